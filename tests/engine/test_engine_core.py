"""EngineCore behaviour on the real embedded model: preemption, prefix
caching, aborts in every state, deadlines, stop conditions, validation."""

from __future__ import annotations

import gc
import itertools

import pytest
import torch

from pagewire.services.common.errors import Refusal, RequestError
from pagewire.services.engine.config import CPU_MAX_NUM_BATCHED_TOKENS, GPU_MAX_NUM_BATCHED_TOKENS
from pagewire.services.engine.executor.kv_tensors import kv_bytes_per_block
from pagewire.services.engine.executor.model_executor import freeze_long_lived_objects
from pagewire.services.engine.core.engine import STALE_DEADLINES_KEPT
from pagewire.services.engine.core.sequence import FinishReason, RequestOutput, SamplingParams, Sequence, SequenceStatus
from tests.engine.util import MAX_NEW_TOKENS, assert_no_leaks, greedy, make_engine, run_all, tokens_of

LONG = 8  # index of the long prompt in the prompt set

# Every test here runs with overlapped steps and without.
pytestmark = pytest.mark.usefixtures("both_schedulings")


def _hf_greedy(hf_model, ids: list[int], max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=2)
    return out[0, len(ids) :].tolist()


def test_preempted_requests_produce_the_unpreempted_output(engine_model, prompts, hf_greedy) -> None:
    short = [i for i, ids in enumerate(prompts) if len(ids) <= 16][:6]
    # Each request needs up to 7 blocks of 4 tokens; six of them cannot all fit in 14.
    core = make_engine(engine_model, block_size=4, num_kv_blocks=14, max_model_len=64)
    for i in short:
        core.add_request(f"r{i}", prompts[i], greedy(MAX_NEW_TOKENS, ignore_eos=True))
    outputs = run_all(core)
    stats = core.stats()
    assert stats.num_preemptions > 0
    # Recomputing a preempted request is not a new query of the prefix cache.
    assert stats.prefix_cache_queried_tokens == sum(len(prompts[i]) for i in short)
    for i in short:
        expected = hf_greedy[i]
        # ignore_eos: HF stops at EOS, so compare up to it.
        assert tokens_of(outputs[f"r{i}"])[: len(expected)] == expected, f"request r{i}"
    assert_no_leaks(core)


def test_a_frozen_engine_keeps_its_blocks_from_full_collections_and_still_serves(engine_model, prompts, hf_greedy) -> None:
    # What the engine's process does once its core is built.
    core = make_engine(engine_model, num_kv_blocks=2048)
    freeze_long_lived_objects()
    try:
        collected = {id(o) for o in gc.get_objects()}
        assert not any(id(block) in collected for block in core.kv_cache.pool.blocks)
        core.add_request("r0", prompts[0], greedy(MAX_NEW_TOKENS))
        assert tokens_of(run_all(core)["r0"]) == hf_greedy[0]
        assert_no_leaks(core)
    finally:
        gc.unfreeze()


def test_preemption_takes_the_newest_running_sequence_and_queues_it_first(engine_model, prompts, hf_greedy) -> None:
    """DESIGN.md: when blocks run out the newest running sequence is preempted
    and waits at the front of the queue, ahead of requests that never ran."""
    short = [i for i, ids in enumerate(prompts) if len(ids) <= 16][:6]
    core = make_engine(engine_model, block_size=4, num_kv_blocks=14, max_model_len=64)
    # Three arrive before step 0 and already outgrow the cache; three more before step 2.
    arrivals = {0: short[:3], 2: short[3:]}
    # Admission order, kept by the test: (step, place in the waiting queue) when a sequence last entered the batch.
    admitted: dict[str, tuple[int, int]] = {}
    outputs: dict[str, list[RequestOutput]] = {}
    contested = 0  # preemptions that spared an older running sequence
    for step in itertools.count():
        for i in arrivals.get(step, []):
            core.add_request(f"r{i}", prompts[i], greedy(MAX_NEW_TOKENS, ignore_eos=True))
        if not core.has_unfinished():
            break
        running, waiting = list(core.scheduler.running), list(core.scheduler.waiting)
        preemptions = {seq.request_id: seq.num_preemptions for seq in running}
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
        for place, seq in enumerate(waiting):
            if seq.status is SequenceStatus.RUNNING:
                admitted[seq.request_id] = (step, place)
        victims = [seq for seq in running if seq.num_preemptions > preemptions[seq.request_id]]
        if not victims:
            continue
        by_age = sorted(running, key=lambda seq: admitted[seq.request_id])
        assert _ids(victims) == _ids(by_age[len(by_age) - len(victims) :]), f"step {step}: preempted from {_ids(by_age)}"
        queue = list(core.scheduler.waiting)
        # Oldest victim first, so they rerun in arrival order, then the queue as it was.
        assert _ids(queue) == _ids(victims) + _ids([seq for seq in waiting if seq in queue]), f"step {step}"
        assert all(not seq.block_table and seq.num_computed_tokens == 0 for seq in victims)
        contested += len(victims) < len(running)
    assert contested > 0
    for i in short:
        # ignore_eos: HF stops at EOS, so compare up to it.
        assert tokens_of(outputs[f"r{i}"])[: len(hf_greedy[i])] == hf_greedy[i], f"request r{i}"
    assert_no_leaks(core)


