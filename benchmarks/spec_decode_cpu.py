"""Speculative decoding on the CPU: the engine in-process on the embedded
model (SmolLM2-135M-Instruct, float32) at batch 1, greedy, with
--speculative-method ngram against plain decoding in the same run, on two
chat tasks whose answers repeat much of the prompt (where prompt lookup
helps): edit a given code snippet, and answer by quoting a given passage.

Each task runs plain and speculative in turn for --repeat rounds (prefix
caching off, so no round reuses another's prefill) and each keeps its best
round, which evens out other load on a shared machine. Outputs must be equal
token for token. Prints one JSON line per task and mode, then the ratio of
output tokens per second over all tasks.

    python -m benchmarks.spec_decode_cpu [--num-speculative-tokens 4] [--max-tokens 128] [--repeat 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.engine_cpu import emit
from pagewire.services.common.logging import configure_logging
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.executor.model_executor import create_engine_core, load_engine_model
from pagewire.services.engine.core.sequence import SamplingParams

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
PASSAGE = (
    "The Industrial Revolution began in Great Britain in the late eighteenth century. Steam engines, first used to pump water "
    "out of mines, soon powered textile mills, and the new factories drew workers from the countryside into fast-growing towns. "
    "Railways followed in the 1830s, cutting the cost of moving coal and goods and linking distant markets."
)
TASKS = {
    "code_edit": f"Rename the function total_price to compute_total in this code and output the whole code:\n\n```python\n{CODE}```",
    "quote": f"Read this passage:\n\n{PASSAGE}\n\nWhere did the Industrial Revolution begin, and what did steam engines power? Answer by quoting the passage word for word.",
}


def run(loaded: LoadedModel, prompt: list[int], max_tokens: int, **settings) -> tuple[float, list[int], dict]:
    config = EngineConfig(max_model_len=2048, num_kv_blocks=256, enable_prefix_caching=False, **settings)
    core = create_engine_core(config, loaded)
    tokens: list[int] = []
    start = time.perf_counter()
    core.add_request("r", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    while core.has_unfinished():
        for out in core.step():
            tokens.extend(out.new_token_ids)
    seconds = time.perf_counter() - start
    stats = core.stats()
    figures = {
        "steps": stats.steps_total,
        "draft_tokens": stats.spec_decode_draft_tokens_total,
        "accepted_tokens": stats.spec_decode_accepted_tokens_total,
        "accepted_by_position": list(stats.spec_decode_accepted_by_position),
    }
    return seconds, tokens, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2, help="Alternating rounds; each mode keeps its best.")
    args = parser.parse_args()
    configure_logging("warning")
    loaded = load_engine_model(EngineConfig(device="cpu", dtype="float32"))
    tokenizer = load_hf_tokenizer(resolve_model(None))
    modes = {
        "plain": {},
        "ngram": {
            "speculative_method": "ngram",
            "num_speculative_tokens": args.num_speculative_tokens,
            "ngram_max": args.ngram_max,
            "ngram_min": args.ngram_min,
        },
    }
    totals = {mode: [0, 0.0] for mode in modes}  # output tokens, seconds
    for task, text in TASKS.items():
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(chat)["input_ids"]
        best: dict[str, tuple[float, list[int], dict]] = {}
        for _ in range(args.repeat):
            for mode, settings in modes.items():
                result = run(loaded, prompt, args.max_tokens, **settings)
                if mode not in best or result[0] < best[mode][0]:
                    best[mode] = result
        if best["plain"][1] != best["ngram"][1]:
            raise SystemExit(f"{task}: speculative output differs from plain decoding")
        for mode, (seconds, tokens, figures) in best.items():
            totals[mode][0] += len(tokens)
            totals[mode][1] += seconds
            acceptance = figures["accepted_tokens"] / figures["draft_tokens"] if figures["draft_tokens"] else None
            emit(
                {
                    "task": task,
                    "mode": mode,
                    "prompt_tokens": len(prompt),
                    "output_tokens": len(tokens),
                    "seconds": round(seconds, 3),
                    "output_tok_s": round(len(tokens) / seconds, 2),
                    "acceptance": None if acceptance is None else round(acceptance, 3),
                    "torch_threads": torch.get_num_threads(),
                    **figures,
                }
            )
    rates = {mode: tokens / seconds for mode, (tokens, seconds) in totals.items()}
    emit({"ratio_ngram_over_plain": round(rates["ngram"] / rates["plain"], 3), "num_speculative_tokens": args.num_speculative_tokens})


if __name__ == "__main__":
    main()
