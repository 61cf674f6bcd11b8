"""The engine core in a process of its own, behind a pipe.

The gRPC server and the step loop used to share one interpreter, so every
step's host work (scheduling, batch staging, sampling) waited whenever the
server's threads held the GIL to read, convert and send messages; on an H100
that cost about 3 ms of a 7-10 ms decode step. Here the core and its
StepLoop run in a spawned child with a GIL of their own; the server process
only forwards commands and per-step batches (pickled, ~0.2 ms a step for
256 requests).

Parent -> child: ("stream", action, stream_id), ("command", Add/AbortCommand),
("stats", ticket), ("lora", ticket, name, path or None), ("stop",). Child ->
parent: ("ready", EngineInfo) or ("failed", why) once, then ("batch",
stream_id, StreamBatch | None), ("stats", ticket, EngineStats), ("lora",
ticket, adapter names | RequestError) and ("error", why) if a step raised.
A StreamBatch crosses the pipe as it is: its plain updates are flat lists,
which pickle in a twentieth of the time an object each takes (256 updates:
11 against 226 us, on the step loop's thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import itertools
import multiprocessing
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from pagewire.services.common.logging import configure_logging, get_logger
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineInfo, EngineStats
from pagewire.services.engine.core.step_loop import (
    LoraCommand,
    StepLoop,
    StreamBatch,
    StreamCommand,
    StreamState,
    settle,
)

log = get_logger("engine")

STOP_TIMEOUT_S = 10.0


class CoreProcessError(RuntimeError):
    """The core process failed to start or went away."""


def _child_main(config: EngineConfig, conn: Connection) -> None:
    # Ctrl-C reaches the whole process group; the server decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(config.log_level, config.log_format, service="engine")
    from pagewire.services.engine.executor.model_executor import (
        create_engine_core,
        freeze_long_lived_objects,
    )

    try:
        core = create_engine_core(config)
    except Exception as exc:
        log.exception("engine core failed to load")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    freeze_long_lived_objects()
    send_lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(message)

    step_loop = StepLoop(core, on_error=lambda exc: send(("error", f"{type(exc).__name__}: {exc}")))
    commands = threading.Thread(target=_forward_commands, args=(conn, step_loop, send), name="engine-core-commands", daemon=True)
    commands.start()
    send(("ready", core.info))
    # Steps run on the thread that loaded the model. torch's CPU operators
    # keep an OpenMP thread pool per calling thread; with a second pool
    # libgomp sees more threads than cores and stops its workers spinning
    # between operators, so each of a step's ~1,300 small operators waited
    # on a wake-up (a tenth of every step on a 2-core CPU).
    step_loop.run()
    # After a failed step the server still asks for stats until it stops us.
    commands.join()
    # Frozen objects outlive the interpreter's last collection, and native
    # libraries (triton's bindings) print each one they find alive at exit
    # as a leak: hand them back first.
    gc.unfreeze()


def _forward_commands(conn: Connection, step_loop: StepLoop, send: Callable[[tuple[Any, ...]], None]) -> None:
    """The server's messages, read off the pipe and queued for the step loop,
    which stops when the server says so or goes away."""
    streams: dict[int, StreamState] = {}
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            break  # the server went away
        kind = message[0]
        if kind == "stop":
            break
        if kind == "stats":
            send(("stats", message[1], step_loop.core.stats()))
        elif kind == "lora":
            _, ticket, name, path = message
            step_loop.submit(LoraCommand(name, path, lambda result, ticket=ticket: send(("lora", ticket, result))))
        elif kind == "command":
            step_loop.submit(message[1])
        elif kind == "stream":
            _, action, stream_id = message
            if action == "open":
                streams[stream_id] = StreamState(stream_id, lambda batch, sid=stream_id: send(("batch", sid, batch)))
            stream = streams.pop(stream_id) if action == "close" else streams[stream_id]
            step_loop.submit(StreamCommand(action, stream))
    step_loop.stop()


class CoreProcess:
    """The server side of the core process: what the servicer needs of a core
    (info, stats, submit, error, stop), with StepLoop's command types."""

    def __init__(self, config: EngineConfig, on_lost: Callable[[], None] = lambda: None):
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._child_conn = child_conn
        self.process = context.Process(target=_child_main, args=(config, child_conn), name="pagewire-engine-core", daemon=True)
        self._on_lost = on_lost
        self._send_lock = threading.Lock()
        self._deliveries: dict[int, Callable[[StreamBatch | None], None]] = {}
        # Ticket -> the caller waiting for its stats or LoRA reply.
        self._waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._tickets = itertools.count()
        self._stopping = False
        self.error: BaseException | None = None
        self._info: EngineInfo | None = None
        self._reader = threading.Thread(target=self._read, name="engine-core-reader", daemon=True)

    def start(self) -> EngineInfo:
        """Spawn the child and wait while it loads the model (blocking)."""
        self.process.start()
        self._child_conn.close()
        try:
            message = self._conn.recv()
        except EOFError:
            self.process.join()
            raise CoreProcessError(f"the engine core process exited with code {self.process.exitcode} while loading") from None
        if message[0] == "failed":
            self.process.join()
            raise CoreProcessError(f"the engine core failed to load: {message[1]}")
        self._info = message[1]
        self._reader.start()
        return self._info

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise CoreProcessError("the engine core process has not started")
        return self._info

    def submit(self, command: object) -> None:
        if isinstance(command, StreamCommand):
            stream = command.stream
            if command.kind == "open":
                self._deliveries[stream.stream_id] = stream.deliver
            elif command.kind == "close":
                self._deliveries.pop(stream.stream_id, None)
            self._send(("stream", command.kind, stream.stream_id))
        else:
            self._send(("command", command))

    async def stats(self) -> EngineStats:
        return await self._ask("stats")

    async def lora(self, name: str, path: str | None) -> tuple[str, ...]:
        """Load (path given) or unload an adapter in the core; the names loaded afterwards, or RequestError."""
        names = await self._ask("lora", name, path)
        self._info = dataclasses.replace(self.info, lora_adapters=names)
        return names

    async def _ask(self, kind: str, *args: Any) -> Any:
        if self.error is not None:
            raise self.error
        ticket = next(self._tickets)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        self._waiters[ticket] = (loop, waiter)
        self._send((kind, ticket, *args))
        return await waiter

    def stop(self) -> None:
        self._stopping = True
        try:
            self._send(("stop",))
        except CoreProcessError:
            pass
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            log.warning("engine core did not stop; killing it", pid=self.process.pid)
            self.process.kill()
            self.process.join()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:
            raise CoreProcessError("the engine core process is gone") from exc

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "batch":
                _, stream_id, batch = message
                deliver = self._deliveries.get(stream_id) if batch is not None else self._deliveries.pop(stream_id, None)
                if deliver is not None:
                    deliver(batch)
            elif kind in ("stats", "lora"):
                loop, waiter = self._waiters.pop(message[1])
                loop.call_soon_threadsafe(settle, waiter, message[2])
            elif kind == "error":
                # The core's state is unknown: the server stops, and whatever supervises it starts a fresh one.
                self.error = CoreProcessError(f"an engine step failed: {message[1]}")
                self._on_lost()
        if self._stopping:
            return  # stop() reaps the child
        self.process.join(STOP_TIMEOUT_S)
        self.error = self.error or CoreProcessError(f"the engine core process exited with code {self.process.exitcode}")
        log.error("engine core lost", reason=str(self.error))
        for deliver in list(self._deliveries.values()):
            deliver(None)
        self._deliveries.clear()
        for loop, waiter in self._waiters.values():
            loop.call_soon_threadsafe(settle, waiter, self.error)
        self._on_lost()

