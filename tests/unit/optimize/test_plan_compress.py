"""What the planner makes of compression: every engine's recipes again after prune → distill, QAT on
OpenVINO and ONNX Runtime from one shared fine-tune, a model imported from memory fine-tuned from its
program, and without training data a reason in the not-built list instead."""

from __future__ import annotations

from pathlib import Path

import pytest

import kiln
from kiln.hardware import detect
from kiln.optimize.config import OptimizeConfig
from kiln.optimize.plan import enumerate_variants
from kiln.recipe import NO_TRAINING, compression_prefix, stage_key
from tests.fixtures import compress_models
from tests.unit.optimize.conftest import Imported, _import

CPU = detect().device("cpu")


def test_with_training_data_every_engine_is_tried_again_pruned_and_distilled(cnn: Imported) -> None:
    config = OptimizeConfig(prune=[0.5, 0.25], qat=True, engines=["onnxruntime", "openvino"], train_budget_s=30)
    plain, _ = enumerate_variants(OptimizeConfig(engines=["onnxruntime", "openvino"]), cnn.version_dir, CPU, "c")
    recipes, skipped = enumerate_variants(config, cnn.version_dir, CPU, "c", train="t0", untrainable=None)
    pruned = [r for r in recipes if compression_prefix(r.passes)]
    by_ratio = {ratio: [r for r in pruned if r.passes[0].params["ratio"] == ratio] for ratio in (0.25, 0.5)}
    qat = [r for r in recipes if r.int8 == "nncf-qat" and not compression_prefix(r.passes)]
    assert len(by_ratio[0.5]) == len(by_ratio[0.25]) == len(plain) + len(qat)  # each recipe once more per ratio
    for r in pruned:
        prune, distill = r.passes[:2]
        assert (prune.name, prune.params["round_to"]) == ("prune-structured", 8)
        assert (distill.name, distill.params) == ("distill", {"budget_s": 30, "train": "t0"})
        assert "+ prune" in r.label() and "distill" in r.label()
        assert not r.is_reference  # a pruned model is judged on its own, never the fp32 int8 is held to
    assert {r.label() for r in qat} == {"openvino int8 qat", "onnxruntime int8 qat"}
    assert qat[0].passes[0].params["train"] == "t0" and qat[0].passes[0].params["calibration"] == "c"
    assert len({r.artifact_key("h") for r in qat}) == 1  # one fine-tune writes what both engines run
    assert qat[0].passes[0].params["exports"] == ["openvino-ir", "onnx-qdq"]
    assert not any("pruned" in s.label for s in skipped)
    # one stage per prefix: the two ratios build apart, every engine after one ratio shares its build
    keys = {stage_key("h", compression_prefix(r.passes)) for r in pruned}
    assert len(keys) == 2


def test_without_training_data_compression_is_skipped_with_the_reason(cnn: Imported) -> None:
    config = OptimizeConfig(prune=[0.5], qat=True, engines=["onnxruntime", "openvino"])
    recipes, skipped = enumerate_variants(config, cnn.version_dir, CPU, "c", train=None, untrainable=None)
    assert not any(compression_prefix(r.passes) or r.int8 == "nncf-qat" for r in recipes)
    assert {s.label: s.reason for s in skipped}["pruned and QAT variants"] == NO_TRAINING


def test_a_model_imported_from_memory_is_pruned_from_its_program(tmp_path_factory: pytest.TempPathFactory) -> None:
    # No factory to rebuild it from: the passes rebuild the module from its model.pt2 program instead.
    cnn = _import(tmp_path_factory.mktemp("memory"), "wide", compress_models.cnn(), (1, 1, 8, 8), "classification")
    result = kiln.optimize(
        cnn.repo, cnn.name, prune=[0.5], engines=["onnxruntime"], int8=[], graph_passes=False, choose=False,
        data=str(cnn.data), train_data=str(cnn.data), train_budget_s=2.0, min_time_s=0.02, warmup=2, finalists=0,
    )  # fmt: skip
    pruned = [v for v in result.variants if v.recipe is not None and compression_prefix(v.recipe.passes)]
    assert pruned and all(v.status != "skipped" and v.status != "failed" for v in pruned), [
        (v.label, v.status, v.reason) for v in pruned
    ]
    assert {p.name for p in pruned[0].recipe.passes} >= {"prune-structured", "distill"}


