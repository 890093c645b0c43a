"""Keras, scikit-learn, TorchScript and torch.export imports: parity, dynamic dims, and loading safety."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kiln
from kiln.convert.from_keras import import_keras
from kiln.errors import InvalidSourceError, UntrustedSourceError
from tests.fixtures import tiny_models


def parity_rows(result: Any) -> set[tuple[str, int]]:
    return {(p["artifact"], p["batch"]) for p in result.manifest.parity}


def assert_parity_ok(result: Any, atol: float = 1e-4) -> None:
    assert result.manifest.parity, "no parity check was recorded"
    assert all(p["ok"] and p["max_abs_error"] < atol for p in result.manifest.parity), result.manifest.parity


def run_both(repo: Path, name: str, feed: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for engine in ("onnxruntime", "torch"):
        with kiln.load(repo, name, engine=engine) as predictor:
            out[engine] = predictor.predict(feed)
    return out


# ---- Keras ----------------------------------------------------------------------------------------------
def keras_two_in_two_out() -> Any:
    keras = import_keras()  # keras on the torch backend, as kiln loads it

    keras.utils.set_random_seed(0)
    seq = keras.Input((None, 6), name="seq")  # dynamic sequence length
    extra = keras.Input((4,), name="extra")
    x = keras.layers.Conv1D(8, 3, padding="same", activation="relu")(seq)
    x = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling1D()(x), extra])
    logits = keras.layers.Dense(3, name="logits")(x)
    probs = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model([seq, extra], [logits, probs])


def test_keras_file_with_two_inputs_two_outputs_and_a_dynamic_sequence(repo: Path, tmp_path: Path) -> None:
    model = keras_two_in_two_out()
    path = tmp_path / "twin.keras"
    model.save(path)
    result = kiln.import_model(path, repo)
    assert result.manifest.framework == "keras" and "dynamo" in result.manifest.exporter
    assert [(t.name, t.shape) for t in result.spec.inputs] == [("seq", (-1, -1, 6)), ("extra", (-1, 4))]
    assert [(t.name, t.shape) for t in result.spec.outputs] == [("logits", (-1, 3)), ("probs", (-1, 2))]
    assert parity_rows(result) == {(a, b) for a in ("model.onnx", "model.pt2") for b in (1, 4)}
    assert_parity_ok(result)
    rng = np.random.default_rng(0)
    for length in (3, 11):
        feed = {"seq": rng.standard_normal((2, length, 6)).astype(np.float32),
                "extra": rng.standard_normal((2, 4)).astype(np.float32)}  # fmt: skip
        want = [t.detach().numpy() for t in model([feed["seq"], feed["extra"]])]
        for engine, got in run_both(repo, "twin", feed).items():
            np.testing.assert_allclose(got["logits"], want[0], rtol=1e-4, atol=1e-5, err_msg=engine)
            np.testing.assert_allclose(got["probs"], want[1], rtol=1e-4, atol=1e-5, err_msg=engine)


def test_legacy_h5_file_imports(repo: Path, tmp_path: Path) -> None:
    keras = import_keras()  # keras on the torch backend, as kiln loads it

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    path = tmp_path / "legacy.h5"
    model.save(path)
    result = kiln.import_model(path, repo)
    assert_parity_ok(result)
    x = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    got = kiln.load(repo, "legacy").predict(x)
    np.testing.assert_allclose(next(iter(got.values())), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_keras_lambda_layers_are_refused_by_safe_mode(repo: Path, tmp_path: Path) -> None:
    keras = import_keras()  # keras on the torch backend, as kiln loads it

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Lambda(lambda t: t * 2)(inp))
    path = tmp_path / "lam.keras"
    model.save(path)
    with pytest.raises(InvalidSourceError, match=r"Keras cannot load it: .*safe_mode"):
        kiln.import_model(path, repo)
    assert not kiln.Repository(repo).has_model("lam")


# ---- scikit-learn -------------------------------------------------------------------------------------
def iris_pipeline() -> Any:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_iris(return_X_y=True)
    names = np.array(["setosa", "versicolor", "virginica"])
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, names[y]), x.astype(np.float32)


def test_sklearn_pickle_needs_trust_then_matches_sklearn(repo: Path, tmp_path: Path) -> None:
    pipe, x = iris_pipeline()
    path = tmp_path / "iris.pkl"
    path.write_bytes(pickle.dumps(pipe))
    with pytest.raises(UntrustedSourceError, match=r"loading a pickle runs any code .* --trust-pickle"):
        kiln.import_model(path, repo)
    assert not kiln.Repository(repo).has_model("iris")

    result = kiln.import_model(path, repo, trust_pickle=True)
    assert result.spec.task == "classification"
    assert result.spec.labels == ["setosa", "versicolor", "virginica"]
    assert [(t.name, t.dtype, t.shape) for t in result.spec.outputs] == [
        ("label", "string", (-1,)),
        ("probabilities", "float32", (-1, 3)),
    ]
    assert {(p["output"], p["batch"]) for p in result.manifest.parity} == {
        (o, b) for o in ("label", "probabilities") for b in (1, 16)
    }
    assert_parity_ok(result)
    got = kiln.load(repo, "iris").predict(x)
    assert got["label"].tolist() == pipe.predict(x).tolist()
    np.testing.assert_allclose(got["probabilities"], pipe.predict_proba(x), atol=1e-5)


def test_sklearn_regressor_object_imports_without_a_pickle(repo: Path) -> None:
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    reg = Ridge().fit(x, x @ np.array([1.0, -2.0, 0.5]))
    result = kiln.import_model(reg, repo, name="ridge")
    assert result.spec.task == "generic" and result.spec.labels is None
    assert_parity_ok(result)
    (got,) = kiln.load(repo, "ridge").predict(x).values()
    np.testing.assert_allclose(got[:, 0], reg.predict(x), rtol=1e-4, atol=1e-4)


# ---- TorchScript and torch.export ---------------------------------------------------------------------
SEQ_AXES = {"ids": {1: "seq"}, "mask": {1: "seq"}}


def seq_feed(batch: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(length)
    mask = np.ones((batch, length), np.int64)
    mask[0, length // 2 :] = 0
    return {"ids": rng.integers(0, 20, (batch, length)), "mask": mask}


def eager(module: torch.nn.Module, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        return [t.numpy() for t in module(*(torch.from_numpy(a) for a in feed.values()))]


def test_torchscript_file_with_a_dynamic_sequence(repo: Path, tmp_path: Path) -> None:
    module = tiny_models.seq_pool().eval()
    path = tmp_path / "scripted.pt"
    torch.jit.script(module).save(str(path))
    result = kiln.import_model(
        path, repo, input_shapes=[(1, 6), (1, 6)], input_dtypes=["int64", "int64"], dynamic_axes=SEQ_AXES,
        output_names=["logits", "pooled"],
    )  # fmt: skip
    assert result.manifest.framework == "torchscript"
    assert [(t.name, t.shape) for t in result.spec.inputs] == [("ids", (-1, -1)), ("mask", (-1, -1))]
    assert result.spec.outputs[0].shape == (-1, -1, 3)
    assert parity_rows(result) == {(a, b) for a in ("model.onnx", "model.pt2") for b in (1, 4)}
    assert_parity_ok(result)
    for length in (2, 9):
        feed = seq_feed(3, length)
        want = eager(module, feed)
        for engine, got in run_both(repo, "scripted", feed).items():
            np.testing.assert_allclose(got["logits"], want[0], rtol=1e-4, atol=1e-5, err_msg=engine)
            np.testing.assert_allclose(got["pooled"], want[1], rtol=1e-4, atol=1e-5, err_msg=engine)


def test_a_state_dict_saved_as_pt_is_not_taken_for_torchscript(repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(tiny_models.mlp().state_dict(), path)
    with pytest.raises(kiln.KilnError, match=r"not a TorchScript archive.*--weights"):
        kiln.import_model(path, repo, input_shapes=[(1, 4)])


def test_pt2_file_keeps_its_dynamic_dims(repo: Path, tmp_path: Path) -> None:
    module = tiny_models.seq_pool().eval()
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=512)
    example = (torch.randint(0, 20, (2, 5)), torch.ones(2, 5, dtype=torch.int64))
    program = torch.export.export(module, example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    path = tmp_path / "exported.pt2"
    torch.export.save(program, str(path))
    result = kiln.import_model(path, repo, output_names=["logits", "pooled"])
    assert result.manifest.framework == "torch.export"
    assert [(t.name, t.dtype, t.shape) for t in result.spec.inputs] == [
        ("ids", "int64", (-1, -1)),
        ("mask", "int64", (-1, -1)),
    ]
    assert_parity_ok(result)
    feed = seq_feed(2, 13)
    want = eager(module, feed)
    for engine, got in run_both(repo, "exported", feed).items():
        np.testing.assert_allclose(got["logits"], want[0], rtol=1e-4, atol=1e-5, err_msg=engine)


class _Marker:
    """Unpickled, it creates a directory: what a hostile file would do with any callable it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.mkdir, (str(self.path),))


