"""The engine core's own host work per decode step, with no model: what a
step of N decoding sequences costs the step thread in Python, apart from
the device, on any machine.

The executor is a stand-in that samples token 7 for every sequence at once
(the real one's share, input staging and sampling, is measured by
benchmarks/throughput.py and the latency benchmark on a GPU); everything
else is the real thing: EngineCore.step (scheduling, block bookkeeping,
read-back, stop checks, outputs: `core_us_per_step`; for the first step of
each round, prompts only, `prefill_core_us_per_step`) and, around it, what
the served engine's step thread adds (`step_loop_us_per_step`): the step
loop applying commands, routing each output into its stream's batch and
pickling that batch for the pipe to the server process
(service/core_process.py), less the pipe write itself. Each round adds N
greedy requests of 64 prompt ids and 128 output tokens, and times 100
decode steps; the record gives the median over rounds after two warm ones. There is no prefix cache to hit: every
prompt is random.

    python -m benchmarks.core_step [--sequences 256] [--rounds 12]
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import statistics
import sys
import time

from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.engine import EngineCore, ExecutorSpec
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.common.logging import configure_logging
from pagewire.services.engine.core.sequence import RequestOutput, SamplerOutput, SamplingParams, Sequence
from pagewire.services.engine.core.step_loop import AddCommand, StepLoop, StreamCommand, StreamState

PROMPT_LEN = 64
OUTPUT_LEN = 128
MEASURED_STEPS = 100
WARM_ROUNDS = 2
SAMPLED_TOKEN = 7


class SampledAtOnce:
    """A launched step whose every sequence has sampled SAMPLED_TOKEN."""

    def __init__(self, sequences: list[Sequence]):
        self.sequences = sequences

    def start_masks(self) -> None:
        pass

    def resolve(self) -> SamplerOutput:
        count = len(self.sequences)
        return SamplerOutput([[SAMPLED_TOKEN]] * count, [[]] * count)


class NoModel:
    """The executor's interface with nothing behind it."""

    spec = ExecutorSpec("no-model", 32000, (2,), 4096, 8192, 200_000, "cpu", "float32")

    def launch(self, scheduled: list[ScheduledSequence]) -> SampledAtOnce:
        return SampledAtOnce([item.seq for item in scheduled if item.completes_sequence])

    def forget(self, request_id: str) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    configure_logging("warning")
    config = EngineConfig(device="cpu", dtype="float32", max_model_len=4096, max_num_seqs=args.sequences, max_num_batched_tokens=8192)
    core = EngineCore(config, NoModel())  # type: ignore[arg-type]
    loop = StepLoop(core)
    # What core_process.py's stream does with a batch, less the pipe write.
    loop.submit(StreamCommand("open", StreamState(1, lambda batch: pickle.dumps(("batch", 1, batch)))))
    core_step = core.step
    core_seconds: list[float] = []

    def timed_core_step() -> list[RequestOutput]:
        started = time.perf_counter()
        outputs = core_step()
        core_seconds.append(time.perf_counter() - started)
        return outputs

    core.step = timed_core_step  # type: ignore[method-assign]
    rng = random.Random(1)
    sampling = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    core_s, rest_s, prefill_s = [], [], []
    for round_index in range(args.rounds):
        for i in range(args.sequences):
            loop.submit(AddCommand(1, f"r{round_index}-{i}", [rng.randrange(3, 30000) for _ in range(PROMPT_LEN)], sampling, None))
        core_seconds.clear()
        loop.run_once()  # a step of prompts only: admitting, hashing and allocating their blocks
        prefill_s.append(core_seconds[0])
        while any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in core.sequences.values()):
            loop.run_once()
        core_seconds.clear()
        started = time.perf_counter()
        for _ in range(MEASURED_STEPS):
            loop.run_once()
        total = time.perf_counter() - started
        core_s.append(sum(core_seconds) / MEASURED_STEPS)
        rest_s.append((total - sum(core_seconds)) / MEASURED_STEPS)
        while core.has_unfinished():
            loop.run_once()
    record = {
        "bench": "core_step",
        "sequences": args.sequences,
        "rounds": args.rounds,
        "core_us_per_step": round(statistics.median(core_s[WARM_ROUNDS:]) * 1e6, 1),
        "step_loop_us_per_step": round(statistics.median(rest_s[WARM_ROUNDS:]) * 1e6, 1),
        "prefill_tokens_per_step": min(config.max_num_batched_tokens, args.sequences * PROMPT_LEN),
        "prefill_core_us_per_step": round(statistics.median(prefill_s[WARM_ROUNDS:]) * 1e6, 1),
        "prefix_cache_hit_tokens": core.kv_cache.hit_tokens,
    }
    sys.stdout.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
