"""One request's life in the gateway, shared by the gRPC API and the REST shim.

A request goes: validate → Tokenize (unless ids were given) → route to an
engine replica → AddRequest on that replica's Generate stream → per-step
updates, whose new ids go to the tokenizer's Detokenize stream in one batch
per step → text deltas → chunks for the client. Stop strings are matched by
the detokenizer; on a match the request is aborted in the engine.

A request with token_ids_only skips the tokenizer on the way out: its ids
become chunks as the engine's step arrives, and the engine's end is its end.

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

A chunk handed out counts as unread until the caller says its client's
transport has taken it (`taken`); a client that reads too slowly fails the
request (output_buffer.py), which aborts it in the same way.

The request reaches the gateway's connections and registries only through
`Hub` (implemented by hub.Gateway).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Protocol

from google.protobuf import duration_pb2
from google.rpc import status_pb2

from pagewire.services.common.errors import RequestError
from pagewire.services.common.grpc_utils import to_status
from pagewire.services.common.logging import get_logger
from pagewire.services.gateway.clients import EngineReplica
from pagewire.services.gateway.metrics import GatewayMetrics
from pagewire.services.gateway.output_buffer import OutputLimits, UnreadOutput
from pagewire.services.gateway.router import Target
from pagewire.services.gateway.validation import check_fits, check_prompt, validate_request
from pagewire.v1 import common_pb2, engine_pb2, gateway_pb2, tokenizer_pb2

log = get_logger("gateway")

FinishReason = common_pb2.FinishReason
UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED

# The detokenizer decodes the first output tokens after this many prompt
# tokens, so that they get the spacing they have in context.
PROMPT_TAIL_TOKENS = 8

Emit = Callable[[gateway_pb2.GenerateChunk], None]


class Hub(Protocol):
    """What a request needs of the gateway: its models, its peers, and the
    registry through which the peers' streams reach the request."""

    async def resolve(self, model: str, lora: str) -> Target:
        """The served model (empty: the first one) or LoRA adapter `model`
        names, with the adapter `lora` names; NOT_FOUND or UNAVAILABLE otherwise."""

    def admit(self, request: GatewayRequest) -> None:
        """Count the request in flight; RESOURCE_EXHAUSTED when the gateway is full."""

    async def tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeResult: ...

    def pick_replica(self, model_id: str, prompt: list[int], lora: str) -> EngineReplica:
        """The replica to serve a prompt (one with the LoRA adapter loaded, if
        any); UNAVAILABLE when none serving the model is up."""

    def register(self, request: GatewayRequest) -> None:
        """Hand the request the engine's updates and the tokenizer's text for its internal id."""

    def detokenize(self, items: Iterable[tokenizer_pb2.DetokenizeItem]) -> None:
        """Send items on the Detokenize stream; UNAVAILABLE when the tokenizer is down."""

    async def token_texts(self, token_ids: Iterable[int]) -> dict[int, str]: ...

    def leave(self, request: GatewayRequest) -> None:
        """The request is over: it is no longer in flight nor registered."""


class ChunkStream:
    """`chunks` over `run` and `taken`, for a request or a group of them (choices.py)."""

    async def run(self, emit: Emit) -> None:
        raise NotImplementedError

    def taken(self) -> None:
        raise NotImplementedError

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
                self.taken()  # the caller is back for more: its client took this one
            task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)


