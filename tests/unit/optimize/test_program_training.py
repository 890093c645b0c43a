"""Fine-tuning models that have no factory: a ``.pt2`` file, a TorchScript archive, a Keras model on the torch
backend. The passes rebuild them from their ``model.pt2`` program with its calls lifted into layers
(``kiln.optimize.program_layers``): the layers and names that gives, weights that train, pruning and
distillation of a ``.pt2`` import, QAT of TorchScript and Keras imports, and what pruning leaves alone."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import kiln
from kiln.errors import PassNotApplicable
from kiln.optimize.data import Samples
from kiln.optimize.passes.base import PassContext, run_passes
from kiln.optimize.program_layers import fixed_width_layers, program_module
from kiln.optimize.training import check_trainable, load_module
from kiln.recipe import PassStep
from kiln.repository import Repository
from tests.fixtures import compress_models, tiny_models


@dataclass
class Imported:
    source: str
    version_dir: Path
    spec: Any
    name: str  # the input's name

    def program(self) -> Any:
        return torch.export.load(str(self.version_dir / "model.pt2"))


def _import(path: Path, repo: Path, **config: Any) -> Imported:
    result = kiln.import_model(str(path), repo, name=path.stem, **config)
    return Imported(result.manifest.source, result.path, result.spec, result.spec.inputs[0].name)


def _pt2(module: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(module.eval(), (torch.randn(2, *shape[1:]),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def _torchscript(module: torch.nn.Module, shape: tuple[int, ...], path: Path) -> Path:
    torch.jit.save(torch.jit.trace(module.eval(), torch.randn(*shape)), str(path))
    return path


def _keras_cnn(path: Path) -> Path:
    from kiln.convert.from_keras import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])  # fmt: skip
    bn = model.layers[1]
    rng = np.random.default_rng(0)
    gamma, beta, mean, var = (w.shape for w in bn.get_weights())
    bn.set_weights([rng.uniform(0.5, 1.5, gamma), rng.uniform(-0.2, 0.2, beta), rng.uniform(-0.3, 0.3, mean),
                    rng.uniform(0.5, 2.0, var)])  # fmt: skip
    model.save(str(path))
    return path


def _outputs(module: Any, x: np.ndarray) -> np.ndarray:
    from kiln.convert.from_pytorch import flatten_outputs

    with torch.no_grad():
        return flatten_outputs(module(torch.from_numpy(x)))[0][0].numpy()


def _labelled(model: Imported, n: int, seed: int) -> Samples:
    shape = [n, *(d for d in model.spec.inputs[0].shape[1:])]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return Samples({model.name: x}, _outputs(program_module(model.program()), x).argmax(axis=1))


def _context(model: Imported, work: Path, **fields: Any) -> PassContext:
    work.mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "model.pt2"):
        shutil.copy(model.version_dir / name, work / name)
    calibration = fields.pop("calibration", None)
    return PassContext(work, model.spec, calibration, source=model.source, version_dir=model.version_dir, **fields)


def _ort(work: Path, name: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(work / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {name: x})[0]


@pytest.fixture(scope="module")
def pt2_cnn(tmp_path_factory: pytest.TempPathFactory) -> Imported:
    tmp = tmp_path_factory.mktemp("pt2")
    return _import(_pt2(compress_models.cnn(), (1, 1, 8, 8), tmp / "cnn.pt2"), tmp / "repo", task="classification")


def test_a_program_becomes_layers_under_its_own_names(pt2_cnn: Imported) -> None:
    program = pt2_cnn.program()
    module = program_module(program)
    kinds = {n: type(m).__name__ for n, m in module.named_modules() if n[:1].isdigit()}
    assert kinds == {"0": "Conv2d", "1": "BatchNorm", "3": "Conv2d", "4": "BatchNorm", "8": "Linear"}
    assert isinstance(module.get_submodule("1"), torch.nn.modules.batchnorm._BatchNorm)
    assert set(module.state_dict()) == set(program.state_dict)  # the same names: the program's weights load as is
    assert not module.training
    x = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_outputs(module, x), _outputs(program.module(), x), rtol=1e-6, atol=1e-6)
    module.train()  # ep.module() refuses train(); a fine-tune needs it
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trained == {k for k in program.state_dict if not k.endswith(("running_mean", "running_var", "tracked"))}


def test_torchscript_weights_stored_as_buffers_become_parameters(tmp_path: Path) -> None:
    path = _torchscript(compress_models.cnn(), (1, 1, 8, 8), tmp_path / "cnn.pt")
    model = _import(path, tmp_path / "repo", input_shapes=[(1, 1, 8, 8)])
    program = model.program()
    assert not program.graph_signature.parameters  # TS2EPConverter keeps every weight as a buffer
    module = program_module(program)
    assert {n for n, _ in module.named_parameters()} >= {"0.weight", "0.bias", "3.weight", "8.weight", "8.bias"}
    assert {n for n, _ in module.named_buffers()} >= {"1.running_mean", "1.running_var"}
    x = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_outputs(module, x), _outputs(program.module(), x), rtol=1e-6, atol=1e-6)


def test_prune_and_distill_a_pt2_import(pt2_cnn: Imported, tmp_path: Path) -> None:
    train, validation = _labelled(pt2_cnn, 768, seed=1), _labelled(pt2_cnn, 256, seed=2)
    ctx = _context(pt2_cnn, tmp_path / "work", train=train, validation=validation)
    prune, distill = run_passes([PassStep(name="prune-structured", params={"ratio": 0.5}),
                                 PassStep(name="distill", params={"budget_s": 3.0})], ctx)  # fmt: skip
    assert prune.details["widths"] == {"0": [16, 8], "3": [32, 16]} and prune.details["kept"] == ["8"]
    assert distill.details["metric"] == "top-1" and distill.details["best"] > distill.details["before"] + 0.05
    module = load_module(pt2_cnn.source, pt2_cnn.version_dir, ctx.work)  # the program, resized, distilled
    assert module.get_submodule("0").out_channels == 8 and module.get_submodule("8").in_features == 16 * 4 * 4
    x = validation.inputs[pt2_cnn.name]
    logits = _ort(ctx.work, pt2_cnn.name, x)
    np.testing.assert_allclose(logits, _outputs(module, x), rtol=1e-4, atol=1e-4)
    assert (logits.argmax(axis=1) == validation.labels).mean() == pytest.approx(distill.details["best"])


def test_prune_keeps_the_widths_a_program_spells_out_in_its_shapes(tmp_path: Path) -> None:
    # The encoder's attention reshapes to (batch, tokens, heads, head size): in the program those are
    # literals, so the q/k/v projections keep their widths; the FFN's hidden units still go.
    model = _import(_pt2(compress_models.encoder(), (1, 6, 32), tmp_path / "enc.pt2"), tmp_path / "repo")
    module = program_module(model.program())
    names = {m: n for n, m in module.named_modules()}
    assert {names[m] for m in fixed_width_layers(module)} == {"attention.query", "attention.key", "attention.value"}
    assert fixed_width_layers(compress_models.encoder()) == []  # a factory's module keeps its own attributes
    ctx = _context(model, tmp_path / "work")
    [report] = run_passes([PassStep(name="prune-structured", params={"ratio": 0.5})], ctx)
    assert report.details["widths"] == {"ffn.0": [64, 32]}
    x = np.random.default_rng(3).standard_normal((3, 6, 32)).astype(np.float32)
    pruned = load_module(model.source, model.version_dir, ctx.work)
    np.testing.assert_allclose(_ort(ctx.work, model.name, x), _outputs(pruned, x), rtol=1e-4, atol=1e-5)


def _qat(model: Imported, work: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """QAT to both exports on the model's own labels; (report, fp32 and QDQ ONNX top-1 on held-out data)."""
    train, validation = _labelled(model, 512, seed=4), _labelled(model, 256, seed=5)
    calibration = [{model.name: validation.inputs[model.name][i * 16 : (i + 1) * 16]} for i in range(4)]
    ctx = _context(model, work, calibration=calibration, train=train, validation=validation, train_budget_s=3.0)
    [report] = run_passes(
        [PassStep(name="qat-int8", params={"epochs": 2, "exports": ["openvino-ir", "onnx-qdq"]})], ctx
    )
    x = validation.inputs[model.name]
    return report, validation.labels, _ort(work, model.name, x).argmax(axis=1)


