"""Speculative proposals from a draft model: a smaller model with the
target's tokenizer, run inside the same engine on the same device, with a
paged KV cache of its own.

Each engine step that speculates, the draft first catches up on the tokens
of each sequence it has not computed yet (the whole prompt the first time;
afterwards the tokens the last verification accepted, and the one it
sampled), then decodes k tokens greedily, one batched pass per token, the
sampled ids feeding the next pass on the device. A greedy draft proposes a
point mass, which is what the target's rejection sampling assumes, so
sampled output keeps the target's distribution.

What the draft's cache holds is tracked as token ids per request: tokens
rejected by the target, or changed by anything else, are recomputed from the
first one that differs. A request whose catch-up does not fit this step's
token budget (long prompts arriving together) gets no proposal until it has
caught up, and one for which the draft's cache has no room gets none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagewire.services.common.logging import get_logger
from pagewire.services.common.model import resolve_model
from pagewire.services.engine.core.kv_cache import cdiv
from pagewire.services.engine.core.proposer import ProposalRequest
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import GREEDY
from pagewire.services.engine.executor.kv_tensors import kv_bytes_per_block
from pagewire.services.engine.executor.loader import LoadedModel, load_model
from pagewire.services.engine.executor.runner import ModelRunner
from pagewire.services.engine.executor.tensor_parallel import MirroredSequence

log = get_logger("engine")


def load_draft_model(path: str, target: LoadedModel, max_model_len: int) -> LoadedModel:
    """The draft model on the target's device and dtype; refused when its
    vocabulary or context cannot serve the target's requests."""
    draft = load_model(resolve_model(path), target.device, target.dtype, max_model_len)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"--draft-model {path} has a vocabulary of {draft.config.vocab_size} tokens, the target {target.config.vocab_size}: "
            "the draft must share the target's tokenizer"
        )
    return draft


def draft_bytes_per_block(draft: LoadedModel, block_size: int, kv_dtype: torch.dtype) -> int:
    c = draft.config
    return kv_bytes_per_block(c.num_layers, block_size, c.num_kv_heads, c.head_dim, kv_dtype)


@dataclass
class _DraftState:
    """What the draft's cache holds for one request."""

    blocks: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the tokens whose K/V it holds, in order
    # How many of token_ids are the request's own tokens, which never change
    # once produced: only what follows them (proposals) needs comparing.
    confirmed: int = 0


class DraftProposer:
    def __init__(self, runner: ModelRunner, num_blocks: int, block_size: int, num_speculative_tokens: int, max_num_batched_tokens: int):
        """`runner` runs the draft model over its own KV cache of num_blocks blocks."""
        self.runner = runner
        self.block_size = block_size
        self.k = num_speculative_tokens
        self.token_budget = max_num_batched_tokens
        self.free_blocks = list(range(num_blocks - 1, -1, -1))
        self.states: dict[str, _DraftState] = {}
        log.info("draft model ready", num_kv_blocks=num_blocks, num_speculative_tokens=num_speculative_tokens)

    def forget(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is not None:
            self.free_blocks.extend(reversed(state.blocks))

    def _reserve(self, state: _DraftState, num_tokens: int) -> bool:
        """Blocks for num_tokens positions; False (nothing taken) when the cache has too few free."""
        needed = cdiv(num_tokens, self.block_size) - len(state.blocks)
        if needed > len(self.free_blocks):
            return False
        for _ in range(max(0, needed)):
            state.blocks.append(self.free_blocks.pop())
        return True

    @torch.inference_mode()
    def propose_all(self, requests: list[ProposalRequest]) -> dict[str, list[int]]:
        budget = self.token_budget
        ready: list[tuple[ProposalRequest, _DraftState, int]] = []
        catch_up: list[ScheduledSequence] = []
        for request in requests:
            limit = min(request.max_tokens, self.k)
            if limit <= 0:
                continue
            state = self.states.setdefault(request.request_id, _DraftState())
            tokens = request.token_ids
            computed = state.confirmed + _common_prefix(state.token_ids[state.confirmed :], tokens[state.confirmed :])
            del state.token_ids[computed:]
            # The last token is fed by the first decoding pass, which samples the first proposal.
            chunk = min(len(tokens) - 1 - computed, budget)
            complete = computed + chunk == len(tokens) - 1
            if not self._reserve(state, len(tokens) + limit - 1 if complete else computed + chunk):
                continue
            budget -= chunk
            if chunk:
                catch_up.append(_scheduled(request.request_id, state, computed, tokens[computed : computed + chunk], samples=False))
                state.token_ids.extend(tokens[computed : computed + chunk])
            state.confirmed = computed + chunk
            if complete:
                ready.append((request, state, limit))
        if catch_up:
            self.runner.launch(catch_up)
        return self._decode(ready) if ready else {}

    def _decode(self, ready: list[tuple[ProposalRequest, _DraftState, int]]) -> dict[str, list[int]]:
        """Up to k greedy passes; each feeds the token before it (the last
        known one first, then the draft's own sample, still on the device)."""
        mirrors = [_scheduled(r.request_id, state, len(r.token_ids) - 1, r.token_ids[-1:], samples=True).seq for r, state, _ in ready]
        launched = []
        for step in range(max(limit for _, _, limit in ready)):
            batch = []
            for mirror, (_, _, limit) in zip(mirrors, ready):
                if step < limit:
                    if step:
                        mirror.num_computed_tokens += 1
                        mirror.num_tokens += 1
                        mirror.known = []
                    batch.append(ScheduledSequence(mirror, 1))  # type: ignore[arg-type]
            launched.append(self.runner.launch(batch))
        proposals: dict[str, list[int]] = {mirror.request_id: [] for mirror in mirrors}
        for step in launched:
            assert step is not None
            for mirror, token_ids in zip(step.sequences, step.resolve().token_ids):
                proposals[mirror.request_id].append(token_ids[0])
        for request, state, limit in ready:
            # K/V now held: the last known token and every proposal but the last.
            state.token_ids.extend([request.token_ids[-1], *proposals[request.request_id][: limit - 1]])
            state.confirmed = len(request.token_ids)
        return proposals


def _scheduled(request_id: str, state: _DraftState, start: int, fed: list[int], *, samples: bool) -> ScheduledSequence:
    """A pass over the positions from `start` on that `fed` fills; the next
    token is sampled only when `samples`."""
    end = start + len(fed)
    seq = MirroredSequence(request_id, start, end if samples else end + 1, 0, state.blocks, [], list(fed), sampling=GREEDY)
    return ScheduledSequence(seq, len(fed))  # type: ignore[arg-type]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
