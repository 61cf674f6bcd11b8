"""Paged KV cache bookkeeping: a pool of fixed-size blocks with reference
counts, per-sequence block tables, and prefix caching of full blocks.

A full block is named by the SHA-256 of (its parent block's hash, its token
ids), the first block's parent being a hash of the LoRA adapter when the
sequence has one, so equal hashes mean equal prefixes under the same weights: a lookup trusts the hash alone, and
a collision would hand one request another's K/V, so the hash must be one
that a crafted prompt cannot collide with. Blocks no live sequence holds wait in an
LRU free queue; cached ones keep their hash (and their K/V) until allocation
has to reuse them, so a later request with the same prefix can revive them.

With a sliding attention window, the blocks a sequence's queries can no
longer see go back to the pool while it runs; their block table entries
become SLID_OUT, which attention never reads (it starts at the window).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from pagewire.services.engine.core.sequence import Sequence


# A block table entry whose block slid out of the attention window and went back to the pool.
SLID_OUT = -1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent_hash: bytes | None, token_ids: SequenceOf[int]) -> bytes:
    return hashlib.sha256((parent_hash or b"") + array("I", token_ids).tobytes()).digest()


def chain_root(salt: str) -> bytes | None:
    """The parent hash of a sequence's first block: none for the base model,
    else a hash of the LoRA adapter's name and load (Sequence.prefix_salt), so
    that blocks computed with different weights (different K/V for the same
    tokens) never share a hash."""
    return hashlib.sha256(b"lora\0" + salt.encode()).digest() if salt else None


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


class BlockPool:
    """Every block, the free queue (front = first to reuse) and the hash index."""

    def __init__(self, num_blocks: int):
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[bytes, KVBlock] = {}
        # Kept as a counter (not counted on demand) so other threads can read it.
        self.num_cached_free = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self) -> KVBlock:
        _, block = self.free_queue.popitem(last=False)
        if block.block_hash is not None:
            del self.cached[block.block_hash]
            block.block_hash = None
            self.num_cached_free -= 1
        block.ref_count = 1
        return block

    def touch(self, block: KVBlock) -> None:
        """Take a reference to a cached block, reviving it from the free queue."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
            self.num_cached_free -= 1
        block.ref_count += 1

    def release(self, block: KVBlock) -> None:
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        self.free_queue[block.block_id] = block
        if block.block_hash is not None:
            self.num_cached_free += 1
        else:
            # Holds nothing reusable: hand it out before any cached block.
            self.free_queue.move_to_end(block.block_id, last=False)

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self.cached.get(block_hash)

    def register(self, block: KVBlock, block_hash: bytes) -> None:
        # A block that came from the cache keeps its hash; a block whose
        # content another block already caches stays private.
        if block.block_hash is not None or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block


