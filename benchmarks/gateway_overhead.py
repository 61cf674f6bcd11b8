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
tokens a second one gateway process can carry.

    python benchmarks/gateway_overhead.py [--requests 256] [--output-len 128] [--step-ms 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

import through_gateway
from pagewire.services.common.grpc_utils import check_health

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 32000
START_TIMEOUT_S = 60.0

ENGINE_MAIN = """
import asyncio, sys
from tests.gateway.scripted_engine import ScriptedEngine, start_scripted_engine

async def main():
    engine = ScriptedEngine("scripted", step_s=float(sys.argv[2]), max_model_len=4096, num_blocks=1 << 20)
    running = await start_scripted_engine(engine, int(sys.argv[1]))
    await running.server.wait_for_termination()

asyncio.run(main())
"""


def start(command: list[str], log_path: Path) -> subprocess.Popen:
    with log_path.open("wb") as log:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_serving(target: str, service: str, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not check_health(target, service, timeout_s=1.0):
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{service} on {target} did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def cpu_seconds(processes: dict[str, subprocess.Popen]) -> dict[str, float]:
    times = {name: psutil.Process(p.pid).cpu_times() for name, p in processes.items()}
    return {name: t.user + t.system for name, t in times.items()}


def measure(name: str, target: str, prompts: list[list[int]], args: argparse.Namespace, processes: dict[str, subprocess.Popen], direct: bool) -> dict:
    before = cpu_seconds(processes)
    timings = through_gateway.stream_requests(target, prompts, args.output_len, prefix=name, direct_to_engine=direct)
    after = cpu_seconds(processes)
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
        "cpu_us_per_token": {service: round((after[service] - before[service]) / tokens * 1e6, 1) for service in processes},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--step-ms", type=float, default=8.0, help="the scripted engine's time per step")
    parser.add_argument("--repeat", type=int, default=2, help="alternating rounds of each system; the best is reported")
    args = parser.parse_args()

    ports = {name: through_gateway.free_port() for name in ("engine", "tokenizer", "gateway", "http")}
    workdir = Path(tempfile.mkdtemp(prefix="pagewire-gateway-overhead-"))
    through_gateway.write_tokenizer(VOCAB_SIZE, workdir / "model")
    # The tokenizer service resolves a HF directory by its config.json.
    (workdir / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": VOCAB_SIZE}))
    cli = [sys.executable, "-m", "pagewire.services.cli"]
    common = ["--host", "127.0.0.1", "--log-level", "warning", "--log-format", "json"]
    commands = {
        "engine": [sys.executable, "-c", ENGINE_MAIN, str(ports["engine"]), str(args.step_ms / 1000)],
        "tokenizer": [*cli, "tokenizer", *common, "--port", str(ports["tokenizer"]), "--model", str(workdir / "model")],
        "gateway": [
            *cli, "gateway", *common, "--port", str(ports["gateway"]), "--http-port", str(ports["http"]),
            "--tokenizer", f"127.0.0.1:{ports['tokenizer']}", "--engine", f"127.0.0.1:{ports['engine']}",
            "--max-concurrent-requests", str(max(1024, args.requests)),
        ],
    }  # fmt: skip
    services = {"engine": "pagewire.v1.Engine", "tokenizer": "pagewire.v1.Tokenizer", "gateway": "pagewire.v1.Generation"}
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name in ("engine", "tokenizer", "gateway"):
            processes[name] = start(commands[name], workdir / f"{name}.log")
            wait_serving(f"127.0.0.1:{ports[name]}", services[name], processes[name], workdir / f"{name}.log")
        prompts = [[1 + (r * 7919 + i * 104729) % (VOCAB_SIZE - 1) for i in range(args.prompt_len)] for r in range(args.requests)]
        best: dict[str, dict] = {}
        for round_index in range(args.repeat):
            for name, target, direct in (
                ("engine-grpc", f"127.0.0.1:{ports['engine']}", True),
                ("gateway", f"127.0.0.1:{ports['gateway']}", False),
            ):
                result = measure(f"{name}-{round_index}-", target, prompts, args, processes, direct) | {"system": name, "round": round_index}
                if name not in best or result["output_tokens_per_s"] > best[name]["output_tokens_per_s"]:
                    best[name] = result
        workload = {"requests": args.requests, "prompt_len": args.prompt_len, "output_len": args.output_len, "step_ms": args.step_ms}
        for result in best.values():
            sys.stdout.write(json.dumps(result | workload) + "\n")
        ratio = best["gateway"]["output_tokens_per_s"] / best["engine-grpc"]["output_tokens_per_s"]
        sys.stdout.write(json.dumps({"ratio": {"gateway_over_engine_grpc": round(ratio, 3)}} | workload) + "\n")
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