def test_qat_fine_tunes_a_torchscript_import(tmp_path: Path) -> None:
    path = _torchscript(tiny_models.qat_cnn(), (1, 1, 8, 8), tmp_path / "qat.pt")
    model = _import(path, tmp_path / "repo", input_shapes=[(1, 1, 8, 8)], task="classification")
    report, labels, predicted = _qat(model, tmp_path / "w")
    assert report.details["fake_quantize"] >= 2 and report.details["quantize_linear"] >= 2
    assert report.details["steps"] > 0
    assert (predicted == labels).mean() >= 0.9


def test_qat_fine_tunes_a_keras_import(tmp_path: Path) -> None:
    model = _import(_keras_cnn(tmp_path / "cnn.keras"), tmp_path / "repo", task="classification")
    module = program_module(model.program())
    # Keras keeps its kernels in its own layout and reads them as constants: lifted, in torch's layout
    kinds = sorted(type(m).__name__ for n, m in module.named_modules() if n.startswith("lifted."))
    assert kinds == ["Conv2d", "Linear"]
    trained = {tuple(p.shape) for p in module.parameters()}
    assert {(16, 1, 3, 3), (10, 16)} <= trained  # the conv and dense kernels train ...
    statistics = [p for p in module.parameters() if p.shape == (16,)]
    assert len(statistics) == 3  # ... with the conv bias and the BatchNorm's gamma and beta, not its mean/variance
    x = np.random.default_rng(6).standard_normal((3, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(_outputs(module, x), _outputs(model.program().module(), x), rtol=1e-5, atol=1e-5)
    report, labels, predicted = _qat(model, tmp_path / "w")
    assert report.details["fake_quantize"] >= 2 and report.details["quantize_linear"] >= 2
    assert (predicted == labels).mean() >= 0.85


def test_only_models_with_pytorch_code_or_a_program_can_be_fine_tuned(pt2_cnn: Imported, tmp_path: Path) -> None:
    check_trainable(pt2_cnn.source, pt2_cnn.version_dir)
    check_trainable("tests.fixtures.compress_models:cnn", None)
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    with pytest.raises(PassNotApplicable, match=r"imported from '/m/linear.onnx', which left no model.pt2"):
        check_trainable("/m/linear.onnx", onnx_dir)
    assert Repository(pt2_cnn.version_dir.parent.parent).manifest("cnn", 1).framework == "torch.export"
