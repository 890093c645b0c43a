"""GPU memory while a variant loads and runs (``--device cuda``), measured without perturbing the timed
loops: NVML's used memory on every device before and after, for every engine, and for the torch engine
also ``torch.cuda.max_memory_allocated``. Every call into torch.cuda and NVML goes through
:class:`CudaRuntime`, so the logic here is tested with a fake and no GPU. Host memory is
:mod:`kiln.memory`'s (the optimizer meters with it too).
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from kiln.errors import UnsupportedError, pip_install


class CudaRuntime(Protocol):
    """What the bench asks of CUDA; :class:`SystemCuda` answers from torch.cuda, onnxruntime and NVML."""

    def device_count(self) -> int: ...
    def torch_cuda(self) -> str | None: ...  # None when usable, else why not
    def ort_cuda(self) -> str | None: ...
    def nvml_used(self) -> dict[int, int] | None: ...  # used bytes per device; None without NVML
    def torch_reset_peak(self, index: int) -> None: ...
    def torch_max_allocated(self, index: int) -> int: ...


class SystemCuda:
    """The real thing; every import is lazy so that a CPU-only machine never loads CUDA libraries."""

    def device_count(self) -> int:
        from kiln.hardware import detect

        return sum(1 for d in detect().devices if d.kind == "cuda")

    def torch_cuda(self) -> str | None:
        import torch

        if torch.cuda.is_available():
            return None
        return (
            f"this torch ({torch.__version__}) has no CUDA; install a CUDA build of torch "
            "(https://pytorch.org/get-started/locally/)"
        )

    def ort_cuda(self) -> str | None:
        import onnxruntime as ort

        providers = list(ort.get_available_providers())
        if "CUDAExecutionProvider" in providers:
            return None
        return f"this onnxruntime has no CUDAExecutionProvider (only {providers}); pip install onnxruntime-gpu"

    def nvml_used(self) -> dict[int, int] | None:
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return None
        try:
            return {
                i: int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used)
                for i in range(pynvml.nvmlDeviceGetCount())
            }
        finally:
            pynvml.nvmlShutdown()

    def torch_reset_peak(self, index: int) -> None:
        import torch

        torch.cuda.reset_peak_memory_stats(index)

    def torch_max_allocated(self, index: int) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated(index))


def device_index(device: str) -> int | None:
    """``cpu`` → None; ``cuda`` / ``cuda:N`` → N; anything else is refused."""
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device == "cpu":
        return None
    if match is None:
        raise UnsupportedError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    return int(match.group(1) or 0)


def check_device(device: str, engines: set[str], runtime: CudaRuntime | None = None) -> list[str]:
    """Refuse, before anything loads, a device the engines to measure cannot use; warnings to show."""
    index = device_index(device)
    if index is None:
        return []
    runtime = runtime or SystemCuda()
    count = runtime.device_count()
    if index >= count:
        found = f"{count} CUDA device(s)" if count else "no CUDA device"
        raise UnsupportedError(f"--device {device}: this machine has {found}; bench on --device cpu")
    from kiln.engines.base import get_engine

    stacks = {"torch": runtime.torch_cuda, "onnxruntime": runtime.ort_cuda}
    for name in sorted(engines):
        cls = get_engine(name)
        why = stacks[cls.cuda_stack]() if cls.cuda_stack in stacks else None
        if why is None and "cuda" not in cls.devices:
            why = f"it runs on {list(cls.devices)} only"
        if why is not None:
            raise UnsupportedError(f"--device {device}: engine {name!r} cannot run there: {why}; or use --device cpu")
    if runtime.nvml_used() is None:
        return [
            f"GPU memory is not measured: NVML is missing or failed; {pip_install('nvidia-ml-py', 'gpu')} (nvidia-ml-py)"
        ]
    return []


class GpuMeter:
    """NVML used memory before/after on every device (any engine), and the torch allocator's peak
    on the bench device for the torch engine only. Inactive on the CPU."""

    def __init__(self, device: str, engine: str, runtime: CudaRuntime | None = None) -> None:
        self.index = device_index(device)
        self.engine = engine
        self.runtime = runtime if runtime is not None or self.index is None else SystemCuda()
        self._before: dict[int, int] | None = None
        self._running = False
        self.used_delta: dict[str, int] | None = None
        self.torch_max_allocated: int | None = None

    @property
    def _torch(self) -> bool:
        from kiln.engines.base import get_engine

        return self.index is not None and get_engine(self.engine).cuda_stack == "torch"

    def __enter__(self) -> GpuMeter:
        if self.runtime is not None and self.index is not None:
            self._before = self.runtime.nvml_used()
            if self._torch:
                self.runtime.torch_reset_peak(self.index)
            self._running = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Read the figures now (while the engine still holds its memory); later calls change nothing."""
        if not self._running or self.runtime is None or self.index is None:
            return
        self._running = False
        after = self.runtime.nvml_used()
        if self._before is not None and after is not None:
            self.used_delta = {str(i): max(0, after[i] - self._before.get(i, 0)) for i in sorted(after)}
        if self._torch:
            self.torch_max_allocated = self.runtime.torch_max_allocated(self.index)

    def figures(self) -> dict[str, Any]:
        return {"gpu_used_delta_bytes": self.used_delta, "torch_max_allocated_bytes": self.torch_max_allocated}
