"""The ranks of a tensor-parallel engine, seen from rank 0 (the process of
the engine core): it starts a worker process per other rank and, before each
step, broadcasts the step's plan: for each scheduled sequence, what the
runner reads of it (positions, the tokens it needs, its block table). A
worker mirrors those sequences and runs the same runner over them, so every
rank launches the same kernels and collectives in the same order, CUDA graphs
included. Only rank 0 samples; it broadcasts the sampled ids, which a worker
keeps on its device for the next step's inputs as rank 0 does.

A worker that exits takes the engine down with it (the process exits with
code 1): the collectives of the next step would wait for it forever, and the
requests' K/V on that rank is gone. The engine's supervisor then starts a
fresh engine, as it does when the core process dies.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from pagewire.services.common.logging import get_logger
from pagewire.services.engine.config import EngineConfig
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import GREEDY, SamplingParams, Sequence, SequenceStatus
from pagewire.services.engine.executor import parallel
from pagewire.services.engine.executor.grammar_pool import MaskRow
from pagewire.services.engine.executor.sampler import DeviceSample, Sampler, SamplingRequest

log = get_logger("engine")

WORKER_MODULE = "pagewire.services.engine.executor.tp_worker"


@dataclass
class MirroredSequence:
    """The fields a runner reads of a sequence, for passes that serve no core
    Sequence: a worker's copy of rank 0's, or a draft model's pass. Workers
    never sample, so there the sampling fields stay as plain greedy ones."""

    request_id: str
    num_computed_tokens: int
    num_tokens: int
    block_table_epoch: int
    block_table: list[int]
    spec_token_ids: list[int]
    known: list[int]
    sampling: SamplingParams = GREEDY
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    constrained: bool = False
    # A mirror lives for one pass; its sequence's end is rank 0's business.
    status: SequenceStatus = SequenceStatus.RUNNING

    @property
    def num_known_tokens(self) -> int:
        return self.num_computed_tokens + len(self.known)

    def token_at(self, index: int) -> int:
        return self.known[index - self.num_computed_tokens]

    def token_slice(self, start: int, stop: int) -> list[int]:
        return self.known[start - self.num_computed_tokens : stop - self.num_computed_tokens]


@dataclass
class PlannedSequence:
    """One scheduled sequence of a step's plan."""

    serial: int  # the same for a sequence over consecutive steps
    num_new_tokens: int
    seq: MirroredSequence


class StepPlanner:
    """Rank 0's side: the plan of each step, with a serial per sequence that
    stays the same while the sequence keeps being scheduled (a worker's
    runner recognises a sequence by its mirror's identity, as rank 0's
    recognises the Sequence object)."""

    def __init__(self) -> None:
        self._serials = itertools.count()
        self._last: dict[int, tuple[Sequence, int]] = {}

    def plan(self, scheduled: list[ScheduledSequence]) -> list[PlannedSequence]:
        planned, seen = [], {}
        for item in scheduled:
            seq = item.seq
            last = self._last.get(id(seq))
            serial = last[1] if last is not None and last[0] is seq else next(self._serials)
            seen[id(seq)] = (seq, serial)
            start = seq.num_computed_tokens
            inputs_end = min(start + item.num_new_tokens - len(seq.spec_token_ids), seq.num_known_tokens)
            known = seq.token_slice(start, inputs_end) if inputs_end > start else []
            mirror = MirroredSequence(seq.request_id, start, seq.num_tokens, seq.block_table_epoch, list(seq.block_table), list(seq.spec_token_ids), known)
            planned.append(PlannedSequence(serial, item.num_new_tokens, mirror))
        self._last = seen
        return planned


class Mirrors:
    """A worker's side: the scheduled batch of a plan, over mirrors that keep
    their identity from one step to the next."""

    def __init__(self) -> None:
        self._last: dict[int, MirroredSequence] = {}

    def scheduled(self, plan: list[PlannedSequence]) -> list[ScheduledSequence]:
        batch, mirrors = [], {}
        for p in plan:
            mirror = self._last.get(p.serial)
            if mirror is None:
                mirror = p.seq
            else:
                vars(mirror).update(vars(p.seq))
            mirrors[p.serial] = mirror
            batch.append(ScheduledSequence(mirror, p.num_new_tokens))  # type: ignore[arg-type]
        self._last = mirrors
        return batch


class BroadcastingSampler:
    """Rank 0's sampler: samples, then sends the ids to the workers."""

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    def start_masks(self, rows: list[MaskRow]) -> None:
        self.sampler.start_masks(rows)

    def sample(self, logits: torch.Tensor, rows: list[SamplingRequest], row_counts: list[int] | None = None) -> DeviceSample:
        return self._broadcast(self.sampler.sample(logits, rows, row_counts))

    def greedy(self, logits: torch.Tensor, constrained: list[int] | None = None, mask_rows: list[MaskRow] | None = None) -> DeviceSample:
        return self._broadcast(self.sampler.greedy(logits, constrained, mask_rows))

    @staticmethod
    def _broadcast(sample: DeviceSample) -> DeviceSample:
        parallel.broadcast_tensor(sample.token_ids)
        return sample


class ReceivingSampler:
    """A worker's sampler: rank 0's sampled ids, kept on this rank's device."""

    def __init__(self, device: torch.device):
        self.device = device

    def sample(self, logits: torch.Tensor, rows: list[SamplingRequest], row_counts: list[int] | None = None) -> DeviceSample:
        return self._receive(row_counts or [1] * len(rows))

    def greedy(self, logits: torch.Tensor, constrained: list[int] | None = None, mask_rows: list[MaskRow] | None = None) -> DeviceSample:
        return self._receive([1] * logits.shape[0])

    def _receive(self, row_counts: list[int]) -> DeviceSample:
        token_ids = parallel.broadcast_tensor(torch.empty(sum(row_counts), dtype=torch.int64, device=self.device))
        return DeviceSample(token_ids, [], row_counts, [], [], False, None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelWorkers:
    """Rank 0's handle on the other ranks: started, joined into one process
    group with this process, sent each step's plan, and stopped."""

    def __init__(self, config: EngineConfig, device: torch.device):
        size = config.tensor_parallel_size
        address = f"127.0.0.1:{_free_port()}"
        self._stopping = False
        self.processes = []
        for rank in range(1, size):
            process = subprocess.Popen([sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE)
            assert process.stdin is not None
            process.stdin.write(pickle.dumps((config, rank, address)))
            process.stdin.close()
            self.processes.append(process)
        atexit.register(self.stop)
        for rank, process in enumerate(self.processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), name=f"tp-rank-{rank}-watch", daemon=True).start()
        parallel.initialize(0, size, address, device)
        self.planner = StepPlanner()
        log.info("tensor-parallel ranks joined", size=size, workers=[p.pid for p in self.processes])

    def _watch(self, rank: int, process: subprocess.Popen[bytes]) -> None:
        code = process.wait()
        if not self._stopping:
            log.error("a tensor-parallel rank exited; the engine exits so that its supervisor starts a fresh one", rank=rank, exit_code=code)
            os._exit(1)

    def share(self, value: Any) -> Any:
        """Send the workers what they size themselves by (rank 0 decides)."""
        return parallel.broadcast_object(value)

    def send(self, scheduled: list[ScheduledSequence]) -> None:
        parallel.broadcast_object(self.planner.plan(scheduled))

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        try:
            parallel.broadcast_object(None)
        except RuntimeError:
            pass  # a worker already gone; it is killed below
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        parallel.destroy()
