"""CUDA paths. CI has no GPU, so these skip there; on a machine with one they run for real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.hardware import detect

pytestmark = pytest.mark.gpu

needs_torch_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch has no CUDA device here")
needs_ort_cuda = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="onnxruntime has no CUDA provider here"
)


@needs_torch_cuda
def test_doctor_lists_cuda_devices_with_the_right_bf16_rule() -> None:
    cuda = [d for d in detect().devices if d.kind == "cuda"]
    assert cuda
    for d in cuda:
        assert d.compute_capability is not None
        major = int(d.compute_capability.split(".")[0])
        assert d.bf16.supported == (major >= 8)


@needs_torch_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_torch_engine_on_cuda(repo: Path, precision: str) -> None:
    kiln.import_model("tests.fixtures.tiny_models:mlp", repo, name="mlp", input_shapes=[(1, 4)])
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    cpu = kiln.load(repo, "mlp", engine="torch").predict(x)["output"]
    gpu = kiln.load(repo, "mlp", engine="torch", device="cuda", precision=precision).predict(x)["output"]  # type: ignore[arg-type]
    np.testing.assert_allclose(gpu, cpu, rtol=1e-2, atol=1e-2)


@needs_ort_cuda
def test_onnxruntime_engine_uses_the_cuda_provider(repo: Path) -> None:
    kiln.import_model("tests.fixtures.tiny_models:mlp", repo, name="mlp", input_shapes=[(1, 4)])
    predictor = kiln.load(repo, "mlp", engine="onnxruntime", device="cuda")
    assert predictor.engine.active_providers[0] == "CUDAExecutionProvider"  # type: ignore[attr-defined]
    x = np.ones((4, 4), np.float32)
    np.testing.assert_allclose(predictor.predict(x)["output"], kiln.load(repo, "mlp").predict(x)["output"], rtol=1e-4)


@needs_torch_cuda
@needs_ort_cuda
def test_optimize_on_cuda_builds_times_and_loads_variants_there(repo: Path, tmp_path: Path) -> None:
    kiln.import_model("tests.fixtures.tiny_models:mlp", repo, name="mlp", input_shapes=[(1, 4)])
    rng = np.random.default_rng(0)
    data = tmp_path / "mlp.npz"
    np.savez(data, features=rng.standard_normal((64, 4)).astype(np.float32),
             **{"calibration/features": rng.standard_normal((32, 4)).astype(np.float32)})  # fmt: skip
    result = kiln.optimize(repo, "mlp", device="cuda", data=str(data), engines=["onnxruntime", "torch"],
                           metric="sqnr", min_sqnr_db=20, compile_modes=[], min_time_s=0.05)  # fmt: skip
    built = [v for v in result.variants if v.recipe is not None and v.status != "skipped"]
    assert built and {v.recipe.device for v in built} == {"cuda:0"}  # type: ignore[union-attr]
    assert any(v.recipe.precision == "fp16" and v.status in ("accepted", "chosen") for v in built)  # type: ignore[union-attr]
    with kiln.load(repo, "mlp") as predictor:  # the chosen variant, on the device it was chosen for
        assert predictor.engine.options.device == "cuda:0"
        assert predictor.predict(np.ones((3, 4), np.float32))["output"].shape == (3, 3)
