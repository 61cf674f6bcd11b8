"""Structured output at the standard workload: every request constrained
to a JSON schema against the same engine unconstrained, in the same run.
The shape is smollm2-135m's with random weights, the one whose vocabulary
is the embedded model's tokenizer, which compiles the grammar (the llama
shapes' tokenizer is not on the machine). The schema (an object holding an
array of at least --min-items strings) cannot be complete before the output
length, so both modes generate exactly --output-len tokens per request.

Warm-ups run both modes on prompts of their own; every measured run takes a
set of random prompts of its own, so none hits the prefix cache (each
record says so). Prints one JSON line per mode and round (--rounds: the
modes in turn, which bounds the drift of a noisy host), then the ratio of
output tokens per second over all rounds.

    python -m benchmarks.structured_output [--requests 256] [--prompt-len 512] [--output-len 128] [--rounds 1]

A cheap check of the benchmark itself on a CPU:

    python -m benchmarks.structured_output --device cpu --requests 4 --prompt-len 32 --output-len 16 --min-items 16
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json

import torch

from benchmarks import hf_peer
from benchmarks.throughput import SHAPES, WARM_UP_SEED, add_workload_arguments, emit, engine_config, measured_engine, random_model, run_engine, warm_up_prompts
from pagewire.services.common.logging import configure_logging
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.services.engine.config import grammar_workers
from pagewire.services.engine.executor.grammar_pool import GrammarTimings
from pagewire.services.engine.executor.loader import resolve_dtype
from pagewire.services.tokenizer.grammar import GrammarCompiler
from pagewire.v1 import common_pb2

SHAPE = "smollm2-135m"
WORKER_START_TIMEOUT_S = 300


def schema(min_items: int) -> dict:
    return {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": min_items}}, "required": ["items"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser, SHAPE)
    parser.add_argument("--min-items", type=int, default=128, help="the schema's shortest array: past what --output-len tokens can hold")
    parser.add_argument("--model", default="", help="where the tokenizer comes from: a HF directory (its tokenizer files and config.json "
                        "suffice) or a .gguf; default: the embedded model")
    parser.add_argument("--grammar-workers", type=int, default=None, help="the engine's --grammar-workers (default: its own for this host)")
    parser.add_argument("--rounds", type=int, default=1, help="run the two modes in turn this many times (each run on prompts of its "
                        "own), the ratio being of the rounds' totals: alternating bounds the drift of a noisy host")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a cheap check of the benchmark itself")
    args = parser.parse_args()
    configure_logging("warning", "console", service="benchmark")
    device = torch.device(args.device)
    vocab_size = SHAPES[SHAPE]["vocab_size"]
    tokenizer = load_hf_tokenizer(resolve_model(args.model))
    if len(tokenizer) != vocab_size:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, {SHAPE} {vocab_size}: the grammar would not fit the shape")
    grammar = GrammarCompiler(tokenizer).compile(common_pb2.Constraint(json_schema=json.dumps(schema(args.min_items))))

    # The engine's matchers load the same tokenizer.
    config = dataclasses.replace(engine_config(args), model=args.model, grammar_workers=args.grammar_workers)
    loaded = random_model(SHAPE, resolve_dtype(config.dtype, device), config.max_model_len, device)
    # The tokenizer's end of sequence, where a complete answer may stop.
    loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, eos_token_ids=(tokenizer.eos_token_id,)))
    core = measured_engine(config, loaded)
    # A server's steady state: every grammar worker up before the first measured request.
    core.executor.grammars.start_workers(wait_s=WORKER_START_TIMEOUT_S)
    modes = ("unconstrained", "json_schema")
    # Every measured run takes prompts of its own (the warm-up's seed left out), so none hits the prefix cache.
    seeds = (seed for seed in itertools.count() if seed != WARM_UP_SEED)
    measured = {(round_index, mode): hf_peer.prompts(args.requests, args.prompt_len, vocab_size, seed=next(seeds))
                for round_index in range(args.rounds) for mode in modes}  # fmt: skip
    warm = warm_up_prompts([prompt for prompts in measured.values() for prompt in prompts], args, vocab_size)
    workload = dict(shape=SHAPE, requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len, grammar_workers=grammar_workers(config),
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")  # fmt: skip
    totals = {mode: {"seconds": 0.0, "output_tokens": 0} for mode in modes}
    for (round_index, mode), prompts in measured.items():
        mode_grammar = grammar if mode == "json_schema" else ""
        run_engine(core, warm, 8, compiled_grammar=mode_grammar)
        before = dataclasses.replace(core.executor.grammars.timings)
        result = run_engine(core, prompts, args.output_len, compiled_grammar=mode_grammar)
        result.update(grammar_ms_per_step(before, core.executor.grammars.timings))
        if result["output_tokens"] != args.requests * args.output_len:
            raise SystemExit(f"{mode}: {result['output_tokens']} output tokens, expected {args.requests * args.output_len}")
        emit(dict(bench="structured_output", mode=mode, round=round_index, **workload, **result))
        totals[mode]["seconds"] += result["seconds"]
        totals[mode]["output_tokens"] += result["output_tokens"]
    out_tok_s = {mode: total["output_tokens"] / total["seconds"] for mode, total in totals.items()}
    emit(dict(bench="structured_output_ratio", shape=SHAPE, rounds=args.rounds, **{f"{mode}_out_tok_s": round(rate, 1) for mode, rate in out_tok_s.items()},
              constrained_over_unconstrained=round(out_tok_s["json_schema"] / out_tok_s["unconstrained"], 3)))  # fmt: skip


def grammar_ms_per_step(before: GrammarTimings, after: GrammarTimings) -> dict[str, float]:
    """The step thread's milliseconds a constrained step sending the rows and
    waiting for the masks, and the slowest worker's own, over a run."""
    steps = max(after.steps - before.steps, 1)
    return {f"grammar_{name}_ms": round((getattr(after, f"{name}_s") - getattr(before, f"{name}_s")) * 1e3 / steps, 3) for name in ("start", "wait", "fill")}


if __name__ == "__main__":
    main()
