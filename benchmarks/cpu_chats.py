"""Chats on the CPU: the embedded model served by `pagewire serve` (tokenizer,
engine and gateway as processes on this machine), once per --dtypes entry,
against HF transformers `generate` on the same model in float32, in one run. Workload: --chats concurrent chat
requests (32 different questions), greedy, at most --max-tokens tokens each
(64), stopping at the model's end of turn. Useful tokens are those up to and
including the end of turn: HF pads a finished row until the batch's longest
answer ends, pagewire frees its slot. Warm-ups ask other questions (another
wording of each topic), so all the measured prompts can find in the prefix
cache is the chat template's opening, which every chat shares. Prints
one JSON line per system (pagewire's with the CPU seconds each service took
and the engine's prefix-cache counters over the measured run), then the
ratio.

    python -m benchmarks.cpu_chats [--chats 32] [--max-tokens 64] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from benchmarks.through_gateway import cpu_seconds, serve_children
from pagewire.services.common.logging import configure_logging
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.support.harness import ServeProcess, engine_stats

TOPICS = [
    "the water cycle", "photosynthesis", "how a bicycle stays upright", "why the sky is blue", "the French revolution",
    "black holes", "how vaccines work", "the stock market", "volcanoes", "the internet", "plate tectonics", "jazz music",
    "the moon landing", "how bees make honey", "electric cars", "the Roman empire", "tides", "rainbows", "earthquakes",
    "the printing press", "coffee", "the human heart", "glaciers", "solar panels", "chess", "the Great Wall of China",
    "sleep", "lightning", "recycling", "the Olympic games", "dinosaurs", "clouds", "the piano", "bread baking",
    "wind turbines", "the Amazon rainforest", "penguins", "the Eiffel Tower", "origami", "comets",
]  # fmt: skip


MEASURED = "Explain {} in two sentences."
WARM_UP = "Describe {} to a child."  # differs from MEASURED from the first word on


def questions(count: int, wording: str) -> list[str]:
    return [wording.format(TOPICS[i % len(TOPICS)]) for i in range(count)]


def emit(record: dict) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


async def _chat_stream(target: str, texts: list[str], max_tokens: int) -> tuple[int, float]:
    """Every chat at once on one Generate stream: (useful output tokens, seconds)."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    starts = [
        gateway_pb2.ClientMessage(
            start=gateway_pb2.GenerateRequest(
                request_id=f"c{i}", chat=gateway_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=text)]), sampling=sampling
            )
        )
        for i, text in enumerate(texts)
    ]
    tokens = 0
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        start = time.perf_counter()
        async for reply in gateway_pb2_grpc.GenerationStub(channel).Generate(iter(starts)):
            for chunk in reply.chunks:
                if chunk.error.code:
                    raise RuntimeError(f"{chunk.request_id}: {chunk.error.message}")
                tokens += len(chunk.token_ids)
        return tokens, time.perf_counter() - start


def run_pagewire(args: argparse.Namespace, work_dir: Path, dtype: str) -> dict:
    served = ServeProcess(["--host", "127.0.0.1", "--dtype", dtype], log_path=work_dir / f"serve-{dtype}.log")
    served.start()
    try:
        served.wait_serving()
        asyncio.run(_chat_stream(served.grpc_target, questions(args.chats, WARM_UP), 8))
        children = serve_children(served)
        before, stats_before = cpu_seconds(children), engine_stats(served.engine_target)
        tokens, seconds = asyncio.run(_chat_stream(served.grpc_target, questions(args.chats, MEASURED), args.max_tokens))
        after, stats_after = cpu_seconds(children), engine_stats(served.engine_target)
    finally:
        served.stop()
    counters = {"prompt_tokens": "prompt_tokens_total", "prefix_cache_queried_tokens": "prefix_cache_queried_tokens",
                "prefix_cache_hit_tokens": "prefix_cache_hit_tokens"}  # fmt: skip
    return dict(useful_tokens=tokens, seconds=round(seconds, 2), useful_tok_s=round(tokens / seconds, 1),
                **{key: getattr(stats_after, name) - getattr(stats_before, name) for key, name in counters.items()},
                **{f"cpu_s_{name}": round(after[name] - before[name], 2) for name in after})  # fmt: skip


def run_hf(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM

    source = resolve_model("")
    tokenizer = load_hf_tokenizer(source)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(source.directory), **source.pretrained_kwargs(), dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id

    def generate(texts: list[str], max_tokens: int) -> tuple[int, float]:
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False) for t in texts]
        batch = tokenizer(rendered, return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, pad_token_id=eos, eos_token_id=eos)
        seconds = time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        return sum(row.index(eos) + 1 if eos in row else len(row) for row in new), seconds

    generate(questions(args.chats, WARM_UP), 8)
    tokens, seconds = generate(questions(args.chats, MEASURED), args.max_tokens)
    return dict(useful_tokens=tokens, seconds=round(seconds, 2), useful_tok_s=round(tokens / seconds, 1), batch_size=args.chats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--dtypes", default="float32,bfloat16", help="the served engine's --dtype, one run each (float32 is the default, bfloat16 uses AMX where the CPU has it)"
    )
    args = parser.parse_args()
    configure_logging("warning")
    workload = dict(bench="cpu_chats", chats=args.chats, max_tokens=args.max_tokens, threads=torch.get_num_threads())
    served = {}
    with tempfile.TemporaryDirectory(prefix="pagewire-chats-") as work_dir:
        for dtype in args.dtypes.split(","):
            served[dtype] = run_pagewire(args, Path(work_dir), dtype)
            emit(dict(workload, system="pagewire-serve", dtype=dtype, **served[dtype]))
    hf = run_hf(args)
    emit(dict(workload, system="hf-generate", dtype="float32", **hf))
    for dtype, pagewire in served.items():
        emit(dict(bench="cpu_chats_ratio", dtype=dtype, pagewire_over_hf_generate=round(pagewire["useful_tok_s"] / hf["useful_tok_s"], 2)))


if __name__ == "__main__":
    main()
