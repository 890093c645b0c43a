"""The search: what it builds, rejects and chooses, its cache, and what it records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.engines.routed import BatchRoutedEngine
from kiln.errors import NoVariantWithinBudgetError
from kiln.optimize.accuracy import AccuracyFigures
from kiln.optimize.choice import crossover
from kiln.optimize.config import OptimizeConfig
from kiln.optimize.search import VariantResult, _choose, _judge
from kiln.optimize.timing import Timing
from kiln.recipe import PassStep, Recipe
from kiln.repository import Repository
from kiln.serving.manager import version_bytes
from kiln.spec import LargeBatchChoice
from tests.unit.optimize.conftest import Imported

FAST = {"min_time_s": 0.02, "warmup": 2, "compile_modes": [], "calibration_methods": ["minmax"], "batch_size": 8}


def _fig(value: float = 1.0) -> AccuracyFigures:
    return AccuracyFigures("top1", value, 1.0, 0.0, 40.0, 1.0, 10, value, value)


def _v(name: str, latency: float, recipe: Recipe, value: float = 1.0, status: str = "accepted") -> VariantResult:
    t = Timing(latency, latency, 1000 / latency, 8, 0.0, 0.0, 10, 1)
    return VariantResult(id=name, label=recipe.label(), recipe=recipe, status=status, accuracy=_fig(value), timing=t)  # type: ignore[arg-type]


ORT = Recipe(engine="onnxruntime")
ORT_INT8 = Recipe(engine="onnxruntime", int8="ort-dynamic", passes=(PassStep(name="ort-dynamic"),))
OV = Recipe(engine="openvino", passes=(PassStep(name="ov-convert"),), options={"hint": "latency"})
OV_INT8 = Recipe(engine="openvino", int8="nncf", passes=(PassStep(name="ov-convert"), PassStep(name="nncf")),
                 options={"hint": "latency"})  # fmt: skip
TORCH = Recipe(engine="torch")


def test_int8_slower_than_its_engines_fp32_is_rejected_with_the_reason() -> None:
    results = [
        _v("ort", 1.0, ORT),
        _v("ort-int8", 1.2, ORT_INT8),
        _v("ov", 2.0, OV),
        _v("ov-int8", 0.5, OV_INT8, 0.995),
    ]
    _judge(results, OptimizeConfig(), None)
    assert results[1].status == "rejected" and "slower than onnxruntime fp32" in results[1].reason
    assert results[3].status == "accepted"
    assert _choose(results, "latency") is results[3] and results[3].status == "chosen"


def test_speed_verdict_follows_the_latest_figures() -> None:
    """Judged again after a retime, an int8 variant is judged on the new figures, as a rerun would."""
    results = [_v("ort", 1.0, ORT), _v("ort-int8", 1.2, ORT_INT8)]
    _judge(results, OptimizeConfig(), None)
    assert results[1].status == "rejected"
    results[0].timing = Timing(1.5, 1.5, 1000 / 1.5, 8, 0.0, 0.0, 10, 1)  # the final round timed fp32 slower
    _judge(results, OptimizeConfig(), None)
    assert results[1].status == "accepted" and results[1].reason == ""
    assert _choose(results, "latency") is results[1]


def test_choice_ignores_rejected_variants_even_when_fastest() -> None:
    results = [_v("torch", 5.0, TORCH), _v("ort", 1.0, ORT), _v("fast-but-wrong", 0.1, ORT_INT8, 0.5, "rejected")]
    _judge(results, OptimizeConfig(), results[0])
    assert _choose(results, "latency") is results[1]
    assert results[1].speedup == pytest.approx(5.0)


def test_throughput_objective_chooses_by_items_per_second() -> None:
    a, b = _v("a", 1.0, ORT), _v("b", 2.0, TORCH)
    b.timing = Timing(2.0, 2.0, 5000.0, 8, 0.0, 0.0, 10, 1)
    assert _choose([a, b], "throughput") is b


def test_pareto_frontier_is_accuracy_against_speed() -> None:
    results = [_v("fast-less-accurate", 1.0, ORT_INT8, 0.97), _v("slow-accurate", 2.0, ORT, 1.0),
               _v("dominated", 3.0, TORCH, 0.98)]  # fmt: skip
    _judge(results, OptimizeConfig(), None)
    assert [r.pareto for r in results] == [True, True, False]


@pytest.mark.slow
def test_search_on_a_tiny_cnn_chooses_caches_and_records(cnn: Imported) -> None:
    result = kiln.optimize(cnn.repo, cnn.name, data=str(cnn.data), engines=["onnxruntime", "openvino", "torch"], **FAST)
    by_label = {v.label: v for v in result.variants}
    assert result.metric == "top1"
    chosen = result.chosen_variant
    assert chosen is not None and chosen.status == "chosen"
    accepted = [v for v in result.variants if v.status in ("chosen", "accepted")]
    assert all(chosen.timing.latency_ms <= v.timing.latency_ms for v in accepted)  # type: ignore[union-attr]
    for v in result.variants:
        if v.status == "rejected":
            assert v.reason.startswith(("out of budget", "int8 slower"))
    assert by_label["torch fp32"].accuracy.sqnr_db == float("inf")  # type: ignore[union-attr]
    assert {"onnxruntime int8 static-minmax + onnxslim", "openvino int8 nncf", "torch fp32 + fold-conv-bn"} <= set(
        by_label
    )
    # Evidence on disk, the choice in the spec, and kiln.load uses it by default.
    vdir = cnn.version_dir / "variants" / chosen.id
    figures = json.loads((vdir / "figures.json").read_text())
    assert figures["timing"]["latency_ms"] == chosen.timing.latency_ms  # type: ignore[union-attr]
    assert Repository(cnn.repo).spec(cnn.name).chosen_variant == chosen.id
    with kiln.load(cnn.repo, cnn.name) as predictor:
        assert predictor.variant == chosen.id
        assert predictor.predict({"x": cnn.x[:3]})["y"].shape == (3, 10)
    with kiln.load(cnn.repo, cnn.name, variant="reference") as predictor:
        assert predictor.variant == "reference"
    # Every built variant loads through kiln.load from its recipe alone, whatever its engine.
    built = [v for v in result.variants if v.status != "skipped"]
    assert {v.recipe.engine for v in built} == {"onnxruntime", "openvino", "torch"}  # type: ignore[union-attr]
    for v in built:
        with kiln.load(cnn.repo, cnn.name, variant=v.id) as predictor:
            assert predictor.engine.name == v.recipe.engine  # type: ignore[union-attr]
            assert predictor.predict({"x": cnn.x[:2]})["y"].dtype == "float32"
    # A partner for large batches (what the optimizer stores when one wins there): kiln.load runs batches
    # from its crossover on it and smaller ones on the choice, with the same answers.
    repository = Repository(cnn.repo)
    spec = repository.spec(cnn.name)
    partner = next(v for v in built if v.recipe.engine != chosen.recipe.engine)  # type: ignore[union-attr]
    repository.save_spec(spec.model_copy(update={"chosen_large": LargeBatchChoice(variant=partner.id, from_rows=4)}))
    handle = repository.variant(cnn.name)
    assert handle.id == chosen.id and handle.large is not None and handle.large.id == partner.id
    assert version_bytes(repository, handle) > version_bytes(repository, repository.variant(cnn.name, None, chosen.id))
    with (
        kiln.load(cnn.repo, cnn.name) as routed,
        kiln.load(cnn.repo, cnn.name, variant=partner.id) as large,
        kiln.load(cnn.repo, cnn.name, variant=chosen.id) as small,  # a variant asked for by id runs alone
    ):
        engine = routed.engine
        assert isinstance(engine, BatchRoutedEngine) and engine.name == chosen.recipe.engine  # type: ignore[union-attr]
        assert not isinstance(small.engine, BatchRoutedEngine)
        for rows in (1, 3, 4, 9):
            feed = {"x": cnn.x[:rows]}
            want = (large if rows >= 4 else small).predict(feed)["y"]
            np.testing.assert_array_equal(routed.predict(feed)["y"], want)
    repository.save_spec(spec)
    # A second run builds nothing and chooses the same.
    again = kiln.optimize(cnn.repo, cnn.name, data=str(cnn.data), engines=["onnxruntime", "openvino", "torch"], **FAST)
    assert again.built == 0 and again.chosen == result.chosen
    assert again.reused == sum(1 for v in again.variants if v.status != "skipped")


def test_a_narrower_rerun_keeps_the_faster_earlier_choice_unless_told_to_replace(tmp_path: Path) -> None:
    """A rerun that does not measure the earlier choice (a narrower preset, fewer engines) does not replace it
    with a slower one; ``replace`` does, and a rerun that measured the earlier choice replaces it anyway."""
    from .conftest import _import, tiny_mlp

    m = _import(tmp_path, "m", tiny_mlp(), (1, 16), "classification")
    repository = Repository(m.repo)
    first = kiln.optimize(m.repo, m.name, data=str(m.data), engines=["onnxruntime"], **FAST)
    # An earlier choice the narrower run will not measure, faster by its own figures (as a full search's
    # choice is against a quick rerun's).
    earlier = next(v for v in first.variants if v.status in ("accepted", "chosen") and v.recipe and v.recipe.passes)
    handle = repository.variant(m.name, None, earlier.id)
    figures = handle.figures()
    figures["timing"]["latency_ms"] = first.chosen_variant.timing.latency_ms / 2  # type: ignore[union-attr]
    handle.save_figures(figures)
    repository.save_spec(repository.spec(m.name).model_copy(update={"chosen_variant": earlier.id}))
    narrow = {"data": str(m.data), "engines": ["onnxruntime"], "exclude": [earlier.label], **FAST}
    kept = kiln.optimize(m.repo, m.name, **narrow)
    assert earlier.id not in {v.id for v in kept.variants} and kept.chosen != earlier.id
    assert repository.spec(m.name).chosen_variant == earlier.id
    assert any(n.startswith(f"kept the earlier choice {earlier.label}") and "--replace" in n for n in kept.notes)
    kiln.optimize(m.repo, m.name, replace=True, **narrow)
    assert repository.spec(m.name).chosen_variant == kept.chosen
    repository.save_spec(repository.spec(m.name).model_copy(update={"chosen_variant": earlier.id}))
    again = kiln.optimize(m.repo, m.name, data=str(m.data), engines=["onnxruntime"], **FAST)  # measures it
    assert repository.spec(m.name).chosen_variant == again.chosen


def test_the_large_batch_partner_takes_over_where_it_wins_from_then_on() -> None:
    sizes = [2, 4, 8, 16]
    assert crossover(sizes, [False, True, True, True]) == 4
    assert crossover(sizes, [True, False, True, True]) == 8  # a win below a loss is noise: from where it holds
    assert crossover(sizes, [True, True, True, True]) == 2
    assert crossover(sizes, [True, True, True, False]) is None  # not at the throughput batch: no partner
    assert crossover([], []) is None


@pytest.mark.slow
def test_no_variant_in_budget_is_an_accuracy_error(cnn: Imported) -> None:
    """500 dB is beyond any float32 output that differs from the reference at all, so nothing meets it
    unless it is bit-identical to the reference (infinite SQNR), as ONNX Runtime's fp32 MLP can be on
    some CPUs. Hence the CNN: its ONNX graph has the BatchNorms folded into the convolutions, so its
    fp32 rounds differently from the eager PyTorch reference on any machine."""
    with pytest.raises(NoVariantWithinBudgetError, match="not even fp32"):
        kiln.optimize(cnn.repo, cnn.name, data=str(cnn.data), engines=["onnxruntime"], int8=["ort-dynamic"],
                      metric="sqnr", min_sqnr_db=500, choose=False, **FAST)  # fmt: skip


@pytest.mark.slow
def test_out_of_budget_variants_are_shown_and_rejected(mlp: Imported) -> None:
    result = kiln.optimize(mlp.repo, mlp.name, data=str(mlp.data), engines=["onnxruntime"], metric="sqnr",
                           min_sqnr_db=60, choose=False, **FAST)  # fmt: skip
    int8 = [v for v in result.variants if v.recipe is not None and v.recipe.int8]
    assert int8 and all(v.status == "rejected" and "SQNR" in v.reason for v in int8)
    assert all(v.timing is not None and v.accuracy is not None for v in int8)  # shown with their figures
    assert result.chosen_variant is not None and result.chosen_variant.recipe.int8 is None  # type: ignore[union-attr]
    assert Repository(mlp.repo).spec(mlp.name).chosen_variant is None  # choose=False records nothing


@pytest.mark.slow
def test_without_calibration_data_static_variants_are_skipped_with_a_note(mlp: Imported) -> None:
    result = kiln.optimize(mlp.repo, mlp.name, engines=["onnxruntime", "openvino"], choose=False, **FAST)
    skipped = {v.label: v.reason for v in result.variants if v.status == "skipped"}
    assert "calibration data" in skipped["onnxruntime int8 static"]
    assert "calibration data" in skipped["openvino int8 nncf"]
    assert not any(v.recipe is not None and v.recipe.int8 in ("ort-static", "nncf") for v in result.variants)
    assert result.metric == "agreement" and any("random inputs" in n for n in result.notes)


@pytest.mark.slow
def test_a_model_with_external_weights_optimizes_and_the_version_stays_readable(tmp_path: Path) -> None:
    import onnx

    from tests.fixtures import onnx_models

    source = onnx_models.save(onnx_models.linear_model(in_features=16, out_features=8), tmp_path / "ext.onnx",
                              external=True)  # fmt: skip
    repo = tmp_path / "repo"
    imported = kiln.import_model(source, repo, name="ext")
    weights = imported.path / "model.onnx.data"
    before = weights.read_bytes()
    rng = np.random.default_rng(0)
    data = tmp_path / "ext.npz"
    np.savez(data, x=rng.standard_normal((64, 16)).astype(np.float32),
             **{"calibration/x": rng.standard_normal((32, 16)).astype(np.float32)})  # fmt: skip
    result = kiln.optimize(repo, "ext", data=str(data), engines=["onnxruntime", "openvino"], metric="sqnr",
                           min_sqnr_db=10, choose=False, **FAST)  # fmt: skip
    built = [v for v in result.variants if v.status != "skipped"]
    assert built and not [(v.label, v.reason) for v in built if v.status == "failed"]
    assert {v.recipe.int8 for v in built if v.recipe is not None} >= {"ort-dynamic", "ort-static"}
    onnx.load(str(imported.path / "model.onnx"))  # onnx refuses external data that has a second hard link
    assert weights.read_bytes() == before and weights.stat().st_nlink == 1
    for variant_data in (imported.path / "variants").glob("*/model.onnx.data"):
        assert variant_data.stat().st_nlink == 1


@pytest.mark.slow
def test_new_calibration_data_builds_new_static_variants(mlp: Imported, tmp_path: Path) -> None:
    x = np.load(mlp.data)["x"]
    rng = np.random.default_rng(5)
    runs = []
    for scale in (1.0, 50.0):  # the second calibration set has ranges fifty times wider
        data = tmp_path / f"calib-{scale:g}.npz"
        np.savez(data, x=x, labels=mlp.labels,
                 **{"calibration/x": (rng.standard_normal((64, 16)) * scale).astype(np.float32)})  # fmt: skip
        runs.append(kiln.optimize(mlp.repo, mlp.name, data=str(data), engines=["onnxruntime"],
                                  int8=["ort-static", "ort-dynamic"], choose=False, **FAST))  # fmt: skip
    static = [next(v for v in r.variants if v.recipe is not None and v.recipe.int8 == "ort-static") for r in runs]
    dynamic = [next(v for v in r.variants if v.recipe is not None and v.recipe.int8 == "ort-dynamic") for r in runs]
    assert static[0].id != static[1].id and static[1].built  # calibrated anew, not the old ranges reused
    assert dynamic[0].id == dynamic[1].id and not dynamic[1].built  # nothing calibrated: the cache holds


@pytest.mark.slow
def test_figures_from_another_machine_are_measured_again(mlp: Imported, monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.hardware

    options = {"data": str(mlp.data), "engines": ["onnxruntime"], "int8": ["ort-dynamic"], "choose": False, **FAST}
    kiln.optimize(mlp.repo, mlp.name, **options)
    same = kiln.optimize(mlp.repo, mlp.name, **options)
    assert same.built == 0 and not any(v.fresh for v in same.variants)
    real = kiln.hardware.machine_fingerprint
    monkeypatch.setattr(kiln.hardware, "machine_fingerprint", lambda *libs: "another-" + real(*libs))
    moved = kiln.optimize(mlp.repo, mlp.name, **options)  # the repository copied to another machine
    timed = [v for v in moved.variants if v.timing is not None]
    assert timed and all(v.fresh for v in timed)
    rebuilt = {v.label for v in moved.variants if v.built}
    assert rebuilt == {"onnxruntime fp32 + onnxslim+ort-optimize"}  # tuned for the CPU it was built on
