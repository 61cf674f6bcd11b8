"""Structured output on the engine with the embedded model: constrained
outputs are in their grammar's language and end with it, the unconstrained
requests of the same batch are unchanged, and the matcher follows its
sequence through preemption, aborts and an engine that speculates, in the
step thread and in worker processes alike."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
import xgrammar
from xgrammar.contrib.hf import LogitsProcessor

from pagewire.services.common.errors import RequestError
from pagewire.services.engine.core.kv_cache import cdiv
from pagewire.services.engine.core.sequence import FinishReason, SamplingParams
from pagewire.services.engine.executor.grammar import allowed_tokens, apply_token_bitmask
from pagewire.services.engine.executor.grammar_pool import GrammarMatchers
from pagewire.services.engine.executor.sampler import Sampler, SamplingRequest
from pagewire.services.tokenizer.grammar import GrammarCompiler
from pagewire.v1 import common_pb2
from tests.engine.util import assert_no_leaks, greedy, make_engine, run_all, tokens_of
from tests.support.schemas import PERSON

ITEMS = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "minItems": 1, "maxItems": 3}},
    "required": ["items"],
}
REGEX = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe"]
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def compiler(hf_tokenizer) -> GrammarCompiler:
    return GrammarCompiler(hf_tokenizer)


@pytest.fixture(scope="module")
def chat_prompts(hf_tokenizer) -> list[list[int]]:
    questions = ["Describe a person as JSON.", "List some fruits as JSON.", "Give me a code.", "Is the sky blue?"]
    texts = [hf_tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False) for q in questions]
    return [hf_tokenizer(text)["input_ids"] for text in texts]


@pytest.fixture(scope="module")
def grammars(compiler: GrammarCompiler) -> list[str]:
    return [
        compiler.compile(common_pb2.Constraint(json_schema=json.dumps(PERSON))),
        compiler.compile(common_pb2.Constraint(json_schema=json.dumps(ITEMS))),
        compiler.compile(common_pb2.Constraint(regex=REGEX)),
        compiler.compile(common_pb2.Constraint(choice=common_pb2.Choice(choices=CHOICES))),
    ]


def _check(texts: list[str]) -> None:
    jsonschema.validate(json.loads(texts[0]), PERSON)
    jsonschema.validate(json.loads(texts[1]), ITEMS)
    assert re.fullmatch(REGEX, texts[2]), texts[2]
    assert texts[3] in CHOICES, texts[3]


def _run_constrained(core, prompts: list[list[int]], grammars: list[str], hf_tokenizer, sampling: SamplingParams = greedy(MAX_TOKENS)) -> list[str]:  # type: ignore[no-untyped-def]
    for i, (prompt, grammar) in enumerate(zip(prompts, grammars)):
        core.add_request(f"c{i}", prompt, sampling, compiled_grammar=grammar)
    outputs = run_all(core)
    assert all(outputs[f"c{i}"][-1].finish_reason is FinishReason.STOP for i in range(len(grammars)))
    assert not len(core.executor.grammars)
    return [hf_tokenizer.decode(tokens_of(outputs[f"c{i}"]), skip_special_tokens=True) for i in range(len(grammars))]


@pytest.fixture(scope="module")
def alone(engine_model, chat_prompts, grammars, hf_tokenizer) -> list[str]:  # type: ignore[no-untyped-def]
    """Each kind's greedy constrained output, from an engine that runs nothing else."""
    return _run_constrained(make_engine(engine_model), chat_prompts, grammars, hf_tokenizer)


def test_constrained_outputs_are_in_their_language(alone: list[str]) -> None:
    _check(alone)


def test_a_mixed_batch_leaves_unconstrained_requests_unchanged(
    both_schedulings, engine_model, chat_prompts, grammars, prompts, hf_tokenizer, alone  # type: ignore[no-untyped-def]
) -> None:
    plain = make_engine(engine_model)
    for i, prompt in enumerate(prompts[:4]):
        plain.add_request(f"u{i}", prompt, greedy(16))
    expected = {rid: tokens_of(outs) for rid, outs in run_all(plain).items()}
    core = make_engine(engine_model)
    for i, prompt in enumerate(prompts[:4]):
        core.add_request(f"u{i}", prompt, greedy(16))
    for i, (prompt, grammar) in enumerate(zip(chat_prompts, grammars)):
        core.add_request(f"c{i}", prompt, greedy(MAX_TOKENS), compiled_grammar=grammar)
    outputs = run_all(core)
    assert {rid: tokens_of(outputs[rid]) for rid in expected} == expected
    assert [hf_tokenizer.decode(tokens_of(outputs[f"c{i}"]), skip_special_tokens=True) for i in range(4)] == alone
    assert_no_leaks(core)


