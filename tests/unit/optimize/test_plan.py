"""What the search enumerates for a device: CUDA gets its own families (fp16 ONNX Runtime, CUDA graphs)
and loses the CPU-only ones, and every recipe remembers its device."""

from __future__ import annotations

import pytest

import kiln
from kiln.errors import UnsupportedError
from kiln.hardware import Device, cpu_device, cuda_rules
from kiln.optimize.config import OptimizeConfig
from kiln.optimize.plan import enumerate_variants
from kiln.recipe import Recipe
from tests.unit.optimize.conftest import Imported


def _h200() -> Device:
    bf16, fp16, int8 = cuda_rules(9, 0, True)
    return Device("cuda", 0, "NVIDIA H200", bf16=bf16, fp16=fp16, int8=int8, compute_capability="9.0")


def test_a_cuda_device_gets_fp16_and_cuda_graphs_and_no_cpu_only_engines(cnn: Imported) -> None:
    config = OptimizeConfig(device="cuda", compile_modes=["default", "reduce-overhead"])
    recipes, skipped = enumerate_variants(config, cnn.version_dir, _h200(), calibration="c0ffee")
    labels = {r.label() for r in recipes}
    assert {r.device for r in recipes} == {"cuda:0"}
    assert "onnxruntime fp16 + onnxslim" in labels
    assert any("compile reduce-overhead" in label for label in labels)
    assert not any(r.engine == "openvino" for r in recipes)
    reasons = {s.label: s.reason for s in skipped}
    assert "CPU only" in reasons["openvino variants"] and "CPU only" in reasons["torch int8 dynamic"]


def test_on_the_cpu_cuda_only_families_are_skipped_with_the_reason(cnn: Imported) -> None:
    config = OptimizeConfig(compile_modes=["default", "reduce-overhead"])
    device = cpu_device({"avx2", "avx512f", "avx512_vnni"}, "a CPU without bf16")
    recipes, skipped = enumerate_variants(config, cnn.version_dir, device, calibration=None)
    assert {r.device for r in recipes} == {"cpu"}
    reasons = {s.label: s.reason for s in skipped}
    assert "CUDA only" in reasons["torch compile reduce-overhead"] and "CUDA only" in reasons["onnxruntime fp16"]


def test_the_device_is_part_of_a_variant_id_but_cpu_ids_stay_as_they_were() -> None:
    cpu, cuda = Recipe(engine="onnxruntime"), Recipe(engine="onnxruntime", device="cuda:0")
    legacy = Recipe.model_validate({"engine": "onnxruntime"})  # a recipe.json written before the field
    assert cpu.variant_id("h") == legacy.variant_id("h") != cuda.variant_id("h")
    assert cpu.artifact_key("h") == cuda.artifact_key("h")  # same files, run elsewhere


def test_optimizing_for_a_device_this_machine_lacks_is_a_clear_error(mlp: Imported) -> None:
    from kiln.hardware import detect

    if any(d.kind == "cuda" for d in detect().devices):
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(UnsupportedError, match="cuda"):
        kiln.optimize(mlp.repo, mlp.name, device="cuda", choose=False)


def test_with_tensorrt_a_cuda_search_tries_it_in_fp32_and_fp16(cnn: Imported, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.engines import ort

    monkeypatch.setattr(ort, "_has_tensorrt", lambda: True)
    recipes, _ = enumerate_variants(OptimizeConfig(device="cuda"), cnn.version_dir, _h200(), calibration=None)
    trt = [r for r in recipes if r.options.get("tensorrt")]
    assert sorted(r.precision for r in trt) == ["fp16", "fp32"]
    assert all(r.label().endswith("[tensorrt]") and r.device == "cuda:0" for r in trt)


def test_tensorrt_providers_come_first_with_their_options_and_never_on_the_cpu() -> None:
    from kiln.engines.ort import providers_for

    available = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    got = providers_for("cuda:1", available, {"trt_fp16_enable": True})
    assert got == [("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": True}),
                   ("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]  # fmt: skip
    assert providers_for("cuda", available) == [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with pytest.raises(UnsupportedError, match="TensorRT runs on CUDA"):
        providers_for("cpu", available, {})
    with pytest.raises(UnsupportedError, match="onnxruntime-gpu"):
        providers_for("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"], {})
