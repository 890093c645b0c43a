"""prune-structured and distill on tiny models imported from factories (tests/fixtures/compress_models.py):
the widths after pruning, the layers kept, parity of the saved artifacts with the module, recovery by
distillation within its budget, and the cases where the passes do not apply."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import PassNotApplicable
from kiln.optimize.data import Samples
from kiln.optimize.passes.base import PassContext, run_passes
from kiln.optimize.training import load_module
from kiln.recipe import NO_TRAINING

FACTORIES = "tests.fixtures.compress_models"


@dataclass
class Step:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Imported:
    source: str
    version_dir: Path
    spec: Any


def _import(tmp: Path, name: str, shape: tuple[int, ...], task: str, outputs: list[str] | None = None) -> Imported:
    source = f"{FACTORIES}:{name}"
    result = kiln.import_model(source, tmp / "repo", name=name, input_shapes=[shape], input_names=["x"],
                               output_names=outputs or ["y"], task=task)  # fmt: skip
    return Imported(source, result.path, result.spec)


def _context(model: Imported, work: Path, train: Samples | None = None, validation: Samples | None = None,
             progress: Any = None) -> PassContext:  # fmt: skip
    """A staging directory holding copies of the version's artifacts, as the search hands a pass."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "model.pt2"):
        shutil.copy(model.version_dir / name, work / name)
    return PassContext(work, model.spec, source=model.source, version_dir=model.version_dir, train=train,
                       validation=validation, progress=progress or (lambda text: None))  # fmt: skip


def _labelled(model: Imported, n: int, seed: int) -> Samples:
    """Random inputs labelled with the original model's predictions (so it scores 100 % top-1)."""
    shape = [d if d > 0 else n for d in model.spec.inputs[0].shape]
    shape[0] = n
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        labels = load_module(model.source, model.version_dir)(torch.from_numpy(x)).argmax(dim=1).numpy()
    return Samples({"x": x}, labels)


