"""The standard workload through every door of pagewire in one call: the
engine in-process, then the same model behind `pagewire serve` through the
public gRPC `Generate` stream (all requests on one stream, as one client
multiplexes them, the same asking for token ids only, which leaves the
tokenizer out of the output, and spread over a stream per client process),
through REST streaming /v1/completions (SSE) and through REST
non-streaming /v1/completions.

Workload: --requests requests (256) of --prompt-len random prompt ids (512),
--output-len output tokens each (128), greedy, EOS ignored, all submitted at
once. Except on the one-stream gRPC door, the requests are spread over
--client-processes asynchronous client processes (benchmarks/rest_client.py,
benchmarks/grpc_client.py) so that the client is never the bottleneck: a
gRPC stream is served by one gateway worker, so only several streams (or
connections) can use several. One warm-up on prompts of its own
precedes the measured runs, and each run has prompts of its own, so none
finds another's blocks in the prefix cache (each record says its hits).

Besides throughput and latency, each served run records the CPU time of the
front door, the gateway and tokenizer processes (every worker), per output
token: cpu_us_per_token_front_door, and each service's share of it,
cpu_us_per_token_by_service; and on the client-process doors, how busy
the busiest client process was over its run (busiest_client_cpu_share, CPU
seconds per second of its run, its library threads included: near 1 or
above, a client set the pace and more --client-processes are needed to
measure the server).

    python -m benchmarks.rest [--shapes smollm2-135m,llama-1b] [--gateway-workers N] [--tokenizer-workers N]

A cheap check on a CPU:

    python -m benchmarks.rest --device cpu --shapes tiny --requests 16 --prompt-len 64 --output-len 16 --max-num-seqs 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from benchmarks import hf_peer, through_gateway, throughput
from pagewire.services.common.logging import configure_logging
from pagewire.services.engine.executor.loader import resolve_dtype
from tests.support.harness import REPO, ServeProcess, child_environment, engine_stats

# Prompt seeds of the measured runs: the in-process and one-stream gRPC runs
# share throughput.py's, the other doors have their own.
GRPC_SEED = 1
GRPC_STREAMS_SEED = 4
REST_STREAM_SEED = 5
REST_WHOLE_SEED = 6
GRPC_IDS_ONLY_SEED = 8  # 7 is the warm-up's (throughput.WARM_UP_SEED)
# Each served path and the seed of its own prompts.
DOORS = {"grpc": GRPC_SEED, "grpc_ids_only": GRPC_IDS_ONLY_SEED, "grpc_streams": GRPC_STREAMS_SEED, "rest_sse": REST_STREAM_SEED, "rest": REST_WHOLE_SEED}
# Seconds the client processes get to start before they all send at once.
CLIENT_START_S = 3.0


def front_door_pids(served: ServeProcess) -> dict[str, int]:
    """The gateway and tokenizer services of a serve (through_gateway.cpu_seconds
    counts each one's workers with it)."""
    return {name: pid for name, pid in through_gateway.serve_children(served).items() if name != "engine" and psutil.pid_exists(pid)}


def process_count(pids: dict[str, int]) -> int:
    """The processes of these services, their workers included."""
    return sum(1 + len(psutil.Process(pid).children(recursive=True)) for pid in pids.values())


def _clients_run(client_module: str, work: dict, prompts: list[list[int]], client_processes: int) -> tuple[float, dict[str, dict], float]:
    """Every prompt at once from client processes of client_module, each
    given `work` and its share of the prompts: the common start instant,
    each request's record, and the busiest client's CPU seconds per second
    of its run (near 1 or above: a client, not the server, set the pace)."""
    start_at = time.monotonic() + CLIENT_START_S
    shares = [{f"r{i}": prompts[i] for i in range(offset, len(prompts), client_processes)} for offset in range(client_processes)]
    clients = []
    for share in shares:
        client = subprocess.Popen([sys.executable, "-m", client_module], cwd=REPO, env=child_environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None
        client.stdin.write(json.dumps({**work, "prompts": share, "start_at": start_at}))
        client.stdin.close()
        clients.append(client)
    records: dict[str, dict] = {}
    busiest = 0.0
    for client in clients:
        assert client.stdout is not None
        share = json.loads(client.stdout.read())
        if client.wait() != 0:
            raise RuntimeError(f"a client process ({client_module}) exited with {client.returncode}")
        records |= share["records"]
        busiest = max(busiest, share["cpu_s"] / max(share["wall_s"], 1e-9))
    return start_at, records, busiest


def measure(served: ServeProcess, door: str, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    """One run of the workload through `door` (of DOORS), with the engine's
    counters and the front door's CPU time."""
    pids = front_door_pids(served)
    stats_before, cpu_before = engine_stats(served.engine_target), through_gateway.cpu_seconds(pids)
    if door in ("grpc", "grpc_ids_only"):
        timings = through_gateway.stream_requests(served.grpc_target, prompts, args.output_len, token_ids_only=door == "grpc_ids_only")
        start, first_token, finished, tokens, seconds, errors = (
            timings.start, timings.first_token, timings.finished, timings.output_tokens, timings.seconds, timings.errors
        )  # fmt: skip
    else:
        if door == "grpc_streams":
            client_module, work = "benchmarks.grpc_client", {"target": served.grpc_target, "output_len": args.output_len}
        else:
            client_module, work = "benchmarks.rest_client", {"url": served.rest_url, "output_len": args.output_len, "stream": door == "rest_sse"}
        start, records, client_busy = _clients_run(client_module, work, prompts, args.client_processes)
        errors = [f"{rid}: {r['error']}" for rid, r in records.items() if "error" in r]
        finished = {rid: r["finished"] for rid, r in records.items() if "finished" in r}
        # Without a stream, a request's first token arrives with its last.
        first_token = {rid: r.get("first_token", r["finished"]) for rid, r in records.items() if "finished" in r}
        tokens = sum(r.get("tokens", 0) for r in records.values())
        seconds = max(finished.values(), default=start) - start
    stats_after, cpu_after = engine_stats(served.engine_target), through_gateway.cpu_seconds(pids)
    front_cpu = sum(cpu_after[name] - cpu_before[name] for name in cpu_after)
    record = dict(
        **throughput.summarize(start, first_token, finished, tokens, seconds, args.output_len),
        engine_steps=stats_after.steps_total - stats_before.steps_total,
        prefix_cache_hit_tokens=stats_after.prefix_cache_hit_tokens - stats_before.prefix_cache_hit_tokens,
        front_door_processes=process_count(pids), cpu_s_front_door=round(front_cpu, 2),
        cpu_us_per_token_front_door=round(front_cpu / tokens * 1e6, 1) if tokens else None,
        cpu_us_per_token_by_service={name: round((cpu_after[name] - cpu_before[name]) / tokens * 1e6, 1) for name in cpu_after} if tokens else None,
    )  # fmt: skip
    if door not in ("grpc", "grpc_ids_only"):
        record["busiest_client_cpu_share"] = round(client_busy, 3)
    if errors:
        record.update(errors=len(errors), first_error=errors[0])
    return record


def benchmark_shape(shape: str, args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    vocab_size = throughput.SHAPES[shape]["vocab_size"]
    workload = dict(shape=shape, requests=args.requests, prompt_len=args.prompt_len, output_len=args.output_len,
                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")  # fmt: skip
    prompts = {seed: hf_peer.prompts(args.requests, args.prompt_len, vocab_size, seed=seed) for seed in DOORS.values()}
    warm = throughput.warm_up_prompts([p for measured in prompts.values() for p in measured], args, vocab_size)
    config = throughput.engine_config(args)
    loaded = throughput.random_model(shape, resolve_dtype(config.dtype, device), config.max_model_len, device)
    core = throughput.measured_engine(config, loaded)
    throughput.run_engine(core, warm, 8)
    in_process = throughput.run_engine(core, prompts[GRPC_SEED], args.output_len)
    throughput.emit(dict(bench="rest", system="pagewire", **workload, **in_process))
    work_dir = Path(tempfile.mkdtemp(prefix=f"pagewire-rest-{shape}-", dir=args.work_dir or None))
    through_gateway.write_model_dir(loaded, work_dir / "model")
    through_gateway.write_tokenizer(loaded.config.vocab_size, work_dir / "model")
    del core, loaded
    throughput.free_gpu()

    engine_flags = [*throughput.served_engine_flags(args), "--max-concurrent-requests", str(max(4096, args.requests))]
    for flag, value in (("--gateway-workers", args.gateway_workers), ("--tokenizer-workers", args.tokenizer_workers)):
        if value:
            engine_flags += [flag, str(value)]
    served = through_gateway.serve(work_dir / "model", engine_flags, Path(args.log_dir or work_dir) / f"serve-rest-{shape}.log")
    try:
        served.wait_serving(through_gateway.START_TIMEOUT_S)
        through_gateway.stream_requests(served.grpc_target, warm, 8, prefix="warm")
        served_runs = {door: measure(served, door, prompts[DOORS[door]], args) for door in args.doors.split(",")}
    finally:
        served.stop()
        shutil.rmtree(work_dir, ignore_errors=True)
    workers = dict(gateway_workers=args.gateway_workers or "default", tokenizer_workers=args.tokenizer_workers or "default", client_processes=args.client_processes)
    for door, record in served_runs.items():
        throughput.emit(dict(bench="rest", system=f"pagewire-{door.replace('_', '-')}", **workload, **workers, **record))
    ratios = {f"{door}_over_in_process": round(record["out_tok_s"] / in_process["out_tok_s"], 3) for door, record in served_runs.items()}
    ttft = {f"{door}_ttft_p50_over_in_process": round(record["ttft_p50_ms"] / in_process["ttft_p50_ms"], 3) for door, record in served_runs.items()}
    throughput.emit(dict(bench="rest_ratio", shape=shape, **ratios, **ttft))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput.add_workload_arguments(parser, "smollm2-135m,llama-1b")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--gateway-workers", type=int, default=0, help="gateway processes of the served system (0: serve's default)")
    parser.add_argument("--tokenizer-workers", type=int, default=0, help="tokenizer processes of the served system (0: serve's default)")
    parser.add_argument("--doors", default=",".join(DOORS), help=f"the served paths measured, in order (of {', '.join(DOORS)})")
    parser.add_argument("--client-processes", type=int, default=4, help="client processes the requests of every door but one-stream gRPC are spread over")
    parser.add_argument("--work-dir", default="", help="where the model directory is written (default: the system's temp dir)")
    parser.add_argument("--log-dir", default="", help="where `pagewire serve`'s log goes (default: beside the model, deleted)")
    args = parser.parse_args()
    configure_logging("warning")  # stdout carries only the JSON lines
    for shape in args.shapes.split(","):
        benchmark_shape(shape, args)


if __name__ == "__main__":
    main()
