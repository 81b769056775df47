"""A bounded LRU of decoded compacted caches kept on the worker's device.

A follow-up question on the same document is the common case; fetching the blob from Redis, checking it and
copying it to the GPU again costs more than the answer's first token. The cache is bounded both by entry count and
by tensor bytes so a few huge documents cannot exhaust device memory. It is only a cache: the worker still checks
that the handle exists in Redis before using an entry, so a deleted or expired handle is never served from here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from workers.compaction.types import CompactedKV


def cache_nbytes(compacted: CompactedKV) -> int:
    """Device bytes held by a compacted cache's tensors (padding included: that is what the device stores)."""
    return sum(
        t.numel() * t.element_size()
        for layer in compacted.layers
        for t in (layer.keys, layer.values, layer.beta, layer.lengths)
    )


class HotCache:
    """Least-recently-used map handle -> CompactedKV, bounded by `max_entries` and `max_bytes`."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[CompactedKV, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, handle: str) -> CompactedKV | None:
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None:
                return None
            self._entries.move_to_end(handle)
            return entry[0]

    def put(self, handle: str, compacted: CompactedKV) -> int:
        """Insert (or refresh) an entry, evicting the least recently used ones until both bounds hold; return how
        many were evicted.

        An entry larger than the whole byte budget is not cached at all rather than flushing everything else.
        """
        size = cache_nbytes(compacted)
        evicted = 0
        with self._lock:
            self._pop(handle)
            if self.max_entries <= 0 or size > self.max_bytes:
                return evicted
            self._entries[handle] = (compacted, size)
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._pop(next(iter(self._entries)))
                evicted += 1
        return evicted

    def discard(self, handle: str) -> None:
        with self._lock:
            self._pop(handle)

    def _pop(self, handle: str) -> None:
        entry = self._entries.pop(handle, None)
        if entry is not None:
            self._bytes -= entry[1]

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes
