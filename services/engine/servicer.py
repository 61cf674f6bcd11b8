"""The Engine gRPC service over one EngineCore.

Many Generate streams share the core. A step thread (StepLoop) owns the
core: the asyncio side only converts messages and queues commands (add,
abort, input done, close) for it; after every step the thread hands each
stream that had an update one batch, which becomes exactly one EngineStep on
that stream. Per-request failures travel in band as an update with `error`
set. `pagewire engine` runs the StepLoop in a process of its own
(core_process.py); tests may attach one in this process."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from services.common.grpc_utils import DuplicateRequestError, RequestError, invalid_argument
from services.common.logging import get_logger
from services.common.pb.pagewire.v1 import common_pb2, engine_pb2, engine_pb2_grpc
from services.engine.engine import EngineCore, EngineInfo, EngineLoad, EngineStats
from services.engine.sequence import FinishReason, RequestOutput, SamplingParams

log = get_logger("engine")

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
IDLE_WAIT_S = 0.5

FINISH_REASONS = {
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
    FinishReason.TIME_LIMIT: common_pb2.FINISH_REASON_TIME_LIMIT,
}


def sampling_from_proto(params: common_pb2.SamplingParams) -> SamplingParams:
    """Proto -> core dataclass; unset optional fields take the documented defaults."""
    defaults = SamplingParams()

    def get(name: str):
        return getattr(params, name) if params.HasField(name) else getattr(defaults, name)

    return SamplingParams(
        temperature=get("temperature"),
        top_p=get("top_p"),
        top_k=get("top_k"),
        min_p=get("min_p"),
        seed=get("seed"),
        repetition_penalty=get("repetition_penalty"),
        presence_penalty=get("presence_penalty"),
        frequency_penalty=get("frequency_penalty"),
        max_tokens=get("max_tokens"),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=get("logprobs"),
        n=get("n"),
    )


def update_from_output(request_id: str, output: RequestOutput) -> engine_pb2.SequenceUpdate:
    update = engine_pb2.SequenceUpdate(request_id=request_id, token_ids=output.new_token_ids)
    for lp in output.logprobs:
        update.logprobs.append(
            common_pb2.TokenLogprob(
                token_id=lp.token_id,
                logprob=lp.logprob,
                top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
        )
    if output.finish_reason is not None:
        update.finish_reason = FINISH_REASONS[output.finish_reason]
    if output.matched_stop_token_id is not None:
        update.matched_stop_token_id = output.matched_stop_token_id
    if output.num_prompt_tokens is not None:
        update.num_prompt_tokens = output.num_prompt_tokens
        update.num_cached_tokens = output.num_cached_tokens or 0
        update.queue_time_s = output.queue_time_s or 0.0
    return update


def update_from_error(request_id: str, error: RequestError) -> engine_pb2.SequenceUpdate:
    ends = not isinstance(error, DuplicateRequestError)
    finish_reason = common_pb2.FINISH_REASON_ERROR if ends else common_pb2.FINISH_REASON_UNSPECIFIED
    return engine_pb2.SequenceUpdate(request_id=request_id, finish_reason=finish_reason, error=error.to_status())


def load_to_proto(load: EngineLoad) -> engine_pb2.EngineLoad:
    return engine_pb2.EngineLoad(num_running=load.num_running, num_waiting=load.num_waiting, kv_cache_usage=load.kv_cache_usage)


@dataclass
class StreamBatch:
    """What one step did for one stream's requests: (request id, output or error)."""

    updates: list[tuple[str, RequestOutput | RequestError]]
    load: EngineLoad


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


@dataclass
class AbortCommand:
    stream_id: int
    request_id: str


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
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.commands.put(None)
        self._thread.join()

    def submit(self, command: object) -> None:
        self.commands.put(command)

    @property
    def info(self) -> EngineInfo:
        return self.core.info

    async def stats(self) -> EngineStats:
        return self.core.stats()

    def _run(self) -> None:
        while not self._stopping.is_set():
            pending: dict[int, list[tuple[str, RequestOutput | RequestError]]] = {}
            try:
                self._apply_commands(pending)
                if self.core.has_unfinished():
                    for output in self.core.step():
                        self._route(output, pending)
            except Exception as exc:
                log.exception("engine step loop failed")
                self.error = exc
                self._on_error(exc)
                self._fail_all_streams()
                return
            if pending:
                load = self.core.load()
                for stream_id, updates in pending.items():
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        stream.deliver(StreamBatch(updates, load))
            # After the deliveries, so a stream's last updates precede its end.
            for stream in [s for s in self.streams.values() if s.input_done and not s.live]:
                del self.streams[stream.stream_id]
                stream.deliver(None)

    def _apply_commands(self, pending: dict[int, list]) -> None:
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

    def _apply(self, command: object, pending: dict[int, list]) -> None:
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
            pending.setdefault(stream.stream_id, []).append((command.request_id, error))

    def _add(self, stream: StreamState, command: AddCommand) -> RequestError | None:
        if isinstance(command.sampling, RequestError):
            return command.sampling
        if command.request_id in stream.live:
            return DuplicateRequestError(f"request id {command.request_id!r} is already live on this stream; the earlier request continues")
        core_id = f"{stream.stream_id}/{next(self._core_ids)}"
        try:
            self.core.add_request(core_id, command.prompt_token_ids, command.sampling, command.timeout_s)
        except RequestError as error:
            return error
        stream.live[command.request_id] = core_id
        self.owners[core_id] = (stream.stream_id, command.request_id)
        return None

    def _route(self, output: RequestOutput, pending: dict[int, list]) -> None:
        owner = self.owners.get(output.request_id)
        if owner is None:
            return
        stream_id, request_id = owner
        if output.finished:
            del self.owners[output.request_id]
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.live.pop(request_id, None)
        if stream_id in self.streams:
            pending.setdefault(stream_id, []).append((request_id, output))

    def _fail_all_streams(self) -> None:
        for stream in list(self.streams.values()):
            stream.deliver(None)
        self.streams.clear()


