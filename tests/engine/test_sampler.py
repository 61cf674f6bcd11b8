"""The batched sampler against simple per-row torch references."""

from __future__ import annotations

import math

import pytest
import torch

from pagewire.services.engine.executor.sampler import Sampler, SamplingRequest, apply_penalties, filter_logits, row_argmax
from pagewire.services.engine.core.sequence import SamplingParams

VOCAB = 64


def _row(params: SamplingParams, request_id: str = "r", prompt: list[int] | None = None, output: list[int] | None = None) -> SamplingRequest:
    return SamplingRequest(request_id, params, prompt or [], output or [])


def _sample(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRequest]) -> tuple[list[int], list]:
    """One token per row, and its logprob (None when not asked for)."""
    out = sampler.sample(logits, rows).resolve()
    return [t for (t,) in out.token_ids], [lp[0] if lp else None for lp in out.logprobs]


def test_greedy_takes_what_sample_takes_for_plain_greedy_rows() -> None:
    """The step's shortcut for a batch of plain greedy rows (no row of
    parameters built) picks each row's first largest logit, as sample()
    does, inf and NaN rows included."""
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(5))
    logits[1, 7] = logits[1, 9] = 50.0  # a tie: the first wins
    logits[2, 3] = math.inf
    logits[3, :] = math.nan
    rows = [_row(SamplingParams(temperature=0.0), f"r{i}") for i in range(6)]
    greedy = Sampler(seed=0, device=torch.device("cpu")).greedy(logits.clone()).resolve()
    assert greedy.token_ids == Sampler(seed=0, device=torch.device("cpu")).sample(logits.clone(), rows).resolve().token_ids
    assert greedy.token_ids[:3] == [[int(logits[0].argmax())], [7], [3]]


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def _reference_top_p(probs: torch.Tensor, top_p: float) -> set[int]:
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for token in order:
        kept.add(token)
        mass += probs[token].item()
        if mass >= top_p:
            break
    return kept


def test_top_k_top_p_min_p_masks_match_references() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB) * 3
    top_k = torch.tensor([0, 5, 0, 0, 3, 0])
    top_p = torch.tensor([1.0, 1.0, 0.7, 1.0, 0.9, 0.05])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.0, 0.0])
    filtered = filter_logits(logits, top_k, top_p, min_p)
    probs = logits.softmax(-1)
    assert _kept(filtered[0]) == set(range(VOCAB))
    assert _kept(filtered[1]) == set(logits[1].topk(5).indices.tolist())
    assert _kept(filtered[2]) == _reference_top_p(probs[2], 0.7)
    assert _kept(filtered[3]) == set(torch.nonzero(probs[3] >= 0.1 * probs[3].max()).flatten().tolist())
    # top-k then top-p over the renormalised survivors.
    top3 = logits[4].topk(3).indices
    renormalised = torch.full((VOCAB,), 0.0)
    renormalised[top3] = logits[4][top3].softmax(-1)
    assert _kept(filtered[4]) == _reference_top_p(renormalised, 0.9)
    # A tiny top_p still keeps the most likely token.
    assert _kept(filtered[5]) == {int(logits[5].argmax())}
    torch.testing.assert_close(filtered[2][list(_kept(filtered[2]))], logits[2][list(_kept(filtered[2]))])


def test_penalties_match_per_row_reference() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    rows = [
        _row(SamplingParams(repetition_penalty=1.3), prompt=[1, 2, 3], output=[3, 4]),
        _row(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt=[5], output=[6, 6, 7]),
        _row(SamplingParams(), prompt=[1], output=[1]),
    ]
    got = apply_penalties(logits, rows)
    expected = logits.clone()
    for token in {1, 2, 3, 4}:
        value = expected[0, token]
        expected[0, token] = value / 1.3 if value > 0 else value * 1.3
    expected[1, 6] -= 0.5 * 2 + 0.25
    expected[1, 7] -= 0.5 * 1 + 0.25
    torch.testing.assert_close(got, expected)


