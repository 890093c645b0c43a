from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.hardware import _cgroup_cpus, cpu_device, cuda_rules, detect, usable_cores


def test_cpu_bf16_needs_avx512_bf16_or_amx() -> None:
    assert cpu_device({"avx512f", "avx512_bf16"}, "x").bf16.supported
    assert cpu_device({"amx_bf16", "amx_tile"}, "x").bf16.supported
    plain = cpu_device({"avx2", "avx512f"}, "x")
    assert not plain.bf16.supported
    assert "AVX512-BF16" in plain.bf16.reason


def test_cpu_int8_prefers_vnni() -> None:
    assert "VNNI" in cpu_device({"avx512_vnni"}, "x").int8.reason
    assert not cpu_device(set(), "x").int8.supported


@pytest.mark.parametrize(
    ("major", "minor", "bf16"),
    [(7, 0, False), (7, 5, False), (8, 0, True), (8, 6, True), (9, 0, True)],
)
def test_cuda_bf16_needs_compute_capability_8(major: int, minor: int, bf16: bool) -> None:
    # The widely copied guide that says 7.0 is wrong: V100 (7.0) and T4 (7.5) have no bf16.
    support, fp16, _ = cuda_rules(major, minor, torch_says_bf16=None)
    assert support.supported is bf16
    assert fp16.supported


def test_cuda_rule_defers_to_torch_when_it_knows() -> None:
    support, _, _ = cuda_rules(8, 0, torch_says_bf16=False)
    assert not support.supported
    assert "is_bf16_supported" in support.reason


def test_cuda_bf16_emulation_is_not_support() -> None:
    """torch.cuda.is_bf16_supported() says True on a V100 by default (it counts emulation): below 8.0 the
    compute capability decides."""
    support, _, _ = cuda_rules(7, 0, torch_says_bf16=True)
    assert not support.supported and "< 8.0" in support.reason
    assert cuda_rules(9, 0, torch_says_bf16=True)[0].supported


def test_detect_matches_this_machines_cpu_flags() -> None:
    info = detect()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    cpu = info.device("cpu")
    assert cpu.bf16.supported == bool(flags & {"avx512_bf16", "amx_bf16"})
    assert ("AVX-512" in info.isa) == ("avx512f" in flags)
    assert "CPUExecutionProvider" in info.onnxruntime_providers
    assert info.physical_cores >= 1
    json.dumps(info.to_dict())  # serialisable as is


@pytest.mark.parametrize(
    ("physical", "logical", "allowed", "quota", "want"),
    [
        (8, 16, 16, None, 8),  # the whole machine
        (8, 16, 4, None, 2),  # taskset to 4 SMT threads: 2 cores' worth
        (8, 8, 8, 2.5, 3),  # docker --cpus 2.5
        (2, 2, 1, None, 1),
        (4, 4, 4, 0.2, 1),  # never zero threads
    ],
)
def test_usable_cores_follow_affinity_and_the_cgroup_quota(
    physical: int, logical: int, allowed: int, quota: float | None, want: int
) -> None:
    assert usable_cores(physical, logical, allowed, quota) == want


def test_cgroup_quota_is_read_from_v2_and_v1_files(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert _cgroup_cpus(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpus(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpus(tmp_path) == 2.0


def test_int8_saturates_on_x86_without_vnni_only() -> None:
    from kiln.hardware import int8_saturates

    assert int8_saturates({"avx2", "fma"})  # ONNX Runtime's u8s8 kernels overflow: 7-bit weights
    assert int8_saturates({"avx2", "avx512f", "avx512bw"})
    assert not int8_saturates({"avx2", "avx512f", "avx512_vnni"})
    assert not int8_saturates({"avx2", "avx_vnni"})
    assert not int8_saturates({"asimd", "fp"})  # ARM