class CoreHandle(Protocol):
    """What the servicer needs of a running core: a StepLoop in this process
    (tests) or a CoreProcess (`pagewire engine`)."""

    error: BaseException | None

    @property
    def info(self) -> EngineInfo: ...

    async def stats(self) -> EngineStats: ...

    def submit(self, command: object) -> None: ...

    def stop(self) -> None: ...


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self) -> None:
        self.core: CoreHandle | None = None
        self._stream_ids = itertools.count()

    def attach(self, core: CoreHandle) -> None:
        """Start serving with a running core (RPCs before this get UNAVAILABLE)."""
        self.core = core

    def stop(self) -> None:
        if self.core is not None:
            self.core.stop()

    async def _ready(self, context: grpc.aio.ServicerContext) -> CoreHandle:
        if self.core is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is still loading its model")
        if self.core.error is not None:
            await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {self.core.error}")
        return self.core

    async def Generate(
        self, request_iterator: AsyncIterator[engine_pb2.EngineInput], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[engine_pb2.EngineStep]:
        step_loop = await self._ready(context)
        event_loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[StreamBatch | None] = asyncio.Queue()

        def deliver(batch: StreamBatch | None) -> None:
            try:
                event_loop.call_soon_threadsafe(inbox.put_nowait, batch)
            except RuntimeError:
                pass  # the event loop is gone: the server is shutting down

        stream = StreamState(next(self._stream_ids), deliver)
        step_loop.submit(StreamCommand("open", stream))
        reader = asyncio.create_task(self._read_inputs(request_iterator, stream, step_loop))
        try:
            while True:
                batch = await inbox.get()
                if batch is None:
                    if step_loop.error is not None:
                        await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {step_loop.error}")
                    return
                updates = [
                    update_from_error(rid, item) if isinstance(item, RequestError) else update_from_output(rid, item)
                    for rid, item in batch.updates
                ]
                yield engine_pb2.EngineStep(updates=updates, load=load_to_proto(batch.load))
        finally:
            reader.cancel()
            step_loop.submit(StreamCommand("close", stream))

    async def _read_inputs(self, request_iterator: AsyncIterator[engine_pb2.EngineInput], stream: StreamState, step_loop: CoreHandle) -> None:
        try:
            async for message in request_iterator:
                for add in message.add:
                    timeout_s = add.timeout.ToTimedelta().total_seconds() if add.HasField("timeout") else None
                    step_loop.submit(
                        AddCommand(stream.stream_id, add.request_id, list(add.prompt_token_ids), self._sampling(add), timeout_s)
                    )
                for request_id in message.abort:
                    step_loop.submit(AbortCommand(stream.stream_id, request_id))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            return
        step_loop.submit(StreamCommand("input_done", stream))

    @staticmethod
    def _sampling(add: engine_pb2.AddRequest) -> SamplingParams | RequestError:
        if not add.request_id:
            return invalid_argument("request_id must be non-empty")
        return sampling_from_proto(add.sampling)

    async def Info(self, request: engine_pb2.EngineInfoRequest, context: grpc.aio.ServicerContext) -> engine_pb2.EngineInfo:
        info = (await self._ready(context)).info
        return engine_pb2.EngineInfo(
            model_id=info.model_id,
            max_model_len=info.max_model_len,
            block_size=info.block_size,
            num_kv_blocks=info.num_kv_blocks,
            max_num_seqs=info.max_num_seqs,
            max_num_batched_tokens=info.max_num_batched_tokens,
            vocab_size=info.vocab_size,
            eos_token_ids=info.eos_token_ids,
            device=info.device,
            dtype=info.dtype,
            prefix_caching=info.prefix_caching,
        )

    async def Stats(self, request: engine_pb2.EngineStatsRequest, context: grpc.aio.ServicerContext) -> engine_pb2.EngineStats:
        stats = await (await self._ready(context)).stats()
        return engine_pb2.EngineStats(
            load=load_to_proto(stats.load),
            num_total_blocks=stats.num_total_blocks,
            num_free_blocks=stats.num_free_blocks,
            num_cached_free_blocks=stats.num_cached_free_blocks,
            prefix_cache_queried_tokens=stats.prefix_cache_queried_tokens,
            prefix_cache_hit_tokens=stats.prefix_cache_hit_tokens,
            num_preemptions=stats.num_preemptions,
            prompt_tokens_total=stats.prompt_tokens_total,
            generation_tokens_total=stats.generation_tokens_total,
            requests_finished_total=stats.requests_finished_total,
            steps_total=stats.steps_total,
        )
