"""Turns a scheduler output into one forward pass over the flattened batch,
then samples the sequences whose next token is due, without waiting for the
device: `launch` returns at once, and a token the host has not read back yet
(sampled by the step before) is taken from that step's device tensor. A
sequence with speculative proposals feeds them after its last known token
and gets logits at every one of those positions (a verify step).

A step with a constrained sequence queues its sampling (`complete()`) only
when the next step's inputs are prepared on the host, just before the
device needs its tokens, or when the core reads it back: the grammar's mask
needs the token of the step before, which the core reads back while this
step's forward pass runs, and then has the masks started (`start_masks()`)
while it schedules and prepares the next step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagewire.services.engine.core.kv_cache import cdiv
from pagewire.services.engine.executor.backend import AttentionMetadata
from pagewire.services.engine.executor.kv_tensors import allocate_kv_tensors
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.executor.lora import LoraSlots
from pagewire.services.engine.executor.grammar_pool import MaskRow
from pagewire.services.engine.executor.sampler import DeviceSample, Sampler, SamplerOutput, SamplingRequest
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import GREEDY, Sequence, SequenceStatus


@dataclass
class BatchInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    # Rows of the hidden states whose logits are sampled, and their sequences.
    logits_indices: torch.Tensor
    sampled_sequences: list[Sequence]
    # Each token's LoRA slot (-1: the base model); None when no token has an adapter.
    lora_slots: torch.Tensor | None = None


@dataclass
class LaunchedStep:
    """A step whose forward pass is queued on the device, and its sampling
    once complete() has run (at launch, unless a sequence is constrained).
    It holds the sampler and the logits, not the runner: the runner keeps
    its last step, and a cycle would leave a dropped engine's CUDA graphs to
    the garbage collector, which may free them while another engine captures."""

    sequences: list[Sequence]
    sampler: Sampler
    # The step's logits until they are sampled.
    logits: torch.Tensor | None
    _sample: DeviceSample | None = field(default=None, init=False)

    @property
    def sample(self) -> DeviceSample:
        assert self._sample is not None, "a launched step's sampling was read before complete() queued it"
        return self._sample

    def start_masks(self) -> None:
        """Start filling the grammar masks of the constrained sequences, whose
        output tokens the host holds now (the step before was read back)."""
        if self._sample is None:
            self.sampler.start_masks(self._mask_rows()[1])

    def _mask_rows(self) -> tuple[list[int], list[MaskRow]]:
        """The rows a grammar masks (constrained sequences that have not
        ended), and their request ids and outputs."""
        rows = [i for i, s in enumerate(self.sequences) if s.constrained and s.status is not SequenceStatus.FINISHED]
        return rows, [(self.sequences[i].request_id, self.sequences[i].output_token_ids) for i in rows]

    @torch.inference_mode()
    def complete(self) -> None:
        """Queue the sampling, if not yet done (the logits are inference
        tensors, which the grammar masks in place)."""
        if self._sample is None:
            assert self.logits is not None
            if all(s.sampling.plain_greedy and not s.spec_token_ids for s in self.sequences):
                # Most steps: no row of parameters built per sequence (masked or not).
                self._sample = self.sampler.greedy(self.logits, *self._mask_rows())
            else:
                self._sample = self.sampler.sample(self.logits, sampling_rows(self.sequences), [len(s.spec_token_ids) + 1 for s in self.sequences])
            self.logits = None

    def resolve(self) -> SamplerOutput:
        self.complete()
        return self.sample.resolve()


def sampling_rows(sequences: list[Sequence]) -> list[SamplingRequest]:
    """A row per proposal of each sequence, then its next-token row. A
    sequence that ended while its step ran (a deferred sampling comes after
    the read-back and aborts) gets a plain greedy row: its token is
    dropped, and its grammar and seeded generator are gone."""
    return [
        SamplingRequest(s.request_id, s.sampling, s.prompt_token_ids, s.output_token_ids, draft, s.constrained)
        if s.status is not SequenceStatus.FINISHED
        else SamplingRequest(s.request_id, GREEDY, [], [])
        for s in sequences
        for draft in [*s.spec_token_ids, None]
    ]


class PendingInputs:
    """Input positions whose token the host does not know yet: the previous
    launched step samples them on the device."""

    def __init__(self, last: LaunchedStep | None):
        self._last = last
        self.positions: list[int] = []
        self._sequences: list[Sequence] = []

    def token(self, seq: Sequence, position: int, flat_index: int) -> int:
        """seq's token at position, or a placeholder recorded for fill()."""
        if position < seq.num_known_tokens:
            return seq.token_at(position)
        # Only the newest sample can be unknown: older ones were read back before this step.
        self.positions.append(flat_index)
        self._sequences.append(seq)
        return 0

    def next_tokens(self, sequences: list[Sequence], starts: np.ndarray, flat_indices: np.ndarray) -> np.ndarray:
        """Each sequence's token at its start position, a placeholder where
        it is not known yet (recorded for fill()); flat_indices are the
        positions' places in the step's input ids."""
        known = np.fromiter((seq.num_known_tokens for seq in sequences), np.int64, len(sequences))
        ids = np.zeros(len(sequences), np.int64)
        is_known = starts < known
        if not is_known.any():  # every step of a decode with overlapped scheduling
            self.positions += flat_indices.tolist()
            self._sequences += sequences
            return ids
        known_rows = np.flatnonzero(is_known)
        ids[known_rows] = [sequences[i].token_at(position) for i, position in zip(known_rows.tolist(), starts[known_rows].tolist())]
        unknown = np.flatnonzero(~is_known).tolist()
        self.positions += flat_indices[unknown].tolist()
        self._sequences += [sequences[i] for i in unknown]
        return ids

    def tokens(self, seq: Sequence, start: int, stop: int, flat_index: int) -> list[int]:
        """seq's tokens at positions [start, stop), the one not known yet (if
        any) as a placeholder recorded for fill(); flat_index is start's."""
        known = min(stop, seq.num_known_tokens)
        ids = seq.token_slice(start, known) if known > start else []
        ids.extend(self.token(seq, position, flat_index + position - start) for position in range(max(start, known), stop))
        return ids

    def fill(self, input_ids: torch.Tensor) -> None:
        """Write the pending tokens into input_ids on the device. Called once
        the step's inputs are prepared on the host: a constrained previous
        step queues its sampling here (complete()), having had its masks
        filled meanwhile."""
        if self.positions and self._last is not None:
            self._last.complete()
            device = input_ids.device
            sample, last = self._last.sample, self._last.sequences
            if len(sample.token_ids) == len(last) == len(self._sequences) and all(a is b for a, b in zip(self._sequences, last)):
                sampled = sample.token_ids  # the common decode step: the last step's sequences, in order, a row each
            else:
                row_of = {id(seq): row for row, seq in zip(sample.last_rows, last)}
                sampled = sample.token_ids[torch.tensor([row_of[id(seq)] for seq in self._sequences], dtype=torch.int64).to(device, non_blocking=True)]
            if self.positions[-1] == len(self.positions) - 1:  # rising from 0 (they always rise): the first rows, as in a decode step
                input_ids[: len(self.positions)] = sampled
            else:
                input_ids[torch.tensor(self.positions, dtype=torch.int64).to(device, non_blocking=True)] = sampled


