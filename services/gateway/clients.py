"""The gateway's connections to its peers: one tokenizer and any number of
engine replicas. Each holds long-lived multiplexed streams (see
connection.py) and hands every incoming message to a callback at once, so no
request's consumer can hold up the stream."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable

import grpc
from grpc_health.v1 import health_pb2

from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.common.grpc_utils import error_from_status
from pagewire.services.common.logging import get_logger
from pagewire.v1 import engine_pb2, engine_pb2_grpc, tokenizer_pb2, tokenizer_pb2_grpc
from pagewire.services.gateway.connection import Backoff, OutgoingStream, keep_connected, until_serving
from pagewire.services.gateway.router import ReplicaState

log = get_logger("gateway")

ENGINE_SERVICE = engine_pb2.DESCRIPTOR.services_by_name["Engine"].full_name
TOKENIZER_SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


def _unavailable(peer: str) -> RequestError:
    return RequestError(Refusal.UNAVAILABLE, f"{peer} is not connected; retry shortly")


class PeerClient:
    """One channel to a peer service, reconnected with backoff. Subclasses
    name the peer (`peer_kind`, `service_name`, an `address`) and open their
    streams in `_session` once the peer reports SERVING."""

    peer_kind: str
    service_name: str
    address: str

    def __init__(self, channel_options: list[tuple[str, int]], backoff: Backoff, connect_timeout_s: float, max_message_bytes: int):
        self._channel_options = channel_options
        self._max_message_bytes = max_message_bytes
        self._backoff = backoff
        self._connect_timeout_s = connect_timeout_s
        self._channel: grpc.aio.Channel | None = None

    async def run(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address, options=self._channel_options)
        try:
            await keep_connected(f"{self.peer_kind} {self.address}", self._session_when_serving, self._backoff)
        finally:
            await self._channel.close()

    async def _session_when_serving(self) -> None:
        assert self._channel is not None
        readiness = await until_serving(self._channel, self.service_name)
        if readiness is not None:
            await self._session(readiness)

    async def _session(self, readiness: grpc.aio.UnaryStreamCall) -> None:
        raise NotImplementedError


class EngineReplica(PeerClient):
    """One engine replica: its Generate stream, Info and Stats."""

    peer_kind = "engine"
    service_name = ENGINE_SERVICE

    def __init__(
        self,
        address: str,
        channel_options: list[tuple[str, int]],
        backoff: Backoff,
        connect_timeout_s: float,
        max_message_bytes: int,
        on_step: Callable[[EngineReplica, engine_pb2.EngineStep], None],
        on_down: Callable[[EngineReplica, str], None],
    ):
        super().__init__(channel_options, backoff, connect_timeout_s, max_message_bytes)
        self.state = ReplicaState(address)
        self._on_step = on_step
        self._on_down = on_down
        self._outgoing: OutgoingStream[engine_pb2.EngineInput] | None = None
        self._idle = asyncio.Event()

    @property
    def address(self) -> str:
        return self.state.address

    async def _session(self, readiness: grpc.aio.UnaryStreamCall) -> None:
        assert self._channel is not None
        stub = engine_pb2_grpc.EngineStub(self._channel)
        outgoing: OutgoingStream[engine_pb2.EngineInput] = OutgoingStream(self._max_message_bytes)
        tasks: list[asyncio.Future[None]] = []
        reason = "stream closed by the engine"
        try:
            self.state.info = await stub.Info(engine_pb2.EngineInfoRequest(), timeout=self._connect_timeout_s)
            call = stub.Generate(outgoing.messages())
            tasks += [asyncio.ensure_future(self._read_steps(call)), asyncio.ensure_future(self._follow_readiness(readiness))]
            self._outgoing = outgoing
            self.state.available = True
            log.info("engine connected", peer=self.address, model=self.state.info.model_id, max_model_len=self.state.info.max_model_len)
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
            if tasks[1] in done:
                reason = "the engine is draining and has no requests of this gateway left"
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            raise
        except asyncio.CancelledError:
            reason = "removed from the replica set"
            raise
        finally:
            readiness.cancel()
            for task in tasks:
                task.cancel()
            outgoing.close()
            was_connected = self._outgoing is not None
            self._outgoing = None
            self.state.available = False
            self.state.load = engine_pb2.EngineLoad()
            self.state.in_flight.clear()
            self._idle.set()
            if was_connected:
                self._on_down(self, reason)

    async def _read_steps(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for step in call:
                self.state.load = step.load
                self._on_step(self, step)
        finally:
            call.cancel()

    async def _follow_readiness(self, watch: grpc.aio.UnaryStreamCall) -> None:
        """Returns once the engine reports NOT_SERVING (draining before a
        shutdown) and every request of this gateway there has finished: new
        requests stop going to it at once, and closing the stream then lets
        it stop. Also returns when the watch ends with the connection."""
        try:
            # read(), not `async for`: until_serving began the watch with read().
            while (reply := await watch.read()) is not grpc.aio.EOF:
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    self.state.available = False
                    log.info("engine draining: no new requests go to it", peer=self.address, in_flight=len(self.state.in_flight))
                    await self.idle()
                    return
        except grpc.aio.AioRpcError:
            pass  # the Generate stream reports why the connection went

    async def idle(self) -> None:
        """Returns once no request of this gateway is in flight here."""
        while self.state.in_flight:
            self._idle.clear()
            await self._idle.wait()

    def add(self, request: engine_pb2.AddRequest) -> None:
        """Send the request; RequestError when the engine is not connected or
        the request does not fit in one message."""
        if self._outgoing is None:
            raise _unavailable(f"engine {self.address}")
        self._outgoing.send(engine_pb2.EngineInput(add=[request]))
        self.state.in_flight.add(request.request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request in the engine; a no-op when the stream is down (the
        engine drops a closed stream's requests itself)."""
        if self._outgoing is not None:
            self._outgoing.send(engine_pb2.EngineInput(abort=[request_id]))
        self.release(request_id)

    def release(self, request_id: str) -> None:
        """The request is over in the engine."""
        self.state.in_flight.discard(request_id)
        if not self.state.in_flight:
            self._idle.set()

    def stub(self) -> engine_pb2_grpc.EngineStub:
        """The Engine service of a connected replica; UNAVAILABLE otherwise."""
        if self._channel is None or not self.state.available:
            raise _unavailable(f"engine {self.address}")
        return engine_pb2_grpc.EngineStub(self._channel)

    async def stats(self, timeout_s: float) -> engine_pb2.EngineStats:
        return await self.stub().Stats(engine_pb2.EngineStatsRequest(), timeout=timeout_s)

    async def refresh_info(self, timeout_s: float) -> None:
        """Read Info again: its LoRA adapters change as they are loaded and unloaded."""
        self.state.info = await self.stub().Info(engine_pb2.EngineInfoRequest(), timeout=timeout_s)

    def set_lora_adapters(self, names: Iterable[str]) -> None:
        assert self.state.info is not None
        del self.state.info.lora_adapters[:]
        self.state.info.lora_adapters.extend(names)


