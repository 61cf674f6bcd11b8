"""The host's share of a constrained decode step, without model or device:
--rows sequences under the structured-output benchmark's schema (an array
of strings) each take in one more token a step and get their next masks
filled, by the step thread alone (--workers 0) or by worker processes
(GrammarMatchers.start, then fill). Each row's tokens are a seeded random
walk through what its grammar allows, as a model with random weights
samples them, and every worker count replays the same walk.

Prints one JSON line per worker count ("auto": the engine's default for
this host), with the mean milliseconds a step of the start (what the step
thread spends sending the rows, and filling its own share) and of the wait
for the masks after it, after --warm-up steps.

    python -m benchmarks.grammar_step [--rows 256] [--steps 64] [--workers auto,0,1,2,4,8] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.structured_output import WORKER_START_TIMEOUT_S, schema
from benchmarks.throughput import emit
from pagewire.services.common.config import available_cores
from pagewire.services.common.logging import configure_logging
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.services.engine.config import EngineConfig, grammar_workers
from pagewire.services.engine.executor.grammar import allowed_tokens
from pagewire.services.engine.executor.grammar_pool import GrammarMatchers
from pagewire.services.tokenizer.grammar import GrammarCompiler
from pagewire.v1 import common_pb2


def walk(model: str, grammar: str, stop_ids: list[int], vocab_size: int, args: argparse.Namespace, workers: int) -> dict[str, float]:
    """Mean milliseconds a step of start and wait, over the steps after the warm-up."""
    matchers = GrammarMatchers(model, args.rows, workers)
    matchers.start_workers(wait_s=WORKER_START_TIMEOUT_S)
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(args.rows)}
    for request_id in outputs:
        matchers.add(request_id, grammar, stop_ids)
    generator = torch.Generator().manual_seed(0)
    timings = {"start_ms": 0.0, "wait_ms": 0.0}
    for step in range(args.warm_up + args.steps):
        rows = list(outputs.items())
        began = time.perf_counter()
        matchers.start(rows)
        started = time.perf_counter()
        bitmask = matchers.fill(rows)
        filled = time.perf_counter()
        if step >= args.warm_up:
            timings["start_ms"] += (started - began) * 1e3 / args.steps
            timings["wait_ms"] += (filled - started) * 1e3 / args.steps
        allowed = allowed_tokens(bitmask, vocab_size)
        allowed[:, stop_ids] = False
        for tokens, token in zip(outputs.values(), torch.multinomial(allowed.float(), 1, generator=generator)[:, 0].tolist()):
            tokens.append(token)
    matchers.close()
    return {name: round(value, 3) for name, value in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warm-up", type=int, default=8)
    parser.add_argument("--workers", default="auto,0,1,2,4,8", help="comma-separated grammar worker counts; auto: the engine's default")
    parser.add_argument("--min-items", type=int, default=128)
    parser.add_argument("--model", default="", help="where the tokenizer comes from (default: the embedded model)")
    args = parser.parse_args()
    configure_logging("warning", "console", service="benchmark")
    tokenizer = load_hf_tokenizer(resolve_model(args.model))
    grammar = GrammarCompiler(tokenizer).compile(common_pb2.Constraint(json_schema=json.dumps(schema(args.min_items))))
    stop_ids = [tokenizer.eos_token_id]
    host = dict(available_cores=available_cores(), hardware_threads=os.cpu_count())
    # The walk's own sampling is not the engine's work: one thread keeps it off the workers' cores.
    torch.set_num_threads(1)
    for value in args.workers.split(","):
        workers = grammar_workers(EngineConfig()) if value == "auto" else int(value)
        timings = walk(args.model, grammar, stop_ids, len(tokenizer), args, workers)
        emit(dict(bench="grammar_step", rows=args.rows, steps=args.steps, workers=workers, default=value == "auto", **host, **timings))


if __name__ == "__main__":
    main()