def test_sampled_constrained_outputs_are_in_their_language(engine_model, chat_prompts, grammars, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    for seed in range(2):
        core = make_engine(engine_model)
        texts = _run_constrained(core, chat_prompts, grammars, hf_tokenizer, SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS))
        _check(texts)


def test_overlap_leaves_sampled_constrained_outputs_unchanged(engine_model, chat_prompts, grammars, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    sampling = SamplingParams(temperature=1.0, seed=7, max_tokens=MAX_TOKENS)
    texts = [_run_constrained(make_engine(engine_model, async_scheduling=overlap), chat_prompts, grammars, hf_tokenizer, sampling) for overlap in (True, False)]
    assert texts[0] == texts[1]
    _check(texts[0])


def test_a_constrained_step_is_launched_before_the_tokens_before_it_are_read_back(engine_model, chat_prompts, grammars) -> None:  # type: ignore[no-untyped-def]
    """Overlapped, the device runs step N+1's forward pass while the host
    reads step N's tokens and starts N+1's masks; N+1's sampling waits for
    them only once the host has scheduled step N+2 and prepared its inputs,
    within N+2's launch."""
    core = make_engine(engine_model)
    events: list[str] = []
    scheduler, executor, matchers = core.scheduler, core.executor, core.executor.grammars
    schedule, launch, start, fill = scheduler.schedule, executor.launch, matchers.start, matchers.fill
    scheduler.schedule = lambda proposals: (events.append("schedule"), schedule(proposals))[1]
    executor.launch = lambda scheduled: (events.append("launch"), launch(scheduled))[1]
    matchers.start = lambda rows: (events.append("start"), start(rows))[1]
    matchers.fill = lambda rows: (events.append("fill"), fill(rows))[1]
    core.add_request("c", chat_prompts[0], greedy(8), compiled_grammar=grammars[0])
    outputs = run_all(core)
    assert len(tokens_of(outputs["c"])) == 8
    # The prefill, then each call: schedule N+2, launch N+2 (sampling N+1 once N+2's inputs are
    # prepared), read N+1 back, start N+2's mask.
    assert events[:3] == ["schedule", "launch", "start"]
    assert events[3:11] == ["schedule", "launch", "fill", "start"] * 2


def test_preemption_keeps_the_matcher_in_step(engine_model, chat_prompts, grammars, hf_tokenizer, alone) -> None:  # type: ignore[no-untyped-def]
    # The two JSON requests twice each: every prompt fits, but not every answer,
    # so some sequences are preempted and recomputed.
    prompts, kinds = [chat_prompts[0], chat_prompts[0], chat_prompts[1], chat_prompts[1]], [grammars[0], grammars[0], grammars[1], grammars[1]]
    core = make_engine(engine_model, block_size=4, num_kv_blocks=sum(cdiv(len(p), 4) for p in prompts) + 8, enable_prefix_caching=False)
    texts = _run_constrained(core, prompts, kinds, hf_tokenizer)
    assert core.stats().num_preemptions > 0
    assert texts == [alone[0], alone[0], alone[1], alone[1]]


def test_constrained_requests_do_not_speculate_and_keep_their_output(engine_model, chat_prompts, grammars, hf_tokenizer, alone) -> None:  # type: ignore[no-untyped-def]
    core = make_engine(engine_model, speculative_method="ngram", num_speculative_tokens=4)
    assert _run_constrained(core, chat_prompts, grammars, hf_tokenizer) == alone
    assert core.stats().spec_decode_draft_tokens_total == 0


def test_abort_frees_the_matcher(engine_model, chat_prompts, grammars) -> None:  # type: ignore[no-untyped-def]
    core = make_engine(engine_model)
    core.add_request("c", chat_prompts[0], greedy(MAX_TOKENS), compiled_grammar=grammars[0])
    for _ in range(3):
        core.step()
    core.abort("c")
    outputs = run_all(core)
    assert outputs["c"][-1].finish_reason is FinishReason.CANCELLED
    assert not len(core.executor.grammars)
    assert_no_leaks(core)


def test_a_grammar_that_does_not_load_refuses_its_request_alone(engine_model, chat_prompts, grammars, hf_tokenizer, alone) -> None:  # type: ignore[no-untyped-def]
    core = make_engine(engine_model)
    with pytest.raises(RequestError) as caught:
        core.add_request("bad", chat_prompts[0], greedy(MAX_TOKENS), compiled_grammar='{"not": "a grammar"}')
    assert caught.value.field == "compiled_grammar" and "does not load" in caught.value.message
    assert _run_constrained(core, chat_prompts[:1], grammars[:1], hf_tokenizer) == alone[:1]


# Five schemas for the reference check: nesting, arrays, enums, required
# fields, string patterns, numbers with bounds.
HF_SCHEMAS = [
    PERSON,
    ITEMS,
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -99, "maximum": 99}, "y": {"type": "integer", "minimum": -99, "maximum": 99}}, "required": ["x", "y"]}}, "required": ["point"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 10}, "maxItems": 4}}, "required": ["scores"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": ["low", "high"]}, "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"}}, "required": ["ok", "level", "code"]},
]