def _ids(seqs: list[Sequence]) -> list[str]:
    return [seq.request_id for seq in seqs]


def test_kv_cache_memory_sizes_the_cpu_cache_and_num_kv_blocks_wins(engine_model) -> None:
    c = engine_model.config
    per_block = kv_bytes_per_block(c.num_layers, 16, c.num_kv_heads, c.head_dim, torch.float32)
    # K and V x 30 layers x 16 tokens x 3 KV heads x head_dim 64 x 4 bytes for SmolLM2-135M.
    assert per_block == 2 * 30 * 16 * 3 * 64 * 4
    sized = make_engine(engine_model, num_kv_blocks=None, kv_cache_memory=11 * per_block - 1)
    assert sized.info.num_kv_blocks == sized.kv_cache.pool.num_free == 10
    assert all(k.shape[0] == v.shape[0] == 10 for k, v in sized.executor.runner.kv_caches)
    assert make_engine(engine_model, num_kv_blocks=3, kv_cache_memory=11 * per_block).info.num_kv_blocks == 3
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        make_engine(engine_model, num_kv_blocks=None, kv_cache_memory=per_block - 1)


def test_a_block_size_that_is_not_a_power_of_two_is_refused(engine_model) -> None:
    with pytest.raises(ValueError, match="--block-size must be a power of two, got 12"):
        make_engine(engine_model, block_size=12)
    assert make_engine(engine_model, block_size=8).block_size == 8


def test_default_token_budget_is_2048_on_the_cpu(engine_model) -> None:
    assert make_engine(engine_model).info.max_num_batched_tokens == CPU_MAX_NUM_BATCHED_TOKENS == 2048
    # The GPU default is picked inline in EngineCore.__init__ (no pure function to call without a GPU).
    assert GPU_MAX_NUM_BATCHED_TOKENS == 8192
    assert make_engine(engine_model, max_num_batched_tokens=100).info.max_num_batched_tokens == 100


