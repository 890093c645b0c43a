"""Peak host memory while something loads and runs, measured without perturbing what it measures.

On Linux the kernel keeps the process's peak resident set (``VmHWM``) and resets it on request
(``echo 5 > /proc/self/clear_refs``), so nothing runs beside the measured code; elsewhere a background
thread samples RSS (``rss-sampled-delta``), which costs a little CPU meanwhile.

Core, not the bench's: the optimizer records each variant's peak memory in its figures with the same
meter that ``kiln bench`` uses, and the optimizer stands left of the bench.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Literal, Protocol

from kiln.engines.base import release_memory

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


def host_meter() -> HostMeter:
    """The kernel's peak where it can be read and reset, else the sampler."""
    return KernelPeak() if KernelPeak.available() else SampledPeak()