def test_greedy_constrained_output_equals_hf_with_the_same_grammar(engine_model, hf_model, chat_prompts, compiler: GrammarCompiler) -> None:  # type: ignore[no-untyped-def]
    grammars = [compiler.compile(common_pb2.Constraint(json_schema=json.dumps(schema))) for schema in HF_SCHEMAS]
    prompt = chat_prompts[0]
    core = make_engine(engine_model)
    for i, grammar in enumerate(grammars):
        core.add_request(f"s{i}", prompt, greedy(MAX_TOKENS), compiled_grammar=grammar)
    outputs = run_all(core)
    with torch.inference_mode():
        for i, grammar in enumerate(grammars):
            processor = LogitsProcessor(xgrammar.CompiledGrammar.deserialize_json(grammar, compiler.tokenizer_info))
            generated = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, logits_processor=[processor], eos_token_id=2, pad_token_id=2
            )
            expected = generated[0, len(prompt) :].tolist()
            assert tokens_of(outputs[f"s{i}"]) == expected, i


# Five more for the validity check over 100 sampled generations.
MORE_SCHEMAS = [
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}}, "required": ["name", "tags"]}, "active": {"type": "boolean"}}, "required": ["user", "active"]},
    {"type": "object", "properties": {"events": {"type": "array", "items": {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 31}, "kind": {"enum": ["call", "visit"]}}, "required": ["day", "kind"]}, "minItems": 1, "maxItems": 2}}, "required": ["events"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 16}, "rating": {"type": "integer", "minimum": 1, "maximum": 5}, "note": {"type": "string", "maxLength": 12}}, "required": ["title", "rating"]},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}, "country": {"enum": ["FR", "DE", "IT"]}}, "required": ["zip", "country"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 2}, "maxItems": 2}}, "required": ["matrix"]},
]  # fmt: skip
SAMPLES_PER_SCHEMA = 10


def test_a_hundred_sampled_generations_over_ten_schemas_all_validate(engine_model, chat_prompts, compiler: GrammarCompiler, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    schemas = HF_SCHEMAS + MORE_SCHEMAS
    grammars = [compiler.compile(common_pb2.Constraint(json_schema=json.dumps(schema))) for schema in schemas]
    core = make_engine(engine_model, num_kv_blocks=2048, max_num_seqs=len(schemas) * SAMPLES_PER_SCHEMA)
    for i, grammar in enumerate(grammars):
        for seed in range(SAMPLES_PER_SCHEMA):
            sampling = SamplingParams(temperature=0.8, seed=seed, max_tokens=2 * MAX_TOKENS)
            core.add_request(f"s{i}-{seed}", chat_prompts[seed % len(chat_prompts)], sampling, compiled_grammar=grammar)
    outputs = run_all(core)
    assert len(outputs) == len(schemas) * SAMPLES_PER_SCHEMA
    unfinished = {rid: len(tokens_of(output)) for rid, output in outputs.items() if output[-1].finish_reason is not FinishReason.STOP}
    assert not unfinished, f"requests that ran out of tokens (and their lengths): {unfinished}"
    for request_id, output in outputs.items():
        schema = schemas[int(request_id[1:].split("-")[0])]
        jsonschema.validate(json.loads(hf_tokenizer.decode(tokens_of(output), skip_special_tokens=True)), schema)
    assert_no_leaks(core)


def test_the_bitmask_masks_as_xgrammar_does() -> None:
    generator = torch.Generator().manual_seed(0)
    vocab = 100
    logits = torch.randn(4, vocab, generator=generator)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, xgrammar.get_bitmask_shape(1, vocab)[1]), dtype=torch.int32, generator=generator)
    # xgrammar's bitmask has a row per logits row; ours one per masked row.
    full = torch.full((4, bitmask.shape[1]), -1, dtype=torch.int32)
    full[[1, 3]] = bitmask
    expected = logits.clone()
    xgrammar.apply_token_bitmask_inplace(expected, full, indices=[1, 3])
    assert torch.equal(apply_token_bitmask(logits.clone(), bitmask, [1, 3]), expected)
    # Every row masked: the same, without the gather; in place.
    every = logits.clone()
    xgrammar.apply_token_bitmask_inplace(every, full)
    masked = logits.clone()
    assert apply_token_bitmask(masked, full, [0, 1, 2, 3]) is masked and torch.equal(masked, every)
    # A model vocabulary wider than the tokenizer's: the ids past it are masked.
    wide = apply_token_bitmask(torch.zeros(1, vocab + 40), torch.full((1, 4), -1, dtype=torch.int32), [0])
    assert torch.isinf(wide[0, 128:]).all() and not torch.isinf(wide[0, :128]).any()


