"""Batched sampling over one step's logits [num_seqs, vocab].

Order, per row: a constrained row's grammar masks the tokens it does not
allow next (to -inf; the bitmask is filled on the host, by the grammar
workers, while the device still runs the forward pass); penalties on the raw logits; the row's
logit_bias added; greedy rows take the argmax;
the rest are divided by their temperature, then filtered by top-k, top-p and
min-p (the order of HF transformers' warpers), then sampled. Logprobs are
those of the penalised, temperature-scaled distribution before filtering.

A step that verifies speculative proposals has a row per proposal and one
after them. A row's proposal d is accepted when it is the argmax (greedy) or
with probability p(d) under the row's distribution p (sampled); a rejected
row's token comes from p with d removed and renormalised, which, for a
proposal that is a point mass, makes every emitted token follow p exactly
(rejection sampling of speculative decoding). A sequence emits its accepted
proposals up to the first rejected one, then that row's token; with all
accepted, the last row's token.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from pagewire.services.engine.core.sequence import SamplerOutput, SamplingParams, TokenLogprob
from pagewire.services.engine.executor.grammar import apply_token_bitmask
from pagewire.services.engine.executor.grammar_pool import GrammarMatchers, MaskRow
from pagewire.services.engine.executor.host_copy import to_device


@dataclass(slots=True)
class SamplingRequest:
    """One row of the step's logits and what it needs to be sampled."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # The proposed token this row verifies; None for a plain row.
    draft_token_id: int | None = None
    # The row's sequence has a grammar (never with a draft: constrained
    # sequences do not speculate).
    constrained: bool = False


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (divide positive
    logits, multiply negative ones); frequency and presence penalties over
    output tokens only (OpenAI semantics)."""
    num_rows, vocab = logits.shape
    device = logits.device
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
    seen = (_token_counts([r.prompt_token_ids for r in rows], vocab, device) + output_counts) > 0
    repetition = torch.tensor([r.params.repetition_penalty for r in rows], device=device).unsqueeze(1)
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=device).unsqueeze(1)
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=device).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalised, logits)
    return logits - frequency * output_counts - presence * (output_counts > 0).float()


def _token_counts(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] float32 occurrence counts."""
    width = max((len(t) for t in token_lists), default=0)
    # Padding goes to an extra column that is dropped afterwards.
    padded = torch.full((len(token_lists), width), vocab, dtype=torch.int64)
    for i, tokens in enumerate(token_lists):
        padded[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def filter_logits(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, *, truncates: bool = True, uses_min_p: bool = True
) -> torch.Tensor:
    """Set to -inf what top-k (0 = off), top-p (1 = off) and min-p (0 = off)
    exclude, row by row. The most likely token always survives. The caller
    says from the host whether any row truncates (top-k or top-p) or uses
    min-p, so that no step waits on the device to find out."""
    vocab = logits.shape[-1]
    if truncates:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass before it is still short of top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill((mass_before >= top_p.unsqueeze(1)) & (ranks > 0), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    if uses_min_p:
        probs = logits.softmax(dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
    """Add each row's logit_bias to its logits. The (row, id, bias) entries
    reach the device in one non-blocking copy (float32 holds any token id
    exactly), so the step never waits on the device for them."""
    entries = [[i, token_id, bias] for i, r in enumerate(rows) for token_id, bias in r.params.logit_bias]
    staged = to_device(entries, torch.float32, logits.device)
    row_ids, token_ids = staged[:, 0].long(), staged[:, 1].long()
    return logits.index_put((row_ids, token_ids), staged[:, 2].to(logits.dtype), accumulate=True)


@dataclass
class DeviceSample:
    """A step's sampled ids and logprobs, still on the device. `resolve()` waits
    for them (an event, not a device-wide sync) and returns host lists; the
    ids themselves feed the next step's inputs on the device meanwhile."""

    token_ids: torch.Tensor  # [rows] int64, on the device
    params: list[SamplingParams]
    # Rows per sequence, in order: its proposals plus one.
    row_counts: list[int]
    logprob_rows: list[int]
    # Token ids, then (sampled, top values, top ids) when logprobs were asked
    # for, then the accepted flags when the step verified proposals.
    host: list[torch.Tensor]
    verifies: bool
    ready: torch.cuda.Event | None

    @property
    def last_rows(self) -> list[int]:
        """Each sequence's last row: a plain sequence's next token."""
        return list(itertools.accumulate(self.row_counts, initial=-1))[1:]

    def resolve(self) -> SamplerOutput:
        if self.ready is not None:
            self.ready.synchronize()
        token_ids = self.host[0].tolist()
        if not self.logprob_rows and len(token_ids) == len(self.row_counts):  # a row per sequence: no proposals
            return SamplerOutput([[token_id] for token_id in token_ids], [[] for _ in token_ids])
        accepted = self.host[-1].tolist() if self.verifies else []
        logprobs: dict[int, TokenLogprob] = {}
        if self.logprob_rows:
            sampled, top_values, top_ids = (t.tolist() for t in self.host[1:4])
            for row, i in enumerate(self.logprob_rows):
                n = self.params[i].logprobs or 0
                logprobs[i] = TokenLogprob(token_ids[i], sampled[row], tuple(zip(top_ids[row][:n], top_values[row][:n])))
        out = SamplerOutput([], [])
        start = 0
        for count in self.row_counts:
            end = start + 1
            while end < start + count and accepted[end - 1]:
                end += 1
            out.token_ids.append(token_ids[start:end])
            out.logprobs.append([logprobs[row] for row in range(start, end)] if start in logprobs else [])
            start += count
        return out


def finite(logits: torch.Tensor) -> torch.Tensor:
    """A tiny temperature or penalty overflows logits to inf, and inf - inf
    is NaN: every row kept finite, so argmax, softmax and logprobs stay sane.
    In place, so a CPU step does not stream a second copy of its logits
    (6 MB for 32 rows of 49k) through memory."""
    return torch.nan_to_num_(logits, nan=float("-inf"), posinf=torch.finfo(torch.float32).max)


@functools.cache
def _chunk_width(columns: int) -> int | None:
    """The divisor of columns nearest its square root (within 4x), which
    balances row_argmax's two passes; None where there is none."""
    root = math.isqrt(columns)
    divisors = [w for w in range(max(16, root // 4), 4 * root + 1) if columns % w == 0]
    return min(divisors, key=lambda w: abs(math.log(w / root)), default=None)


def row_argmax(rows: torch.Tensor) -> torch.Tensor:
    """rows.argmax(dim=-1) for [n, columns]: each row's first largest value
    (NaN counting as largest, as torch counts it). On the CPU through the
    largest value of each chunk of a row, then the first chunk holding the
    row's largest and the first index within it: ATen's CPU argmax compares
    one element at a time, and over 32 rows of 49k logits took 0.65 ms where
    amax takes 0.04."""
    width = _chunk_width(rows.shape[-1]) if rows.device.type == "cpu" and rows.dim() == 2 and rows.stride(-1) == 1 else None
    if width is None:
        return rows.argmax(dim=-1)
    chunks = rows.view(rows.shape[0], -1, width)
    best_chunk = chunks.amax(dim=-1).argmax(dim=-1)
    within = chunks[torch.arange(rows.shape[0]), best_chunk].argmax(dim=-1)
    return best_chunk * width + within


class Sampler:
    def __init__(self, seed: int, device: torch.device, grammars: GrammarMatchers | None = None):
        self.device = device
        self.grammars = grammars
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self.request_generators.pop(request_id, None)

    def _request_generator(self, request: SamplingRequest) -> torch.Generator:
        generator = self.request_generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(request.params.seed)
            self.request_generators[request.request_id] = generator
        return generator

    def start_masks(self, rows: list[MaskRow]) -> None:
        """Start filling the masks of the constrained rows (those a step's
        sample() gets, constrained), whose outputs are on the host now;
        sample() waits for them."""
        if rows:
            assert self.grammars is not None, "a constrained row reached a sampler without grammars"
            self.grammars.start(rows)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRequest], row_counts: list[int] | None = None) -> DeviceSample:
        """Sample every row on the device without waiting for it; row_counts
        groups the rows by sequence (see DeviceSample), one each when None.
        The logits are the sampler's from here on: it may overwrite them."""
        row_counts = row_counts or [1] * len(rows)
        if all(r.params.plain_greedy and r.draft_token_id is None and not r.constrained for r in rows):
            return self._argmax(logits, row_counts)
        params = [r.params for r in rows]
        constrained = [i for i, r in enumerate(rows) if r.constrained]
        if constrained:
            logits = self._mask(logits, constrained, [(rows[i].request_id, rows[i].output_token_ids) for i in constrained])
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits, rows)
        if any(p.logit_bias for p in params):
            logits = apply_logit_bias(logits, rows)
        verifies = any(r.draft_token_id is not None for r in rows)
        if not verifies and all(p.greedy and p.logprobs is None for p in params):
            return self._argmax(logits, row_counts)
        # Greedy rows keep temperature 1 so their logprobs are the plain
        # distribution. Proposals (-1: none) ride along; float32 holds ids exactly.
        per_row = to_device(
            [
                [1.0 if r.params.greedy else r.params.temperature, float(r.params.greedy), r.params.top_k, r.params.top_p, r.params.min_p]
                + ([-1 if r.draft_token_id is None else r.draft_token_id] if verifies else [])
                for r in rows
            ],
            torch.float32,
            self.device,
        )
        draft = per_row[:, 5].long() if verifies else None
        scaled = finite(logits / per_row[:, 0:1])
        chosen = row_argmax(scaled)
        accepted = None if draft is None else chosen == draft
        if not all(p.greedy for p in params):
            sampled, sampled_accepted = self._sample(scaled, rows, per_row, draft)
            greedy = per_row[:, 1] > 0
            chosen = torch.where(greedy, chosen, sampled)
            if accepted is not None:
                accepted = torch.where(greedy, accepted, sampled_accepted)
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        on_device = [chosen]
        if wanted:
            index = to_device(wanted, torch.int64, self.device)
            logprobs = torch.log_softmax(scaled[index], dim=-1)
            top_n = max(params[i].logprobs or 0 for i in wanted)
            top_values, top_ids = logprobs.topk(top_n, dim=-1)
            on_device += [logprobs.gather(1, chosen[index].unsqueeze(1)).squeeze(1), top_values, top_ids]
        if accepted is not None:
            on_device.append(accepted)
        return self._to_host(chosen, params, row_counts, wanted, on_device, verifies)

    def greedy(self, logits: torch.Tensor, constrained: list[int] | None = None, mask_rows: list[MaskRow] | None = None) -> DeviceSample:
        """A row per sequence, each plain greedy (SamplingParams.plain_greedy,
        no proposal), the rows listed in constrained masked by their grammars
        first (mask_rows: their request ids and outputs): what sample()
        computes for such rows, without building a row of parameters each."""
        if constrained:
            assert mask_rows is not None
            logits = self._mask(logits, constrained, mask_rows)
        return self._argmax(logits, [1] * logits.shape[0])

    def _mask(self, logits: torch.Tensor, constrained: list[int], mask_rows: list[MaskRow]) -> torch.Tensor:
        """The logits with row constrained[i] masked by the grammar of mask_rows[i]."""
        assert self.grammars is not None, "a constrained row reached a sampler without grammars"
        return apply_token_bitmask(logits, self.grammars.fill(mask_rows), constrained)

    def _argmax(self, logits: torch.Tensor, row_counts: list[int]) -> DeviceSample:
        """Greedy rows without logprobs or proposals, served without building
        per-row parameters: what the general path computes for them (temperature 1)."""
        chosen = row_argmax(finite(logits))
        return self._to_host(chosen, [], row_counts, [], [chosen], False)

    def _to_host(
        self, chosen: torch.Tensor, params: list[SamplingParams], row_counts: list[int], wanted: list[int], on_device: list[torch.Tensor], verifies: bool
    ) -> DeviceSample:
        if self.device.type != "cuda":
            return DeviceSample(chosen, params, row_counts, wanted, on_device, verifies, None)
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in on_device]
        for target, source in zip(host, on_device):
            target.copy_(source, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return DeviceSample(chosen, params, row_counts, wanted, host, verifies, ready)

    def _sample(
        self, scaled: torch.Tensor, rows: list[SamplingRequest], per_row: torch.Tensor, draft: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's sampled token, and with proposals (draft, -1 for none)
        whether the row accepted its own."""
        params = [r.params for r in rows]
        truncates = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        uses_min_p = any(p.min_p > 0.0 for p in params)
        filtered = filter_logits(scaled, per_row[:, 2].long(), per_row[:, 3], per_row[:, 4], truncates=truncates, uses_min_p=uses_min_p)
        probs = filtered.softmax(dim=-1)
        seeded = [(i, self._request_generator(r)) for i, r in enumerate(rows) if r.params.seed is not None and not r.params.greedy]
        accepted = None
        if draft is not None:
            has_draft = draft >= 0
            index = draft.clamp(min=0).unsqueeze(1)
            proposed = probs.gather(1, index)
            uniform = torch.rand(len(rows), device=self.device, generator=self.generator)
            for i, generator in seeded:
                uniform[i] = torch.rand((), device=self.device, generator=generator)
            accepted = has_draft & (uniform < proposed.squeeze(1))
            # On rejection: p with the proposal removed (the exponential race
            # below needs no renormalising).
            probs = probs.scatter(1, index, torch.where(has_draft.unsqueeze(1), 0.0, proposed))
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race),
        # which lets each seeded row use its own generator.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, generator in seeded:
            noise[i].exponential_(generator=generator)
        sampled = row_argmax(probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny))
        if accepted is not None:
            sampled = torch.where(accepted, draft, sampled)
        return sampled, accepted
