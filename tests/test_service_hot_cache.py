"""The worker's device LRU: bounded by entries and by bytes, least recently used evicted first."""

from __future__ import annotations

import torch

from workers.compaction.types import CompactedKV, CompactedLayer
from workers.hot_cache import HotCache, cache_nbytes


def cache(slots: int) -> CompactedKV:
    layer = CompactedLayer(keys=torch.zeros(2, slots, 4), values=torch.zeros(2, slots, 4),
                           beta=torch.zeros(2, slots), lengths=torch.full((2,), slots))
    return CompactedKV(layers=[layer], original_length=slots)


def test_entry_bound_evicts_the_least_recently_used():
    hot = HotCache(max_entries=2, max_bytes=1 << 30)
    a, b, c = cache(1), cache(1), cache(1)
    hot.put("a", a)
    hot.put("b", b)
    assert hot.get("a") is a  # a is now the most recently used
    assert hot.put("c", c) == 1
    assert hot.get("b") is None and hot.get("a") is a and hot.get("c") is c


def test_byte_bound_and_oversized_entries():
    size = cache_nbytes(cache(8))
    assert size == 2 * (2 * 8 * 4 * 4) + 2 * 8 * 4 + 2 * 8  # keys, values (fp32), beta (fp32), lengths (int64)
    hot = HotCache(max_entries=10, max_bytes=2 * size)
    for name in "abc":
        hot.put(name, cache(8))
    assert len(hot) == 2 and hot.nbytes == 2 * size and hot.get("a") is None
    assert hot.put("huge", cache(64)) == 0 and hot.get("huge") is None  # larger than the budget: not cached
    assert len(hot) == 2  # ...and nothing else was flushed for it


def test_discard_and_refresh_keep_the_byte_count_exact():
    hot = HotCache(max_entries=4, max_bytes=1 << 30)
    hot.put("a", cache(4))
    hot.put("a", cache(8))
    assert hot.nbytes == cache_nbytes(cache(8))
    hot.discard("a")
    assert len(hot) == 0 and hot.nbytes == 0
