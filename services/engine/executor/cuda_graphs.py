"""The model runner on a GPU: decode steps replay CUDA graphs, one captured
per batch size of a ladder, so a step costs a few host-to-device copies and
one graph launch instead of hundreds of kernel launches from Python. Steps
with prefill chunks, and verify steps of speculative decoding (several
query positions per sequence), run eagerly: their shapes vary too much to
capture.

A graph is captured over static buffers: the batch is padded up to the next
captured size with rows that write no cache slot (slot -1) and attend to
nothing (context 0). Attention inside the graph is launched for the longest
context the engine allows (max_model_len); each sequence splits its own
context over the launch's thread blocks, so short contexts lose little.
"""

from __future__ import annotations

import torch

from pagewire.services.common.logging import get_logger
from pagewire.services.engine.executor.backend import AttentionMetadata
from pagewire.services.engine.core.kv_cache import cdiv
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.executor.lora import LoraSlots
from pagewire.services.engine.executor.runner import LaunchedStep, ModelRunner, PendingInputs
from pagewire.services.engine.executor.sampler import Sampler
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import Sequence

log = get_logger("engine")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_num_seqs:
    a decode batch pads by at most 15 rows."""
    ladder = [size for size in (1, 2, 4, 8) if size < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return [*ladder, max_num_seqs]


class _Staging:
    """Pinned host copies of a decode graph's inputs, filled with numpy and
    copied asynchronously."""

    def __init__(self, rows: int, max_blocks: int):
        self.rows = torch.zeros(4, rows, dtype=torch.int64, pin_memory=True)  # ids, positions, cache slots, LoRA slots
        self.seq_lens = torch.zeros(rows, dtype=torch.int32, pin_memory=True)
        self.tables = torch.zeros(rows, max_blocks, dtype=torch.int32, pin_memory=True)
        # What each staged table row holds: (sequence, its preemptions, blocks).
        # A running sequence's table only grows, and is rebuilt only after a
        # preemption, so a row whose key matches needs at most its new tail.
        # The sequence object itself is the key: request ids may be reused.
        self.table_keys: list[tuple[Sequence, int, int] | None] = [None] * rows


class CudaGraphRunner(ModelRunner):
    def __init__(
        self,
        loaded: LoadedModel,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        sampler: Sampler,
        max_num_seqs: int,
        max_model_len: int,
        lora: LoraSlots | None = None,
    ):
        super().__init__(loaded, kv_caches, block_size, sampler, lora)
        self.max_model_len = max_model_len
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        largest, device = self.batch_sizes[-1], loaded.device
        max_blocks = cdiv(max_model_len, block_size)
        # Static device inputs of every graph (a graph of size n reads the first n rows).
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(largest, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(largest, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.logits = torch.empty(largest, loaded.config.vocab_size, dtype=torch.float32, device=device)
        # Each row's LoRA slot (-1: the base model, and the padding rows).
        self.lora_slots = torch.full((largest,), -1, dtype=torch.int64, device=device)
        # Two sets of pinned staging, used in turn: while step N's copies may
        # still be queued behind step N-1, step N+1 fills the other set, whose
        # copies finished before step N-1's tokens were read back.
        self.staging = [_Staging(largest, max_blocks), _Staging(largest, max_blocks)]
        self.num_decode_launches = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _decode_metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.max_model_len,
        )

    def _decode_forward(self, size: int) -> None:
        if self.lora is not None:
            self.lora.context.bind(self.lora_slots[:size])  # the mask is computed inside the graph
        hidden = self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._decode_metadata(size))
        self.logits[:size].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Largest first, so the smaller graphs reuse its share of the pool.
        for size in reversed(self.batch_sizes):
            self._decode_forward(size)  # eager once: kernels load, cuBLAS settles on its algorithms
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._decode_forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        log.info("decode graphs captured", batch_sizes=self.batch_sizes)

    def _launch(self, scheduled: list[ScheduledSequence], pending: PendingInputs) -> LaunchedStep | None:
        is_decode = all(item.num_new_tokens == 1 and item.completes_sequence for item in scheduled)
        if not is_decode or len(scheduled) > self.batch_sizes[-1]:
            return super()._launch(scheduled, pending)
        num_seqs = len(scheduled)
        size = next(size for size in self.batch_sizes if size >= num_seqs)
        staging = self.staging[self.num_decode_launches % 2]
        self.num_decode_launches += 1
        rows, seq_lens, tables = staging.rows.numpy(), staging.seq_lens.numpy(), staging.tables.numpy()
        rows[2:, num_seqs:size] = -1  # padding rows: no cache write, no adapter ...
        seq_lens[num_seqs:size] = 0  # ... and no context
        sequences = [item.seq for item in scheduled]
        positions = [seq.num_computed_tokens for seq in sequences]
        block_size = self.block_size
        rows[0, :num_seqs] = [pending.token(seq, position, row) for row, (seq, position) in enumerate(zip(sequences, positions))]
        rows[1, :num_seqs] = positions
        rows[2, :num_seqs] = [seq.block_table[p // block_size] * block_size + p % block_size for seq, p in zip(sequences, positions)]
        seq_lens[:num_seqs] = rows[1, :num_seqs] + 1
        if self.lora is not None:
            rows[3, :num_seqs] = self.lora_slots_of(sequences)
        keys = staging.table_keys
        for row, seq in enumerate(sequences):
            table = seq.block_table
            key = keys[row]
            staged = key[2] if key is not None and key[0] is seq and key[1] == seq.num_preemptions else 0
            if staged != len(table):
                tables[row, staged : len(table)] = table[staged:]
                keys[row] = (seq, seq.num_preemptions, len(table))
        self.input_ids[:size].copy_(staging.rows[0, :size], non_blocking=True)
        pending.fill(self.input_ids)
        self.positions[:size].copy_(staging.rows[1, :size], non_blocking=True)
        self.slot_mapping[:size].copy_(staging.rows[2, :size], non_blocking=True)
        if self.lora is not None:
            self.lora_slots[:size].copy_(staging.rows[3, :size], non_blocking=True)
        self.seq_lens[:size].copy_(staging.seq_lens[:size], non_blocking=True)
        self.block_tables[:size].copy_(staging.tables[:size], non_blocking=True)
        self.graphs[size].replay()
        return self._sample(sequences, self.logits[:num_seqs])
