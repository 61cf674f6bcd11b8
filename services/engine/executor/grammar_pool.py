"""The matchers of the constrained sequences, spread over worker processes
so that a step's masks are filled on several cores at once, and while the
step thread goes on with the next step. xgrammar's own thread pool does not
spread the fill: threads of one process contend inside the library, where
processes do not.

Each sequence lives in one shard (executor/grammar.py) for its whole life:
a worker process's, or the step thread's own. Sequences go to the worker
with the fewest; the step thread's shard takes them when there are no
workers (--grammar-workers 0) or none has started yet, so the first
constrained requests never wait for a worker to start.

A step's constrained rows are started (`start`) as soon as their outputs
are on the host: each shard gets, for each of its rows, the tokens the
sequence gained since it was last sent and the bitmask row to write, and
writes the masks into a bitmask in shared memory. `fill` waits for them
only when the sampling needs them.

A worker is `python -m` this module, talking over a socket pair: its
settings and then ("add" | "forget" | "step", ...) messages, one reply per
step. It exits when the engine closes the socket or goes away.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import xgrammar

from pagewire.services.common.logging import configure_logging, get_logger
from pagewire.services.engine.executor.grammar import GrammarLoader, GrammarShard, ShardRow, tokenizer_info

log = get_logger("engine")

# A constrained row of a step: its request id and output tokens.
MaskRow = tuple[str, list[int]]

WORKER_MODULE = "pagewire.services.engine.executor.grammar_pool"
# A worker that has not answered a step by then is taken for hung.
WORKER_REPLY_TIMEOUT_S = 60.0
WORKER_START_POLL_S = 0.05


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker is sent first."""

    # Files in shared memory (the message itself stays small, so sending it
    # never waits for the worker to start).
    tokenizer_info_path: str
    bitmask_path: str
    bitmask_rows: int
    bitmask_words: int
    log_level: str
    log_format: str


@dataclass
class GrammarTimings:
    """Where a constrained step's grammar time goes, summed over steps."""

    steps: int = 0
    # The step thread sending the rows.
    start_s: float = 0.0
    # The step thread waiting for the masks.
    wait_s: float = 0.0
    # The slowest worker's own time, from receiving its rows to its reply.
    fill_s: float = 0.0


class WorkerShard:
    """A GrammarShard in a worker process."""

    def __init__(self, index: int, settings: WorkerSettings):
        here, there = socket.socketpair()
        self.process = subprocess.Popen([sys.executable, "-m", WORKER_MODULE, str(there.fileno())], pass_fds=[there.fileno()])
        there.close()
        self.name = f"grammar worker {index} (pid {self.process.pid})"
        self.connection = Connection(here.detach())
        self.connection.send(settings)
        self.ready = False
        self.sequences = 0
        self._reply_due = False

    def poll_ready(self) -> bool:
        """Whether the worker has loaded its settings (it says so once)."""
        if not self.ready and self.connection.poll():
            self._receive()
            self.ready = True
        return self.ready

    def add(self, request_id: str, compiled_grammar: str, stop_token_ids: list[int]) -> None:
        self._send(("add", request_id, compiled_grammar, stop_token_ids))

    def forget(self, request_id: str) -> None:
        self._send(("forget", request_id))

    def step(self, rows: list[ShardRow]) -> None:
        self._send(("step", rows))
        self._reply_due = True

    def _send(self, message: tuple) -> None:
        try:
            self.connection.send(message)
        except OSError:
            raise self._exited() from None

    def wait(self) -> float:
        """The worker's own seconds for the step sent, once it has answered (0.0 when none was)."""
        if not self._reply_due:
            return 0.0
        self._reply_due = False
        seconds = self._receive()
        assert isinstance(seconds, float), f"{self.name} answered a step with {seconds!r}"
        return seconds

    def _receive(self) -> object:
        try:
            if not self.connection.poll(WORKER_REPLY_TIMEOUT_S):
                raise RuntimeError(f"{self.name} did not answer within {WORKER_REPLY_TIMEOUT_S:.0f} s")
            return self.connection.recv()
        except (EOFError, OSError):
            raise self._exited() from None

    def _exited(self) -> RuntimeError:
        return RuntimeError(f"{self.name} exited (code {self.process.poll()}); structured output cannot go on")

    def close(self) -> None:
        try:
            self.connection.close()
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()


