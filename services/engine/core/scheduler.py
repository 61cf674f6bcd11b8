"""One token budget per step: running sequences first (decodes and unfinished
prefill chunks), then new or preempted sequences, each taking as many prompt
tokens as the budget leaves (chunked prefill), as long as the running batch
uses no more LoRA adapters than there are device slots. When blocks run out, the
newest running sequence is preempted: its blocks are freed and it is
recomputed from its tokens later, which leaves its output unchanged."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from pagewire.services.engine.core.kv_cache import KVCacheManager
from pagewire.services.engine.core.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every known token is computed, so the next token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens + len(self.seq.spec_token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, kv_cache: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_loras: int = 0):
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # Distinct LoRA adapters the running batch may use (the device slots); 0: no adapters.
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_queued(self) -> int:
        """Waiting sequences beyond the free seats of the running batch: a burst
        of arrivals between two steps is not a queue when the next step admits it."""
        free_seats = max(0, self.max_num_seqs - len(self.running))
        return max(0, len(self.waiting) - free_seats)

    def schedule(self, proposals: dict[str, list[int]] | None = None) -> SchedulerOutput:
        """`proposals`: speculative tokens by request id, for decoding
        sequences; each is verified in this step when the budget and the free
        blocks allow, or dropped (never preempting another sequence for them)."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        proposals = proposals or {}
        for seq in list(self.running):
            if budget <= 0 or seq.status is not SequenceStatus.RUNNING:
                break
            self.kv_cache.release_slid_blocks(seq)
            if seq.reached_length_limit:
                continue  # its last token is still being read back; another step would only be dropped
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            drafts = proposals.get(seq.request_id, ())[: budget - num_new]  # an empty tuple slices to itself: no list per sequence
            if drafts and self.kv_cache.allocate_slots(seq, num_new + len(drafts)):
                seq.spec_token_ids = drafts
                num_new += len(drafts)
            elif not self._allocate_preempting(seq, num_new, out):
                break
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        # Admitting work right after preempting would only evict it again.
        if out.preempted:
            return out
        now = time.monotonic()
        adapters = {seq.lora for seq in self.running if seq.lora}
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted with a token in flight: recompute once its id is back
            if seq.lora and seq.lora not in adapters and len(adapters) >= self.max_loras:
                break  # every slot holds an adapter of the running batch: wait (in order) for one to free
            if seq.lora:
                adapters.add(seq.lora)
            cached_blocks = self.kv_cache.cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached_blocks) * self.kv_cache.block_size, budget)
            if not self.kv_cache.allocate_slots(seq, num_new, cached_blocks):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                seq.num_cached_tokens = seq.num_computed_tokens
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def _allocate_preempting(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences until seq's new tokens fit;
        False when seq itself had to go."""
        while not self.kv_cache.allocate_slots(seq, num_new_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update_computed(self, out: SchedulerOutput) -> None:
        """Record that the scheduled tokens are now in the KV cache."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            self.kv_cache.cache_computed_blocks(item.seq)

    def roll_back_rejected(self, seq: Sequence) -> None:
        """After a verify step: only the inputs before the newest token hold
        valid K/V (the last known token and the accepted proposals); the
        positions of rejected proposals count as not computed, and blocks
        that held only them go back to the pool."""
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_known_tokens - 1)
        self.kv_cache.trim(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take seq out of the queues and free its blocks, whatever its state."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