def _ort(work: Path, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _torch_outputs(module: Any, x: np.ndarray) -> list[np.ndarray]:
    from kiln.convert.from_pytorch import flatten_outputs

    with torch.no_grad():
        return [o.numpy() for o in flatten_outputs(module(torch.from_numpy(x)))[0]]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    return _import(tmp_path_factory.mktemp("cnn"), "cnn", (1, 1, 8, 8), "classification")


@pytest.fixture(scope="module")
def pruned_cnn(cnn: Imported, tmp_path_factory: pytest.TempPathFactory) -> tuple[PassContext, Any]:
    ctx = _context(cnn, tmp_path_factory.mktemp("pruned") / "work")
    report = run_passes([Step("prune-structured", {"ratio": 0.5, "round_to": 8})], ctx)[0]
    return ctx, report


def test_prune_halves_the_channels_and_keeps_the_classifier(cnn: Imported, pruned_cnn: tuple[PassContext, Any]) -> None:
    ctx, report = pruned_cnn
    module = load_module(cnn.source, cnn.version_dir, ctx.work)
    assert (module[0].out_channels, module[1].num_features, module[3].out_channels) == (8, 8, 16)
    assert (module[8].in_features, module[8].out_features) == (16 * 4 * 4, 10)  # the output layer keeps its width
    assert report.details["widths"] == {"0": [16, 8], "3": [32, 16]}
    assert report.details["kept"] == ["8"]
    assert report.details["params_after"] < report.details["params_before"] / 2
    assert report.details["macs_after"] < report.details["macs_before"] / 2
    assert report.nodes_after == report.nodes_before


def test_pruned_artifacts_compute_the_pruned_module(cnn: Imported, pruned_cnn: tuple[PassContext, Any]) -> None:
    ctx, _ = pruned_cnn
    x = np.random.default_rng(7).standard_normal((5, 1, 8, 8)).astype(np.float32)
    expected = _torch_outputs(load_module(cnn.source, cnn.version_dir, ctx.work), x)
    np.testing.assert_allclose(_ort(ctx.work, x)[0], expected[0], rtol=1e-4, atol=1e-5)
    program = torch.export.load(str(ctx.work / "model.pt2")).module()
    np.testing.assert_allclose(_torch_outputs(program, x)[0], expected[0], rtol=1e-5, atol=1e-6)
    original = _torch_outputs(load_module(cnn.source, cnn.version_dir), x)[0]
    assert expected[0].shape == original.shape and not np.allclose(expected[0], original, atol=1e-3)


def test_prune_keeps_the_layers_named_in_keep(cnn: Imported, tmp_path: Path) -> None:
    ctx = _context(cnn, tmp_path / "work")
    report = run_passes([Step("prune-structured", {"ratio": 0.5, "keep": ["0"]})], ctx)[0]
    assert report.details["widths"] == {"3": [32, 16]}
    with pytest.raises(ValueError, match="no such module"):
        run_passes([Step("prune-structured", {"ratio": 0.5, "keep": ["conv9"]})], _context(cnn, tmp_path / "w2"))


def test_prune_rounds_widths_to_the_nearest_multiple(cnn: Imported, tmp_path: Path) -> None:
    ctx = _context(cnn, tmp_path / "work")
    report = run_passes([Step("prune-structured", {"ratio": 0.5, "round_to": 16})], ctx)[0]
    assert report.details["widths"] == {"3": [32, 16]}  # 16 channels keep 8 -> 16, the nearest (and least) multiple


def test_prune_keeps_every_layer_that_produces_a_detector_output(tmp_path: Path) -> None:
    det = _import(tmp_path, "detector", (1, 3, 32, 32), "detection", outputs=["scores", "boxes"])
    ctx = _context(det, tmp_path / "work")
    report = run_passes([Step("prune-structured", {"ratio": 0.5})], ctx)[0]
    assert report.details["widths"] == {"backbone.0": [16, 8], "backbone.3": [32, 16], "stem.0": [32, 16]}
    assert report.details["kept"] == ["cls", "reg"]
    module = load_module(det.source, det.version_dir, ctx.work)
    assert (module.cls.in_channels, module.cls.out_channels, module.reg.out_channels) == (16, 3, 4)
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for got, want in zip(_ort(ctx.work, x), _torch_outputs(module, x), strict=True):
        assert got.shape == want.shape == ((2, 64, 3) if got.shape[-1] == 3 else (2, 64, 4))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_prune_removes_whole_attention_heads_and_ffn_units(tmp_path: Path) -> None:
    enc = _import(tmp_path, "encoder", (1, 6, 32), "embedding")
    ctx = _context(enc, tmp_path / "work")
    report = run_passes([Step("prune-structured", {"ratio": 0.5})], ctx)[0]
    assert report.details["heads"] == {"attention.query": [4, 2]}
    assert report.details["widths"] == {
        "attention.query": [32, 16], "attention.key": [32, 16], "attention.value": [32, 16], "ffn.0": [64, 32],
    }  # fmt: skip
    module = load_module(enc.source, enc.version_dir, ctx.work)
    assert module.attention.output.out_features == 32  # the hidden size reaches the output: kept
    x = np.random.default_rng(2).standard_normal((3, 6, 32)).astype(np.float32)
    np.testing.assert_allclose(_ort(ctx.work, x)[0], _torch_outputs(module, x)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("compiled_engine_loaded", [False, True])
def test_prune_leaves_torch_multihead_attention_alone(tmp_path: Path, compiled_engine_loaded: bool) -> None:
    # A compiled engine switches dynamo's process-wide backed_size_oblivious on (configure_compile); the
    # re-export after pruning must still keep the batch dynamic (it once fixed it at 1 for nn.MultiheadAttention).
    import torch.fx.experimental._config as fx_config

    with fx_config.patch(backed_size_oblivious=compiled_engine_loaded):
        enc = _import(tmp_path, "torch_encoder", (1, 6, 32), "embedding")
        ctx = _context(enc, tmp_path / "work")
        report = run_passes([Step("prune-structured", {"ratio": 0.5})], ctx)[0]
    assert report.details["widths"] == {"ffn.0": [64, 32]}
    assert "attention" in report.details["kept"]


def test_prune_that_removes_nothing_does_not_apply(tmp_path: Path) -> None:
    ctx = _context(_import(tmp_path, "narrow", (1, 1, 8, 8), "classification"), tmp_path / "work")
    with pytest.raises(PassNotApplicable, match="removes none"):
        run_passes([Step("prune-structured", {"ratio": 0.5, "round_to": 8})], ctx)
    assert not (ctx.work / "module.safetensors").exists()


def test_distill_recovers_agreement_with_the_teacher_within_its_budget(cnn: Imported, tmp_path: Path) -> None:
    train, validation = _labelled(cnn, 768, seed=1), _labelled(cnn, 256, seed=2)
    shown: list[str] = []
    ctx = _context(cnn, tmp_path / "work", train, validation, progress=shown.append)
    _, distill = run_passes([Step("prune-structured", {"ratio": 0.5}), Step("distill", {"budget_s": 3.0})], ctx)
    pruned_top1 = distill.details["before"]
    assert distill.details["metric"] == "top-1" and distill.details["loss"] == "kl"
    assert distill.details["best"] > pruned_top1 + 0.05
    assert distill.details["seconds"] <= 3.0 + 0.5
    assert distill.details["stopped_by"] in ("budget", "early-stop", "epochs") and distill.details["steps"] > 0
    assert shown[0].startswith("distill 0/") and "top-1" in shown[-1] and "loss" in shown[-1]
    module = load_module(cnn.source, cnn.version_dir, ctx.work)  # the distilled weights, at the pruned widths
    assert module[0].out_channels == 8
    logits = _ort(ctx.work, validation.inputs["x"])[0]
    np.testing.assert_allclose(logits, _torch_outputs(module, validation.inputs["x"])[0], rtol=1e-4, atol=1e-4)
    assert (logits.argmax(axis=1) == validation.labels).mean() == pytest.approx(distill.details["best"])


def test_distill_matches_a_detectors_raw_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.optimize.passes import compress

    monkeypatch.setattr(compress, "_TEACHER_CACHE_BYTES", 0)  # the teacher runs beside the student, batch by batch
    det = _import(tmp_path, "detector", (1, 3, 32, 32), "detection", outputs=["scores", "boxes"])
    rng = np.random.default_rng(0)
    train = Samples({"x": rng.standard_normal((256, 3, 32, 32)).astype(np.float32)}, np.zeros((256, 2, 5), np.float32))
    validation = Samples({"x": rng.standard_normal((64, 3, 32, 32)).astype(np.float32)})
    ctx = _context(det, tmp_path / "work", train, validation)
    _, distill = run_passes([Step("prune-structured", {"ratio": 0.5}), Step("distill", {"budget_s": 2.0})], ctx)
    assert distill.details["metric"] == "validation loss" and distill.details["loss"] == "mse"
    assert distill.details["best"] < distill.details["before"]


def test_distill_needs_training_data_and_a_changed_model(cnn: Imported, tmp_path: Path) -> None:
    with pytest.raises(PassNotApplicable, match="needs training data") as info:
        run_passes([Step("distill", {"budget_s": 1.0})], _context(cnn, tmp_path / "a"))
    assert str(info.value) == NO_TRAINING
    with pytest.raises(PassNotApplicable, match="prune it first"):
        run_passes([Step("distill", {"budget_s": 1.0})], _context(cnn, tmp_path / "b", train=_labelled(cnn, 8, 0)))


def test_onnx_only_models_cannot_be_pruned_or_distilled(tmp_path: Path) -> None:
    from tests.fixtures import onnx_models

    path = onnx_models.save(onnx_models.linear_model(in_features=16, out_features=8), tmp_path / "linear.onnx")
    result = kiln.import_model(str(path), tmp_path / "repo", name="linear")
    model = Imported(result.manifest.source, result.path, result.spec)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(result.path / "model.onnx", work / "model.onnx")
    ctx = PassContext(work, model.spec, source=model.source, version_dir=model.version_dir,
                      train=Samples({"x": np.zeros((4, 16), np.float32)}))  # fmt: skip
    for step in (Step("prune-structured", {"ratio": 0.5}), Step("distill", {"budget_s": 1.0})):
        with pytest.raises(PassNotApplicable, match="needs the model's PyTorch code"):
            run_passes([step], ctx)
