"""Overlapped steps: the host schedules step N+1 before it reads step N's
tokens back, and nothing a request sees changes for it."""

from __future__ import annotations

import gc
import weakref

from pagewire.services.engine.core.sequence import FinishReason, SamplingParams
from tests.engine.util import assert_no_leaks, make_engine, mixed_sampling, run_all, tokens_of

MAX_TOKENS = 10

VARIANTS = mixed_sampling(MAX_TOKENS)


def _run(engine_model, prompts, async_scheduling: bool) -> dict:  # type: ignore[no-untyped-def]
    core = make_engine(engine_model, async_scheduling=async_scheduling, block_size=4, max_num_batched_tokens=24)
    for index, ids in enumerate(prompts):
        core.add_request(f"r{index}", ids, VARIANTS[index % len(VARIANTS)])
    outputs = run_all(core)
    assert_no_leaks(core)
    return outputs


def test_seeds_penalties_and_logprobs_are_unchanged_by_overlap(engine_model, prompts) -> None:  # type: ignore[no-untyped-def]
    overlapped = _run(engine_model, prompts, True)
    synchronous = _run(engine_model, prompts, False)
    assert overlapped.keys() == synchronous.keys()
    for request_id, outs in synchronous.items():
        assert tokens_of(overlapped[request_id]) == tokens_of(outs), request_id
        mine = [lp for out in overlapped[request_id] for lp in out.logprobs]
        theirs = [lp for out in outs for lp in out.logprobs]
        assert [(lp.token_id, lp.top) for lp in mine] == [(lp.token_id, lp.top) for lp in theirs]


def test_tokens_arrive_one_step_behind_and_a_stop_costs_at_most_one_step(engine_model, prompts, hf_greedy) -> None:  # type: ignore[no-untyped-def]
    stop_token = hf_greedy[0][3]
    expected = hf_greedy[0][: hf_greedy[0].index(stop_token) + 1]
    steps = {}
    for async_scheduling in (True, False):
        core = make_engine(engine_model, async_scheduling=async_scheduling)
        core.add_request("r", prompts[0], SamplingParams(temperature=0.0, max_tokens=50, stop_token_ids=(stop_token,)))
        first = core.step()
        # The prefill sampled a token: overlapped, it is read back with the next step.
        assert [t for out in first for t in out.new_token_ids] == ([] if async_scheduling else expected[:1])
        outputs = first + [out for outs in run_all(core).values() for out in outs]
        assert tokens_of(outputs) == expected
        assert outputs[-1].finish_reason is FinishReason.STOP and outputs[-1].matched_stop_token_id == stop_token
        assert_no_leaks(core)
        steps[async_scheduling] = core.stats().steps_total
    assert steps[False] <= steps[True] <= steps[False] + 1


def test_length_limited_requests_take_no_extra_step(engine_model, prompts) -> None:  # type: ignore[no-untyped-def]
    steps = {}
    for async_scheduling in (True, False):
        core = make_engine(engine_model, async_scheduling=async_scheduling)
        core.add_request("r", prompts[1], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        outputs = run_all(core)["r"]
        assert len(tokens_of(outputs)) == 6 and outputs[-1].finish_reason is FinishReason.LENGTH
        steps[async_scheduling] = core.stats().steps_total
    assert steps[True] == steps[False] == 6


def test_a_dropped_engine_is_freed_at_once(engine_model, prompts) -> None:  # type: ignore[no-untyped-def]
    """No reference cycle holds the runner (a step in flight included): on a
    GPU its CUDA graphs must not be left to a collection that could fall
    during another engine's graph capture."""
    core = make_engine(engine_model)
    core.add_request("r", prompts[0], SamplingParams(temperature=0.0, max_tokens=8))
    core.step()
    core.step()
    assert core._in_flight is not None
    runner = weakref.ref(core.executor.runner)
    gc.disable()
    try:
        del core
        assert runner() is None
    finally:
        gc.enable()
