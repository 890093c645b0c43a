"""Peak host memory from the kernel (:mod:`kiln.memory`), and which GPU figures are read for which engine (with a fake CUDA)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kiln.bench.memory import GpuMeter, check_device, device_index
from kiln.errors import UnsupportedError
from kiln.memory import KernelPeak, host_meter


@pytest.mark.skipif(not KernelPeak.available(), reason="/proc/self/clear_refs is not writable here")
def test_the_kernel_peak_sees_memory_freed_before_the_end() -> None:
    with KernelPeak() as peak:
        block = bytearray(64 << 20)
        block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
        del block
    assert peak.delta >= 60 << 20
    assert isinstance(host_meter(), KernelPeak)


def test_kernel_peak_reads_its_files(tmp_path: Path) -> None:
    status, clear = tmp_path / "status", tmp_path / "clear_refs"
    status.write_text("VmPeak:\t 9000 kB\nVmHWM:\t 1000 kB\nVmRSS:\t 900 kB\n")
    clear.write_text("")
    meter = KernelPeak(status, clear)
    with meter:
        assert clear.read_text() == "5"
        status.write_text("VmHWM:\t 5000 kB\nVmRSS:\t 900 kB\n")
    assert meter.delta == 4000 * 1024
    missing = KernelPeak(tmp_path / "nope", clear)
    with pytest.raises(OSError):
        missing.__enter__()


@dataclass
class FakeCuda:
    devices: int = 1
    torch_ok: bool = True
    ort_ok: bool = True
    nvml: bool = True
    used: dict[int, int] = field(default_factory=lambda: {0: 1000, 1: 5000})
    calls: list[str] = field(default_factory=list)

    def device_count(self) -> int:
        return self.devices

    def torch_cuda(self) -> str | None:
        return None if self.torch_ok else "this torch (2.13.0+cpu) has no CUDA"

    def ort_cuda(self) -> str | None:
        return None if self.ort_ok else "this onnxruntime has no CUDAExecutionProvider"

    def nvml_used(self) -> dict[int, int] | None:
        self.calls.append("nvml")
        return dict(self.used) if self.nvml else None

    def torch_reset_peak(self, index: int) -> None:
        self.calls.append(f"reset:{index}")

    def torch_max_allocated(self, index: int) -> int:
        self.calls.append(f"max:{index}")
        return 7_000_000


def test_device_names() -> None:
    assert (device_index("cpu"), device_index("cuda"), device_index("cuda:2")) == (None, 0, 2)
    with pytest.raises(UnsupportedError, match="expected cpu, cuda or cuda:N"):
        device_index("gpu0")


def test_cuda_is_refused_before_loading_what_cannot_use_it() -> None:
    assert check_device("cpu", {"torch"}, FakeCuda(devices=0)) == []
    with pytest.raises(UnsupportedError, match="this machine has no CUDA device"):
        check_device("cuda", {"onnxruntime"}, FakeCuda(devices=0))
    with pytest.raises(UnsupportedError, match=r"cuda:1: this machine has 1 CUDA device"):
        check_device("cuda:1", {"onnxruntime"}, FakeCuda())
    with pytest.raises(
        UnsupportedError, match=r"engine 'torch' cannot run there: this torch \(2.13.0\+cpu\) has no CUDA"
    ):
        check_device("cuda", {"onnxruntime", "torch"}, FakeCuda(torch_ok=False))
    with pytest.raises(UnsupportedError, match=r"engine 'onnxruntime' .* no CUDAExecutionProvider"):
        check_device("cuda", {"onnxruntime"}, FakeCuda(ort_ok=False))
    with pytest.raises(UnsupportedError, match=r"engine 'openvino' cannot run there: it runs on \['cpu'\]"):
        check_device("cuda", {"openvino"}, FakeCuda())
    # A CPU torch is fine when no torch variant is measured; NVML missing only costs the GPU figures.
    assert check_device("cuda", {"onnxruntime"}, FakeCuda(torch_ok=False)) == []
    (warning,) = check_device("cuda", {"onnxruntime"}, FakeCuda(nvml=False))
    assert "pip install 'kiln-inference[gpu]'" in warning


def test_nvml_for_every_engine_and_the_torch_peak_for_torch_only() -> None:
    cuda = FakeCuda()
    with GpuMeter("cuda:1", "onnxruntime", cuda) as ort:
        cuda.used = {0: 1000, 1: 9000}
    assert ort.used_delta == {"0": 0, "1": 4000} and ort.torch_max_allocated is None
    assert cuda.calls == ["nvml", "nvml"]

    cuda = FakeCuda()
    with GpuMeter("cuda:1", "torch", cuda) as meter:
        cuda.used = {0: 1000, 1: 6000}
    assert meter.figures() == {"gpu_used_delta_bytes": {"0": 0, "1": 1000}, "torch_max_allocated_bytes": 7_000_000}
    assert cuda.calls == ["nvml", "reset:1", "nvml", "max:1"]
    meter.stop()  # read once: a second stop (after the engine is freed) changes nothing
    assert cuda.calls == ["nvml", "reset:1", "nvml", "max:1"]

    cuda = FakeCuda(nvml=False)
    with GpuMeter("cuda", "torch", cuda) as no_nvml:
        pass
    assert no_nvml.used_delta is None and no_nvml.torch_max_allocated == 7_000_000


def test_the_cpu_touches_no_cuda() -> None:
    cuda = FakeCuda()
    with GpuMeter("cpu", "torch", cuda) as meter:
        pass
    assert cuda.calls == [] and meter.figures() == {"gpu_used_delta_bytes": None, "torch_max_allocated_bytes": None}
    with GpuMeter("cpu", "torch") as real:  # no runtime at all is built for the CPU
        pass
    assert real.runtime is None