class TokenizerClient(PeerClient):
    """The tokenizer service: one Tokenize and one Detokenize stream."""

    peer_kind = "tokenizer"
    service_name = TOKENIZER_SERVICE

    def __init__(
        self,
        address: str,
        channel_options: list[tuple[str, int]],
        backoff: Backoff,
        connect_timeout_s: float,
        max_message_bytes: int,
        on_text: Callable[[tokenizer_pb2.TextDelta], None],
        on_down: Callable[[str], None],
    ):
        super().__init__(channel_options, backoff, connect_timeout_s, max_message_bytes)
        self.address = address
        self.info: tokenizer_pb2.TokenizerInfo | None = None
        self._on_text = on_text
        self._on_down = on_down
        self._tokenize_out: OutgoingStream[tokenizer_pb2.TokenizeBatch] | None = None
        self._detokenize_out: OutgoingStream[tokenizer_pb2.DetokenizeBatch] | None = None
        self._pending_tokenize: dict[str, asyncio.Future[tokenizer_pb2.TokenizeResult]] = {}
        # Single-token texts for logprobs and matched stop tokens, decoded on
        # the Detokenize stream under ids of their own; a token's text never
        # changes, so it is kept.
        self._token_texts: dict[int, str] = {}
        self._pending_token_texts: dict[str, tuple[int, list[str], asyncio.Future[str]]] = {}
        self._lookup_ids = itertools.count()

    @property
    def available(self) -> bool:
        return self._detokenize_out is not None

    @property
    def pending_tokenize(self) -> int:
        return len(self._pending_tokenize)

    async def _session(self, readiness: grpc.aio.UnaryStreamCall) -> None:
        assert self._channel is not None
        readiness.cancel()
        stub = tokenizer_pb2_grpc.TokenizerStub(self._channel)
        self.info = await stub.Info(tokenizer_pb2.TokenizerInfoRequest(), timeout=self._connect_timeout_s)
        tokenize_out: OutgoingStream[tokenizer_pb2.TokenizeBatch] = OutgoingStream(self._max_message_bytes)
        detokenize_out: OutgoingStream[tokenizer_pb2.DetokenizeBatch] = OutgoingStream(self._max_message_bytes)
        tokenize_call = stub.Tokenize(tokenize_out.messages())
        detokenize_call = stub.Detokenize(detokenize_out.messages())
        self._tokenize_out, self._detokenize_out = tokenize_out, detokenize_out
        log.info("tokenizer connected", peer=self.address, model=self.info.model_id)
        readers = [asyncio.ensure_future(self._read_tokenized(tokenize_call)), asyncio.ensure_future(self._read_text(detokenize_call))]
        reason = "stream closed by the tokenizer"
        try:
            done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
            raise
        finally:
            self._tokenize_out = self._detokenize_out = None
            for task in readers:
                task.cancel()
            tokenize_out.close()
            detokenize_out.close()
            tokenize_call.cancel()
            detokenize_call.cancel()
            error = _unavailable(f"tokenizer {self.address}")
            for future in [*self._pending_tokenize.values(), *(f for _, _, f in self._pending_token_texts.values())]:
                if not future.done():
                    future.set_exception(error)
            self._pending_tokenize.clear()
            self._pending_token_texts.clear()
            self._on_down(reason)

    async def _read_tokenized(self, call: grpc.aio.StreamStreamCall) -> None:
        async for batch in call:
            for result in batch.results:
                future = self._pending_tokenize.pop(result.request_id, None)
                if future is None or future.done():
                    continue
                if result.error.code:
                    future.set_exception(error_from_status(result.error))
                else:
                    future.set_result(result)

    async def _read_text(self, call: grpc.aio.StreamStreamCall) -> None:
        async for batch in call:
            for delta in batch.deltas:
                lookup = self._pending_token_texts.get(delta.request_id)
                if lookup is None:
                    self._on_text(delta)
                    continue
                token_id, parts, future = lookup
                parts.append(delta.text)
                if delta.closed or delta.error.code:
                    del self._pending_token_texts[delta.request_id]
                    self._token_texts[token_id] = "".join(parts)
                    if not future.done():
                        future.set_result(self._token_texts[token_id])

    async def tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeResult:
        """The result of one request; RequestError when the tokenizer refuses it."""
        if self._tokenize_out is None:
            raise _unavailable(f"tokenizer {self.address}")
        self._tokenize_out.send(tokenizer_pb2.TokenizeBatch(requests=[request]))
        future: asyncio.Future[tokenizer_pb2.TokenizeResult] = asyncio.get_running_loop().create_future()
        self._pending_tokenize[request.request_id] = future
        try:
            return await future
        finally:
            self._pending_tokenize.pop(request.request_id, None)

    def detokenize(self, items: Iterable[tokenizer_pb2.DetokenizeItem]) -> None:
        self.send_detokenize(tokenizer_pb2.DetokenizeBatch(items=items))

    def send_detokenize(self, batch: tokenizer_pb2.DetokenizeBatch) -> None:
        if self._detokenize_out is None:
            raise _unavailable(f"tokenizer {self.address}")
        self._detokenize_out.send(batch)

    async def token_texts(self, token_ids: Iterable[int]) -> dict[int, str]:
        """The text of each token on its own, special tokens included."""
        wanted = set(token_ids)
        futures: dict[int, asyncio.Future[str]] = {}
        items = []
        loop = asyncio.get_running_loop()
        for token_id in wanted - self._token_texts.keys():
            lookup_id = f"token-text-{next(self._lookup_ids)}"
            futures[token_id] = loop.create_future()
            self._pending_token_texts[lookup_id] = (token_id, [], futures[token_id])
            items.append(
                tokenizer_pb2.DetokenizeItem(
                    request_id=lookup_id,
                    start=tokenizer_pb2.DetokenizeStart(skip_special_tokens=False),
                    append=tokenizer_pb2.DetokenizeAppend(token_ids=[token_id], last=True),
                )
            )
        if items:
            self.detokenize(items)
            await asyncio.gather(*futures.values())
        return {token_id: self._token_texts[token_id] for token_id in wanted}
