from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.hardware import cpu_device, cuda_rules, detect


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