def test_shared_prefix_reuses_cached_blocks_with_unchanged_output(engine_model, hf_model, prompts) -> None:
    core = make_engine(engine_model, block_size=16)
    base = prompts[LONG]
    run_all_one = lambda rid, ids: (core.add_request(rid, ids, greedy(MAX_NEW_TOKENS)), run_all(core))[1][rid]  # noqa: E731
    first = run_all_one("first", base)
    assert first[0].num_cached_tokens == 0
    variant = base[:-3] + prompts[0][:3]
    second = run_all_one("second", variant)
    shared_full_blocks = (len(base) - 3) // 16
    assert second[0].num_cached_tokens == shared_full_blocks * 16 > 0
    stats = core.stats()
    assert stats.prefix_cache_hit_tokens == shared_full_blocks * 16
    assert stats.prefix_cache_queried_tokens == len(base) + len(variant)
    assert tokens_of(second) == _hf_greedy(hf_model, variant)
    # The very same prompt again: every full block hits except the one holding the last token.
    again = run_all_one("again", base)
    assert again[0].num_cached_tokens == ((len(base) - 1) // 16) * 16
    assert tokens_of(again) == tokens_of(first)
    assert_no_leaks(core)
    assert core.stats().num_cached_free_blocks > 0


def test_follow_up_turn_hits_the_blocks_of_the_earlier_output(engine_model, hf_model, prompts) -> None:
    # A chat's next turn repeats the last prompt and its answer: the blocks the
    # answer filled while decoding, and those of a prompt prefilled in chunks
    # ending mid-block, are in the prefix cache.
    core = make_engine(engine_model, block_size=16, max_num_batched_tokens=24)
    base = prompts[LONG]
    core.add_request("turn-1", base, greedy(MAX_NEW_TOKENS, ignore_eos=True))
    answer = tokens_of(run_all(core)["turn-1"])
    follow_up = base + answer + prompts[0]
    core.add_request("turn-2", follow_up, greedy(MAX_NEW_TOKENS))
    second = run_all(core)["turn-2"]
    # Every full block of turn 1's tokens whose KV was computed (the last answer token's never is).
    assert second[0].num_cached_tokens == (len(base) + len(answer) - 1) // 16 * 16
    assert tokens_of(second) == _hf_greedy(hf_model, follow_up)
    assert_no_leaks(core)


def test_prompt_of_whole_blocks_recomputes_its_last_token(engine_model, hf_model) -> None:
    core = make_engine(engine_model, block_size=4)
    ids = list(range(1000, 1012))  # three full blocks
    for rid in ("a", "b"):
        core.add_request(rid, ids, greedy(4))
        outputs = run_all(core)[rid]
    assert outputs[0].num_cached_tokens == 8
    assert tokens_of(outputs) == _hf_greedy(hf_model, ids, 4)
    assert_no_leaks(core)


def test_abort_in_every_state_frees_every_block(engine_model, prompts, hf_greedy) -> None:
    core = make_engine(engine_model, block_size=4, num_kv_blocks=40, max_num_batched_tokens=24, max_model_len=256)
    core.add_request("bystander", prompts[0], greedy(MAX_NEW_TOKENS))
    core.add_request("decoding", prompts[1], greedy(50, ignore_eos=True))
    core.add_request("finishing", prompts[2], greedy(1))
    core.add_request("mid-prefill", prompts[LONG], greedy(4))
    core.add_request("waiting", prompts[3], greedy(4))
    core.abort("waiting")
    core.abort("never-added")
    outputs: dict[str, list] = {}

    def step() -> None:
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)

    step()
    assert outputs["waiting"][0].finish_reason is FinishReason.CANCELLED
    mid = core.sequences["mid-prefill"]
    assert 0 < mid.num_computed_tokens < mid.num_prompt_tokens
    core.abort("mid-prefill")
    # "finishing" sampled its only token in the first step (read back one step
    # later with async scheduling): it is already gone, so the abort is a no-op.
    while "finishing" not in outputs:
        step()
    assert outputs["finishing"][-1].finish_reason is FinishReason.LENGTH
    core.abort("finishing")
    while len(core.sequences["decoding"].output_token_ids) < 3:
        step()
    core.abort("decoding")
    # Fill the cache until something is preempted, then abort the preempted request.
    for i in range(4):
        core.add_request(f"filler{i}", prompts[4 + i], greedy(40, ignore_eos=True))
    preempted = None
    for _ in range(200):
        step()
        preempted = next((s for s in core.scheduler.waiting if s.num_preemptions > 0), None)
        if preempted is not None:
            break
    assert preempted is not None and preempted.status is SequenceStatus.WAITING
    core.abort(preempted.request_id)
    for rid, outs in run_all(core).items():
        outputs.setdefault(rid, []).extend(outs)
    cancelled = {rid for rid, outs in outputs.items() if outs[-1].finish_reason is FinishReason.CANCELLED}
    assert cancelled == {"waiting", "mid-prefill", "decoding", preempted.request_id}
    assert "never-added" not in outputs
    assert sum(1 for out in outputs["finishing"] if out.finished) == 1
    assert tokens_of(outputs["bystander"]) == hf_greedy[0]
    assert_no_leaks(core)


def test_deadline_finishes_with_time_limit(engine_model, prompts) -> None:
    core = make_engine(engine_model)
    core.add_request("late", prompts[0], greedy(50), timeout_s=0.0)
    core.add_request("on-time", prompts[0], greedy(3))
    outputs = run_all(core)
    assert [o.finish_reason for o in outputs["late"]] == [FinishReason.TIME_LIMIT]
    assert outputs["late"][0].num_prompt_tokens == len(prompts[0])
    assert outputs["on-time"][-1].finish_reason is FinishReason.LENGTH
    assert_no_leaks(core)


def test_a_deadline_ends_only_the_request_it_was_given_to(engine_model, prompts, monkeypatch) -> None:
    """A request that ended before its deadline leaves nothing behind: a later
    request under the same id, without a timeout, runs to its length."""
    clock = [1000.0]
    monkeypatch.setattr("pagewire.services.engine.core.engine.time.monotonic", lambda: clock[0])
    core = make_engine(engine_model)
    core.add_request("reused", prompts[0], greedy(2), timeout_s=5.0)
    assert run_all(core)["reused"][-1].finish_reason is FinishReason.LENGTH
    core.add_request("reused", prompts[0], greedy(3))
    core.add_request("timed", prompts[1], greedy(50), timeout_s=5.0)
    clock[0] += 6.0  # past both deadlines
    outputs = run_all(core)
    assert outputs["reused"][-1].finish_reason is FinishReason.LENGTH and len(tokens_of(outputs["reused"])) == 3
    assert outputs["timed"][-1].finish_reason is FinishReason.TIME_LIMIT
    assert_no_leaks(core)
    # Requests that end long before their deadlines leave no more than a bounded trail behind.
    for i in range(STALE_DEADLINES_KEPT + 10):
        core.add_request(f"quick{i}", prompts[0], greedy(1), timeout_s=3600.0)
        core.abort(f"quick{i}")
        core.step()
    assert len(core._deadlines) <= STALE_DEADLINES_KEPT + 1


