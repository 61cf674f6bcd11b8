"""The model runner on a GPU: decode steps replay CUDA graphs, one captured
per batch size of a ladder, so a step costs a few host-to-device copies and
one graph launch instead of hundreds of kernel launches from Python. With
speculative decoding, verify steps (each sequence feeds its last token and
up to k proposals) replay graphs of their own, captured for k + 1 query
positions per sequence over a shorter ladder: speculation pays at small
batches, and a verify graph's activations and logits grow with k + 1.

Every other step (prefill chunks, mixed with decodes or not, and larger
verify batches) replays a forward-pass graph captured for a token count of
a second ladder, up to the token budget, with room for max_num_seqs
sequences; its logits and sampling run eagerly, for the rows that sample.
Launched eagerly, a small model's prefill step was bound by the host: some
200 kernel launches and GEMM calls from Python for 30 layers took about
three times the GPU's share of the step. The attention of these graphs is
launched for tiles of the longest chunk (any mix of chunk lengths fits).

A graph is captured over static buffers: the batch is padded up to the next
captured size with rows that write no cache slot (slot -1) and attend to
nothing (context 0). A verify step packs its sequences' tokens first, so
each sequence may feed fewer than k + 1; the rows after them are padding,
and padding sequences have no query rows. Attention inside the graph is
launched for the longest context the engine allows (max_model_len); each
sequence splits its own context over the launch's thread blocks, so short
contexts lose little.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from pagewire.services.common.logging import get_logger
from pagewire.services.engine.executor.backend import AttentionMetadata
from pagewire.services.engine.core.kv_cache import cdiv
from pagewire.services.engine.executor.loader import LoadedModel
from pagewire.services.engine.executor.lora import LoraSlots
from pagewire.services.engine.executor.runner import LaunchedStep, ModelRunner, PendingInputs, cache_slots, token_layout
from pagewire.services.engine.executor.sampler import Sampler
from pagewire.services.engine.core.scheduler import ScheduledSequence
from pagewire.services.engine.core.sequence import Sequence

log = get_logger("engine")


# Verify graphs are captured for batches of at most this many sequences.
MAX_VERIFY_GRAPH_SEQS = 32
# Forward-pass graphs: token counts in steps of at least this many (a GEMM
# over 256 rows costs about what one over a few rows costs), at most this many graphs.
PREFILL_GRAPH_TOKEN_STEP = 256
MAX_PREFILL_GRAPHS = 32


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_num_seqs:
    a decode batch pads by at most 15 rows."""
    ladder = [size for size in (1, 2, 4, 8) if size < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return [*ladder, max_num_seqs]


def prefill_graph_tokens(max_num_batched_tokens: int) -> list[int]:
    """Token counts of the forward-pass graphs: even steps of at least
    PREFILL_GRAPH_TOKEN_STEP, at most MAX_PREFILL_GRAPHS of them, up to and
    including the token budget."""
    step = max(PREFILL_GRAPH_TOKEN_STEP, cdiv(cdiv(max_num_batched_tokens, MAX_PREFILL_GRAPHS), PREFILL_GRAPH_TOKEN_STEP) * PREFILL_GRAPH_TOKEN_STEP)
    return [*range(step, max_num_batched_tokens, step), max_num_batched_tokens]


class GraphStaging:
    """Pinned host copies of a graph's inputs, filled with numpy and copied
    asynchronously. Filling them is host work alone (tested on the CPU
    against a per-token reference: tests/engine/test_graph_staging.py).
    On a GPU an event marks when the copies of the last step staged here
    have run: the host may refill the set only then (a draft model's
    passes are launched back to back, without reading a token back)."""

    def __init__(self, rows: int, seqs: int, max_blocks: int, block_size: int, pin_memory: bool = True):
        self.block_size = block_size
        self.copied = torch.cuda.Event() if pin_memory else None
        self.rows = torch.zeros(4, rows, dtype=torch.int64, pin_memory=pin_memory)  # ids, positions, cache slots, LoRA slots
        self.seq_lens = torch.zeros(seqs, dtype=torch.int32, pin_memory=pin_memory)
        self.query_start_loc = torch.zeros(seqs + 1, dtype=torch.int32, pin_memory=pin_memory)
        self.tables = torch.zeros(seqs, max_blocks, dtype=torch.int32, pin_memory=pin_memory)
        # What each staged table row holds: (sequence, its table's epoch,
        # blocks). Within an epoch a sequence's table only grows, so a row
        # whose key matches needs at most its new tail.
        # The sequence object itself is the key: request ids may be reused.
        self.table_keys: list[tuple[Sequence, int, int] | None] = [None] * seqs

    def stage(self, sequences: list[Sequence], pending: PendingInputs, size: int, tokens_per_seq: int, lora_slots: list[int] | None = None) -> int:
        """Wait until the set's last copies have run (at once unless the
        host is two steps ahead of the device), then stage a step of
        `sequences`, each feeding its last token and its proposals, for the
        graph of `size` sequences and tokens_per_seq rows each: the
        sequences' rows packed first, then padding rows that write no cache
        slot and use no adapter, and padding sequences without context (or
        query rows). Returns the number of real rows. Written over arrays
        rather than per sequence and row: this runs every decode step, for
        hundreds of sequences."""
        if self.copied is not None:
            self.copied.synchronize()
        num_seqs, num_rows = len(sequences), size * tokens_per_seq
        rows, seq_lens, tables = self.rows.numpy(), self.seq_lens.numpy(), self.tables.numpy()
        self._stage_tables(sequences)
        starts = np.fromiter((seq.num_computed_tokens for seq in sequences), np.int64, num_seqs)
        if tokens_per_seq == 1:  # a decode step: a row per sequence, laid out without token_layout's passes
            counts, first_rows, seq_of_row = 1, np.arange(num_seqs), np.arange(num_seqs)
            positions = starts
        else:
            counts = np.fromiter((1 + len(seq.spec_token_ids) for seq in sequences), np.int64, num_seqs)
            first_rows, seq_of_row, positions = token_layout(starts, counts)
        num_tokens = len(positions)
        rows[0, first_rows] = pending.next_tokens(sequences, starts, first_rows)
        if tokens_per_seq > 1:
            for seq, first in zip(sequences, first_rows.tolist()):
                rows[0, first + 1 : first + 1 + len(seq.spec_token_ids)] = seq.spec_token_ids
        rows[1, :num_tokens] = positions
        rows[2, :num_tokens] = cache_slots(tables, seq_of_row, positions, self.block_size)
        rows[2:, num_tokens:num_rows] = -1  # padding rows: no cache write, no adapter ...
        seq_lens[:num_seqs] = starts + counts
        seq_lens[num_seqs:size] = 0  # ... and no context
        if lora_slots is not None:
            rows[3, :num_tokens] = np.repeat(lora_slots, counts)
        if tokens_per_seq > 1:
            query_start_loc = self.query_start_loc.numpy()
            query_start_loc[0] = 0
            query_start_loc[1 : num_seqs + 1] = first_rows + counts
            query_start_loc[num_seqs + 1 : size + 1] = num_tokens  # padding sequences: no query rows
        return num_tokens

    def _stage_tables(self, sequences: list[Sequence]) -> None:
        tables, keys = self.tables.numpy(), self.table_keys
        for row, seq in enumerate(sequences):
            table = seq.block_table
            key = keys[row]
            staged = key[2] if key is not None and key[0] is seq and key[1] == seq.block_table_epoch else 0
            if staged != len(table):
                tables[row, staged : len(table)] = table[staged:]
                keys[row] = (seq, seq.block_table_epoch, len(table))


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
        verify_tokens: int = 1,
        max_num_batched_tokens: int = 0,
    ):
        """verify_tokens: query positions per sequence of a verify step (k + 1
        with k speculative tokens); 1 captures decode graphs only.
        max_num_batched_tokens: the largest forward-pass graph (0: none)."""
        super().__init__(loaded, kv_caches, block_size, sampler, lora)
        self.max_model_len = max_model_len
        # Graph batch sizes by query positions per sequence.
        self.batch_sizes = {1: graph_batch_sizes(max_num_seqs)}
        if verify_tokens > 1:
            self.batch_sizes[verify_tokens] = graph_batch_sizes(min(max_num_seqs, MAX_VERIFY_GRAPH_SEQS))
        self.verify_tokens = verify_tokens
        self.prefill_tokens = prefill_graph_tokens(max_num_batched_tokens) if max_num_batched_tokens else []
        seqs, device = max_num_seqs, loaded.device
        rows = max(q * sizes[-1] for q, sizes in self.batch_sizes.items())
        forward_rows = max([rows, *self.prefill_tokens])
        max_blocks = cdiv(max_model_len, block_size)
        # Static device inputs of every graph (a graph of n sequences and r rows reads the first n and r).
        self.input_ids = torch.zeros(forward_rows, dtype=torch.int64, device=device)
        self.positions = torch.zeros(forward_rows, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((forward_rows,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(seqs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(seqs, max_blocks, dtype=torch.int32, device=device)
        # Decode graphs: one query row per sequence, always; verify graphs: staged each step.
        self.decode_query_start_loc = torch.arange(seqs + 1, dtype=torch.int32, device=device)
        self.verify_query_start_loc = torch.arange(0, (seqs + 1) * verify_tokens, verify_tokens, dtype=torch.int32, device=device)
        self.prefill_query_start_loc = torch.zeros(seqs + 1, dtype=torch.int32, device=device)
        self.logits = torch.empty(rows, loaded.config.vocab_size, dtype=torch.float32, device=device)
        # The forward-pass graphs' hidden states, read for the rows that sample.
        self.hidden = torch.empty(forward_rows if self.prefill_tokens else 0, loaded.config.hidden_size, dtype=loaded.dtype, device=device)
        # Each row's LoRA slot (-1: the base model, and the padding rows).
        self.lora_slots = torch.full((forward_rows,), -1, dtype=torch.int64, device=device)
        # Two sets of pinned staging, used in turn: while step N's copies may
        # still be queued behind step N-1, step N+1 fills the other set, whose
        # copies have mostly run by then (the engine read step N-1's tokens
        # back); the set's event makes the host wait where they have not.
        self.staging = [GraphStaging(rows, seqs, max_blocks, block_size, pin_memory=device.type == "cuda") for _ in range(2)]
        self.num_graph_launches = 0
        self.num_verify_graph_launches = 0
        self.num_prefill_graph_launches = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _metadata(self, size: int, tokens_per_seq: int) -> AttentionMetadata:
        query_start_loc = self.decode_query_start_loc if tokens_per_seq == 1 else self.verify_query_start_loc
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[: size * tokens_per_seq],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=query_start_loc[: size + 1],
            max_query_len=tokens_per_seq,
            max_seq_len=self.max_model_len,
        )

    def _prefill_metadata(self, num_tokens: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables,
            seq_lens=self.seq_lens,
            query_start_loc=self.prefill_query_start_loc,
            max_query_len=num_tokens,
            max_seq_len=self.max_model_len,
        )

    def _hidden(self, rows: int, metadata: AttentionMetadata) -> torch.Tensor:
        if self.lora is not None:
            self.lora.context.bind(self.lora_slots[:rows])  # the kernels read the slots inside the graph
        return self.model(self.input_ids[:rows], self.positions[:rows], self.kv_caches, metadata)

    def _forward(self, size: int, tokens_per_seq: int) -> None:
        rows = size * tokens_per_seq
        self.logits[:rows].copy_(self.model.compute_logits(self._hidden(rows, self._metadata(size, tokens_per_seq))))

    def _forward_prefill(self, num_tokens: int) -> None:
        self.hidden[:num_tokens].copy_(self._hidden(num_tokens, self._prefill_metadata(num_tokens)))

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        # Most rows first, so the smaller graphs reuse its share of the pool.
        captures = [(size * q, self.graphs, (size, q), functools.partial(self._forward, size, q)) for q, sizes in self.batch_sizes.items() for size in sizes]
        captures += [(tokens, self.prefill_graphs, tokens, functools.partial(self._forward_prefill, tokens)) for tokens in self.prefill_tokens]
        for _, graphs, key, forward in sorted(captures, key=lambda capture: -capture[0]):
            forward()  # eager once: kernels load, cuBLAS settles on its algorithms
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                forward()
            graphs[key] = graph
        torch.cuda.synchronize(self.device)
        # The eager passes' activations, cached outside the graphs' pool, are not needed again.
        torch.cuda.empty_cache()
        log.info(
            "CUDA graphs captured",
            batch_sizes=self.batch_sizes[1], verify_batch_sizes=self.batch_sizes.get(self.verify_tokens, []), prefill_tokens=self.prefill_tokens,
        )  # fmt: skip

    def _graph_shape(self, scheduled: list[ScheduledSequence]) -> tuple[int, int] | None:
        """(batch size, query positions per sequence) of the graph that runs
        this step, or None when it runs eagerly: a graph takes only steps in
        which every sequence feeds its last token and its proposals, and samples."""
        if not all(item.completes_sequence and item.num_new_tokens == len(item.seq.spec_token_ids) + 1 for item in scheduled):
            return None
        widest = max(item.num_new_tokens for item in scheduled)
        tokens_per_seq = 1 if widest == 1 else self.verify_tokens
        sizes = self.batch_sizes.get(tokens_per_seq)
        if widest > tokens_per_seq or sizes is None or len(scheduled) > sizes[-1]:
            return None
        return next(size for size in sizes if size >= len(scheduled)), tokens_per_seq

    def _launch(self, scheduled: list[ScheduledSequence], pending: PendingInputs) -> LaunchedStep | None:
        shape = self._graph_shape(scheduled)
        if shape is None:
            num_tokens = sum(item.num_new_tokens for item in scheduled)
            graph_tokens = next((tokens for tokens in self.prefill_tokens if tokens >= num_tokens), None)
            if graph_tokens is None or len(scheduled) > self.seq_lens.shape[0]:
                return super()._launch(scheduled, pending)
            return self._launch_prefill(scheduled, pending, graph_tokens)
        size, tokens_per_seq = shape
        num_rows = size * tokens_per_seq
        staging = self.staging[self.num_graph_launches % 2]
        self.num_graph_launches += 1
        sequences = [item.seq for item in scheduled]
        num_tokens = staging.stage(sequences, pending, size, tokens_per_seq, self.lora_slots_of(sequences) if self.lora is not None else None)
        self.input_ids[:num_rows].copy_(staging.rows[0, :num_rows], non_blocking=True)
        self.positions[:num_rows].copy_(staging.rows[1, :num_rows], non_blocking=True)
        self.slot_mapping[:num_rows].copy_(staging.rows[2, :num_rows], non_blocking=True)
        if self.lora is not None:
            self.lora_slots[:num_rows].copy_(staging.rows[3, :num_rows], non_blocking=True)
        self.seq_lens[:size].copy_(staging.seq_lens[:size], non_blocking=True)
        self.block_tables[:size].copy_(staging.tables[:size], non_blocking=True)
        if tokens_per_seq > 1:
            self.num_verify_graph_launches += 1
            self.verify_query_start_loc[: size + 1].copy_(staging.query_start_loc[: size + 1], non_blocking=True)
        if staging.copied is not None:
            staging.copied.record()
        pending.fill(self.input_ids)
        self.graphs[size, tokens_per_seq].replay()
        # Each sequence's rows are its proposals' and its next token's, in the order _sample takes them.
        return self._sample(sequences, self.logits[:num_tokens])

    def _launch_prefill(self, scheduled: list[ScheduledSequence], pending: PendingInputs, graph_tokens: int) -> LaunchedStep | None:
        """The step's inputs, prepared as for an eager step, copied into the
        static buffers of the forward-pass graph of graph_tokens rows: the
        rows past the step's are padding that writes no cache slot and uses
        no adapter, the sequences past its own have no context and no query rows."""
        batch = self.prepare(scheduled, pending)
        pending.fill(batch.input_ids)
        num_tokens, num_seqs, metadata = batch.input_ids.shape[0], len(scheduled), batch.metadata
        self.num_prefill_graph_launches += 1
        self.input_ids[:num_tokens].copy_(batch.input_ids)
        self.positions[:num_tokens].copy_(batch.positions)
        self.slot_mapping[:num_tokens].copy_(metadata.slot_mapping)
        self.slot_mapping[num_tokens:graph_tokens] = -1
        self.seq_lens[:num_seqs].copy_(metadata.seq_lens)
        self.seq_lens[num_seqs:] = 0
        self.prefill_query_start_loc[: num_seqs + 1].copy_(metadata.query_start_loc)
        self.prefill_query_start_loc[num_seqs + 1 :] = num_tokens
        self.block_tables[:num_seqs, : metadata.block_tables.shape[1]].copy_(metadata.block_tables)
        if self.lora is not None:
            if batch.lora_slots is None:
                self.lora_slots[:num_tokens] = -1
            else:
                self.lora_slots[:num_tokens].copy_(batch.lora_slots)
            self.lora_slots[num_tokens:graph_tokens] = -1
        self.prefill_graphs[graph_tokens].replay()
        if not batch.sampled_sequences:
            return None
        return self._sample(batch.sampled_sequences, self.model.compute_logits(self.hidden[batch.logits_indices]))