def test_greedy_takes_the_argmax_and_logprobs_equal_log_softmax() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    rows = [
        _row(SamplingParams(temperature=0.0, logprobs=4, top_k=2, seed=5)),
        _row(SamplingParams(temperature=0.0)),
        _row(SamplingParams(temperature=0.5, logprobs=0, seed=3), request_id="t"),
    ]
    token_ids, logprobs = _sample(Sampler(seed=0, device=torch.device("cpu")), logits, rows)
    assert token_ids[:2] == logits[:2].argmax(-1).tolist()
    reference = torch.log_softmax(logits[0], -1)
    first = logprobs[0]
    assert first.token_id == token_ids[0]
    assert math.isclose(first.logprob, reference[first.token_id].item(), rel_tol=1e-6)
    assert [t for t, _ in first.top] == reference.topk(4).indices.tolist()
    assert [v for _, v in first.top] == pytest.approx(reference.topk(4).values.tolist(), rel=1e-6)
    assert logprobs[1] is None
    # Sampled rows report the temperature-scaled distribution.
    scaled = torch.log_softmax(logits[2] / 0.5, -1)
    assert math.isclose(logprobs[2].logprob, scaled[token_ids[2]].item(), rel_tol=1e-6)
    assert logprobs[2].top == ()


def test_an_all_greedy_batch_picks_what_a_mixed_batch_picks_for_its_greedy_rows() -> None:
    # All greedy without logprobs takes a shorter path; non-finite logits included.
    torch.manual_seed(4)
    logits = torch.randn(4, VOCAB)
    logits[1, 7] = float("nan")
    logits[2, 9] = float("inf")
    logits[3] = float("-inf")
    logits[3, 11] = 0.0
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    greedy_rows = [_row(SamplingParams(temperature=0.0), request_id=f"g{i}") for i in range(4)]
    alone, _ = _sample(sampler, logits.clone(), greedy_rows)
    mixed, _ = _sample(sampler, torch.cat([logits, logits[:1]]), [*greedy_rows, _row(SamplingParams(temperature=0.7, seed=1), request_id="s")])
    # All greedy, one row penalized: past the penalties, the greedy rows' path.
    penalized = _row(SamplingParams(temperature=0.0, repetition_penalty=1.5), request_id="p", output=[3])
    with_penalty, _ = _sample(sampler, torch.cat([logits, logits[:1]]), [*greedy_rows, penalized])
    assert alone == mixed[:4] == with_penalty[:4]
    assert alone[1] != 7 and alone[2] == 9 and alone[3] == 11


@pytest.mark.parametrize(
    "params, plain",
    [
        (SamplingParams(temperature=0.0), True),
        (SamplingParams(temperature=0.0, seed=3, top_k=5), True),  # greedy ignores what only sampling reads
        (SamplingParams(temperature=0.7), False),
        (SamplingParams(temperature=0.0, logprobs=0), False),
        (SamplingParams(temperature=0.0, repetition_penalty=1.1), False),
        (SamplingParams(temperature=0.0, presence_penalty=0.5), False),
        (SamplingParams(temperature=0.0, logit_bias=((1, 2.0),)), False),
    ],
)
def test_plain_greedy_means_the_argmax_of_untouched_logits(params: SamplingParams, plain: bool) -> None:
    assert params.plain_greedy is plain


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(4000, 1)
    rows = [_row(SamplingParams(temperature=1.0), request_id=str(i)) for i in range(4000)]
    tokens = torch.tensor(_sample(Sampler(seed=7, device=torch.device("cpu")), logits, rows)[0])
    frequencies = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(frequencies, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03, rtol=0)


def test_filtered_tokens_are_never_sampled() -> None:
    torch.manual_seed(3)
    logits = torch.randn(1, VOCAB).repeat(500, 1)
    rows = [_row(SamplingParams(temperature=2.0, top_k=3), request_id=str(i)) for i in range(500)]
    tokens = set(_sample(Sampler(seed=1, device=torch.device("cpu")), logits, rows)[0])
    assert tokens <= set(logits[0].topk(3).indices.tolist()) and len(tokens) == 3