def test_stop_tokens_eos_and_first_output_figures(engine_model, prompts, hf_greedy) -> None:
    core = make_engine(engine_model)
    expected = hf_greedy[0]
    stop = expected[2]
    core.add_request("stop", prompts[0], greedy(MAX_NEW_TOKENS, stop_token_ids=(stop,)))
    chat = len(prompts) - 3  # "Say hello." in the chat template: ends with EOS quickly
    core.add_request("eos", prompts[chat], greedy(40))
    core.add_request("ignore-eos", prompts[chat], greedy(40, ignore_eos=True))
    outputs = run_all(core)
    stopped = tokens_of(outputs["stop"])
    assert stopped == expected[: expected.index(stop) + 1]
    assert outputs["stop"][-1].finish_reason is FinishReason.STOP
    assert outputs["stop"][-1].matched_stop_token_id == stop
    eos = tokens_of(outputs["eos"])
    assert eos[-1] == 2 and len(eos) < 40 and outputs["eos"][-1].finish_reason is FinishReason.STOP
    ignored = tokens_of(outputs["ignore-eos"])
    assert len(ignored) == 40 and ignored[: len(eos)] == eos
    first = outputs["stop"][0]
    assert first.num_prompt_tokens == len(prompts[0]) and first.queue_time_s is not None and first.queue_time_s >= 0
    assert outputs["stop"][1].num_prompt_tokens is None
    assert_no_leaks(core)


def test_logprobs_equal_hf_log_softmax(engine_model, hf_model, prompts) -> None:
    core = make_engine(engine_model)
    core.add_request("lp", prompts[0], greedy(1, logprobs=5))
    (out,) = run_all(core)["lp"]
    with torch.inference_mode():
        reference = torch.log_softmax(hf_model(torch.tensor([prompts[0]])).logits[0, -1].float(), -1)
    (lp,) = out.logprobs
    assert lp.token_id == out.new_token_ids[0] == int(reference.argmax())
    assert lp.logprob == pytest.approx(reference[lp.token_id].item(), abs=1e-4)
    assert [t for t, _ in lp.top] == reference.topk(5).indices.tolist()


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], SamplingParams(), "prompt_token_ids is empty"),
        ([1, 49152], SamplingParams(), "outside the vocabulary"),
        ([1] * 64, SamplingParams(), "max_model_len"),
        ([1], SamplingParams(max_tokens=0), "max_tokens must be >= 1"),
        ([1], SamplingParams(temperature=-0.5), "temperature"),
        ([1], SamplingParams(temperature=101.0), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(top_k=-1), "top_k"),
        ([1], SamplingParams(min_p=1.5), "min_p"),
        ([1], SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        ([1], SamplingParams(repetition_penalty=float("nan")), "repetition_penalty"),
        ([1], SamplingParams(repetition_penalty=float("inf")), "repetition_penalty"),
        ([1], SamplingParams(temperature=float("nan")), "temperature"),
        ([1], SamplingParams(top_p=float("nan")), "top_p"),
        ([1], SamplingParams(presence_penalty=float("inf")), "presence_penalty"),
        ([1], SamplingParams(presence_penalty=2.5), "presence_penalty"),
        ([1], SamplingParams(frequency_penalty=-3.0), "frequency_penalty"),
        ([1], SamplingParams(logprobs=21), "logprobs"),
        ([1], SamplingParams(n=2), "n must be 1"),
    ],
)
def test_bad_requests_are_refused_with_invalid_argument(engine_model, prompt, params, message) -> None:
    core = make_engine(engine_model, max_model_len=64)
    with pytest.raises(RequestError) as refused:
        core.add_request("bad", prompt, params)
    assert refused.value.kind == Refusal.INVALID_ARGUMENT
    assert message in refused.value.message
    assert not core.sequences


def test_request_larger_than_the_whole_cache_is_refused(engine_model) -> None:
    core = make_engine(engine_model, block_size=4, num_kv_blocks=4, max_model_len=64)
    with pytest.raises(RequestError) as refused:
        core.add_request("big", [1] * 10, greedy(20))
    assert refused.value.kind == Refusal.INVALID_ARGUMENT
    assert "KV blocks" in refused.value.message
    core.add_request("fits", [1] * 10, greedy(6))
    assert tokens_of(run_all(core)["fits"])
    assert_no_leaks(core)
