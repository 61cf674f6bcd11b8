"""The CPU workload: pagewire's engine in-process against HF transformers
`generate` on the embedded model (SmolLM2-135M-Instruct, float32), in one run.

Workload: --requests requests (32) of --prompt-len random prompt ids (64),
--output-len tokens each (32), greedy, EOS ignored. pagewire gets every
request at once; HF generates them as one batch (equal prompt lengths, so no
padding) and, with --hf-sequential, one at a time. The two alternate for
--repeat rounds and each keeps its best round, which evens out other load on
a shared machine. Prints one JSON line per system, then the ratios.

    python -m benchmarks.engine_cpu [--requests 32] [--prompt-len 64] [--output-len 32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.throughput import measured_engine
from pagewire.services.common.logging import configure_logging
from pagewire.services.common.model import resolve_model
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore
from pagewire.services.engine.executor.model_executor import load_engine_model
from pagewire.services.engine.core.sequence import SamplingParams


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def random_prompts(count: int, length: int, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size - 10, (count, length), generator=generator).tolist()


def run_pagewire(core: EngineCore, prompts: list[list[int]], output_len: int) -> tuple[float, dict[str, list[int]]]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        core.add_request(str(i), ids, params)
    while core.has_unfinished():
        for out in core.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return time.perf_counter() - start, outputs


def run_hf(model, prompts: list[list[int]], output_len: int, batch_size: int) -> tuple[float, list[list[int]]]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    generated: list[list[int]] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[i : i + batch_size])
            out = model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=config)
            generated.extend(out[:, batch.shape[1] :].tolist())
    return time.perf_counter() - start, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="Alternating rounds; each system keeps its best.")
    parser.add_argument("--hf-sequential", action="store_true", help="Also time HF generating one request at a time (once).")
    args = parser.parse_args()
    configure_logging("warning")
    threads = torch.get_num_threads()
    workload = {"requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len, "torch_threads": threads}
    total_tokens = args.requests * args.output_len

    # Rounds repeat the same prompts: without this, later rounds would skip their prefill.
    config = EngineConfig(device="cpu", enable_prefix_caching=False)
    core = measured_engine(config, load_engine_model(config))
    prompts = random_prompts(args.requests, args.prompt_len, core.vocab_size, seed=0)
    warm_up = random_prompts(2, args.prompt_len, core.vocab_size, seed=1)  # none of the measured ones

    from transformers import AutoModelForCausalLM

    source = resolve_model(None)
    model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=torch.float32, **source.pretrained_kwargs()).eval()
    run_pagewire(core, warm_up, 2)
    run_hf(model, warm_up, 2, batch_size=2)
    engine_times, hf_times = [], []
    for _ in range(args.repeat):
        seconds, engine_outputs = run_pagewire(core, prompts, args.output_len)
        engine_times.append(seconds)
        seconds, hf_outputs = run_hf(model, prompts, args.output_len, batch_size=args.requests)
        hf_times.append(seconds)
    engine_rate, hf_rate = total_tokens / min(engine_times), total_tokens / min(hf_times)
    emit({"system": "pagewire", **workload, "seconds": round(min(engine_times), 3), "rounds_s": [round(t, 3) for t in engine_times],
          "output_tokens_per_s": round(engine_rate, 1), "prefix_cache_hit_tokens": core.stats().prefix_cache_hit_tokens})  # fmt: skip
    emit({"system": "hf-generate-batched", **workload, "seconds": round(min(hf_times), 3), "rounds_s": [round(t, 3) for t in hf_times],
          "output_tokens_per_s": round(hf_rate, 1)})  # fmt: skip
    same = sum(engine_outputs[str(i)] == hf_outputs[i] for i in range(args.requests))
    ratios = {"pagewire_over_hf_batched": round(engine_rate / hf_rate, 3), "greedy_outputs_equal": f"{same}/{args.requests}"}
    if args.hf_sequential:
        seconds, _ = run_hf(model, prompts, args.output_len, batch_size=1)
        sequential_rate = total_tokens / seconds
        emit({"system": "hf-generate-sequential", **workload, "seconds": round(seconds, 3), "output_tokens_per_s": round(sequential_rate, 1)})
        ratios["pagewire_over_hf_sequential"] = round(engine_rate / sequential_rate, 3)
    emit({"ratio": ratios})


if __name__ == "__main__":
    main()