class LocalShard:
    """A GrammarShard in the step thread: a step is written as it is sent."""

    def __init__(self, shard: GrammarShard):
        self.shard = shard
        self.sequences = 0

    def add(self, request_id: str, compiled_grammar: str, stop_token_ids: list[int]) -> None:
        self.shard.add(request_id, compiled_grammar, stop_token_ids)

    def forget(self, request_id: str) -> None:
        self.shard.forget(request_id)

    def step(self, rows: list[ShardRow]) -> None:
        self.shard.step(rows)

    def wait(self) -> float:
        return 0.0


@dataclass(slots=True)
class SentOutput:
    """What a sequence's shard has been sent of its output: how many tokens,
    and the newest (it stands for the prefix: an output only grows while
    its sequence lives, except when a stop drops tokens)."""

    shard: WorkerShard | LocalShard
    count: int = 0
    last: int = -1

    def row(self, request_id: str, output_token_ids: list[int], row: int) -> ShardRow:
        """The shard's row for this output, and the output taken as sent."""
        count, keep = len(output_token_ids), self.count
        if keep and (count < keep or output_token_ids[keep - 1] != self.last):
            keep = 0
        self.count = count
        self.last = output_token_ids[-1] if count else -1
        return (request_id, keep, output_token_ids[keep:], row)


