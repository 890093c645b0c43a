from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from kiln.errors import CorruptModelError, InputError, InvalidSourceError
from tests.fixtures import onnx_models


def test_onnx_file_imports_with_spec_from_the_graph(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx")
    result = kiln.import_model(path, repo)
    assert result.model == "linear"
    assert [(t.name, t.dtype, t.shape) for t in result.spec.inputs] == [("x", "float32", (-1, 4))]
    assert [(t.name, t.dtype, t.shape) for t in result.spec.outputs] == [("y", "float32", (-1, 3))]
    assert result.spec.serving.max_batch_size > 0
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(kiln.load(repo, "linear").predict({"x": x})["y"], want, rtol=1e-6)


def test_external_data_is_carried_along(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(), tmp_path / "ext.onnx", external=True)
    assert (tmp_path / "ext.onnx.weights").is_file()
    result = kiln.import_model(path, repo, name="ext")
    assert set(result.manifest.artifacts) == {"model.onnx", "model.onnx.data"}
    out = kiln.load(repo, "ext").predict(np.ones((2, 4), np.float32))["y"]
    assert out.shape == (2, 3)
    # Changing the external weights is a different source: it is imported as a new version.
    data = bytearray((tmp_path / "ext.onnx.weights").read_bytes())
    data[0] ^= 0xFF
    (tmp_path / "ext.onnx.weights").write_bytes(bytes(data))
    assert kiln.import_model(path, repo, name="ext").version == 2


def test_fixed_batch_model_disables_batching(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(batch=1), tmp_path / "fixed.onnx")
    spec = kiln.import_model(path, repo).spec
    assert spec.inputs[0].shape == (1, 4)
    assert spec.serving.max_batch_size == 0
    with pytest.raises(InputError, match="dimension 0"):
        kiln.load(repo, "fixed").predict(np.ones((2, 4), np.float32))


def test_renaming_inputs_and_outputs(repo: Path, tmp_path: Path) -> None:
    path = onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx")
    spec = kiln.import_model(path, repo, name="renamed", input_names=["features"], output_names=["scores"]).spec
    assert (spec.inputs[0].name, spec.outputs[0].name) == ("features", "scores")
    out = kiln.load(repo, "renamed").predict({"features": np.ones((1, 4), np.float32)})
    assert set(out) == {"scores"}


def test_truncated_onnx_is_corrupt_and_named(repo: Path, tmp_path: Path) -> None:
    good = onnx_models.save(onnx_models.linear_model(), tmp_path / "good.onnx")
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(CorruptModelError, match=r"truncated\.onnx"):
        kiln.import_model(bad, repo)
    assert kiln.Repository(repo).models() == []


def test_missing_and_unknown_files(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidSourceError, match="file not found"):
        kiln.import_model(tmp_path / "nope.onnx", repo)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(InvalidSourceError, match=r"unknown model format '\.bin'"):
        kiln.import_model(other, repo)


def test_wrong_input_dtype_through_predict(repo: Path, tmp_path: Path) -> None:
    kiln.import_model(onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx"), repo)
    with pytest.raises(InputError, match="'x': dtype must be float32, got float64"):
        kiln.load(repo, "linear").predict(np.ones((1, 4)))


def test_torch_engine_is_refused_for_onnx_models(repo: Path, tmp_path: Path) -> None:
    kiln.import_model(onnx_models.save(onnx_models.linear_model(), tmp_path / "linear.onnx"), repo)
    with pytest.raises(kiln.KilnError, match="models imported from ONNX run on 'onnxruntime'"):
        kiln.load(repo, "linear", engine="torch")
