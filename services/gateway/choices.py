"""A request for several completions: n > 1, or several prompts of one
/v1/completions body. Each completion is a GatewayRequest of its own (one
sequence in the engine); this group runs them and merges their chunks into
one request's, each chunk tagged with its completion's index
(prompt_index * n + i, as OpenAI numbers choices).

The completions of one prompt share its KV blocks through the engine's
prefix cache rather than through anything of their own: the first is sent
alone, and the others follow it to the same replica once it has produced its
first token, when its prompt's full blocks are computed and cached. That
costs the followers one step of latency, and keeps the engine core free of
sequence groups (forking block tables, copy-on-write of a shared last
block) that only n > 1 would use; a follower recomputes only the prompt's
last, partial block. The followers also reuse the first's tokenization and
compiled grammar.

Completion i of a prompt samples with seed + i when a seed is set, so that
the choices differ and each is reproducible. Each completion's last chunk
carries its finish reason; the group's last chunk carries the usage summed
over completions (each prompt counted once). A completion that fails fails
the group: the others are cancelled and their output dropped, and the failed
one's chunk is the last. Cancelling the group, its client going away or the
deadline (each completion has the same one) ends every completion.
"""

from __future__ import annotations

import asyncio
import collections
import uuid

from pagewire.services.common.errors import RequestError
from pagewire.services.common.grpc_utils import to_status
from pagewire.services.gateway.metrics import GatewayMetrics
from pagewire.services.gateway.output_buffer import OutputLimits
from pagewire.services.gateway.request import ChunkStream, Emit, GatewayRequest, Hub
from pagewire.services.gateway.validation import check_fits, validate_request
from pagewire.v1 import common_pb2, gateway_pb2

SEED_MODULUS = 2**64


class ChoiceGroup(ChunkStream):
    """The completions of one request, as one request."""

    def __init__(
        self, hub: Hub, metrics: GatewayMetrics, prompts: list[gateway_pb2.GenerateRequest], output_limits: OutputLimits = OutputLimits()
    ):
        """`prompts`: one request per prompt, alike but for the input; the
        first one's sampling.n completions of each."""
        self.hub = hub
        self.request = prompts[0]
        self.id = self.request.request_id or f"req-{uuid.uuid4().hex}"
        self.n = self.request.sampling.n or 1
        self.num_prompts = len(prompts)
        self._prompts, self._metrics, self._output_limits = prompts, metrics, output_limits
        # Made by run() once n is checked: a request's n may be any uint32.
        self.members: list[GatewayRequest] = []
        self._cancelled = False
        self._emit: Emit | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failed = False
        self._ended = 0
        self._usage = common_pb2.Usage()
        # The member of each chunk handed out and not yet taken, oldest first
        # (None for the group's own refusal).
        self._handed: collections.deque[GatewayRequest | None] = collections.deque()

    def _completion(self, prompt: gateway_pb2.GenerateRequest, i: int) -> gateway_pb2.GenerateRequest:
        request = gateway_pb2.GenerateRequest()
        request.CopyFrom(prompt)
        request.request_id = self.id
        request.sampling.ClearField("n")
        if request.sampling.HasField("seed"):
            request.sampling.seed = (request.sampling.seed + i) % SEED_MODULUS
        return request

    def cancel(self) -> None:
        self._cancelled = True
        for member in self.members:
            member.cancel()

    def taken(self) -> None:
        if (member := self._handed.popleft()) is not None:
            member.taken()

    async def run(self, emit: Emit) -> None:
        self._emit = emit
        try:
            # n and the output over every completion, checked once for the group.
            validate_request(self.request)
            target = await self.hub.resolve(self.request.model, self.request.lora)
            check_fits(self.request, target.info, self.num_prompts)
        except RequestError as exc:
            self._handed.append(None)
            emit(gateway_pb2.GenerateChunk(request_id=self.id, finish_reason=common_pb2.FINISH_REASON_ERROR, error=to_status(exc)))
            return
        for prompt in self._prompts:
            leader = None
            for i in range(self.n):
                member = GatewayRequest(self.hub, self._metrics, self._completion(prompt, i), self._output_limits, leader)
                leader = leader or member
                self.members.append(member)
        if self._cancelled:  # while the group was being checked
            self.cancel()
        self._tasks = [asyncio.ensure_future(member.run(lambda chunk, i=i: self._on_chunk(i, chunk))) for i, member in enumerate(self.members)]
        try:
            await asyncio.wait(self._tasks)
            for task in self._tasks:
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error  # a fault of the gateway, not a refusal: as a lone request's would
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _on_chunk(self, index: int, chunk: gateway_pb2.GenerateChunk) -> None:
        member = self.members[index]
        if self._failed:
            member.taken()  # dropped: never handed out
            return
        chunk.index = index
        if chunk.finish_reason:
            self._ended += 1
            self._count(index, chunk.usage)
            if chunk.error.code:
                self._fail(index)
            if chunk.error.code or self._ended == len(self.members):
                chunk.usage.CopyFrom(self._usage)
            else:
                chunk.ClearField("usage")
        assert self._emit is not None
        self._handed.append(member)
        self._emit(chunk)

    def _count(self, index: int, usage: common_pb2.Usage) -> None:
        self._usage.completion_tokens += usage.completion_tokens
        if index % self.n == 0:  # a prompt's first completion: its prompt counts once
            self._usage.prompt_tokens += usage.prompt_tokens
            self._usage.cached_prompt_tokens += usage.cached_prompt_tokens

    def _fail(self, index: int) -> None:
        """Member `index` failed, which ends the group: the others stop."""
        self._failed = True
        for i, task in enumerate(self._tasks):
            if i != index:
                task.cancel()


def new_request(
    hub: Hub, metrics: GatewayMetrics, prompts: list[gateway_pb2.GenerateRequest], output_limits: OutputLimits = OutputLimits()
) -> GatewayRequest | ChoiceGroup:
    """The request for `prompts` (alike but for their input): one completion
    of one prompt is a GatewayRequest of its own, more are a group of them."""
    if len(prompts) == 1 and prompts[0].sampling.n <= 1:
        return GatewayRequest(hub, metrics, prompts[0], output_limits)
    return ChoiceGroup(hub, metrics, prompts, output_limits)
