from __future__ import annotations

import numpy as np

from kiln.serving.cache import ResponseCache, cache_key


def test_key_depends_on_version_bytes_dtype_and_shape() -> None:
    x = np.arange(4, dtype=np.float32)
    base = cache_key("m", 1, {"x": x}, None)
    assert base == cache_key("m", 1, {"x": x.copy()}, None)
    assert base != cache_key("m", 2, {"x": x}, None)
    assert base != cache_key("m", 1, {"x": x.reshape(2, 2)}, None)
    assert base != cache_key("m", 1, {"x": x.astype(np.float64)}, None)
    assert base != cache_key("m", 1, {"x": x + 1}, None)
    assert base != cache_key("m", 1, {"x": x}, ("y",))
    assert cache_key("m", 1, {"t": np.array(["ab", "c"], dtype=object)}, None) != cache_key(
        "m", 1, {"t": np.array(["a", "bc"], dtype=object)}, None
    )


def test_lru_evicts_the_least_recently_used_within_the_byte_budget() -> None:
    cache = ResponseCache(max_bytes=3 * (400 + 200))
    for i in range(3):
        cache.put(bytes([i]), {"y": np.zeros(100, np.float32)})
    assert cache.get(bytes([0])) is not None  # 0 is now the most recently used
    cache.put(bytes([3]), {"y": np.zeros(100, np.float32)})
    assert cache.get(bytes([1])) is None
    assert cache.get(bytes([0])) is not None and cache.get(bytes([3])) is not None
    assert (cache.hits, cache.misses) == (3, 1)
    assert cache.nbytes <= cache.max_bytes


def test_cached_outputs_do_not_keep_the_batch_alive() -> None:
    batch = np.zeros((8, 4), np.float32)
    cache = ResponseCache(max_bytes=10_000)
    cache.put(b"k", {"y": batch[2:3]})
    got = cache.get(b"k")
    assert got is not None and got["y"].base is None


def test_discard_frees_what_a_retired_version_cached() -> None:
    cache = ResponseCache(max_bytes=1 << 20)
    out = {"y": np.ones(16, np.float32)}
    cache.put(b"a", out, owner=("m", 1))
    cache.put(b"b", out, owner=("m", 1))
    cache.put(b"c", out, owner=("m", 2))
    before = cache.nbytes
    assert cache.discard(("m", 1)) == 2
    assert len(cache) == 1 and cache.get(b"c") is not None and cache.get(b"a") is None
    assert cache.nbytes == before // 3