def test_pruning_ratios_are_checked() -> None:
    import pytest

    from kiln.errors import SpecError

    with pytest.raises(SpecError, match="between 0 and 1"):
        OptimizeConfig.build(prune=[1.5])
    assert OptimizeConfig.build(preset="compress").prune == [0.5]


def test_the_search_builds_prune_distill_int8_and_qat_once_and_a_rerun_builds_nothing(tmp_path: Path) -> None:
    """End to end on a factory import: pruned (and int8 after pruning) and QAT variants are built, checked and
    timed beside the others, smaller by their figures, the pruned model built once for every engine after it;
    a second run reuses everything."""
    import numpy as np
    import torch

    from tests.fixtures import compress_models

    repo = tmp_path / "repo"
    kiln.import_model("tests.fixtures.compress_models:cnn", repo, name="c", input_shapes=[(1, 1, 8, 8)],
                      input_names=["x"], output_names=["y"], task="classification")  # fmt: skip
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        y = compress_models.cnn()(torch.from_numpy(x)).numpy().argmax(axis=1)
    np.savez(tmp_path / "val.npz", x=x[:200], labels=y[:200], **{"calibration/x": x[200:264]})
    np.savez(tmp_path / "train.npz", x=x[200:], labels=y[200:])
    options = {
        "data": str(tmp_path / "val.npz"), "train_data": str(tmp_path / "train.npz"), "prune": [0.5], "qat": True,
        "train_budget_s": 2.0, "engines": ["onnxruntime", "openvino"], "int8": ["ort-static"], "max_drop": 1.0,
        "calibration_methods": ["minmax"], "graph_passes": False, "min_time_s": 0.02, "warmup": 2, "finalists": 0,
        "choose": False, "batch_size": 8,
    }  # fmt: skip
    first = kiln.optimize(repo, "c", **options)
    pruned = [v for v in first.variants if v.recipe is not None and compression_prefix(v.recipe.passes)]
    qat = [v for v in first.variants if v.recipe is not None and v.recipe.int8 == "nncf-qat"]
    assert {v.recipe.engine for v in pruned} == {"onnxruntime", "openvino"}
    assert sorted((v.recipe.engine, bool(compression_prefix(v.recipe.passes))) for v in qat) == [
        ("onnxruntime", False), ("onnxruntime", True), ("openvino", False), ("openvino", True)]  # fmt: skip
    measured = [v for v in [*pruned, *qat] if v.accuracy is not None and v.timing is not None]
    assert len(measured) == len(pruned) + len(qat), [(v.label, v.reason) for v in [*pruned, *qat]]
    reference = next(v for v in first.variants if v.recipe is not None and v.recipe.is_reference
                     and v.recipe.engine == "onnxruntime")  # fmt: skip
    for v in pruned:
        assert v.size is not None and reference.size is not None and v.size.params < 0.5 * reference.size.params
    for alone in (False, True):  # the ONNX Runtime and OpenVINO QAT variants share one fine-tune's files
        ort_qat, ov_qat = sorted((v for v in qat if bool(compression_prefix(v.recipe.passes)) == alone),
                                 key=lambda v: v.recipe.engine)  # fmt: skip
        files = repo / "c" / "1" / "variants"
        assert (files / ort_qat.id / "model.onnx").samefile(files / ov_qat.id / "model.onnx")
        assert (files / ov_qat.id / "model.xml").is_file() and ort_qat.size is not None and ov_qat.size is not None
        assert ort_qat.size.file_bytes == (files / ort_qat.id / "model.onnx").stat().st_size  # its own file only
    stages = list((repo / "c" / "1" / "variants").glob(".stage-*"))
    assert len(stages) == 1  # one prune+distill build served every engine and int8 kind after it
    again = kiln.optimize(repo, "c", **options)
    assert again.built == 0 and not any(v.fresh for v in again.variants)
    assert {v.id for v in again.variants} == {v.id for v in first.variants}