def test_greedy_masked_rows_sample_as_the_general_path(grammars, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """A step of plain greedy rows, some constrained, takes the sampler's
    greedy path (no row of parameters each): the same tokens as the general
    path, and every constrained row's token one its grammar allows."""
    matchers = GrammarMatchers("", 4, 0)
    for request_id, grammar in (("a", grammars[0]), ("c", grammars[1])):
        matchers.add(request_id, grammar, (hf_tokenizer.eos_token_id,))
    sampler = Sampler(seed=0, device=torch.device("cpu"), grammars=matchers)
    logits = torch.randn(3, len(hf_tokenizer), generator=torch.Generator().manual_seed(5))
    plain = SamplingParams(temperature=0.0)
    rows = [SamplingRequest("a", plain, [], [], constrained=True), SamplingRequest("b", plain, [], []), SamplingRequest("c", plain, [], [], constrained=True)]
    general = sampler.sample(logits.clone(), rows).resolve().token_ids
    masked = sampler.greedy(logits.clone(), [0, 2], [("a", []), ("c", [])]).resolve().token_ids
    assert masked == general
    assert masked[1] == [int(logits[1].argmax())]
    allowed = allowed_tokens(matchers.fill([("a", []), ("c", [])]), logits.shape[1])
    assert allowed[0, masked[0][0]] and allowed[1, masked[2][0]] and not allowed.all()
    matchers.close()


@pytest.mark.gpu
@pytest.mark.parametrize(("vocab", "words"), [(49152, 1536), (49152 + 40, 1536), (1000, 40), (70000, 2188)])
def test_the_bitmask_kernel_masks_as_the_torch_reference(vocab: int, words: int) -> None:
    """kernels/token_bitmask.cu against the host's torch path: a vocabulary
    the mask covers exactly, one wider than the mask (its tail masked), one
    narrower (the mask's bits past it ignored), across several blocks a row;
    subsets of rows, the first rows in order and every row (those two
    without an index list); rows that allow nothing (left as they are), also
    when only bits past the vocabulary are set."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(8, vocab, generator=generator)
    for rows in ([0, 4, 7], list(range(8)), [5], [0, 1, 2]):
        bitmask = torch.randint(-(2**31), 2**31 - 1, (len(rows), words), dtype=torch.int32, generator=generator)
        bitmask[0] = 0
        if words * 32 > vocab:
            bitmask[-1] = 0
            bitmask[-1, -1] = -(2**31)  # only the mask's last bit, past the vocabulary
        expected = apply_token_bitmask(logits.clone(), bitmask, rows)
        assert torch.equal(apply_token_bitmask(logits.cuda(), bitmask, rows).cpu(), expected)
    # The registered (page-locked) host bitmask travels as it is.
    pinned = torch.zeros(2, words, dtype=torch.int32, pin_memory=True)
    pinned[1, 0] = 1
    masked = apply_token_bitmask(logits[:2].cuda(), pinned, [0, 1]).cpu()
    assert torch.equal(masked[0], logits[0]) and masked[1, 0] == logits[1, 0] and torch.isinf(masked[1, 1:]).all()


def _with_ready_workers(matchers: GrammarMatchers) -> GrammarMatchers:
    matchers.start_workers(wait_s=120)
    return matchers


def test_the_first_constrained_requests_do_not_wait_for_the_workers(grammars, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Starting the workers returns at once (their first message is small:
    the tokenizer travels in a file), and until they are up the step
    thread's own shard serves new sequences, with the same masks."""
    matchers = GrammarMatchers("", 4, 1)
    stop = (hf_tokenizer.eos_token_id,)
    matchers.add("early", grammars[0], stop)
    assert not any(worker.ready for worker in matchers._workers) and matchers._sent["early"].shard is matchers._local
    _with_ready_workers(matchers).add("late", grammars[0], stop)
    assert matchers._sent["late"].shard in matchers._workers
    masks = matchers.fill([("early", []), ("late", [])])
    assert torch.equal(masks[0], masks[1]) and masks[0].any()
    matchers.close()


def test_worker_processes_give_the_outputs_of_the_step_thread(engine_model, chat_prompts, grammars, hf_tokenizer, alone) -> None:  # type: ignore[no-untyped-def]
    """Every kind of grammar in two worker processes, through preemption
    (recompute replays) and an abort, with a second engine's requests."""
    prompts, kinds = [chat_prompts[0], chat_prompts[0], chat_prompts[1], chat_prompts[1]], [grammars[0], grammars[0], grammars[1], grammars[1]]
    core = make_engine(
        engine_model, block_size=4, num_kv_blocks=sum(cdiv(len(p), 4) for p in prompts) + 8, enable_prefix_caching=False, grammar_workers=2
    )
    _with_ready_workers(core.executor.grammars)
    assert _run_constrained(core, prompts, kinds, hf_tokenizer) == [alone[0], alone[0], alone[1], alone[1]]
    assert core.stats().num_preemptions > 0
    core = make_engine(engine_model, grammar_workers=2)
    _with_ready_workers(core.executor.grammars)
    core.add_request("gone", chat_prompts[0], greedy(MAX_TOKENS), compiled_grammar=grammars[0])
    for _ in range(3):
        core.step()
    core.abort("gone")
    assert _run_constrained(core, chat_prompts, grammars, hf_tokenizer) == alone
    assert_no_leaks(core)
    core.executor.close()


def test_a_worker_shard_writes_the_masks_the_step_thread_does(grammars, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Rows one token ahead, several ahead, rewound, a token the grammar
    refuses and one behind its stop token: a worker process and the step
    thread bring their matchers to the same states, and a grammar that has
    ended or been broken allows only its stop tokens."""
    stop = (hf_tokenizer.eos_token_id,)
    choice = hf_tokenizer(f"{CHOICES[0]}", add_special_tokens=False)["input_ids"]
    person = hf_tokenizer('{"name": "Ann", "age": 3', add_special_tokens=False)["input_ids"]
    earlier = {"ahead-one": person[:2], "ahead-many": person[:1], "rewound": person[:4], "refused": choice[:1], "after-stop": choice}
    stepped: dict[str, list[int]] = {
        "ahead-one": person[:3], "ahead-many": person[:5], "rewound": person[:2], "refused": choice[:1] + [hf_tokenizer("}")["input_ids"][0]],
        "after-stop": choice + list(stop),
    }  # fmt: skip
    grammar_of = {name: grammars[3] if name in ("refused", "after-stop") else grammars[0] for name in stepped}
    masks = []
    for workers in (0, 1):
        matchers = _with_ready_workers(GrammarMatchers("", 8, workers))
        for name, grammar in grammar_of.items():
            matchers.add(name, grammar, stop)
        fills = [matchers.fill(list(earlier.items())).clone(), matchers.fill(list(stepped.items())).clone()]
        masks.append(fills)
        assert len(matchers) == len(grammar_of)
        # Two steps sent; the workers' own fill time comes back with their masks.
        assert matchers.timings.steps == 2 and matchers.timings.start_s > 0
        assert (matchers.timings.fill_s > 0) == bool(workers)
        matchers.close()
    assert all(torch.equal(step, thread) for step, thread in zip(masks[0], masks[1]))
    ahead_one, ahead_many, rewound, refused, after_stop = masks[0][1]
    stop_only = torch.zeros_like(refused)
    stop_only[stop[0] // 32] = 1 << (stop[0] % 32)
    assert torch.equal(refused, stop_only) and torch.equal(after_stop, stop_only)
    # The same grammar at the same prefix gives the same mask, whatever the path there.
    assert torch.equal(rewound, masks[0][0][0])


def test_a_grammar_worker_that_exits_fails_the_step_with_its_name(grammars, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    matchers = _with_ready_workers(GrammarMatchers("", 4, 1))
    matchers.add("c", grammars[3], (hf_tokenizer.eos_token_id,))
    matchers._workers[0].process.kill()
    matchers._workers[0].process.wait()
    with pytest.raises(RuntimeError, match=r"grammar worker 0 \(pid \d+\) exited"):
        matchers.fill([("c", [])])
    matchers.close()