def test_seeded_requests_reproduce_whatever_the_batch() -> None:
    torch.manual_seed(4)
    steps = [torch.randn(3, VOCAB) for _ in range(8)]

    def run(seed: int, position: int, batch_seed: int) -> list[int]:
        """The seeded request's tokens when it sits at `position` among unseeded neighbours."""
        sampler = Sampler(seed=batch_seed, device=torch.device("cpu"))
        tokens = []
        for logits in steps:
            batch = logits.clone()
            batch[[0, position]] = logits[[position, 0]]
            rows = [_row(SamplingParams(temperature=1.0), request_id=f"x{i}") for i in range(3)]
            rows[position] = _row(SamplingParams(temperature=1.0, seed=seed), request_id="seeded")
            tokens.append(_sample(sampler, batch, rows)[0][position])
        return tokens

    assert run(1234, position=0, batch_seed=1) == run(1234, position=2, batch_seed=2)
    assert run(1234, position=0, batch_seed=1) != run(99, position=0, batch_seed=1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_logit_bias_adds_to_each_rows_logits_greedy_and_sampled(device: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, VOCAB)
    forced, banned = 7, int(logits[1].argmax())
    rows = [
        _row(SamplingParams(temperature=0.0, logit_bias=((forced, 100.0),)), "a"),
        _row(SamplingParams(temperature=0.0, logit_bias=((banned, -100.0), (3, 0.5)), logprobs=0), "b"),
        _row(SamplingParams(temperature=1.0, seed=5, logit_bias=((forced, 100.0),)), "c"),
    ]
    sampler = Sampler(0, torch.device(device))
    tokens, logprobs = _sample(sampler, logits.to(device), rows)
    reference = logits.clone()
    reference[1, banned] -= 100.0
    reference[1, 3] += 0.5
    assert tokens[0] == forced and tokens[2] == forced
    assert tokens[1] == int(reference[1].argmax()) != banned
    # Logprobs are those of the biased distribution.
    assert logprobs[1].logprob == pytest.approx(float(reference[1].log_softmax(-1)[tokens[1]]), abs=1e-5)
    # A row without a bias is untouched.
    assert _sample(sampler, logits.to(device), [_row(SamplingParams(temperature=0.0))])[0] == [int(logits[0].argmax())]


def test_logit_bias_out_of_range_is_a_problem() -> None:
    assert SamplingParams(logit_bias=((1, 100.5),)).problems() == ["logit_bias values must be in [-100, 100], got 100.5 for token 1"]
    assert SamplingParams(logit_bias=tuple((i, 1.0) for i in range(301))).problems() == ["at most 300 logit_bias token ids are accepted, got 301"]
    assert SamplingParams(logit_bias=((1, -100.0),)).problems() == []


@pytest.mark.parametrize("columns", [49152, 32000, 151936, 1000, 50257, 7])
def test_row_argmax_equals_torch_argmax(columns: int) -> None:
    # Ties across and within chunks, NaN (counted largest), infinities and an all -inf row.
    generator = torch.Generator().manual_seed(columns)
    rows = torch.randn(9, columns, generator=generator)
    rows[1, [5, columns - 1]] = 50.0
    rows[2, [columns - 2, columns - 1]] = 50.0
    rows[3, columns // 2] = float("nan")
    rows[3, 0] = 1e9
    rows[4, [3, columns - 1]] = float("inf")
    rows[5] = float("-inf")
    rows[6] = rows[6].round()  # many ties
    rows[7, -1] = float("nan")
    assert torch.equal(row_argmax(rows), rows.argmax(dim=-1))
    assert torch.equal(row_argmax(rows[:, : columns - 1]), rows[:, : columns - 1].argmax(dim=-1))
