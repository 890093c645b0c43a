"""Peak host memory while something loads and runs, measured without perturbing what it measures.

On Linux the kernel keeps the process's peak resident set (``VmHWM``) and resets it on request
(``echo 5 > /proc/self/clear_refs``), so nothing runs beside the measured code; elsewhere a background
thread samples RSS (``rss-sampled-delta``), which costs a little CPU meanwhile.

Core, not the bench's: the optimizer records each variant's peak memory in its figures with the same
meter that ``kiln bench`` uses, and the optimizer stands left of the bench. Both also refuse up front a
batch size whose inputs could not fit in memory (:func:`check_batch_memory`).
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from kiln.engines.base import release_memory

if TYPE_CHECKING:
    from kiln.spec import ModelSpec

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 2**20
_tuned: bool | None = None

HostKind = Literal["vmhwm-delta", "rss-sampled-delta"]
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


class HostMeter(Protocol):
    kind: HostKind

    def __enter__(self) -> HostMeter: ...
    def __exit__(self, *exc: object) -> None: ...
    def stop(self) -> None: ...  # read the peak now; later calls change nothing
    @property
    def delta(self) -> int: ...


class KernelPeak:
    """The kernel's resident high-water mark above its value at ``__enter__`` (Linux)."""

    kind: HostKind = "vmhwm-delta"

    def __init__(self, status: Path = _STATUS, clear_refs: Path = _CLEAR_REFS) -> None:
        self._status, self._clear = status, clear_refs
        self.baseline = self.peak = 0
        self._running = False

    @classmethod
    def available(cls) -> bool:
        meter = cls()
        try:
            meter._reset()
            return meter._read_kb("VmHWM") > 0
        except (OSError, ValueError):
            return False

    def _reset(self) -> None:
        self._clear.write_text("5")  # resets VmHWM to the current RSS; touches nothing else

    def _read_kb(self, field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+)\s*kB", self._status.read_text(), re.MULTILINE)
        if match is None:
            raise ValueError(f"{self._status} has no {field}")
        return int(match.group(1)) * 1024

    def __enter__(self) -> KernelPeak:
        release_memory()
        self._reset()
        self.baseline = self.peak = self._read_kb("VmHWM")
        self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            self._running = False
            self.peak = self._read_kb("VmHWM")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)


class SampledPeak:
    """Peak RSS above a baseline, sampled in a background thread (where the kernel keeps no peak)."""

    kind: HostKind = "rss-sampled-delta"

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process(os.getpid())
        self._interval = interval_s
        self.baseline = self.peak = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kiln-peak-memory", daemon=True)

    def _run(self) -> None:
        while not self._halt.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> SampledPeak:
        release_memory()
        self.baseline = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._halt.set()
            self._thread.join()
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def delta(self) -> int:
        return max(0, self.peak - self.baseline)


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc serve every allocation of ``mmap_threshold`` bytes or more (model weights, ONNX
    Runtime's prepacked copies) from a mapping of its own, which ``free`` hands straight back to the OS.

    glibc's default threshold is dynamic: once a large block is freed it rises to that block's size (up to
    32 MiB), and the next model's weights come from the heap, where freed memory stays resident unless
    ``malloc_trim`` finds whole free pages, which fragmentation often prevents. Measured on this machine,
    loading and unloading a 19 MiB MLP 100 times in a server: without this, an unload gave back as little
    as 0.5 % of what its load took and RSS grew 71 % in one run of three (the others 2 %, with unloads as
    low as 54 %); with it, every unload gave back at least 98 % and RSS grew 2 %. A fixed threshold costs
    a page fault per page for tensors above it (1 MiB: 256 rows of 1024 floats), which their compute
    dwarfs. Once per process; a no-op off glibc, or when ``MALLOC_MMAP_THRESHOLD_`` (glibc's own
    tunable) is set, which wins. Returns whether the threshold is now set.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _tuned
    try:
        libc = ctypes.CDLL(None)
        _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold)))
    except (OSError, AttributeError):  # musl and others have no mallopt
        pass
    return _tuned


def release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (``malloc_trim``); what unloads call."""
    release_memory()


def host_meter() -> HostMeter:
    """The kernel's peak where it can be read and reset, else the sampler."""
    return KernelPeak() if KernelPeak.available() else SampledPeak()


def check_batch_memory(spec: ModelSpec, batch: int, what: str, field: str) -> None:
    """Refuse, before anything loads, a batch size whose random inputs alone would not fit: generating them
    holds about three times their bytes (float64 draws, then the cast), and the engine needs as much again
    for its activations; ``kiln bench --batch-sizes 1000000000`` would otherwise swap the machine or be killed."""
    import psutil

    from kiln.errors import SpecFieldError

    sizes = {t.name: math.prod(t.sample_shape(batch)) * t.numpy_dtype.itemsize for t in spec.inputs}
    need = 3 * sum(sizes.values())
    free = int(psutil.virtual_memory().available)
    if need > free // 2:
        largest = max(sizes, key=sizes.__getitem__)
        raise SpecFieldError(what, field, f"batch {batch} needs about {need / 2**30:.1f} GiB to "
                             f"make its inputs ({largest}: {sizes[largest] / 2**30:.2f} GiB), more than half the "
                             f"{free / 2**30:.1f} GiB this machine has free", "use a smaller batch")  # fmt: skip
