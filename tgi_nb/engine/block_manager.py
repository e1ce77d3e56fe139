"""Paged KV cache bookkeeping: reference-counted blocks, block tables, prefix caching.

A full block whose K/V are computed is registered under a chained hash of its tokens (the hash
of the previous block and this block's token ids), so a new sequence whose prompt starts with the
same tokens (a shared system prompt, a RAG context, the ``n`` samples of one prompt) reuses it
instead of recomputing. Freed blocks keep their hash and stay reusable until the space is needed:
blocks without a hash are handed out first, then cached blocks in least-recently-freed order.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

from .sequence import Sequence


class BlockManager:
    """Hands out KV blocks to sequences.

    Example:
        >>> bm = BlockManager(num_blocks=8, block_size=4)
        >>> bm.num_free
        8
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._block_key: list[Optional[int]] = [None] * num_blocks
        self._block_tokens: list[Optional[tuple[int, ...]]] = [None] * num_blocks
        self._cached: dict[int, int] = {}   # chained hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks ``seq`` must be given to write ``num_new_tokens`` more tokens (copy-on-write included)."""
        total = seq.num_computed_tokens + num_new_tokens
        needed = max(0, -(-total // self.block_size) - len(seq.block_table))
        return needed + (1 if self._shared_partial_block(seq) is not None else 0)

    def _shared_partial_block(self, seq: Sequence) -> Optional[int]:
        # The block the next token is written into, if it already exists and another sequence shares it.
        idx = seq.num_computed_tokens // self.block_size
        if idx < len(seq.block_table) and self.ref_counts[seq.block_table[idx]] > 1:
            return idx
        return None

    def _take_free_block(self) -> int:
        block, _ = self._free.popitem(last=False)
        key = self._block_key[block]
        if key is not None:  # evict it from the prefix cache
            del self._cached[key]
            self._block_key[block] = None
            self._block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its longest cached prefix; return the
        number of tokens they hold. At least one token is always left to compute, because the
        last token's logits are needed."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        bs, tokens = self.block_size, seq.token_ids
        prev = 0
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            key = hash((prev, chunk))
            block = self._cached.get(key)
            if block is None or self._block_tokens[block] != chunk:
                break
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(key)
            prev = key
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_new_tokens: int) -> Optional[list[tuple[int, int]]]:
        """Make room for ``num_new_tokens`` more tokens of ``seq``. Returns the (source, destination)
        block copies a copy-on-write needs, or None when there are not enough free blocks (then
        nothing changed)."""
        if self.blocks_needed(seq, num_new_tokens) > len(self._free):
            return None
        copies = []
        shared = self._shared_partial_block(seq)
        if shared is not None:
            old = seq.block_table[shared]
            self.ref_counts[old] -= 1
            new = self._take_free_block()
            seq.block_table[shared] = new
            copies.append((old, new))
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self._take_free_block())
        return copies

    def register_computed(self, seq: Sequence) -> None:
        """Publish the sequence's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs, tokens = self.block_size, seq.token_ids
        prev = seq.block_hashes[-1] if seq.block_hashes else 0
        for i in range(len(seq.block_hashes), seq.num_computed_tokens // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            key = hash((prev, chunk))
            block = seq.block_table[i]
            if key not in self._cached and self._block_key[block] is None:
                self._cached[key] = block
                self._block_key[block] = key
                self._block_tokens[block] = chunk
            seq.block_hashes.append(key)
            prev = key

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let ``child`` share every block of ``parent``; the shared partial block is copied on the
        child's (or parent's) first write into it."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = parent.block_table.copy()
        child.block_hashes = parent.block_hashes.copy()
        child.num_computed_tokens = parent.num_computed_tokens

    def free(self, seq: Sequence) -> None:
        """Return the sequence's blocks. The tail goes first into the eviction order, so a shared
        prefix outlives the suffixes that hang off it."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self._block_key[block] is None:
                    self._free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