class GrammarMatchers:
    """The constrained sequences' matchers and their masks, by request id;
    used by the step thread only. Starts its tokenizer and workers on the
    first constrained request."""

    def __init__(self, model: str, max_rows: int, workers: int, log_level: str = "info", log_format: str = "auto", pin_memory: bool = False):
        self._model = model
        # Page-locked, the masks travel to a GPU by DMA without a staging
        # copy. That copy is done before the masks are next written: the
        # engine reads a step's tokens back before it starts the next step's.
        self._pin_memory = pin_memory
        self._registered = False
        self._log = (log_level, log_format)
        self._max_rows = max_rows
        self._num_workers = workers
        self._sent: dict[str, SentOutput] = {}
        self._local: LocalShard | None = None
        self._workers: list[WorkerShard] = []
        self._bitmask = torch.empty(0, dtype=torch.int32)
        # The files the workers map or read at start; unlinked once they all have.
        self._shared_paths: list[str] = []
        # The request ids of the started step, in bitmask row order.
        self._started: list[str] = []
        self.timings = GrammarTimings()

    def __len__(self) -> int:
        """Constrained sequences held."""
        return len(self._sent)

    def start_workers(self, wait_s: float = 0.0) -> None:
        """Load the tokenizer and start the workers now rather than on the
        first constrained request; with wait_s, wait that long at most for
        every worker to take sequences (RuntimeError past it)."""
        if self._local is None:
            self._local = self._start_up()
        deadline = time.monotonic() + wait_s
        while wait_s and not all(worker.poll_ready() for worker in self._workers):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {len(self._workers)} grammar workers did not all start within {wait_s:.0f} s")
            time.sleep(WORKER_START_POLL_S)

    def _start_up(self) -> LocalShard:
        info = tokenizer_info(self._model)
        self._loader = GrammarLoader(info)
        words = xgrammar.get_bitmask_shape(1, info.vocab_size)[1]
        if self._num_workers:
            bitmask_path, info_path = self._shared_file(b""), self._shared_file(info.serialize_json().encode())
            self._bitmask = torch.from_file(bitmask_path, shared=True, size=self._max_rows * words, dtype=torch.int32).view(self._max_rows, words)
            if self._pin_memory:
                self._register_bitmask()
            settings = WorkerSettings(info_path, bitmask_path, self._max_rows, words, *self._log)
            self._workers = [WorkerShard(index, settings) for index in range(self._num_workers)]
            log.info("grammar workers starting", workers=self._num_workers)
        else:
            self._bitmask = torch.zeros(self._max_rows, words, dtype=torch.int32, pin_memory=self._pin_memory)
        return LocalShard(GrammarShard(self._loader, self._bitmask))

    def _shared_file(self, content: bytes) -> str:
        """A new file in shared memory holding content."""
        handle, path = tempfile.mkstemp(prefix="pagewire-grammar-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        with os.fdopen(handle, "wb") as file:
            file.write(content)
        self._shared_paths.append(path)
        return path

    def _unlink_shared_files(self) -> None:
        for path in self._shared_paths:
            os.unlink(path)
        self._shared_paths = []

    def _register_bitmask(self) -> None:
        error = torch.cuda.cudart().cudaHostRegister(self._bitmask.data_ptr(), self._bitmask.nbytes, 0)
        self._registered = int(error) == 0
        if not self._registered:
            log.warning("the grammar bitmask could not be page-locked; its rows are staged for each copy to the GPU", cuda_error=str(error))

    def _shard_for_new_sequence(self) -> WorkerShard | LocalShard:
        self.start_workers()
        assert self._local is not None
        ready = [worker for worker in self._workers if worker.poll_ready()]
        if self._shared_paths and len(ready) == len(self._workers):
            self._unlink_shared_files()
        return min(ready, key=lambda worker: worker.sequences) if ready else self._local

    def add(self, request_id: str, compiled_grammar: str, stop_token_ids: SequenceOf[int]) -> None:
        """Give the request its grammar; INVALID_ARGUMENT when it does not load."""
        shard = self._shard_for_new_sequence()
        self._loader.load(compiled_grammar)
        shard.add(request_id, compiled_grammar, sorted(set(stop_token_ids)))
        shard.sequences += 1
        self._sent[request_id] = SentOutput(shard)

    def forget(self, request_id: str) -> None:
        sent = self._sent.pop(request_id, None)
        if sent is not None:
            sent.shard.forget(request_id)
            sent.shard.sequences -= 1

    def start(self, rows: list[MaskRow]) -> None:
        """Start bringing these (request id, output tokens) rows' matchers to
        their outputs and writing their next masks, row i of the bitmask
        for the i-th; the workers' share runs while the caller goes on."""
        self.wait()
        began = time.perf_counter()
        if len(rows) > self._max_rows:
            raise RuntimeError(f"a step has {len(rows)} constrained rows, more than the {self._max_rows} the grammar bitmask holds")
        by_shard: dict[WorkerShard | LocalShard, list[ShardRow]] = {shard: [] for shard in self._shards()}
        for index, (request_id, output_token_ids) in enumerate(rows):
            sent = self._sent[request_id]
            by_shard[sent.shard].append(sent.row(request_id, output_token_ids, index))
        # The workers' first (the local shard is last), so they fill while the step thread writes its own share.
        for shard, shard_rows in by_shard.items():
            if shard_rows:
                shard.step(shard_rows)
        self._started = [request_id for request_id, _ in rows]
        self.timings.steps += 1
        self.timings.start_s += time.perf_counter() - began

    def _shards(self) -> list[WorkerShard | LocalShard]:
        assert self._local is not None
        return [*self._workers, self._local]

    def wait(self) -> None:
        """Wait for the started step's masks."""
        began = time.perf_counter()
        fill_s = max((worker.wait() for worker in self._workers), default=0.0)
        if fill_s:
            self.timings.fill_s += fill_s
            self.timings.wait_s += time.perf_counter() - began

    def fill(self, rows: list[MaskRow]) -> torch.Tensor:
        """[len(rows), words] int32 bitmask on the host, a row per (request id,
        output tokens): bit t of a row set when token t may come next. The
        started step's masks serve the rows it started (a step's rows only
        lose sequences between start and fill, which end meanwhile)."""
        request_ids = [request_id for request_id, _ in rows]
        if request_ids != self._started and not set(request_ids) <= set(self._started):
            self.start(rows)
        self.wait()
        started, self._started = self._started, []
        if request_ids == started:
            return self._bitmask[: len(rows)]
        index_of = {request_id: index for index, request_id in enumerate(started)}
        return self._bitmask[[index_of[request_id] for request_id in request_ids]]

    def close(self) -> None:
        for worker in self._workers:
            worker.close()
        self._workers = []
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._bitmask.data_ptr())
            self._registered = False
        self._unlink_shared_files()


def main() -> int:
    """A worker: python -m pagewire.services.engine.executor.grammar_pool FD"""
    # Ctrl-C reaches the whole process group; the engine decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    connection = Connection(int(sys.argv[1]))
    settings: WorkerSettings = connection.recv()
    configure_logging(settings.log_level, settings.log_format, service="engine")
    torch.set_num_threads(1)
    rows, words = settings.bitmask_rows, settings.bitmask_words
    bitmask = torch.from_file(settings.bitmask_path, shared=True, size=rows * words, dtype=torch.int32).view(rows, words)
    with open(settings.tokenizer_info_path, encoding="utf-8") as info:
        shard = GrammarShard(GrammarLoader(xgrammar.TokenizerInfo.deserialize_json(info.read())), bitmask)
    connection.send("ready")
    handlers = {"add": shard.add, "forget": shard.forget, "step": shard.step}
    while True:
        try:
            kind, *args = connection.recv()
        except EOFError:
            return 0
        began = time.perf_counter()
        handlers[kind](*args)
        if kind == "step":
            connection.send(time.perf_counter() - began)


if __name__ == "__main__":
    sys.exit(main())
