"""The response cache: an LRU of outputs keyed by model version and a hash of the input bytes."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

Outputs = dict[str, np.ndarray]


def cache_key(model: str, version: int, inputs: Mapping[str, np.ndarray], outputs: tuple[str, ...] | None) -> bytes:
    """blake2b of the model version, each input's name, dtype, shape and bytes, and the outputs asked for."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{model}\0{version}\0{outputs}\0".encode())
    for name in sorted(inputs):
        arr = inputs[name]
        h.update(f"{name}\0{arr.dtype.str}\0{arr.shape}\0".encode())
        if arr.dtype == object:
            for item in arr.reshape(-1):
                b = item.encode() if isinstance(item, str) else bytes(item)
                h.update(len(b).to_bytes(4, "little"))
                h.update(b)
        else:
            h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))  # type: ignore[arg-type]
    return h.digest()


def _nbytes(outputs: Outputs) -> int:
    return sum(a.nbytes if a.dtype != object else 64 * a.size for a in outputs.values()) + 200


class ResponseCache:
    """Thread-safe LRU bounded in bytes; ``hits`` and ``misses`` count lookups. Each entry remembers its
    ``owner`` (a served model version) so that :meth:`discard` frees a retired version's entries at once."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, tuple[Outputs, int, object]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: bytes) -> Outputs | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: bytes, outputs: Mapping[str, np.ndarray], owner: object = None) -> None:
        # Copy: the outputs are views of a batch, and keeping them would keep the whole batch alive.
        owned = {k: np.array(v, copy=True) for k, v in outputs.items()}
        size = _nbytes(owned)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._entries[key] = (owned, size, owner)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, n, _) = self._entries.popitem(last=False)
                self._bytes -= n

    def discard(self, owner: object) -> int:
        """Drop every entry ``owner`` put (an unloaded or replaced model version); returns how many."""
        with self._lock:
            keys = [k for k, (_, _, o) in self._entries.items() if o == owner]
            for k in keys:
                self._bytes -= self._entries.pop(k)[1]
        return len(keys)
