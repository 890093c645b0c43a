from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engines import EngineOptions, available_engines, get_engine
from kiln.errors import EngineUnavailableError, UnsupportedError
from kiln.hardware import Device, Support, detect


def test_unknown_engine_lists_the_known_ones() -> None:
    with pytest.raises(EngineUnavailableError, match=r"unknown engine 'tensorflow'; known engines: \[.*'onnxruntime'"):
        get_engine("tensorflow")
    assert {"onnxruntime", "torch"} <= set(available_engines())


def test_missing_artifact_is_named(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(EngineUnavailableError, match=r"needs model\.pt2"):
        get_engine("torch").check_options(tmp_path, EngineOptions())


def test_precision_and_device_are_checked(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    ort = get_engine("onnxruntime")
    with pytest.raises(UnsupportedError, match="precisions"):
        ort.check_options(tmp_path, EngineOptions(precision="bf16"))
    with pytest.raises(UnsupportedError, match="runs on"):
        ort.check_options(tmp_path, EngineOptions(device="tpu"))


def test_bf16_refused_where_the_cpu_lacks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.pt2").write_bytes(b"")
    real = detect()
    no = Support(False, "needs AVX512-BF16 or AMX-BF16")
    cpu = Device("cpu", 0, "old cpu", bf16=no, fp16=no, int8=no)
    fake = type(real)(**{**real.__dict__, "devices": [cpu]})
    monkeypatch.setattr("kiln.hardware.detect", lambda: fake)
    with pytest.raises(UnsupportedError, match=r"bf16 on cpu .*AVX512-BF16"):
        get_engine("torch").check_options(tmp_path, EngineOptions(precision="bf16"))
