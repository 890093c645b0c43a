from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import kiln
from kiln.errors import InvalidSourceError, ParityError, SpecError
from tests.fixtures import tiny_models

MLP = "tests.fixtures.tiny_models:mlp"


def eager(module: torch.nn.Module, *arrays: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(a) for a in arrays))
    outs = out if isinstance(out, tuple) else (out,)
    return [t.numpy() for t in outs]


def test_factory_import_exports_onnx_and_pt2_with_parity(repo: Path) -> None:
    result = kiln.import_model(MLP, repo, name="mlp", input_shapes=[(1, 4)])
    assert (result.version, result.reused) == (1, False)
    assert {"model.onnx", "model.pt2"} <= set(result.manifest.artifacts)
    assert result.spec.inputs[0].name == "features"  # taken from forward()'s signature
    assert result.spec.inputs[0].shape == (-1, 4)
    assert result.spec.outputs[0].shape == (-1, 3)
    checked = {(p["artifact"], p["batch"]) for p in result.manifest.parity}
    assert checked == {("model.onnx", 1), ("model.onnx", 4), ("model.pt2", 1), ("model.pt2", 4)}
    assert all(p["ok"] and p["max_abs_error"] < 1e-4 for p in result.manifest.parity)
    assert "dynamo" in result.manifest.exporter


@pytest.mark.parametrize("batch", [1, 3, 17])
def test_both_engines_return_the_pytorch_numbers(repo: Path, batch: int) -> None:
    kiln.import_model(MLP, repo, name="mlp", input_shapes=[(1, 4)])
    x = np.random.default_rng(batch).standard_normal((batch, 4)).astype(np.float32)
    (want,) = eager(tiny_models.mlp().eval(), x)
    for engine in ("onnxruntime", "torch"):
        with kiln.load(repo, "mlp", engine=engine) as predictor:
            got = predictor.predict(x)["output"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=engine)


def test_same_source_is_not_imported_twice(repo: Path) -> None:
    first = kiln.import_model(MLP, repo, name="mlp", input_shapes=[(1, 4)])
    again = kiln.import_model(MLP, repo, name="mlp", input_shapes=[(1, 4)])
    assert again.reused and again.version == first.version
    forced = kiln.import_model(MLP, repo, name="mlp", input_shapes=[(1, 4)], force=True)
    assert (forced.version, forced.reused) == (2, False)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_weights_files_are_loaded_safely(repo: Path, tmp_path: Path, fmt: str) -> None:
    module = tiny_models.mlp()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    kiln.import_model(MLP, repo, name="mlp", input_shapes=[(1, 4)], weights=path)
    x = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(kiln.load(repo, "mlp").predict(x)["output"], eager(module.eval(), x)[0], rtol=1e-4)


def test_weights_that_do_not_fit_are_rejected(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"fc1.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(InvalidSourceError, match="do not fit the model"):
        kiln.import_model(MLP, repo, input_shapes=[(1, 4)], weights=path)


def test_multi_input_multi_output(repo: Path) -> None:
    result = kiln.import_model(
        "tests.fixtures.tiny_models:two_heads", repo, name="two", input_shapes=[(1, 3, 8, 8), (1, 5)],
        input_dtypes=["float32", "int64"], output_names=["logits", "embedding"],
    )  # fmt: skip
    assert [t.name for t in result.spec.inputs] == ["image", "ids"]
    assert [t.dtype for t in result.spec.inputs] == ["float32", "int64"]
    assert [t.name for t in result.spec.outputs] == ["logits", "embedding"]
    rng = np.random.default_rng(0)
    feed = {"image": rng.standard_normal((3, 3, 8, 8)).astype(np.float32), "ids": rng.integers(0, 10, (3, 5))}
    want = eager(tiny_models.two_heads().eval(), feed["image"], feed["ids"])
    for engine in ("onnxruntime", "torch"):
        got = kiln.load(repo, "two", engine=engine).predict(feed)
        np.testing.assert_allclose(got["logits"], want[0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got["embedding"], want[1], rtol=1e-4, atol=1e-5)


def test_dict_outputs_take_their_keys_as_names(repo: Path) -> None:
    result = kiln.import_model("tests.fixtures.tiny_models:dict_out", repo, name="d", input_shapes=[(1, 4)])
    assert [t.name for t in result.spec.outputs] == ["scores", "logits"]
    out = kiln.load(repo, "d").predict(np.ones((2, 4), np.float32))
    np.testing.assert_allclose(out["scores"].sum(axis=1), 1.0, rtol=1e-5)


def test_parity_failure_is_an_error_and_leaves_no_version(repo: Path) -> None:
    with pytest.raises(ParityError, match="output 'output' at batch 1"):
        kiln.import_model("tests.fixtures.tiny_models:noisy", repo, name="noisy", input_shapes=[(1, 4)])
    assert kiln.Repository(repo).versions("noisy") == []
    assert not kiln.Repository(repo).has_model("noisy")


def test_an_nn_module_object_imports_through_the_python_api(repo: Path) -> None:
    result = kiln.import_model(tiny_models.mlp(), repo, name="obj", input_shapes=[(2, 4)])
    assert result.version == 1 and result.manifest.source == "<MLP object>"


@pytest.mark.parametrize(
    ("source", "kwargs", "message"),
    [
        ("tests.fixtures.tiny_models:broken", {"input_shapes": [(1, 4)]}, "factory raised RuntimeError"),
        ("tests.fixtures.tiny_models:not_a_module", {"input_shapes": [(1, 4)]}, "returned int"),
        ("tests.fixtures.tiny_models:NOT_CALLABLE", {"input_shapes": [(1, 4)]}, "neither"),
        (MLP, {}, "--input-shape"),
        (MLP, {"input_shapes": [(1, 4)], "input_dtypes": ["float32", "int64"]}, "input dtypes"),
    ],
)
def test_bad_pytorch_sources(repo: Path, source: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSourceError, match=message):
        kiln.import_model(source, repo, **kwargs)


def test_new_version_with_a_different_signature_is_refused(repo: Path) -> None:
    kiln.import_model(MLP, repo, name="m", input_shapes=[(1, 4)])
    with pytest.raises(SpecError, match="another --name"):
        kiln.import_model("tests.fixtures.tiny_models:dict_out", repo, name="m", input_shapes=[(1, 4)])
    assert kiln.Repository(repo).versions("m") == [1]


def test_bad_import_options_are_spec_errors(repo: Path) -> None:
    with pytest.raises(SpecError, match="atol"):
        kiln.import_model(MLP, repo, input_shapes=[(1, 4)], atol=-1)


def test_when_the_dynamo_exporter_fails_the_legacy_one_is_used_and_said(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.onnx.export

    def export(*args: object, **kwargs: object) -> object:
        if kwargs.get("dynamo"):
            raise RuntimeError("unsupported operator for the dynamo exporter")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.onnx, "export", export)
    result = kiln.import_model(MLP, repo, name="legacy", input_shapes=[(1, 4)])
    assert "legacy TorchScript exporter" in result.manifest.exporter
    assert any("dynamo ONNX exporter failed (unsupported operator" in n for n in result.notes)
    assert all(p["ok"] for p in result.manifest.parity)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    onnx_out = kiln.load(repo, "legacy").predict(x)["output"]
    np.testing.assert_allclose(onnx_out, eager(tiny_models.mlp().eval(), x)[0], rtol=1e-4, atol=1e-5)
    assert kiln.load(repo, "legacy").predict(np.ones((17, 4), np.float32))["output"].shape == (17, 3)  # batch dynamic
