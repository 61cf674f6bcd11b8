"""Structured output on the CPU: the engine in-process on the embedded model
(SmolLM2-135M-Instruct, float32) with --concurrency requests at once, every
one constrained to a JSON schema against the same requests unconstrained,
in the same run. The schema (an object holding an array of at least 64
strings) cannot be complete before max_tokens, so both modes generate
exactly max_tokens per request and the work compares one for one; the
unconstrained requests ignore end-of-sequence for the same reason.

Each mode runs --repeat rounds in turn (prefix caching off) and keeps its
best round, which evens out other load on a shared machine. Prints one JSON
line per mode, then the ratio of output tokens per second.

    python -m benchmarks.structured_output_cpu [--concurrency 32] [--max-tokens 64] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.engine_cpu import emit
from pagewire.services.common.logging import configure_logging
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.sequence import SamplingParams
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.executor.model_executor import create_engine_core, load_engine_model
from pagewire.services.tokenizer.grammar import GrammarCompiler
from pagewire.v1 import common_pb2

SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
    "required": ["items"],
}
TOPICS = ["fruits", "rivers", "cities", "colours", "tools", "birds", "trees", "games"]


def run(loaded: LoadedModel, prompts: list[list[int]], sampling: SamplingParams, grammar: str) -> tuple[float, int]:
    core = create_engine_core(EngineConfig(max_model_len=1024, num_kv_blocks=512, enable_prefix_caching=False, max_num_seqs=len(prompts)), loaded)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        core.add_request(f"r{i}", prompt, sampling, compiled_grammar=grammar)
    tokens = 0
    while core.has_unfinished():
        tokens += sum(len(out.new_token_ids) for out in core.step())
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    configure_logging("warning", "console", service="benchmark")
    config = EngineConfig(device="cpu", dtype="float32")
    loaded = load_engine_model(config)
    tokenizer = load_hf_tokenizer(resolve_model(config.model))
    grammar = GrammarCompiler(tokenizer).compile(common_pb2.Constraint(json_schema=json.dumps(SCHEMA)))
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"List {TOPICS[i % len(TOPICS)]} as JSON, request {i}."}], add_generation_prompt=True, tokenize=False
        )
        for i in range(args.concurrency)
    ]
    prompt_ids = [tokenizer(text)["input_ids"] for text in prompts]
    modes = {
        "unconstrained": (SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True), ""),
        "json_schema": (SamplingParams(temperature=0.0, max_tokens=args.max_tokens), grammar),
    }
    run(loaded, prompt_ids[:2], modes["json_schema"][0], grammar)  # loads the engine's TokenizerInfo once
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        for mode, (sampling, mode_grammar) in modes.items():
            seconds, tokens = run(loaded, prompt_ids, sampling, mode_grammar)
            assert tokens == args.concurrency * args.max_tokens, (mode, tokens)
            best[mode] = max(best.get(mode, 0.0), tokens / seconds)
    for mode, tok_s in best.items():
        emit({"mode": mode, "concurrency": args.concurrency, "max_tokens": args.max_tokens, "output_tok_s": round(tok_s, 1)})
    emit({"ratio_constrained_to_unconstrained": round(best["json_schema"] / best["unconstrained"], 3)})


if __name__ == "__main__":
    main()