def token_layout(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where the tokens of a flattened batch come from: sequence i feeds
    counts[i] tokens from position starts[i]. Returns each sequence's first
    row, each row's sequence and each row's position."""
    first_rows = np.cumsum(counts) - counts
    seq_of_row = np.repeat(np.arange(len(counts)), counts)
    return first_rows, seq_of_row, np.arange(len(seq_of_row)) + np.repeat(starts - first_rows, counts)


def cache_slots(tables: np.ndarray, seq_of_row: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """The KV cache slot of each row's position, its sequence's block table
    being row seq_of_row of tables."""
    return tables[seq_of_row, positions // block_size].astype(np.int64) * block_size + positions % block_size


class ModelRunner:
    def __init__(
        self, loaded: LoadedModel, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, sampler: Sampler, lora: LoraSlots | None = None
    ):
        self.model = loaded.model
        self.device = loaded.device
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.sampler = sampler
        self.lora = lora
        self.last_launched: LaunchedStep | None = None

    def prepare(self, scheduled: list[ScheduledSequence], pending: PendingInputs) -> BatchInputs:
        input_ids: list[int] = []
        logits_indices: list[int] = []
        sampled: list[Sequence] = []
        # Row by row into one array: torch.tensor over nested lists took 2.5x as long (256 tables of 40 blocks: 0.58 ms).
        tables = np.zeros((len(scheduled), max(len(item.seq.block_table) for item in scheduled)), dtype=np.int32)
        for row, item in enumerate(scheduled):
            seq = item.seq
            drafts = seq.spec_token_ids
            start = seq.num_computed_tokens
            input_ids.extend(pending.tokens(seq, start, start + item.num_new_tokens - len(drafts), len(input_ids)))
            input_ids.extend(drafts)
            tables[row, : len(seq.block_table)] = seq.block_table
            if item.completes_sequence:
                logits_indices.extend(range(len(input_ids) - 1 - len(drafts), len(input_ids)))
                sampled.append(seq)
        starts = np.fromiter((item.seq.num_computed_tokens for item in scheduled), np.int64, len(scheduled))
        counts = np.fromiter((item.num_new_tokens for item in scheduled), np.int64, len(scheduled))
        first_rows, seq_of_row, positions = token_layout(starts, counts)
        seq_lens = starts + counts

        def on_device(values: np.ndarray | list[int], dtype: torch.dtype) -> torch.Tensor:
            # Lists through numpy: torch.tensor over a list takes four times as long (8192 ids: 445 against 104 us).
            if isinstance(values, list):
                values = np.fromiter(values, np.int64, len(values))
            return torch.from_numpy(values).to(self.device, dtype, non_blocking=True)

        metadata = AttentionMetadata(
            slot_mapping=on_device(cache_slots(tables, seq_of_row, positions, self.block_size), torch.int64),
            block_tables=on_device(tables, torch.int32),
            seq_lens=on_device(seq_lens, torch.int32),
            query_start_loc=on_device(np.append(first_rows, len(input_ids)), torch.int32),
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
        )
        lora_slots = None
        if self.lora is not None and any(item.seq.lora for item in scheduled):
            lora_slots = on_device(np.repeat(self.lora_slots_of([item.seq for item in scheduled]), counts), torch.int64)
        return BatchInputs(
            on_device(input_ids, torch.int64), on_device(positions, torch.int64), metadata, on_device(logits_indices, torch.int64), sampled, lora_slots
        )

    def lora_slots_of(self, sequences: list[Sequence]) -> list[int]:
        """Each sequence's LoRA slot, swapping its adapter in when it is not resident."""
        assert self.lora is not None
        slots = self.lora.slots_for(seq.lora for seq in sequences)
        return [slots[seq.lora] for seq in sequences]

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledSequence]) -> LaunchedStep | None:
        """Queue the step on the device; None when no sequence samples a token in it."""
        launched = self._launch(scheduled, PendingInputs(self.last_launched))
        if launched is not None:
            self.last_launched = launched
        return launched

    def _launch(self, scheduled: list[ScheduledSequence], pending: PendingInputs) -> LaunchedStep | None:
        batch = self.prepare(scheduled, pending)
        pending.fill(batch.input_ids)
        if self.lora is not None:
            self.lora.context.bind(batch.lora_slots)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.metadata)
        if not batch.sampled_sequences:
            return None
        logits = self.model.compute_logits(hidden[batch.logits_indices])
        return self._sample(batch.sampled_sequences, logits)

    def _sample(self, sequences: list[Sequence], logits: torch.Tensor) -> LaunchedStep:
        """logits: a row per proposal of each sequence, then its next-token row."""
        launched = LaunchedStep(sequences, self.sampler, logits)
        if not any(s.constrained for s in sequences):
            launched.complete()
        return launched


def profile_peak_memory(loaded: LoadedModel, num_tokens: int, block_size: int) -> int:
    """Peak device bytes of one forward over num_tokens prompt tokens, weights
    included, using a throwaway KV cache just large enough; the KV cache
    budget is what remains of the device's allowance after it."""
    config = loaded.config
    num_blocks = cdiv(num_tokens, block_size)
    kv_caches = allocate_kv_tensors(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, loaded.dtype, loaded.device)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=loaded.device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=loaded.device).unsqueeze(0),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=loaded.device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=loaded.device),
    )
    torch.cuda.reset_peak_memory_stats(loaded.device)
    with torch.inference_mode():
        hidden = loaded.model(torch.zeros(num_tokens, dtype=torch.int64, device=loaded.device), torch.arange(num_tokens, device=loaded.device), kv_caches, metadata)
        loaded.model.compute_logits(hidden[-1:])
    torch.cuda.synchronize(loaded.device)
    peak = torch.cuda.max_memory_allocated(loaded.device)
    cache_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv_caches)
    del kv_caches, hidden
    torch.cuda.empty_cache()
    return peak - cache_bytes
