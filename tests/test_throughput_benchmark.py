"""benchmarks/throughput.py --gateway: the model directory it writes loads
back into the same weights and tokenizer, and the whole served path runs on
the CPU with the tiny shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import through_gateway, throughput
from pagewire.services.common.model import load_hf_tokenizer, resolve_model
from pagewire.services.engine.executor.loader import load_model
from tests.support.harness import REPO, child_environment


def test_model_dir_loads_back(tmp_path: Path) -> None:
    original = throughput.random_model("tiny", torch.float32, 64, torch.device("cpu"))
    through_gateway.write_model_dir(original, tmp_path)
    through_gateway.write_tokenizer(original.config.vocab_size, tmp_path)

    source = resolve_model(str(tmp_path))
    loaded = load_model(source, torch.device("cpu"), torch.float32, 64)
    assert loaded.config == original.config
    reloaded = dict(loaded.model.named_parameters())
    for name, param in original.model.named_parameters():
        assert torch.equal(reloaded[name], param), name

    tokenizer = load_hf_tokenizer(source)
    assert len(tokenizer) == original.config.vocab_size
    assert tokenizer.decode([1, 2, original.config.vocab_size - 1]) == f"w1 w2 w{original.config.vocab_size - 1}"


def test_core_step_benchmark_times_the_core_and_the_step_loop() -> None:
    command = [sys.executable, "-m", "benchmarks.core_step", "--sequences", "8", "--rounds", "3"]
    result = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["sequences"] == 8 and record["prefix_cache_hit_tokens"] == 0
    assert record["core_us_per_step"] > 0 and record["step_loop_us_per_step"] > 0


@pytest.mark.slow
def test_gateway_mode_on_cpu() -> None:
    command = [sys.executable, "-m", "benchmarks.throughput", "--device", "cpu", "--shapes", "tiny", "--requests", "8",
               "--prompt-len", "32", "--output-len", "8", "--max-num-seqs", "8", "--gateway"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    runs = {r["system"]: r for r in records if r["bench"] == "throughput"}
    assert set(runs) == {"pagewire", "pagewire-gateway", "pagewire-engine-grpc"}
    for record in runs.values():
        assert record["output_tokens"] == 8 * 8 and "errors" not in record
    ratio = next(r for r in records if r["bench"] == "throughput_ratio")
    assert ratio["gateway_over_in_process"] > 0


def test_gateway_overhead_benchmark_runs_the_public_path() -> None:
    # benchmarks/gateway_overhead.py: real tokenizer and gateway processes
    # over a scripted engine; every token of every request arrives both ways.
    command = [sys.executable, "-m", "benchmarks.gateway_overhead", "--requests", "8", "--output-len", "8", "--step-ms", "2", "--repeat", "1"]
    result = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    runs = {r["system"]: r for r in records if "system" in r}
    assert set(runs) == {"engine-grpc", "gateway", "gateway-ids-only"}
    for record in runs.values():
        assert record["output_tokens"] == 8 * 8
    # CPU time counts in clock ticks, too coarse to be non-zero for 64 tokens.
    assert set(runs["gateway"]["cpu_us_per_token"]) == {"engine", "tokenizer", "gateway"}
    assert records[-1]["ratio"]["gateway_over_engine_grpc"] > 0


@pytest.mark.slow
def test_rest_benchmark_on_cpu_with_workers() -> None:
    # benchmarks/rest.py: in-process, gRPC on one stream (text and ids only) and on a stream per
    # client process, REST streaming and REST whole responses in one call,
    # the front door's CPU counted over every worker.
    command = [sys.executable, "-m", "benchmarks.rest", "--device", "cpu", "--shapes", "tiny", "--requests", "8", "--prompt-len", "32",
               "--output-len", "8", "--max-num-seqs", "8", "--gateway-workers", "2", "--tokenizer-workers", "2", "--client-processes", "2"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=child_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    runs = {r["system"]: r for r in records if r["bench"] == "rest"}
    assert set(runs) == {"pagewire", "pagewire-grpc", "pagewire-grpc-ids-only", "pagewire-grpc-streams", "pagewire-rest-sse", "pagewire-rest"}
    for record in runs.values():
        assert record["output_tokens"] == 8 * 8 and "errors" not in record and record["prefix_cache_hit_tokens"] == 0
    for door in ("grpc", "grpc-ids-only", "grpc-streams", "rest-sse", "rest"):
        # Two tokenizers, the supervising gateway and its two workers.
        assert runs[f"pagewire-{door}"]["front_door_processes"] == 5
        assert runs[f"pagewire-{door}"]["cpu_us_per_token_front_door"] > 0
    for door in ("grpc-streams", "rest-sse", "rest"):
        # The client processes' own CPU over their runs, counted.
        assert runs[f"pagewire-{door}"]["busiest_client_cpu_share"] > 0
    ratio = next(r for r in records if r["bench"] == "rest_ratio")
    assert ratio["rest_sse_over_in_process"] > 0 and ratio["grpc_streams_over_in_process"] > 0
