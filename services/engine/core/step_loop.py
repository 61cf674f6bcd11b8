"""The step loop: the one thread that owns an EngineCore. Many streams share
the core: their commands (add, abort, input done, close) arrive on a queue,
are applied between steps, and after every step each stream that had an
update is handed one StreamBatch. Nothing here knows the transport: the
servicer (service/servicer.py) turns batches into messages, and
service/core_process.py runs this loop in a process of its own."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pagewire.services.common.errors import DuplicateRequestError, Refusal, RequestError
from pagewire.services.common.logging import get_logger
from pagewire.services.engine.core.engine import EngineCore, EngineInfo, EngineLoad, EngineStats
from pagewire.services.engine.core.sequence import RequestOutput, SamplingParams

log = get_logger("engine")

IDLE_WAIT_S = 0.5


@dataclass(slots=True)
class StreamBatch:
    """What one step did for one stream's requests. Most updates are one
    token and nothing else ("plain"): those come as two flat lists, the
    caller's request ids and their tokens, which the step thread fills and
    pickles (service/core_process.py) in a fraction of the time an object
    each takes. The rest (ends, logprobs, refusals, several tokens) come as
    (request id, output or error) in `updates`, read first: a request has at
    most one output a step, and its refusal comes before it."""

    load: EngineLoad | None = None
    updates: list[tuple[str, RequestOutput | RequestError]] = field(default_factory=list)
    plain_ids: list[str] = field(default_factory=list)
    plain_tokens: list[int] = field(default_factory=list)

    def add(self, request_id: str, item: RequestOutput | RequestError) -> None:
        # Plain: one token and nothing else (every field PLAIN_OUTPUT_FIELDS
        # names at its default but the id and the token). Tested inline, as
        # the step thread asks it of every output.
        if (
            type(item) is RequestOutput and item.finish_reason is None and item.num_prompt_tokens is None and len(item.new_token_ids) == 1
            and not item.logprobs and item.matched_stop_token_id is None and item.num_cached_tokens is None and item.queue_time_s is None
        ):  # fmt: skip
            self.plain_ids.append(request_id)
            self.plain_tokens.append(item.new_token_ids[0])
        else:
            self.updates.append((request_id, item))

    def items(self) -> Iterator[tuple[str, RequestOutput | RequestError]]:
        """Every update as (the caller's request id, output or error), in the order to send them."""
        yield from self.updates
        for request_id, token in zip(self.plain_ids, self.plain_tokens):
            yield request_id, RequestOutput(request_id, [token])


# What StreamBatch.add reads of a RequestOutput to call it plain: a field
# added there must be added here, or a plain update would lose it (a test
# holds the two together).
PLAIN_OUTPUT_FIELDS = ("request_id", "new_token_ids", "logprobs", "finish_reason", "matched_stop_token_id", "num_prompt_tokens",
                       "num_cached_tokens", "queue_time_s")  # fmt: skip


@dataclass
class StreamState:
    """A Generate stream as the step thread sees it. `deliver` is called from
    the step thread with a StreamBatch, or None once the stream is done."""

    stream_id: int
    deliver: Callable[[StreamBatch | None], None]
    # Caller's request id -> the core's (engine-wide unique) id.
    live: dict[str, str] = field(default_factory=dict)
    input_done: bool = False


@dataclass
class AddCommand:
    stream_id: int
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams | RequestError
    timeout_s: float | None
    # Serialized xgrammar CompiledGrammar (structured output); empty: none.
    compiled_grammar: str = ""
    # The LoRA adapter to run with; empty: the base model.
    lora: str = ""


@dataclass
class AbortCommand:
    stream_id: int
    request_id: str


@dataclass
class LoraCommand:
    """Load (with a path) or unload (path None) a LoRA adapter between steps.
    `reply` is called from the step thread with the adapter names loaded
    afterwards, or the RequestError that refused it."""

    name: str
    path: str | None
    reply: Callable[[tuple[str, ...] | RequestError], None]


@dataclass
class LoraInstall:
    """An adapter read off the step thread (LoraCommand), installed between steps."""

    name: str
    adapter: object
    reply: Callable[[tuple[str, ...] | RequestError], None]


@dataclass
class StreamCommand:
    """Open a stream, mark its input finished, or close it (aborting its requests)."""

    kind: str
    stream: StreamState


class StepLoop:
    """The thread that owns the EngineCore. `on_error` hears of a step that raised
    before the streams are ended."""

    def __init__(self, core: EngineCore, on_error: Callable[[BaseException], None] = lambda exc: None):
        self.core = core
        self._on_error = on_error
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.streams: dict[int, StreamState] = {}
        # Core id -> (stream id, caller's request id).
        self.owners: dict[str, tuple[int, str]] = {}
        self._core_ids = itertools.count()
        # Set when a step raised: the core's state is unknown, so nothing more runs.
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Step on a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="engine-step-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the loop to stop after its step; wait for it when start() gave it a thread."""
        self._stopping.set()
        self.commands.put(None)
        if self._thread is not None:
            self._thread.join()

    def submit(self, command: object) -> None:
        self.commands.put(command)

    @property
    def info(self) -> EngineInfo:
        return self.core.info

    async def stats(self) -> EngineStats:
        return self.core.stats()

    async def lora(self, name: str, path: str | None) -> tuple[str, ...]:
        """Load (path given) or unload an adapter; the names loaded afterwards, or RequestError."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[str, ...]] = loop.create_future()
        self.submit(LoraCommand(name, path, lambda result: loop.call_soon_threadsafe(settle, done, result)))
        return await done

    def run(self) -> None:
        """Step on the calling thread until stop() or a failed step."""
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception as exc:
                log.exception("engine step loop failed")
                self.error = exc
                self._on_error(exc)
                self._fail_all_streams()
                return

    def run_once(self) -> None:
        """Apply the commands waiting (waiting for one when the core is
        idle), step once, and hand each stream its batch."""
        pending: dict[int, StreamBatch] = {}
        self._apply_commands(pending)
        if self.core.has_unfinished():
            for output in self.core.step():
                self._route(output, pending)
        if pending:
            load = self.core.load()
            for stream_id, batch in pending.items():
                stream = self.streams.get(stream_id)
                if stream is not None:
                    batch.load = load
                    stream.deliver(batch)
        # After the deliveries, so a stream's last updates precede its end.
        for stream in [s for s in self.streams.values() if s.input_done and not s.live]:
            del self.streams[stream.stream_id]
            stream.deliver(None)

    def _apply_commands(self, pending: dict[int, StreamBatch]) -> None:
        block = not self.core.has_unfinished()
        while True:
            try:
                command = self.commands.get(timeout=IDLE_WAIT_S) if block else self.commands.get_nowait()
            except queue.Empty:
                return
            block = False
            if command is None:
                return
            self._apply(command, pending)

    def _apply(self, command: object, pending: dict[int, StreamBatch]) -> None:
        if isinstance(command, StreamCommand):
            stream = command.stream
            if command.kind == "open":
                self.streams[stream.stream_id] = stream
            elif command.kind == "input_done":
                stream.input_done = True
            elif command.kind == "close":
                for core_id in stream.live.values():
                    self.core.abort(core_id)
                self.streams.pop(stream.stream_id, None)
                stream.live.clear()
            return
        if isinstance(command, LoraCommand) and command.path is not None:
            # Reading an adapter from disk takes long enough to stall the running requests' steps.
            threading.Thread(target=self._read_lora, args=(command, command.path), name="lora-reader", daemon=True).start()
            return
        if isinstance(command, (LoraCommand, LoraInstall)):
            command.reply(self._apply_lora(command))
            return
        stream = self.streams.get(command.stream_id)
        if stream is None:
            return
        if isinstance(command, AbortCommand):
            core_id = stream.live.get(command.request_id)
            if core_id is not None:
                self.core.abort(core_id)
            return
        error = self._add(stream, command)
        if error is not None:
            log.info("request refused", request_id=command.request_id, reason=error.message)
            pending.setdefault(stream.stream_id, StreamBatch()).add(command.request_id, error)

    def _read_lora(self, command: LoraCommand, path: str) -> None:
        try:
            adapter = self.core.read_lora_adapter(command.name, path)
        except RequestError as error:
            log.info("LoRA adapter refused", name=command.name, reason=error.message)
            command.reply(error)
        except Exception as exc:  # an unreadable file: the caller hears why, the engine goes on
            log.exception("LoRA adapter failed to load", name=command.name)
            command.reply(RequestError(Refusal.INTERNAL, f"LoRA adapter {command.name!r} failed to load: {type(exc).__name__}: {exc}"))
        else:
            self.submit(LoraInstall(command.name, adapter, command.reply))

    def _apply_lora(self, command: LoraCommand | LoraInstall) -> tuple[str, ...] | RequestError:
        """Unload, or install a read adapter, between steps."""
        try:
            if isinstance(command, LoraInstall):
                self.core.install_lora_adapter(command.name, command.adapter)
            else:
                self.core.unload_lora_adapter(command.name)
        except RequestError as error:
            log.info("LoRA adapter change refused", name=command.name, reason=error.message)
            return error
        return self.core.lora_adapter_names

    def _add(self, stream: StreamState, command: AddCommand) -> RequestError | None:
        if isinstance(command.sampling, RequestError):
            return command.sampling
        if command.request_id in stream.live:
            return DuplicateRequestError(f"request id {command.request_id!r} is already live on this stream; the earlier request continues")
        core_id = f"{stream.stream_id}/{next(self._core_ids)}"
        try:
            self.core.add_request(
                core_id, command.prompt_token_ids, command.sampling, command.timeout_s, command.compiled_grammar, command.lora
            )
        except RequestError as error:
            return error
        stream.live[command.request_id] = core_id
        self.owners[core_id] = (stream.stream_id, command.request_id)
        return None

    def _route(self, output: RequestOutput, pending: dict[int, StreamBatch]) -> None:
        owner = self.owners.get(output.request_id)
        if owner is None:
            return
        stream_id, request_id = owner
        if output.finish_reason is not None:
            del self.owners[output.request_id]
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.live.pop(request_id, None)
        if stream_id in self.streams:
            batch = pending.get(stream_id)
            if batch is None:
                batch = pending[stream_id] = StreamBatch()
            batch.add(request_id, output)

    def _fail_all_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.deliver(None)
        self.streams.clear()


def settle(future: asyncio.Future, result: object) -> None:
    """Resolve future with result, or fail it when result is an exception (e.g. a refusal)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