class KVCacheManager:
    """Block tables of sequences over one BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool, sliding_window: int = 0):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.pool = BlockPool(num_blocks)
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def _update_hashes(self, seq: Sequence, num_full_blocks: int) -> None:
        size = self.block_size
        for i in range(len(seq.block_hashes), num_full_blocks):
            parent = seq.block_hashes[i - 1] if i else chain_root(seq.prefix_salt)
            seq.block_hashes.append(hash_block(parent, seq.token_slice(i * size, (i + 1) * size)))

    def cached_prefix(self, seq: Sequence) -> list[KVBlock]:
        """The longest run of cached blocks matching seq's leading full blocks.
        The last token is never covered: its logits must be computed."""
        if not self.enable_prefix_caching:
            return []
        limit = (seq.num_tokens - 1) // self.block_size
        self._update_hashes(seq, limit)
        hits = []
        for block_hash in seq.block_hashes[:limit]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(self, seq: Sequence, num_new_tokens: int, cached_blocks: SequenceOf[KVBlock] = ()) -> bool:
        """Give seq blocks for num_new_tokens more tokens, first adopting
        cached_blocks (a fresh sequence's prefix hits). False, with nothing
        changed, when the free blocks do not suffice."""
        if not cached_blocks and seq.num_computed_tokens + num_new_tokens <= len(seq.block_table) * self.block_size:
            return True  # room already: most decode steps of every sequence
        num_computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        num_needed = self.blocks_for_tokens(num_computed + num_new_tokens) - len(seq.block_table) - len(cached_blocks)
        # Hits wholly before the window of the first query are not adopted at all.
        num_slid = self._num_slid_blocks(num_computed)
        num_revived = sum(1 for b in cached_blocks[num_slid:] if b.ref_count == 0)
        if num_needed + num_revived > self.pool.num_free:
            return False
        # A preempted sequence's recompute is not a new query of the cache.
        if seq.num_computed_tokens == 0 and seq.num_preemptions == 0 and self.enable_prefix_caching:
            self.queried_tokens += seq.num_tokens
            self.hit_tokens += len(cached_blocks) * self.block_size
        seq.block_table.extend([SLID_OUT] * min(num_slid, len(cached_blocks)))
        for block in cached_blocks[num_slid:]:
            self.pool.touch(block)
            seq.block_table.append(block.block_id)
        if cached_blocks:
            # Adopted hits are registered already; the sequence's own blocks
            # are registered as they fill (cache_computed_blocks).
            seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = num_computed
        for _ in range(max(num_needed, 0)):
            seq.block_table.append(self.pool.allocate().block_id)
        return True

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Enter seq's fully computed blocks into the prefix cache; a block
        holding a token not yet read back waits, since its hash needs the id."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        if num_full <= seq.num_registered_blocks:
            return
        self._update_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            if seq.block_table[i] != SLID_OUT:
                self.pool.register(self.pool.blocks[seq.block_table[i]], seq.block_hashes[i])
        seq.num_registered_blocks = num_full

    def _num_slid_blocks(self, first_query: int) -> int:
        """Leading blocks wholly before the window of a query at first_query
        (and so of every later one)."""
        return max(0, first_query - self.sliding_window + 1) // self.block_size if self.sliding_window else 0

    def most_blocks_held(self, num_tokens: int, max_chunk: int) -> int:
        """Most blocks a sequence growing to num_tokens holds at once when each
        step runs at most max_chunk of its tokens: with a window, that window
        and two chunks (a verify step's rejected proposals, rolled back, keep
        the window's start where it was), with a block of slack at each end."""
        whole = self.blocks_for_tokens(num_tokens)
        return min(whole, self.blocks_for_tokens(self.sliding_window + 2 * max_chunk) + 2) if self.sliding_window else whole

    def release_slid_blocks(self, seq: Sequence) -> None:
        """With a sliding window: give back seq's leading blocks that lie
        wholly before the window of every query it can still run. The next
        query sits at num_computed_tokens, or earlier by the proposals a verify
        step rejects, but never before the last known token. A registered
        block keeps its hash in the free queue, so the prefix cache stays."""
        if not self.sliding_window:
            return
        num_slid = self._num_slid_blocks(min(seq.num_computed_tokens, seq.num_known_tokens - 1))
        # Entries before the first slid one found walking back are slid already.
        for i in range(min(num_slid, len(seq.block_table)) - 1, -1, -1):
            if seq.block_table[i] == SLID_OUT:
                break
            self.pool.release(self.pool.blocks[seq.block_table[i]])
            seq.block_table[i] = SLID_OUT

    def trim(self, seq: Sequence) -> None:
        """Release seq's blocks past those its computed tokens occupy. They
        were never registered (only computed, known tokens are), so nothing
        the prefix cache holds is lost."""
        keep = self.blocks_for_tokens(seq.num_computed_tokens)
        if keep >= len(seq.block_table):
            return
        for block_id in reversed(seq.block_table[keep:]):
            self.pool.release(self.pool.blocks[block_id])
        del seq.block_table[keep:]
        seq.block_table_epoch += 1

    def free(self, seq: Sequence) -> None:
        # Tail first, so a sequence's last blocks are reused before its prefix.
        for block_id in reversed(seq.block_table):
            if block_id != SLID_OUT:
                self.pool.release(self.pool.blocks[block_id])
        seq.block_table.clear()
        seq.block_table_epoch += 1
        seq.num_registered_blocks = 0