def test_a_pt2_that_needs_a_full_unpickle_is_refused_without_trust(repo: Path, tmp_path: Path) -> None:
    import zipfile

    module = tiny_models.seq_pool().eval()
    program = torch.export.export(module, (torch.randint(0, 20, (2, 5)), torch.ones(2, 5, dtype=torch.int64)))
    good = tmp_path / "good.pt2"
    torch.export.save(program, str(good))
    marker = tmp_path / "code-ran"
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(hostile, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("sample_inputs/model.pt"):  # torch.export.load unpickles it
                buffer = io.BytesIO()
                torch.save(_Marker(marker), buffer)
                data = buffer.getvalue()
            dst.writestr(item, data)
    with pytest.raises(UntrustedSourceError, match="--trust-pickle"):
        kiln.import_model(hostile, repo, name="hostile")
    assert not marker.exists()
    # An opaque constant: torch.export.load reads it with plain pickle.loads, past any torch.load guard.
    opaque = tmp_path / "opaque.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(opaque, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("_constants_config.json"):
                entry = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}
                data = json.dumps({"config": {"evil": entry}}).encode()
                dst.writestr(item.filename.rsplit("/", 1)[0] + "/opaque_obj_0", pickle.dumps(_Marker(marker)))
            dst.writestr(item, data)
    with pytest.raises(UntrustedSourceError, match="'evil' is stored as a pickled object"):
        kiln.import_model(opaque, repo, name="opaque")
    assert not marker.exists()
    assert kiln.import_model(good, repo, name="good").manifest.framework == "torch.export"  # plain tensors: fine