class GatewayRequest(ChunkStream):
    """One request (one completion of one prompt) from arrival to its last chunk."""

    def __init__(
        self,
        hub: Hub,
        metrics: GatewayMetrics,
        request: gateway_pb2.GenerateRequest,
        output_limits: OutputLimits = OutputLimits(),
        leader: GatewayRequest | None = None,
    ):
        """`leader`: another completion of the same prompt (choices.py);
        this one takes the leader's prompt ids and replica, and starts once
        the leader's prompt is in that replica's prefix cache."""
        self.hub = hub
        self.metrics = metrics
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.arrival = self.loop.time()
        self.id = request.request_id or f"req-{uuid.uuid4().hex}"
        # Client ids are unique per client stream only; the peers see this one.
        self.internal_id = uuid.uuid4().hex
        # The request's own timeout, set once it is validated; an RPC deadline
        # ends the RPC instead, which cancels the request's task and so aborts
        # the request.
        self.deadline: float | None = None
        # Set when the request's task has something to await or send: its
        # end, or output whose chunk needs token texts.
        self._wake = asyncio.Event()
        self._emit: Emit | None = None
        self._unread = UnreadOutput(output_limits, self.fail)
        # Chunks with logprobs wait in the task for their token texts; all
        # others are sent from the stream callbacks as their text arrives.
        self._wants_logprobs = request.sampling.HasField("logprobs")
        # Output as ids alone: no detokenizer, no token texts.
        self._ids_only = request.token_ids_only
        self.log = log.bind(request_id=self.id, internal_id=self.internal_id)
        self.leader = leader
        # The prompt's ids and compiled grammar once known, for the followers.
        self.prompt: tuple[list[int], str] | None = None
        # Set at the first output token (the prompt's full blocks are then
        # cached in the engine) or at the end, whichever comes first.
        self.prompt_cached = asyncio.Event()
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
        self.completion_tokens = 0  # output ids sent
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._text: list[str] = []
        # Output ids (and their logprobs) not sent yet. They go out with the
        # text of the tokens the detokenizer has taken in, so that none past
        # the end of a stop string is ever sent or counted.
        self._ids: list[int] = []
        self._logprobs: list[common_pb2.TokenLogprob] = []
        self._detokenized_tokens = 0

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
        try:
            try:
                validate_request(self.request)
                target = await self.hub.resolve(self.request.model, self.request.lora)
                check_fits(self.request, target.info)
                self.hub.admit(self)
                if self.request.HasField("timeout"):
                    self.deadline = self.arrival + self.request.timeout.ToTimedelta().total_seconds()
                async with asyncio.timeout_at(self.deadline):
                    prompt, grammar = self.prompt = await self._prompt_ids()
                    if self.finish_reason == UNFINISHED:
                        self._submit(target, prompt, grammar)
                    while self.finish_reason == UNFINISHED:
                        await self._wake.wait()
                        self._wake.clear()
                        if self.finish_reason == UNFINISHED and (chunk := await self._take_chunk()) is not None:
                            self._send(chunk)
                    final = await self._take_chunk()
                assert final is not None
                self._send(final)
                return
            except RequestError as exc:
                self._fail(to_status(exc))
            except TimeoutError:
                self._finish(common_pb2.FINISH_REASON_TIME_LIMIT)
            final = await self._take_chunk(fill_token_text=False)
            assert final is not None
            self._send(final)
        finally:
            self._release()

    async def _prompt_ids(self) -> tuple[list[int], str]:
        """The prompt's token ids and the constraint's compiled grammar (empty
        without one); token ids given by the caller skip the tokenizer unless
        a constraint needs compiling. A follower takes its leader's."""
        if self.leader is not None:
            await self.leader.prompt_cached.wait()
            if self.leader.prompt is None:
                # The leader ended before it had a prompt (cancelled or
                # refused), which ends its group: this one need not start.
                self._finish(common_pb2.FINISH_REASON_CANCELLED)
                return [], ""
            return self.leader.prompt
        kind = self.request.WhichOneof("input")
        constrained = self.request.HasField("constraint")
        if kind == "token_ids" and not constrained:
            return list(self.request.token_ids.ids), ""
        tokenize = tokenizer_pb2.TokenizeRequest(request_id=self.internal_id, constraint=self.request.constraint if constrained else None)
        if kind == "token_ids":
            result = await self.hub.tokenize(tokenize)
            return list(self.request.token_ids.ids), result.compiled_grammar
        if kind == "text":
            tokenize.text = self.request.text
        else:
            tokenize.chat.messages.extend(self.request.chat.messages)
            tokenize.chat.parse_special_tokens_in_content = self.request.chat.parse_special_tokens_in_content
            tokenize.chat.tools.extend(self.request.chat.tools)
        result = await self.hub.tokenize(tokenize)
        return list(result.token_ids), result.compiled_grammar

    def _submit(self, target: Target, prompt: list[int], grammar: str) -> None:
        check_prompt(prompt, target.info)
        if self.leader is not None and self.leader.replica is not None:
            self.replica = self.leader.replica  # where the prompt's blocks are cached
        else:
            self.replica = self.hub.pick_replica(target.info.model_id, prompt, target.lora)
        self.hub.register(self)
        if not self._ids_only:
            self._start_detokenizing(prompt)
        add = engine_pb2.AddRequest(
            request_id=self.internal_id, prompt_token_ids=prompt, sampling=self.request.sampling, compiled_grammar=grammar, lora=target.lora
        )
        if self.deadline is not None:
            remaining = duration_pb2.Duration()
            remaining.FromNanoseconds(max(1, int((self.deadline - self.loop.time()) * 1e9)))
            add.timeout.CopyFrom(remaining)
        self.replica.add(add)
        self.prompt_tokens = len(prompt)
        self.metrics.prompt_tokens.inc(len(prompt))
        self.log.debug("submitted", replica=self.replica.address, prompt_tokens=len(prompt))

    def _start_detokenizing(self, prompt: list[int]) -> None:
        self.hub.detokenize(
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

    # ---- the peers' streams ----------------------------------------------

    def on_engine_update(self, update: engine_pb2.SequenceUpdate, detokenize: tokenizer_pb2.DetokenizeBatch) -> None:
        """Applied as the engine's step arrives; the new ids (and the end) go
        into the step's `detokenize` batch. Ids wait for their text, so only
        an end wakes the task; with token_ids_only they go out at once."""
        if self.finish_reason == UNFINISHED:
            self._apply_update(update)
            if self._ids_only and self.finish_reason == UNFINISHED:
                if self.engine_done:
                    self._finish(self.engine_reason)  # the task sends the last chunk
                elif self._ids:
                    self._send(self._build_chunk(every_id=True))
                return
        token_ids, finished = update.token_ids, update.finish_reason != UNFINISHED
        if self.detokenizing and (token_ids or finished) and not update.error.code:
            append = detokenize.items.add(request_id=self.internal_id).append
            append.token_ids.extend(token_ids)
            append.last = finished

    def _apply_update(self, update: engine_pb2.SequenceUpdate) -> None:
        if update.error.code:
            # Refused or failed in the engine (queue bound, a bad id, no room
            # in the KV cache): nothing of it is left there.
            self._engine_finished()
            self._fail(update.error)
            return
        if update.num_prompt_tokens:
            self.prompt_tokens = update.num_prompt_tokens
            self.cached_tokens = update.num_cached_tokens
        if update.HasField("queue_time_s"):
            self.metrics.queue_time.observe(update.queue_time_s)
        token_ids = update.token_ids
        if token_ids:
            now = self.loop.time()
            self.first_token_at = self.first_token_at or now
            self.prompt_cached.set()
            self.last_token_at = now
            self._ids.extend(token_ids)
            if self._wants_logprobs:
                self._logprobs.extend(update.logprobs)
        if update.finish_reason != UNFINISHED:
            self._engine_finished()
            self.engine_reason = update.finish_reason
            if update.HasField("matched_stop_token_id"):
                self.engine_stop_token = update.matched_stop_token_id

    def _engine_finished(self) -> None:
        """The engine holds nothing of the request any more: it stops
        counting against the replica's load (and its drain) at once."""
        self.engine_done = True
        assert self.replica is not None
        self.replica.release(self.internal_id)

    def on_text(self, delta: tokenizer_pb2.TextDelta) -> None:
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
            self._send(self._build_chunk())

    def _apply_text(self, delta: tokenizer_pb2.TextDelta) -> None:
        if delta.error.code:
            self.detokenizing = False
            self._fail(delta.error)
            return
        self._text.append(delta.text)
        # Text too long for one message comes in pieces; only the last one counts tokens.
        self._detokenized_tokens = max(self._detokenized_tokens, delta.num_tokens)
        if delta.closed:
            self.detokenizing = False
        if delta.stopped:
            # The engine ran on while the match was on its way: its later tokens are dropped.
            keep = self._detokenized_tokens - self.completion_tokens
            del self._ids[keep:], self._logprobs[keep:]
            self.matched_stop = delta.matched_stop
            self._finish(common_pb2.FINISH_REASON_STOP)
        elif delta.closed:
            # Closed without a stop match: the engine's last update came first.
            self._finish(self.engine_reason)

    def on_replica_down(self, replica: EngineReplica, status: status_pb2.Status) -> None:
        # A request the engine had finished only waits for its last text.
        if self.replica is replica and not self.engine_done:
            self.fail(status)

    def on_tokenizer_down(self, status: status_pb2.Status) -> None:
        if self.detokenizing:
            self.detokenizing = False
            self.fail(status)

    # ---- chunks and the end ----------------------------------------------

    def taken(self) -> None:
        """The client's transport has taken the oldest chunk handed out."""
        self._unread.taken()

    def _send(self, chunk: gateway_pb2.GenerateChunk) -> None:
        """Hand a chunk out, unless the client has too much unread: then the
        request fails instead, and its last chunk goes out without output."""
        assert self._emit is not None
        size = chunk.ByteSize()
        if (overflow := self._unread.overflow(size)) is not None:
            if not chunk.finish_reason:
                self.fail(overflow)
                return
            chunk.ClearField("text")
            chunk.ClearField("token_ids")
            chunk.ClearField("logprobs")
            if not chunk.error.code:
                chunk.finish_reason = common_pb2.FINISH_REASON_ERROR
                chunk.error.CopyFrom(overflow)
            size = chunk.ByteSize()
        self._unread.handed_out(size)
        self._emit(chunk)

    def _finish(self, reason: int) -> None:
        self.finish_reason = reason
        self._wake.set()
        self.prompt_cached.set()  # followers waiting for it go on (and end with it)

    def _fail(self, status: status_pb2.Status) -> None:
        self.error = status
        self._finish(common_pb2.FINISH_REASON_ERROR)

    async def _take_chunk(self, fill_token_text: bool = True) -> gateway_pb2.GenerateChunk | None:
        """The output not yet sent, as a chunk; None when there is nothing new."""
        # Ids wait for their text, so that a chunk's text and ids match.
        if not (any(self._text) or self.finish_reason != UNFINISHED):
            return None
        finished = self.finish_reason != UNFINISHED
        chunk = self._build_chunk(every_id=finished)
        if fill_token_text and not self._ids_only:
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

    def _build_chunk(self, every_id: bool = False) -> gateway_pb2.GenerateChunk:
        """The text so far, with the ids the detokenizer has taken in (every
        id left, on the last chunk and without text)."""
        count = len(self._ids) if every_id else max(0, min(len(self._ids), self._detokenized_tokens - self.completion_tokens))
        chunk = gateway_pb2.GenerateChunk(request_id=self.id, text="".join(self._text), token_ids=self._ids[:count], logprobs=self._logprobs[:count])
        self._text = []
        del self._ids[:count], self._logprobs[:count]
        self.completion_tokens += count
        return chunk

    async def _fill_token_texts(self, chunk: gateway_pb2.GenerateChunk) -> None:
        """Token texts of logprobs, and of the stop token that ended the request."""
        wanted = {lp.token_id for lp in chunk.logprobs} | {top.token_id for lp in chunk.logprobs for top in lp.top_logprobs}
        stop_token = self.engine_stop_token if self.finish_reason == common_pb2.FINISH_REASON_STOP and not self.matched_stop else None
        if stop_token is not None:
            wanted.add(stop_token)
        if not wanted:
            return
        texts = await self.hub.token_texts(wanted)
        for lp in chunk.logprobs:
            lp.token = texts[lp.token_id]
            for top in lp.top_logprobs:
                top.token = texts[top.token_id]
        if stop_token is not None:
            self.matched_stop = texts[stop_token]

    def _release(self) -> None:
        """Free what the request holds in the peers and record its outcome."""
        self.hub.leave(self)
        self._unread.close()
        if self.replica is not None and not self.engine_done:
            self.replica.abort(self.internal_id)  # which releases it too
        if self.detokenizing:
            self.detokenizing = False
            try:
                self.hub.detokenize([tokenizer_pb2.DetokenizeItem(request_id=self.internal_id, cancel=True)])
            except RequestError:
                pass  # the tokenizer dropped its state with the stream
        if self.finish_reason == UNFINISHED:
            self._finish(common_pb2.FINISH_REASON_CANCELLED)  # the client went away
        now = self.loop.time()
        self.metrics.observe_finished(
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
