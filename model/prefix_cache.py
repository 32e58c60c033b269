"""Prefix caching: the KV of a shared leading span of prompt tokens, computed once and reused.

Prompts are cut into blocks of `block` tokens; a chain hash names every block-aligned prefix.
After a prompt is prefilled, its slot's KV row is copied into one of `entries` rows of a
separate store, and each of its block-aligned prefixes is registered there. A later prompt that
starts with a registered prefix gets that row copied into its own slot and prefills only the
rest. The store has a fixed size: the least recently used row is overwritten when it is full.
"""

from __future__ import annotations

import collections
import dataclasses

import jax

from model.kv_cache import KVCache, copy_row


@dataclasses.dataclass
class PrefixStats:
    lookups: int = 0
    hits: int = 0
    tokens_reused: int = 0
    evictions: int = 0


class PrefixCache:
    def __init__(self, store: KVCache | tuple[KVCache, ...], block: int):
        """store: the rows' cache; a tuple of caches (a model's and its draft's) keeps a row of each."""
        if block < 1:
            raise ValueError(f"prefix block={block}; must be >= 1")
        self.store, self.block = store, block
        self.entries = (store[0] if isinstance(store, tuple) else store).max_slots
        self._index: dict[int, tuple[int, int]] = {}  # prefix hash -> (row, prefix length)
        self._lru: collections.OrderedDict[int, list[int]] = collections.OrderedDict()  # row -> its hashes
        self.stats = PrefixStats()
        self._copy = jax.jit(copy_row, donate_argnums=0)

    def hashes(self, tokens: list[int]) -> list[int]:
        """Chain hashes of every block-aligned prefix that leaves at least one token to prefill
        (the last prompt token's logits are needed)."""
        out, h = [], 0
        for end in range(self.block, len(tokens), self.block):
            h = hash((h, tuple(tokens[end - self.block:end])))
            out.append(h)
        return out

    def lookup(self, hashes: list[int]) -> tuple[int | None, int]:
        """(store row, prefix length) of the longest cached prefix, or (None, 0)."""
        self.stats.lookups += 1
        for h in reversed(hashes):
            if h in self._index:
                row, length = self._index[h]
                self._lru.move_to_end(row)
                self.stats.hits += 1
                self.stats.tokens_reused += length
                return row, length
        return None, 0

    def load(self, cache: KVCache, row: int, slot: int) -> KVCache:
        """Copies a stored row into a cache slot (the caller prefills from its prefix length on)."""
        return self._copy(cache, self.store, row, slot)

    def insert(self, hashes: list[int], cache: KVCache, slot: int) -> None:
        """Stores a freshly prefilled slot's row under all its block-aligned prefixes."""
        if not hashes or hashes[-1] in self._index:
            return
        if len(self._lru) < self.entries:
            row = len(self._lru)
        else:
            row, old = self._lru.popitem(last=False)
            for h in old:
                if self._index.get(h, (None,))[0] == row:
                    del self._index[h]
            self.stats.evictions += 1
        self.store = self._copy(self.store, cache, slot, row)
        for k, h in enumerate(hashes):
            self._index[h] = (row, (k + 1) * self.block)
        self._lru[row] = hashes

    def __len__(self) -> int:
        return len(self._lru)
