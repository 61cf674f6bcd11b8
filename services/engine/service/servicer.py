"""The Engine gRPC service over a running core (core/step_loop.py).

The servicer only converts messages: each Generate stream's inputs become
commands for the step loop, and each StreamBatch the loop hands back becomes
one EngineStep on that stream, or several when its updates do not fit in one
message of --max-message-bytes. Per-request failures travel in band as
an update with `error` set; the refusal kinds map to gRPC codes in
grpc_utils.GRPC_CODES. `pagewire engine` runs the step loop in a process of
its own (core_process.py); tests may attach one in this process."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Protocol

import grpc
from grpc_status import rpc_status

from pagewire.services.common.errors import DuplicateRequestError, RequestError, invalid_argument
from pagewire.services.common.grpc_utils import to_status
from pagewire.services.common.limits import DEFAULT_MAX_MESSAGE_BYTES
from pagewire.services.common.logging import get_logger
from pagewire.services.common.message_size import entry_bytes, packed_sized, too_large
from pagewire.services.engine.core.engine import EngineInfo, EngineLoad, EngineStats
from pagewire.services.engine.core.sequence import FinishReason, RequestOutput, SamplingParams
from pagewire.services.engine.core.step_loop import AbortCommand, AddCommand, StreamBatch, StreamCommand, StreamState
from pagewire.v1 import common_pb2, engine_pb2, engine_pb2_grpc

SERVICE_NAME = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
LOAD_FIELD = engine_pb2.EngineStep.DESCRIPTOR.fields_by_name["load"].number

log = get_logger("engine")

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
        speculative=get("speculative"),
        logit_bias=tuple(sorted(params.logit_bias.items())),
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
    return engine_pb2.SequenceUpdate(request_id=request_id, finish_reason=finish_reason, error=to_status(error))


def load_to_proto(load: EngineLoad) -> engine_pb2.EngineLoad:
    return engine_pb2.EngineLoad(num_running=load.num_running, num_waiting=load.num_waiting, kv_cache_usage=load.kv_cache_usage)


class CoreHandle(Protocol):
    """What the servicer needs of a running core: a StepLoop in this process
    (tests) or a CoreProcess (`pagewire engine`)."""

    error: BaseException | None

    @property
    def info(self) -> EngineInfo: ...

    async def stats(self) -> EngineStats: ...

    async def lora(self, name: str, path: str | None) -> tuple[str, ...]:
        """Load (path given) or unload a LoRA adapter; the names loaded afterwards, or RequestError."""

    def submit(self, command: object) -> None: ...

    def stop(self) -> None: ...


class EngineServicer(engine_pb2_grpc.EngineServicer):
    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.core: CoreHandle | None = None
        self.max_message_bytes = max_message_bytes
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
        # Requests failed for an update too large to send, aborted in the core:
        # what the core still reports of them is dropped.
        failed: set[str] = set()
        try:
            while True:
                batch = await inbox.get()
                if batch is None:
                    if step_loop.error is not None:
                        await context.abort(grpc.StatusCode.INTERNAL, f"the engine failed: {step_loop.error}")
                    return
                load = load_to_proto(batch.load)
                # Each message holds the load beside as many updates as fit.
                room = self.max_message_bytes - entry_bytes(load, LOAD_FIELD)
                updates = [sized for rid, item in batch.items() if (sized := self._update(rid, item, room, failed, stream, step_loop)) is not None]
                for group in packed_sized(updates, room):
                    yield engine_pb2.EngineStep(updates=group, load=load)
        finally:
            reader.cancel()
            step_loop.submit(StreamCommand("close", stream))

    @staticmethod
    def _update(
        rid: str, item: RequestOutput | RequestError, room: int, failed: set[str], stream: StreamState, step_loop: CoreHandle
    ) -> tuple[engine_pb2.SequenceUpdate, int] | None:
        """The item as an update that fits in `room` bytes, else the request's
        failure (and its abort in the core), with its entry_bytes; None when
        there is nothing to send."""
        if isinstance(item, RequestError):
            update = update_from_error(rid, item)
        elif rid in failed:
            if item.finish_reason is not None:
                failed.discard(rid)
            return None
        else:
            update = update_from_output(rid, item)
            size = entry_bytes(update)
            if size <= room:
                return update, size
            # Only a request id nearly as large as a message, with logprobs, makes one.
            if item.finish_reason is None:
                failed.add(rid)
                step_loop.submit(AbortCommand(stream.stream_id, rid))
            update = update_from_error(rid, too_large("one step's update of this request", size, room))
        size = entry_bytes(update)
        if size > room:
            log.warning("update dropped: its request id leaves no room in a message", request_id_bytes=len(rid.encode()))
            return None
        return update, size

    async def _read_inputs(self, request_iterator: AsyncIterator[engine_pb2.EngineInput], stream: StreamState, step_loop: CoreHandle) -> None:
        try:
            async for message in request_iterator:
                for add in message.add:
                    # Not through timedelta, which overflows on a Duration past the limit the core refuses.
                    timeout_s = add.timeout.ToNanoseconds() / 1e9 if add.HasField("timeout") else None
                    step_loop.submit(
                        AddCommand(
                            stream.stream_id, add.request_id, list(add.prompt_token_ids), self._sampling(add), timeout_s, add.compiled_grammar, add.lora
                        )
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
            kv_cache_dtype=info.kv_cache_dtype,
            quantization=info.quantization,
            tensor_parallel_size=info.tensor_parallel_size,
            weight_bytes_per_rank=info.weight_bytes_per_rank,
            lora_adapters=info.lora_adapters,
        )

    async def LoadLoraAdapter(
        self, request: engine_pb2.LoadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.LoadLoraAdapterResponse:
        if not request.lora_path:
            await context.abort_with_status(rpc_status.to_status(to_status(invalid_argument("lora_path must be non-empty", "lora_path"))))
        return engine_pb2.LoadLoraAdapterResponse(lora_adapters=await self._change_lora(request.lora_name, request.lora_path, context))

    async def UnloadLoraAdapter(
        self, request: engine_pb2.UnloadLoraAdapterRequest, context: grpc.aio.ServicerContext
    ) -> engine_pb2.UnloadLoraAdapterResponse:
        return engine_pb2.UnloadLoraAdapterResponse(lora_adapters=await self._change_lora(request.lora_name, None, context))

    async def _change_lora(self, name: str, path: str | None, context: grpc.aio.ServicerContext) -> tuple[str, ...]:
        core = await self._ready(context)
        try:
            names = await core.lora(name, path)
        except RequestError as error:
            await context.abort_with_status(rpc_status.to_status(to_status(error)))
        log.info("LoRA adapters changed", loaded=list(names), name=name, action="load" if path is not None else "unload")
        return names

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
            spec_decode_draft_tokens_total=stats.spec_decode_draft_tokens_total,
            spec_decode_accepted_tokens_total=stats.spec_decode_accepted_tokens_total,
            spec_decode_accepted_tokens_by_position=stats.spec_decode_accepted_by_position,
            running_lora_adapters=stats.running_lora_adapters,
            waiting_lora_adapters=stats.waiting_lora_adapters,
            max_loras=stats.max_loras,
        )
