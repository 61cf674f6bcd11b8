"""Batched sampling over one step's logits [num_seqs, vocab].

Order, per row: penalties on the raw logits; greedy rows take the argmax;
the rest are divided by their temperature, then filtered by top-k, top-p and
min-p (the order of HF transformers' warpers), then sampled. Logprobs are
those of the penalised, temperature-scaled distribution before filtering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagewire.services.engine.core.sequence import SamplerOutput, SamplingParams, TokenLogprob


@dataclass
class SamplingRequest:
    """One row of the step's logits and what it needs to be sampled."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


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


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set to -inf what top-k (0 = off), top-p (1 = off) and min-p (0 = off)
    exclude, row by row. The most likely token always survives."""
    vocab = logits.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Keep a token while the mass before it is still short of top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_logits = sorted_logits.masked_fill((mass_before >= top_p.unsqueeze(1)) & (ranks > 0), float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
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

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRequest]) -> SamplerOutput:
        params = [r.params for r in rows]
        if any(p.has_penalties for p in params):
            logits = apply_penalties(logits, rows)
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        chosen = logits.argmax(dim=-1)
        # Greedy rows keep temperature 1 so their logprobs are the plain distribution.
        temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=self.device)
        scaled = logits / temperature.unsqueeze(1)
        if not bool(greedy.all()):
            chosen = torch.where(greedy, chosen, self._sample(scaled, rows))
        token_ids = chosen.tolist()
        return SamplerOutput(token_ids, self._logprobs(scaled, chosen, params))

    def _sample(self, scaled: torch.Tensor, rows: list[SamplingRequest]) -> torch.Tensor:
        params = [r.params for r in rows]
        top_k = torch.tensor([p.top_k for p in params], device=self.device)
        top_p = torch.tensor([p.top_p for p in params], device=self.device)
        min_p = torch.tensor([p.min_p for p in params], device=self.device)
        probs = filter_logits(scaled, top_k, top_p, min_p).softmax(dim=-1)
        # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race),
        # which lets each seeded row use its own generator.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, request in enumerate(rows):
            if request.params.seed is not None and not request.params.greedy:
                noise[i].exponential_(generator=self._request_generator(request))
        return (probs / noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)

    def _logprobs(self, scaled: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams]) -> list[TokenLogprob | None]:
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        result: list[TokenLogprob | None] = [None] * len(params)
        if not wanted:
            return result
        index = torch.tensor(wanted, device=self.device)
        logprobs = torch.log_softmax(scaled[index], dim=-1)
        sampled = logprobs.gather(1, chosen[index].unsqueeze(1)).squeeze(1).tolist()
        top_n = max(params[i].logprobs for i in wanted)
        top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], logprobs[:, :0].long())
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        token_ids = chosen[index].tolist()
        for row, i in enumerate(wanted):
            n = params[i].logprobs
            top = tuple(zip(top_ids[row][:n], top_values[row][:n]))
            result[i] = TokenLogprob(token_ids[row], sampled[row], top)
        return result