def test_pytorch_factory_with_dynamic_height_and_width(repo: Path) -> None:
    result = kiln.import_model(
        "tests.fixtures.tiny_models:tiny_fcn", repo, name="fcn", input_shapes=[(1, 3, 16, 12)],
        dynamic_axes={"image": {2: "height", 3: "width"}}, output_names=["features", "pooled"],
    )  # fmt: skip
    assert result.spec.inputs[0].shape == (-1, 3, -1, -1)
    assert result.spec.outputs[0].shape == (-1, 2, -1, -1)
    assert_parity_ok(result)
    module = tiny_models.tiny_fcn().eval()
    for h, w in ((8, 8), (20, 14)):
        feed = {"image": np.random.default_rng(h).standard_normal((2, 3, h, w)).astype(np.float32)}
        want = eager(module, feed)
        for engine, got in run_both(repo, "fcn", feed).items():
            assert got["features"].shape == (2, 2, (h + 1) // 2, (w + 1) // 2)
            np.testing.assert_allclose(got["features"], want[0], rtol=1e-4, atol=1e-5, err_msg=engine)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dynamic_axes": {"pixels": {2: "h"}}}, "names input 'pixels'; the inputs are \\['image'\\]"),
        ({"dynamic_axes": {"image": {4: "h"}}}, "has 4 dimensions; axis 4 does not exist"),
        ({"dynamic_axes": {"image": {1: "c"}}, "input_shapes": [(1, 1, 8, 8)]}, "example size must be at least 2"),
    ],
)
def test_bad_dynamic_axes(repo: Path, kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"input_shapes": [(1, 3, 8, 8)], **kwargs}
    with pytest.raises(InvalidSourceError, match=message):
        kiln.import_model("tests.fixtures.tiny_models:tiny_fcn", repo, **options)


def test_assets_are_copied_hashed_and_part_of_the_source(repo: Path, tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("a\nb\n")
    first = kiln.import_model(MLP_FACTORY, repo, name="m", input_shapes=[(1, 4)], assets=[vocab])
    assert (first.path / "vocab.txt").read_text() == "a\nb\n"
    assert "vocab.txt" in first.manifest.artifacts
    assert kiln.import_model(MLP_FACTORY, repo, name="m", input_shapes=[(1, 4)], assets=[vocab]).reused
    vocab.write_text("a\nb\nc\n")  # same model, new asset: a new version
    assert kiln.import_model(MLP_FACTORY, repo, name="m", input_shapes=[(1, 4)], assets=[vocab]).version == 2
    with pytest.raises(InvalidSourceError, match=r"asset .*missing\.txt does not exist"):
        kiln.import_model(MLP_FACTORY, repo, name="m", input_shapes=[(1, 4)], assets=[tmp_path / "missing.txt"])
    onnx_named = tmp_path / "model.onnx"
    onnx_named.write_text("x")
    with pytest.raises(kiln.KilnError, match=r"already holds a file named 'model\.onnx'"):
        kiln.import_model(MLP_FACTORY, repo, name="m2", input_shapes=[(1, 4)], assets=[onnx_named])


MLP_FACTORY = "tests.fixtures.tiny_models:mlp"
