"""The gateway's hub: the connections to the tokenizer and the engine replicas,
the router over the replicas, and the registry of live requests, keyed by an
id unique across all clients. Requests (request.py) reach all of it through
the Hub interface that Gateway implements; the peers' streams reach a request
through the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc

from pagewire.services.common.errors import Refusal, RequestError
from grpc_status import rpc_status

from pagewire.services.common.grpc_utils import error_from_status, error_status, refusal_of
from pagewire.services.common.limits import DEFAULT_MAX_MESSAGE_BYTES
from pagewire.services.common.logging import get_logger
from pagewire.services.gateway.admission import InFlightCount, LocalCount
from pagewire.services.gateway.choices import ChoiceGroup, new_request
from pagewire.services.gateway.clients import EngineReplica, TokenizerClient
from pagewire.services.gateway.connection import Backoff
from pagewire.services.gateway.discovery import EngineDiscovery
from pagewire.services.gateway.metrics import GatewayMetrics
from pagewire.services.gateway.output_buffer import OutputLimits
from pagewire.services.gateway.request import GatewayRequest
from pagewire.services.gateway.router import Router, RoutingPolicy, Target
from pagewire.services.gateway.tokenizers import TokenizerPool
from pagewire.v1 import engine_pb2, engine_pb2_grpc, gateway_pb2, tokenizer_pb2

log = get_logger("gateway")

# Seconds to wait for each replica's Info when the gateway reads it again (for
# adapters loaded since it connected), and the least time between two such reads
# prompted by requests for a model no replica is known to serve.
INFO_REFRESH_TIMEOUT_S = 2.0
INFO_REFRESH_INTERVAL_S = 1.0
# Seconds an engine may take to read a LoRA adapter from its disk.
LORA_ADMIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class GatewaySettings:
    # One address per tokenizer worker.
    tokenizers: list[str]
    engines: list[str]
    routing: RoutingPolicy
    affinity_blocks: int
    max_concurrent_requests: int
    channel_options: list[tuple[str, int]]
    backoff: Backoff
    connect_timeout_s: float
    discovery_interval_s: float
    # What one message to a peer may hold (--max-message-bytes).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # What a request's client may leave unread, and for how long.
    output: OutputLimits = OutputLimits()


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("connection task failed", task=task.get_name(), error=repr(task.exception()))


class Gateway:
    """Connections to the tokenizer and the engine replicas, and the requests
    riding on them."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics, in_flight: InFlightCount | None = None):
        """`in_flight`: the count --max-concurrent-requests bounds, shared
        by every gateway worker of the server; this gateway's own by default."""
        self._settings = settings
        self._metrics = metrics
        self._discovery = EngineDiscovery(settings.engines, settings.discovery_interval_s)
        self._tokenizer = TokenizerPool(
            settings.tokenizers,
            settings.channel_options,
            settings.backoff,
            settings.connect_timeout_s,
            settings.max_message_bytes,
            self._on_text,
            self._on_tokenizer_down,
        )
        self._replicas: dict[str, EngineReplica] = {}
        self._replica_tasks: dict[str, asyncio.Task[None]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._router = Router([], settings.routing, settings.affinity_blocks)
        # Requests counted against --max-concurrent-requests, by internal id.
        self._in_flight: set[str] = set()
        self._in_flight_count = in_flight or LocalCount()
        # Requests the peers' streams are delivered to, by internal id.
        self._live: dict[str, GatewayRequest] = {}
        self._info_refreshed_at = float("-inf")

    async def run(self) -> None:
        """Keep the tokenizer and every discovered replica connected until cancelled."""
        tokenizer = asyncio.ensure_future(self._tokenizer.run())
        try:
            async for change in self._discovery.watch():
                for address in change.removed:
                    log.info("engine replica left the replica set: no new requests go to it", peer=address)
                    retiring = asyncio.create_task(self._retire(self._replicas.pop(address), self._replica_tasks.pop(address)))
                    self._retiring.add(retiring)
                    retiring.add_done_callback(self._retiring.discard)
                for address in sorted(change.added):
                    self._replicas[address] = EngineReplica(
                        address,
                        self._settings.channel_options,
                        self._settings.backoff,
                        self._settings.connect_timeout_s,
                        self._settings.max_message_bytes,
                        self._on_step,
                        self._on_replica_down,
                    )
                    self._replica_tasks[address] = asyncio.create_task(self._replicas[address].run(), name=f"engine {address}")
                    self._replica_tasks[address].add_done_callback(_report_crash)
                self._router.replicas = [replica.state for replica in self._replicas.values()]
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

    # ---- for the APIs ----------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._tokenizer.available and any(r.state.available for r in self._replicas.values())

    def models(self) -> list[gateway_pb2.ModelCard]:
        """Every served model, then every LoRA adapter loaded on a replica (with its base model as parent)."""
        infos = {info.model_id: info for info in self._router.served_models()}
        cards = [gateway_pb2.ModelCard(id=model_id, max_model_len=info.max_model_len, owned_by="pagewire") for model_id, info in infos.items()]
        adapters = self._router.served_adapters().items()
        return cards + [
            gateway_pb2.ModelCard(id=name, max_model_len=infos[base].max_model_len, owned_by="pagewire", parent=base) for name, base in adapters
        ]

    async def refresh_models(self) -> None:
        """Read every connected replica's Info again, so that adapters loaded
        or unloaded elsewhere (another gateway worker, the engine's own RPC) show."""

        async def one(replica: EngineReplica) -> None:
            try:
                await replica.refresh_info(INFO_REFRESH_TIMEOUT_S)
            except (RequestError, grpc.aio.AioRpcError) as exc:
                log.warning("engine info unavailable", peer=replica.address, error=str(exc))

        self._info_refreshed_at = asyncio.get_running_loop().time()
        await asyncio.gather(*(one(r) for r in self._replicas.values() if r.state.available))

    async def load_lora_adapter(self, name: str, path: str, model: str = "") -> list[str]:
        """Load an adapter on every connected replica of `model` (empty: the
        first model served); the addresses of those replicas."""
        model_id = self._router.resolve_model(model).model_id
        replicas = [r for r in self._replicas.values() if r.state.available and r.state.model_id == model_id]
        request = engine_pb2.LoadLoraAdapterRequest(lora_name=name, lora_path=path)
        return await self._change_lora(replicas, lambda stub: stub.LoadLoraAdapter(request, timeout=LORA_ADMIN_TIMEOUT_S))

    async def unload_lora_adapter(self, name: str) -> list[str]:
        """Unload an adapter from every connected replica that has it; the addresses of those replicas."""
        await self.refresh_models()
        replicas = [r for r in self._replicas.values() if r.state.available and name in r.state.info.lora_adapters]  # type: ignore[union-attr]
        if not replicas:
            raise RequestError(Refusal.NOT_FOUND, f"LoRA adapter {name!r} is not loaded on any connected engine replica", "lora_name")
        request = engine_pb2.UnloadLoraAdapterRequest(lora_name=name)
        return await self._change_lora(replicas, lambda stub: stub.UnloadLoraAdapter(request, timeout=LORA_ADMIN_TIMEOUT_S))

    @staticmethod
    async def _change_lora(
        replicas: list[EngineReplica],
        call: Callable[[engine_pb2_grpc.EngineStub], Awaitable[engine_pb2.LoadLoraAdapterResponse | engine_pb2.UnloadLoraAdapterResponse]],
    ) -> list[str]:
        """Make the call on every replica at once; each replica that answers
        gets its adapter list updated. The first refusal is raised, naming its replica."""
        if not replicas:
            raise RequestError(Refusal.UNAVAILABLE, "no engine replica of the model is connected; retry shortly")
        results = await asyncio.gather(*(call(replica.stub()) for replica in replicas), return_exceptions=True)
        for replica, result in zip(replicas, results):
            if isinstance(result, (engine_pb2.LoadLoraAdapterResponse, engine_pb2.UnloadLoraAdapterResponse)):
                replica.set_lora_adapters(result.lora_adapters)
                continue
            if not isinstance(result, grpc.aio.AioRpcError):
                raise result
            status = rpc_status.from_call(result)
            error = error_from_status(status) if status is not None else RequestError(refusal_of(result.code()), result.details() or "")
            raise RequestError(error.kind, f"engine {replica.address}: {error.message}", error.field)
        return [replica.address for replica in replicas]

    def request(self, request: gateway_pb2.GenerateRequest, *more_prompts: gateway_pb2.GenerateRequest) -> GatewayRequest | ChoiceGroup:
        """A handle on a new request; nothing happens until its chunks are read.
        `more_prompts`: the other prompts of a /v1/completions body, alike but
        for their input."""
        return new_request(self, self._metrics, [request, *more_prompts], self._settings.output)

    async def render_metrics(self, stats_timeout_s: float) -> bytes:
        """The metrics in Prometheus' text format, with every connected
        replica's Stats fetched first (waiting at most stats_timeout_s)."""

        async def one(replica: EngineReplica) -> None:
            try:
                self._metrics.observe_stats(replica.address, await replica.stats(stats_timeout_s), replica.state.info)
            except (RequestError, grpc.aio.AioRpcError) as exc:
                log.warning("engine stats unavailable", peer=replica.address, error=str(exc))

        await asyncio.gather(*(one(r) for r in self._replicas.values() if r.state.available))
        return self._metrics.render()

    # ---- the Hub interface of requests -----------------------------------

    def resolve_model(self, name: str) -> engine_pb2.EngineInfo:
        return self._router.resolve_model(name)

    async def resolve(self, model: str, lora: str = "") -> Target:
        try:
            return self._router.resolve(model, lora)
        except RequestError as exc:
            recently = asyncio.get_running_loop().time() - self._info_refreshed_at < INFO_REFRESH_INTERVAL_S
            if exc.kind is not Refusal.NOT_FOUND or recently:
                raise
        # Perhaps an adapter loaded since: ask the replicas once more.
        await self.refresh_models()
        return self._router.resolve(model, lora)

    def admit(self, request: GatewayRequest) -> None:
        limit = self._settings.max_concurrent_requests
        if not self._in_flight_count.acquire(limit):
            raise RequestError(Refusal.RESOURCE_EXHAUSTED, f"the gateway has {limit} requests in flight (--max-concurrent-requests); retry later")
        self._in_flight.add(request.internal_id)

    async def tokenize(self, request: tokenizer_pb2.TokenizeRequest) -> tokenizer_pb2.TokenizeResult:
        return await self._tokenizer.tokenize(request)

    def pick_replica(self, model_id: str, prompt: list[int], lora: str = "") -> EngineReplica:
        return self._replicas[self._router.pick(model_id, prompt, lora).address]

    def register(self, request: GatewayRequest) -> None:
        self._live[request.internal_id] = request

    def detokenize(self, items: Iterable[tokenizer_pb2.DetokenizeItem]) -> None:
        self._tokenizer.detokenize(items)

    async def token_texts(self, token_ids: Iterable[int]) -> dict[int, str]:
        return await self._tokenizer.token_texts(token_ids)

    def leave(self, request: GatewayRequest) -> None:
        if request.internal_id in self._in_flight:
            self._in_flight.remove(request.internal_id)
            self._in_flight_count.release()
        self._live.pop(request.internal_id, None)
        # A request still detokenizing releases its tokenizer worker with its cancel.
        if not request.detokenizing:
            self._tokenizer.release(request.internal_id)

    # ---- the peers' streams ------------------------------------------------

    def _on_step(self, replica: EngineReplica, step: engine_pb2.EngineStep) -> None:
        self._metrics.observe_load(replica.address, step.load)
        # Built in place: a step carries an item per running request.
        batch = tokenizer_pb2.DetokenizeBatch()
        for update in step.updates:
            request = self._live.get(update.request_id)
            if request is not None:
                request.on_engine_update(update, batch)
        if batch.items:
            try:
                self._tokenizer.send_detokenize(batch)
            except RequestError:
                pass  # the tokenizer-down callback fails these requests

    def _on_text(self, delta: tokenizer_pb2.TextDelta) -> None:
        request = self._live.get(delta.request_id)
        if request is not None:
            request.on_text(delta)

    def _on_replica_down(self, replica: EngineReplica, reason: str) -> None:
        self._metrics.forget_replica(replica.address)
        status = error_status(grpc.StatusCode.UNAVAILABLE, f"engine replica {replica.address} went away ({reason}); retry the request")
        for request in self._live.values():
            request.on_replica_down(replica, status)

    def _on_tokenizer_down(self, tokenizer: TokenizerClient, reason: str) -> None:
        status = error_status(grpc.StatusCode.UNAVAILABLE, f"the tokenizer service went away ({reason}); retry the request")
        for request in self._live.values():
            if self._tokenizer.assigned(request.internal_id) is tokenizer:
                request.on_tokenizer_down(status)
