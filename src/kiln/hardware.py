"""What this machine can do, detected rather than assumed.

bf16 and fp16 support follow the real rules: on CPU, bf16 needs AVX512-BF16 or AMX-BF16 (without them
PyTorch and OpenVINO emulate it, slower than fp32); on CUDA, bf16 needs compute capability 8.0 or
newer (Ampere). ``torch.cuda.is_bf16_supported()`` is asked when torch has CUDA.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from kiln._version import DISTRIBUTION

# /proc/cpuinfo flag -> name users know
_ISA_FLAGS: dict[str, str] = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "amx_fp16": "AMX-FP16",
}


@dataclass(frozen=True)
class Support:
    """Whether a precision runs natively on a device, and why."""

    supported: bool
    reason: str


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int
    name: str
    bf16: Support
    fp16: Support
    int8: Support
    memory_bytes: int | None = None
    compute_capability: str | None = None

    @property
    def id(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


@dataclass(frozen=True)
class HardwareInfo:
    cpu_model: str
    architecture: str
    physical_cores: int
    logical_cores: int
    memory_bytes: int
    isa: list[str]
    devices: list[Device]
    versions: dict[str, str | None]
    onnxruntime_providers: list[str]
    openvino_devices: list[str]
    notes: list[str] = field(default_factory=list)
    usable_cores: int = 0  # what this process may run on: physical cores within its affinity and cgroup quota

    def device(self, device_id: str) -> Device:
        for d in self.devices:
            if d.id == device_id or (device_id == "cuda" and d.kind == "cuda"):
                return d
        from kiln.errors import UnsupportedError

        raise UnsupportedError(f"device {device_id!r} is not on this machine; found {[d.id for d in self.devices]}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for d, dev in zip(data["devices"], self.devices, strict=True):
            d["id"] = dev.id
        return data


def _cpu_flags_and_model() -> tuple[set[str], str]:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    return flags, model


def int8_saturates(flags: set[str] | None = None) -> bool:
    """Whether ONNX Runtime's u8s8 int8 kernels saturate on this CPU: x86 with AVX2 or AVX-512 but no
    VNNI (nor AMX) adds pairs of u8×s8 products in 16 bits, so full 8-bit weights overflow; ONNX Runtime's
    documented remedy is 7-bit weights (``reduce_range``). Measured on such a CPU: an MLP's dynamic int8
    went from 15.9 to 37.1 dB SQNR with it."""
    flags = _cpu_flags_and_model()[0] if flags is None else flags
    if not flags & {"avx2", "avx512f"}:
        return False  # not x86 with those kernels (ARM, or a CPU ONNX Runtime runs int8 otherwise on)
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_device(flags: set[str], model: str) -> Device:
    has = flags.__contains__
    if has("amx_bf16"):
        bf16 = Support(True, "AMX-BF16 tiles")
    elif has("avx512_bf16"):
        bf16 = Support(True, "AVX512-BF16 instructions")
    else:
        bf16 = Support(False, "needs AVX512-BF16 or AMX-BF16; without them bf16 is emulated and slower than fp32")
    if has("amx_fp16"):
        fp16 = Support(True, "AMX-FP16 tiles")
    elif has("avx512_fp16"):
        fp16 = Support(True, "AVX512-FP16 instructions")
    else:
        fp16 = Support(False, "needs AVX512-FP16 or AMX-FP16; fp16 on this CPU is converted to fp32 for compute")
    if has("amx_int8"):
        int8 = Support(True, "AMX-INT8 tiles")
    elif has("avx512_vnni") or has("avx_vnni"):
        int8 = Support(True, "VNNI dot-product instructions")
    elif has("avx2"):
        int8 = Support(True, "AVX2 (no VNNI: int8 gains are smaller)")
    else:
        int8 = Support(False, "no AVX2 or VNNI")
    return Device("cpu", 0, model, bf16=bf16, fp16=fp16, int8=int8)


def cuda_rules(major: int, minor: int, torch_says_bf16: bool | None) -> tuple[Support, Support, Support]:
    """bf16 / fp16 / int8 support for a CUDA device of compute capability ``major.minor``."""
    cc = f"{major}.{minor}"
    if major < 8:  # whatever an emulating library says: no bf16 tensor-core math before Ampere
        bf16 = Support(False, f"compute capability {cc} < 8.0; bf16 needs Ampere (8.0) or newer")
    elif torch_says_bf16 is False:
        bf16 = Support(
            False, f"torch.cuda.is_bf16_supported(including_emulation=False) = False (compute capability {cc})"
        )
    else:
        bf16 = Support(True, f"compute capability {cc} ≥ 8.0")
    fp16 = (
        Support(True, f"compute capability {cc}" + (" with tensor cores" if major >= 7 else ""))
        if (major, minor) >= (5, 3)
        else Support(False, f"compute capability {cc} < 5.3")
    )
    int8 = (
        Support(True, f"compute capability {cc} ≥ 6.1 (DP4A)")
        if (major, minor) >= (6, 1)
        else Support(False, f"compute capability {cc} < 6.1")
    )
    return bf16, fp16, int8


def _cuda_devices(notes: list[str]) -> list[Device]:
    """CUDA devices from torch when it has CUDA, else from NVML (a CPU torch beside a GPU runtime)."""
    devices: list[Device] = []
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            with torch.cuda.device(i):
                says = bool(torch.cuda.is_bf16_supported(including_emulation=False))  # native bf16 only
            bf16, fp16, int8 = cuda_rules(props.major, props.minor, says)
            devices.append(
                Device(
                    "cuda", i, props.name, bf16=bf16, fp16=fp16, int8=int8,
                    memory_bytes=int(props.total_memory), compute_capability=f"{props.major}.{props.minor}",
                )
            )  # fmt: skip
        return devices
    return _nvml_devices(notes)


def _nvml_devices(notes: list[str]) -> list[Device]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: no NVIDIA GPU here
        return []
    devices: list[Device] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)
            bf16, fp16, int8 = cuda_rules(major, minor, None)
            devices.append(
                Device("cuda", i, name if isinstance(name, str) else name.decode(), bf16=bf16, fp16=fp16,
                       int8=int8, memory_bytes=memory, compute_capability=f"{major}.{minor}")
            )  # fmt: skip
        notes.append("CUDA devices found through NVML; this torch build has no CUDA, so the torch engine runs on CPU")
    finally:
        pynvml.nvmlShutdown()
    return devices


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def _openvino_devices(notes: list[str]) -> list[str]:
    try:
        import openvino as ov
    except ImportError:
        return []
    try:
        return list(ov.Core().available_devices)
    except Exception as exc:  # a broken plugin should not break `kiln doctor`
        notes.append(f"OpenVINO is installed but listing devices failed: {exc}")
        return []


@lru_cache(maxsize=1)
def detect() -> HardwareInfo:
    """Inspect this machine once per process."""
    import psutil

    notes: list[str] = []
    flags, model = _cpu_flags_and_model()
    if not flags:
        notes.append("CPU flags could not be read (no /proc/cpuinfo); ISA-dependent features are reported unsupported")
    isa = [name for flag, name in _ISA_FLAGS.items() if flag in flags]
    cpu = cpu_device(flags, model)
    memory = int(psutil.virtual_memory().total)
    devices = [replace(cpu, memory_bytes=memory), *_cuda_devices(notes)]
    versions = {
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "onnx": _version("onnx"),
        "openvino": _version("openvino"),
        "nncf": _version("nncf"),
        "kiln": _version(DISTRIBUTION) or _version("kiln"),
    }
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    usable = usable_cores(physical, logical, _affinity(logical), _cgroup_cpus())
    if usable < physical:
        notes.append(f"this process may use {usable} of the {physical} cores (CPU affinity or cgroup quota): "
                     "engines default to that many threads")  # fmt: skip
    return HardwareInfo(
        cpu_model=model,
        architecture=platform.machine(),
        physical_cores=physical,
        logical_cores=logical,
        usable_cores=usable,
        memory_bytes=memory,
        isa=isa,
        devices=devices,
        versions=versions,
        onnxruntime_providers=_ort_providers(),
        openvino_devices=_openvino_devices(notes),
        notes=notes,
    )


def machine_fingerprint(*libraries: str) -> str:
    """A short hash of what timings depend on: CPU model, ISA, usable cores, memory and the versions of
    ``libraries`` (default: every runtime kiln reports). Figures measured elsewhere do not carry over."""
    import hashlib
    import json

    info = detect()
    versions = {k: v for k, v in info.versions.items() if not libraries or k in libraries}
    facts = [info.cpu_model, info.architecture, info.isa, info.usable_cores, info.memory_bytes, versions,
             [(d.id, d.name) for d in info.devices]]  # fmt: skip
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]


def physical_cores() -> int:
    """The default number of engine threads: ``KILN_NUM_THREADS``, else the cores this process may use."""
    from kiln.environment import get_settings

    info = detect()
    return get_settings().num_threads or info.usable_cores or info.physical_cores


def usable_cores(physical: int, logical: int, allowed: int, quota: float | None) -> int:
    """Physical cores, scaled down to the ``allowed`` CPUs this process may run on (its affinity) and to
    its cgroup's CPU ``quota`` (a container's ``--cpus``): threads beyond that only oversubscribe."""
    per_core = max(1, logical // max(1, physical))  # SMT siblings per core
    cores = physical if allowed >= logical else min(physical, max(1, allowed // per_core))
    return max(1, min(cores, math.ceil(quota)) if quota is not None else cores)


def _affinity(logical: int) -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical


def _cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs granted by the cgroup quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None for no limit."""
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            q = int(v1.read_text())
            return None if q <= 0 else q / int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None
