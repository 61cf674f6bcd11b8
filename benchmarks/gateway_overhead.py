"""What the public path costs on top of an engine: the gateway and tokenizer
services against a scripted engine that emits one token per request every
--step-ms, so that nothing but the gateway, the tokenizer and gRPC is
measured, on any machine with or without a GPU.

The scripted engine (tests/gateway/scripted_engine.py) speaks the real
Engine proto from a process of its own; the tokenizer is the real service on
a word-level vocabulary (one word per id, as benchmarks/through_gateway.py
writes it); the gateway is the real service. The peer is the same client
on the scripted engine's own Generate stream, which shows the rate the
engine alone delivers; the ratio is through-gateway over that. Also printed:
each service's CPU time per output token, the figure that decides how many
tokens a second one gateway process can carry. A third system asks the
gateway for token ids only (GenerateRequest.token_ids_only), whose output
leaves the tokenizer out.

    python -m benchmarks.gateway_overhead [--requests 256] [--output-len 128] [--step-ms 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import through_gateway
from tests.support.harness import Cluster

VOCAB_SIZE = 32000
SCRIPTED_ENGINE = [sys.executable, "-m", "tests.gateway.scripted_engine"]


def systems(cluster: Cluster) -> list[tuple[str, str, bool, bool]]:
    """(name, target, straight to the engine, token ids only) of each system measured."""
    return [
        ("engine-grpc", cluster.engine.address, True, False),
        ("gateway", cluster.gateway.address, False, False),
        ("gateway-ids-only", cluster.gateway.address, False, True),
    ]


def measure(name: str, target: str, prompts: list[list[int]], args: argparse.Namespace, pids: dict[str, int], direct: bool, ids_only: bool) -> dict:
    before = through_gateway.cpu_seconds(pids)
    timings = through_gateway.stream_requests(target, prompts, args.output_len, prefix=name, direct_to_engine=direct, token_ids_only=ids_only)
    after = through_gateway.cpu_seconds(pids)
    if timings.errors:
        raise RuntimeError(f"{name}: {len(timings.errors)} requests failed, first: {timings.errors[0]}")
    tokens = timings.output_tokens
    return {
        "system": name,
        "requests": len(prompts),
        "output_tokens": tokens,
        "seconds": round(timings.seconds, 3),
        "output_tokens_per_s": round(tokens / timings.seconds, 1),
        "messages": timings.messages,
        "cpu_us_per_token": {service: round((after[service] - before[service]) / tokens * 1e6, 1) for service in pids},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=8.0, help="the scripted engine's time per step")
    parser.add_argument("--repeat", type=int, default=2, help="alternating rounds of each system; the best is reported")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="pagewire-gateway-overhead-"))
    through_gateway.write_tokenizer(VOCAB_SIZE, workdir / "model")
    # The tokenizer service resolves a HF directory by its config.json.
    (workdir / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": VOCAB_SIZE}))
    quiet = ["--log-level", "warning"]
    cluster = Cluster.create(
        workdir,
        tokenizer_args=["--model", str(workdir / "model"), *quiet],
        engine_args=["--step-s", str(args.step_ms / 1000)],
        gateway_args=["--max-concurrent-requests", str(max(1024, args.requests)), *quiet],
        engine_program=SCRIPTED_ENGINE,
    )
    try:
        cluster.start()
        pids = {service.name: service.pid for service in cluster.services}
        prompts = [[1 + (r * 7919 + i * 104729) % (VOCAB_SIZE - 1) for i in range(args.prompt_len)] for r in range(args.requests)]
        best: dict[str, dict] = {}
        for round_index in range(args.repeat):
            for name, target, direct, ids_only in systems(cluster):
                result = measure(f"{name}-{round_index}-", target, prompts, args, pids, direct, ids_only) | {"system": name, "round": round_index}
                if name not in best or result["output_tokens_per_s"] > best[name]["output_tokens_per_s"]:
                    best[name] = result
        workload = {"requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len, "step_ms": args.step_ms}
        for result in best.values():
            sys.stdout.write(json.dumps(result | workload) + "\n")
        engine_rate = best["engine-grpc"]["output_tokens_per_s"]
        ratios = {f"{name.replace('-', '_')}_over_engine_grpc": round(best[name]["output_tokens_per_s"] / engine_rate, 3) for name in ("gateway", "gateway-ids-only")}
        sys.stdout.write(json.dumps({"ratio": ratios} | workload) + "\n")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
