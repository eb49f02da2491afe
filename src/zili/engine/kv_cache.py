"""KVCacheManager: a preallocated pool of fixed-size blocks, with prefix caching.

Book-keeping only: this module never touches the KV tensors themselves (the runner owns those).

Prefix caching: when a block of a sequence is full and computed, it is registered under a hash
chained over the previous block's hash and its own token ids. A later sequence whose tokens
start the same way reuses those blocks (ref-counted) instead of recomputing them; a hit is
verified against the stored token ids. A block whose ref count drops to zero goes back to the
free queue but keeps its contents and hash, so it can still be hit until it is evicted (least
recently freed first) to hold new tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # the tokens a cached block holds, to verify hits


def chain_hash(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    return hash((parent_hash, tuple(token_ids)))


@dataclass
class BlockTable:
    """The blocks one sequence holds, in order, and how many of them are registered in the cache."""

    block_ids: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0  # leading blocks already registered under a hash
    last_hash: int | None = None  # hash of block num_cached_blocks - 1


class KVCacheManager:
    """The block pool of one model's KV cache (see the module docstring).

    `recompute_last_hit_block`: a prefix-cache hit gives up its last block, which the sequence then
    computes afresh into a block of its own. A proposer that keeps KV entries in these blocks computed
    from the target's hidden states (DeepSeek MTP, zili.engine.mtp) needs it: its entry at a position
    depends on the token after it, so the entry at the end of a hit was made for another continuation
    (or never made), and the target's hidden state there is needed again (vLLM drops the last hit
    block for EAGLE / MTP for the same reason)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 recompute_last_hit_block: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.recompute_last_hit_block = recompute_last_hit_block
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first. Cached ones stay hittable here.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.tables: dict[str, BlockTable] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def block_ids(self, seq_id: str) -> list[int]:
        return self.tables[seq_id].block_ids

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookup --------------------------------------------------------------
    def find_cached_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Block ids of the longest cached run of full blocks that starts `token_ids`.

        At least one token is always left to compute, so the sequence gets logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        hits: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(parent, chunk)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
            parent = h
        if self.recompute_last_hit_block and hits:
            hits.pop()
        self.prefix_queries += max_blocks * bs
        self.prefix_hits += len(hits) * bs
        return hits

    # ---- allocation -----------------------------------------------------------------------
    def can_allocate(self, seq_id: str, num_total_tokens: int, cached_prefix: Sequence[int] = ()) -> bool:
        table = self.tables.get(seq_id)
        held = len(table.block_ids) if table else len(cached_prefix)
        need = self.blocks_needed(num_total_tokens) - held
        # Cached-prefix blocks sitting in the free queue are taken out of it, not allocated anew.
        reclaimed = 0 if table else sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        return need <= self.num_free_blocks - reclaimed

    def allocate(self, seq_id: str, num_total_tokens: int, cached_prefix: Sequence[int] = ()) -> bool:
        """Make `seq_id` hold blocks for `num_total_tokens` tokens. False (and no change) if out of blocks.

        `cached_prefix` (from find_cached_prefix) is adopted the first time a sequence allocates.
        """
        if not self.can_allocate(seq_id, num_total_tokens, cached_prefix):
            return False
        table = self.tables.get(seq_id)
        if table is None:
            table = self.tables[seq_id] = BlockTable()
            for block_id in cached_prefix:
                self._take(block_id)
                table.block_ids.append(block_id)
            if cached_prefix:
                table.num_cached_blocks = len(cached_prefix)
                table.last_hash = self.blocks[cached_prefix[-1]].block_hash
        while len(table.block_ids) < self.blocks_needed(num_total_tokens):
            table.block_ids.append(self._take_new())
        return True

    def share_prefix(self, parent_id: str, child_id: str, num_tokens: int) -> int:
        """Give `child_id` the parent's full blocks covering its first `num_tokens` tokens (n > 1 forks).

        Returns how many tokens the child now has computed.
        """
        parent = self.tables[parent_id]
        count = min(num_tokens // self.block_size, len(parent.block_ids))
        table = self.tables[child_id] = BlockTable()
        for block_id in parent.block_ids[:count]:
            self._take(block_id)
            table.block_ids.append(block_id)
        table.num_cached_blocks = min(count, parent.num_cached_blocks)
        if table.num_cached_blocks:
            table.last_hash = self.blocks[table.block_ids[table.num_cached_blocks - 1]].block_hash
        return count * self.block_size

    def register_full_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Register the sequence's blocks that are now full and computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self.tables[seq_id]
        bs = self.block_size
        while table.num_cached_blocks < num_computed // bs:
            i = table.num_cached_blocks
            chunk = tuple(token_ids[i * bs:(i + 1) * bs])
            h = chain_hash(table.last_hash, chunk)
            block = self.blocks[table.block_ids[i]]
            if h not in self.cached and block.block_hash is None:
                block.block_hash, block.token_ids = h, chunk
                self.cached[h] = block.block_id
            table.num_cached_blocks += 1
            table.last_hash = h

    def trim(self, seq_id: str, num_tokens: int) -> None:
        """Give back the sequence's trailing blocks beyond those `num_tokens` tokens need (speculative
        decoding's rollback of rejected draft slots). Such blocks were never registered in the prefix
        cache (only computed tokens are), so they go back to the free queue first in line for reuse."""
        table = self.tables[seq_id]
        keep = self.blocks_needed(num_tokens)
        while len(table.block_ids) > keep:
            block_id = table.block_ids.pop()
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                self.free_queue.move_to_end(block_id, last=False)

    def free(self, seq_id: str) -> None:
        """Release every block the sequence holds. Unknown ids are ignored (idempotent)."""
        table = self.tables.pop(seq_id, None)
        if table is None:
            return
        # Free the tail first: when evicting, the end of a prefix should go before its start.
        for block_id in reversed(table.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    # ---- internals --------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_new(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its old contents are about to be overwritten
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = block.token_ids = None
        block.ref_count = 1
        return block_id
