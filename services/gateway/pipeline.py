"""The one request path of the gateway, shared by the gRPC API and the REST shim.

A request goes: validate → Tokenize (unless ids were given) → route to an
engine replica → AddRequest on that replica's Generate stream → per-step
updates, whose new ids go to the tokenizer's Detokenize stream in one batch
per step → text deltas → chunks for the client. Stop strings are matched by
the detokenizer; on a match the request is aborted in the engine.

The per-step path runs in the callbacks of the engine and tokenizer streams,
not in the request's task: a request's text delta becomes its chunk and is
handed to the caller's `emit` as it arrives, so a step of N requests costs N
chunk builds and no task switches. The request's task wakes only for what
needs awaiting: its start, its end, and chunks whose logprobs need token
texts from the tokenizer.

Whatever ends a request early (a Cancel, the client going away, its deadline,
a failure) aborts it in the engine, so its KV blocks are freed, and cancels it
in the detokenizer. That cleanup runs when the chunk iterator closes, so
callers cancel `run` or iterate `chunks` under `contextlib.aclosing`.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc import status_pb2

from pagewire.services.common.errors import RequestError, invalid_argument
from pagewire.services.common.grpc_utils import error_status, to_status
from pagewire.services.common.logging import get_logger
from pagewire.v1 import common_pb2, engine_pb2, gateway_pb2, tokenizer_pb2
from pagewire.services.gateway.clients import EngineReplica, TokenizerClient
from pagewire.services.gateway.connection import Backoff
from pagewire.services.gateway.discovery import EngineDiscovery
from pagewire.services.gateway.metrics import GatewayMetrics
from pagewire.services.gateway.router import Router, RoutingPolicy

log = get_logger("gateway")

FinishReason = common_pb2.FinishReason
UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED

MAX_STOP_STRINGS = 16
MAX_LOGPROBS = 20
# The detokenizer decodes the first output tokens after this many prompt
# tokens, so that they get the spacing they have in context.
PROMPT_TAIL_TOKENS = 8


@dataclass(frozen=True)
class GatewaySettings:
    tokenizer: str
    engines: list[str]
    routing: RoutingPolicy
    affinity_blocks: int
    max_concurrent_requests: int
    channel_options: list[tuple[str, int]]
    backoff: Backoff
    connect_timeout_s: float
    discovery_interval_s: float


Emit = Callable[[gateway_pb2.GenerateChunk], None]


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid_argument(f"{name} must be in {bracket}{low:g}, {high:g}], got {value:g}", field=name)


def validate_request(request: gateway_pb2.GenerateRequest) -> None:
    """Refuse what the protos declare invalid, with a message naming the field."""
    kind = request.WhichOneof("input")
    if kind is None:
        raise invalid_argument("the request has no input: set text, token_ids or chat", field="input")
    if kind == "text" and not request.text:
        raise invalid_argument("text is empty", field="text")
    if kind == "token_ids" and not request.token_ids.ids:
        raise invalid_argument("token_ids is empty", field="token_ids")
    if kind == "chat" and not request.chat.messages:
        raise invalid_argument("chat has no messages", field="messages")
    s = request.sampling
    if s.HasField("temperature"):
        _check_range("temperature", s.temperature, 0, 100)
    if s.HasField("top_p"):
        _check_range("top_p", s.top_p, 0, 1, low_open=True)
    if s.HasField("top_k") and s.top_k < 0:
        raise invalid_argument(f"top_k must be >= 0 (0 = off), got {s.top_k}", field="top_k")
    if s.HasField("min_p"):
        _check_range("min_p", s.min_p, 0, 1)
    if s.HasField("repetition_penalty") and not (math.isfinite(s.repetition_penalty) and s.repetition_penalty > 0):
        raise invalid_argument(f"repetition_penalty must be > 0 (1 = off), got {s.repetition_penalty:g}", field="repetition_penalty")
    if s.HasField("presence_penalty"):
        _check_range("presence_penalty", s.presence_penalty, -2, 2)
    if s.HasField("frequency_penalty"):
        _check_range("frequency_penalty", s.frequency_penalty, -2, 2)
    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise invalid_argument(f"max_tokens must be >= 1, got {s.max_tokens}", field="max_tokens")
    if s.HasField("logprobs") and s.logprobs > MAX_LOGPROBS:
        raise invalid_argument(f"logprobs must be at most {MAX_LOGPROBS}, got {s.logprobs}", field="logprobs")
    if s.HasField("n") and s.n != 1:
        raise invalid_argument(f"n must be 1 (one completion per request), got {s.n}; send several requests instead", field="n")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise invalid_argument(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(request.stop)}", field="stop")
    if any(not stop for stop in request.stop):
        raise invalid_argument("stop strings must not be empty", field="stop")
    if request.timeout.seconds < 0 or request.timeout.nanos < 0:
        raise invalid_argument("timeout must not be negative", field="timeout")


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("connection task failed", task=task.get_name(), error=repr(task.exception()))


class Gateway:
    """Connections to the tokenizer and the engine replicas, and the requests
    riding on them, keyed by an id unique across all clients."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics):
        self.settings = settings
        self.metrics = metrics
        self.discovery = EngineDiscovery(settings.engines, settings.discovery_interval_s)
        self.tokenizer = TokenizerClient(
            settings.tokenizer, settings.channel_options, settings.backoff, settings.connect_timeout_s, self._on_text, self._on_tokenizer_down
        )
        self.replicas: dict[str, EngineReplica] = {}
        self._replica_tasks: dict[str, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self.router = Router([], settings.routing, settings.affinity_blocks)
        self.live: dict[str, GatewayRequest] = {}
        self.active = 0

    async def run(self) -> None:
        """Keep the tokenizer and every discovered replica connected until cancelled."""
        tokenizer = asyncio.ensure_future(self.tokenizer.run())
        try:
            async for change in self.discovery.watch():
                for address in change.removed:
                    log.info("engine replica left the replica set: no new requests go to it", peer=address)
                    retiring = asyncio.create_task(self._retire(self.replicas.pop(address), self._replica_tasks.pop(address)))
                    self._retiring.add(retiring)
                    retiring.add_done_callback(self._retiring.discard)
                for address in sorted(change.added):
                    self.replicas[address] = EngineReplica(
                        address, self.settings.channel_options, self.settings.backoff, self.settings.connect_timeout_s, self._on_step, self._on_replica_down
                    )
                    self._replica_tasks[address] = asyncio.create_task(self.replicas[address].run(), name=f"engine {address}")
                    self._replica_tasks[address].add_done_callback(_report_crash)
                self.router.replicas = [replica.state for replica in self.replicas.values()]
            await tokenizer
        finally:
            tasks = [tokenizer, *self._replica_tasks.values(), *self._retiring]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @staticmethod
    async def _retire(replica: EngineReplica, connection: asyncio.Task[None]) -> None:
        """Let a replica that left the replica set finish this gateway's
        requests (a deleted pod drains), then close its stream."""
        await replica.idle()
        connection.cancel()

    @property
    def ready(self) -> bool:
        return self.tokenizer.available and any(r.state.available for r in self.replicas.values())

    def models(self) -> list[gateway_pb2.ModelCard]:
        return [gateway_pb2.ModelCard(id=info.model_id, max_model_len=info.max_model_len, owned_by="pagewire") for info in self.router.served_models()]

    def request(self, request: gateway_pb2.GenerateRequest) -> GatewayRequest:
        """A handle on a new request; nothing happens until its chunks are read."""
        return GatewayRequest(self, request)

    async def refresh_engine_stats(self, timeout_s: float) -> None:
        """Fetch Stats from every connected replica into the metrics."""

        async def one(replica: EngineReplica) -> None:
            try:
                self.metrics.observe_stats(replica.address, await replica.stats(timeout_s))
            except (RequestError, grpc.aio.AioRpcError) as exc:
                log.warning("engine stats unavailable", peer=replica.address, error=str(exc))

        await asyncio.gather(*(one(r) for r in self.replicas.values() if r.state.available))

    def _on_step(self, replica: EngineReplica, step: engine_pb2.EngineStep) -> None:
        self.metrics.observe_load(replica.address, step.load)
        # Built in place: a step carries an item per running request.
        batch = tokenizer_pb2.DetokenizeBatch()
        for update in step.updates:
            request = self.live.get(update.request_id)
            if request is None:
                continue
            request.apply_engine_update(update)
            token_ids, finished = update.token_ids, update.finish_reason != UNFINISHED
            if request.detokenizing and (token_ids or finished) and not update.error.code:
                append = batch.items.add(request_id=update.request_id).append
                append.token_ids.extend(token_ids)
                append.last = finished
        if batch.items:
            try:
                self.tokenizer.send_detokenize(batch)
            except RequestError:
                pass  # the tokenizer-down callback fails these requests

    def _on_text(self, delta: tokenizer_pb2.TextDelta) -> None:
        request = self.live.get(delta.request_id)
        if request is not None:
            request.apply_text(delta)

    def _on_replica_down(self, replica: EngineReplica, reason: str) -> None:
        self.metrics.forget_replica(replica.address)
        status = error_status(grpc.StatusCode.UNAVAILABLE, f"engine replica {replica.address} went away ({reason}); retry the request")
        for request in self.live.values():
            # A request the engine had finished only waits for its last text.
            if request.replica is replica and not request.engine_done:
                request.fail(status)

    def _on_tokenizer_down(self, reason: str) -> None:
        status = error_status(grpc.StatusCode.UNAVAILABLE, f"the tokenizer service went away ({reason}); retry the request")
        for request in self.live.values():
            if request.detokenizing:
                request.detokenizing = False
                request.fail(status)


class GatewayRequest:
    """One request from arrival to its last chunk."""

    def __init__(self, gateway: Gateway, request: gateway_pb2.GenerateRequest):
        self.gateway = gateway
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.arrival = self.loop.time()
        self.id = request.request_id or f"req-{uuid.uuid4().hex}"
        # Client ids are unique per client stream only; the peers see this one.
        self.internal_id = uuid.uuid4().hex
        # The request's own timeout; an RPC deadline ends the RPC instead,
        # which cancels the request's task and so aborts the request.
        self.deadline = self.arrival + request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
        # Set when the request's task has something to await or send: its
        # end, or output whose chunk needs token texts.
        self._wake = asyncio.Event()
        self._emit: Emit | None = None
        # Chunks with logprobs wait in the task for their token texts; all
        # others are sent from the stream callbacks as their text arrives.
        self._wants_logprobs = request.sampling.HasField("logprobs")
        self.log = log.bind(request_id=self.id, internal_id=self.internal_id)
        self.replica: EngineReplica | None = None
        self.detokenizing = False
        self.engine_done = False
        self.engine_reason = UNFINISHED
        self.engine_stop_token: int | None = None
        self.finish_reason = UNFINISHED
        self.matched_stop = ""
        self.error: status_pb2.Status | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._text: list[str] = []
        self._ids: list[int] = []
        self._logprobs: list[common_pb2.TokenLogprob] = []

    def cancel(self) -> None:
        """Finish the request as CANCELLED (a no-op once it has finished)."""
        if self.finish_reason == UNFINISHED:
            self._finish(common_pb2.FINISH_REASON_CANCELLED)

    def fail(self, status: status_pb2.Status) -> None:
        """Finish the request with an error (a no-op once it has finished)."""
        if self.finish_reason == UNFINISHED:
            self._fail(status)

    async def run(self, emit: Emit) -> None:
        """Serve the request to its end, handing each chunk to `emit`; the last
        one carries the finish reason and usage (and the error, when it
        failed). Cancelling the task ends the request and frees what it holds."""
        self._emit = emit
        self.gateway.active += 1
        try:
            try:
                validate_request(self.request)
                model = self.gateway.router.resolve_model(self.request.model)
                if self.gateway.active > self.gateway.settings.max_concurrent_requests:
                    raise RequestError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the gateway has {self.gateway.settings.max_concurrent_requests} requests in flight (--max-concurrent-requests); retry later",
                    )
                async with asyncio.timeout_at(self.deadline):
                    prompt = await self._prompt_ids()
                    if self.finish_reason == UNFINISHED:
                        self._submit(model, prompt)
                    while self.finish_reason == UNFINISHED:
                        await self._wake.wait()
                        self._wake.clear()
                        if self.finish_reason == UNFINISHED and (chunk := await self._take_chunk()) is not None:
                            emit(chunk)
                    final = await self._take_chunk()
                assert final is not None
                emit(final)
                return
            except RequestError as exc:
                self._fail(to_status(exc))
            except TimeoutError:
                self._finish(common_pb2.FINISH_REASON_TIME_LIMIT)
            final = await self._take_chunk(fill_token_text=False)
            assert final is not None
            emit(final)
        finally:
            self.gateway.active -= 1
            self._release()

    async def chunks(self) -> AsyncIterator[gateway_pb2.GenerateChunk]:
        """`run` as an iterator of the request's chunks, for callers that serve
        one request at a time. Iterate under aclosing()."""
        ready: asyncio.Queue[gateway_pb2.GenerateChunk | None] = asyncio.Queue()
        task = asyncio.ensure_future(self.run(ready.put_nowait))
        # Queued after the last chunk, or when the task failed.
        task.add_done_callback(lambda _: ready.put_nowait(None))
        try:
            while (chunk := await ready.get()) is not None:
                yield chunk
            task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _prompt_ids(self) -> list[int]:
        kind = self.request.WhichOneof("input")
        if kind == "token_ids":
            return list(self.request.token_ids.ids)
        tokenize = tokenizer_pb2.TokenizeRequest(request_id=self.internal_id)
        if kind == "text":
            tokenize.text = self.request.text
        else:
            tokenize.chat.messages.extend(self.request.chat.messages)
        return await self.gateway.tokenizer.tokenize(tokenize)

    def _submit(self, model: engine_pb2.EngineInfo, prompt: list[int]) -> None:
        if len(prompt) >= model.max_model_len:
            raise invalid_argument(
                f"the prompt has {len(prompt)} tokens; {model.model_id} accepts at most {model.max_model_len - 1} "
                f"(max_model_len {model.max_model_len} includes at least one output token): shorten the prompt",
                field="prompt",
            )
        state = self.gateway.router.pick(model.model_id, prompt)
        self.replica = self.gateway.replicas[state.address]
        self.gateway.live[self.internal_id] = self
        self.gateway.tokenizer.detokenize(
            [
                tokenizer_pb2.DetokenizeItem(
                    request_id=self.internal_id,
                    start=tokenizer_pb2.DetokenizeStart(
                        stop=self.request.stop,
                        include_stop_str_in_output=self.request.include_stop_str_in_output,
                        skip_special_tokens=self.request.skip_special_tokens if self.request.HasField("skip_special_tokens") else True,
                        prompt_tail_ids=prompt[-PROMPT_TAIL_TOKENS:],
                    ),
                )
            ]
        )
        self.detokenizing = True
        add = engine_pb2.AddRequest(request_id=self.internal_id, prompt_token_ids=prompt, sampling=self.request.sampling)
        if self.deadline is not None:
            remaining = duration_pb2.Duration()
            remaining.FromNanoseconds(max(1, int((self.deadline - self.loop.time()) * 1e9)))
            add.timeout.CopyFrom(remaining)
        self.replica.add(add)
        self.prompt_tokens = len(prompt)
        self.gateway.metrics.prompt_tokens.inc(len(prompt))
        self.log.debug("submitted", replica=state.address, prompt_tokens=len(prompt))

    def apply_engine_update(self, update: engine_pb2.SequenceUpdate) -> None:
        """Applied as the engine's step arrives; ids wait for their text, so
        only an end wakes the task."""
        if self.finish_reason == UNFINISHED:
            self._apply_update(update)

    def _apply_update(self, update: engine_pb2.SequenceUpdate) -> None:
        if update.error.code:
            self.engine_done = True
            self._fail(update.error)
            return
        if update.num_prompt_tokens:
            self.prompt_tokens = update.num_prompt_tokens
            self.cached_tokens = update.num_cached_tokens
        if update.HasField("queue_time_s"):
            self.gateway.metrics.queue_time.observe(update.queue_time_s)
        token_ids = update.token_ids
        if token_ids:
            now = self.loop.time()
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
            self.completion_tokens += len(token_ids)
            self._ids.extend(token_ids)
            if self._wants_logprobs:
                self._logprobs.extend(update.logprobs)
        if update.finish_reason != UNFINISHED:
            self.engine_done = True
            self.engine_reason = update.finish_reason
            if update.HasField("matched_stop_token_id"):
                self.engine_stop_token = update.matched_stop_token_id
            assert self.replica is not None
            self.replica.release(self.internal_id)

    def apply_text(self, delta: tokenizer_pb2.TextDelta) -> None:
        """Applied as the tokenizer's batch arrives: the text goes out at once
        in a chunk of its own, unless it has to wait for the task."""
        if self.finish_reason != UNFINISHED:
            return
        self._apply_text(delta)
        if self.finish_reason != UNFINISHED or not any(self._text):
            return  # an end has woken the task already
        if self._wants_logprobs:
            self._wake.set()
        else:
            assert self._emit is not None
            self._emit(self._build_chunk())

    def _apply_text(self, delta: tokenizer_pb2.TextDelta) -> None:
        if delta.error.code:
            self.detokenizing = False
            self._fail(delta.error)
            return
        self._text.append(delta.text)
        if delta.closed:
            self.detokenizing = False
        if delta.stopped:
            self.matched_stop = delta.matched_stop
            self._finish(common_pb2.FINISH_REASON_STOP)
        elif delta.closed:
            # Closed without a stop match: the engine's last update came first.
            self._finish(self.engine_reason)

    def _finish(self, reason: int) -> None:
        self.finish_reason = reason
        self._wake.set()

    def _fail(self, status: status_pb2.Status) -> None:
        self.error = status
        self._finish(common_pb2.FINISH_REASON_ERROR)

    async def _take_chunk(self, fill_token_text: bool = True) -> gateway_pb2.GenerateChunk | None:
        """The output not yet sent, as a chunk; None when there is nothing new."""
        # Ids wait for their text, so that a chunk's text and ids match.
        if not (any(self._text) or self.finish_reason != UNFINISHED):
            return None
        finished = self.finish_reason != UNFINISHED
        chunk = self._build_chunk()
        if fill_token_text:
            await self._fill_token_texts(chunk)
        if finished:
            chunk.finish_reason = self.finish_reason
            chunk.matched_stop = self.matched_stop
            chunk.usage.CopyFrom(
                common_pb2.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, cached_prompt_tokens=self.cached_tokens)
            )
            if self.error is not None:
                chunk.error.CopyFrom(self.error)
        return chunk

    def _build_chunk(self) -> gateway_pb2.GenerateChunk:
        chunk = gateway_pb2.GenerateChunk(request_id=self.id, text="".join(self._text), token_ids=self._ids, logprobs=self._logprobs)
        self._text, self._ids, self._logprobs = [], [], []
        return chunk

    async def _fill_token_texts(self, chunk: gateway_pb2.GenerateChunk) -> None:
        """Token texts of logprobs, and of the stop token that ended the request."""
        wanted = {lp.token_id for lp in chunk.logprobs} | {top.token_id for lp in chunk.logprobs for top in lp.top_logprobs}
        stop_token = self.engine_stop_token if self.finish_reason == common_pb2.FINISH_REASON_STOP and not self.matched_stop else None
        if stop_token is not None:
            wanted.add(stop_token)
        if not wanted:
            return
        texts = await self.gateway.tokenizer.token_texts(wanted)
        for lp in chunk.logprobs:
            lp.token = texts[lp.token_id]
            for top in lp.top_logprobs:
                top.token = texts[top.token_id]
        if stop_token is not None:
            self.matched_stop = texts[stop_token]

    def _release(self) -> None:
        """Free what the request holds in the peers and record its outcome."""
        self.gateway.live.pop(self.internal_id, None)
        if self.replica is not None and not self.engine_done:
            self.replica.abort(self.internal_id)
        if self.detokenizing:
            self.detokenizing = False
            try:
                self.gateway.tokenizer.detokenize([tokenizer_pb2.DetokenizeItem(request_id=self.internal_id, cancel=True)])
            except RequestError:
                pass  # the tokenizer dropped its state with the stream
        if self.finish_reason == UNFINISHED:
            self._finish(common_pb2.FINISH_REASON_CANCELLED)  # the client went away
        now = self.loop.time()
        self.gateway.metrics.observe_finished(
            self.finish_reason,
            self.completion_tokens,
            now - self.arrival,
            None if self.first_token_at is None else self.first_token_at - self.arrival,
            None if self.last_token_at is None else self.last_token_at - self.arrival,
        )
        outcome = FinishReason.Name(self.finish_reason)
        if self.error is not None:
            self.log.info("request failed", outcome=outcome, code=self.error.code, error=self.error.message)
        else:
            self.log.info("request finished", outcome=outcome, prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)
