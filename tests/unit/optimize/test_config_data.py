"""OptimizeConfig presets and validation; validation/calibration data from .npz and callables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.errors import DataError, SpecError
from kiln.optimize.config import PRESETS, OptimizeConfig
from kiln.optimize.data import load_split
from kiln.recipe import PassStep, Recipe
from kiln.spec import ModelSpec, TensorSpec

SPEC = ModelSpec(name="m", task="classification", inputs=[TensorSpec(name="x", dtype="float32", shape=(-1, 4))],
                 outputs=[TensorSpec(name="y", dtype="float32", shape=(-1, 3))])  # fmt: skip


def test_preset_fills_defaults_and_explicit_fields_win() -> None:
    quick = OptimizeConfig(preset="quick")
    assert quick.compile_modes == [] and quick.calibration_methods == ["minmax"]
    assert OptimizeConfig(preset="quick", compile_modes=["default"]).compile_modes == ["default"]
    assert OptimizeConfig(preset="cpu-throughput").objective == "throughput"
    assert set(PRESETS) >= {"cpu-latency", "cpu-throughput", "quick", "thorough"}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"preset": "fastest"}, "unknown preset"), ({"objective": "energy"}, "objective"),
     ({"metric": "max-abs"}, "max_abs_error"), ({"engines": []}, "engines"), ({"max_drop": 2}, "max_drop")],
)  # fmt: skip
def test_bad_options_raise_spec_errors(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(SpecError, match=match):
        OptimizeConfig.build(**overrides)


def test_variant_id_derives_from_recipe_and_source() -> None:
    a = Recipe(
        engine="onnxruntime", int8="ort-static", passes=(PassStep(name="ort-static", params={"method": "minmax"}),)
    )
    b = Recipe(
        engine="onnxruntime", int8="ort-static", passes=(PassStep(name="ort-static", params={"method": "entropy"}),)
    )
    assert a.variant_id("s1") == Recipe.model_validate(a.model_dump()).variant_id("s1")
    assert len({a.variant_id("s1"), a.variant_id("s2"), b.variant_id("s1")}) == 3
    assert a.variant_id("s1").startswith("ort-int8-static-minmax-")
    hints = [
        Recipe(engine="openvino", passes=(PassStep(name="ov-convert"),), options={"hint": h})
        for h in ("latency", "throughput")
    ]
    assert hints[0].artifact_key("s") == hints[1].artifact_key("s")  # same files, other run options
    assert hints[0].variant_id("s") != hints[1].variant_id("s")


def test_npz_with_separate_calibration(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    x, calib = np.ones((10, 4), np.float64), np.zeros((6, 4), np.float32)
    np.savez(path, x=x, labels=np.arange(10), **{"calibration/x": calib})
    split = load_split(SPEC, str(path), "src", calibration_samples=4, validation_samples=8)
    assert len(split.validation) == 8 and split.validation.inputs["x"].dtype == np.float32
    assert split.calibration is not None and len(split.calibration) == 4
    assert split.validation.labels is not None and list(split.validation.labels) == list(range(8))


def test_npz_without_calibration_is_split_disjointly_or_said(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.arange(40, dtype=np.float32).reshape(10, 4))
    split = load_split(SPEC, str(path), "src", calibration_samples=4, validation_samples=100)
    assert split.calibration is not None and len(split.calibration) == 4 and len(split.validation) == 6
    small = load_split(SPEC, str(path), "src", calibration_samples=8, validation_samples=100)
    assert any("calibration uses" in n for n in small.notes)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [({"z": np.ones((2, 4))}, "needs inputs"), ({"x": np.ones((2, 5))}, "shape"),
     ({"x": np.array([["a"] * 4] * 2)}, "float32"), ({"x": np.ones((2, 4)), "labels": np.ones(3)}, "labels")],
)  # fmt: skip
def test_npz_errors_name_the_problem(tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match):
        load_split(SPEC, str(path), "src", calibration_samples=1, validation_samples=10)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="unpickling"):
        load_split(SPEC, str(path), "src", calibration_samples=1, validation_samples=10)


def make_data() -> tuple[np.ndarray, np.ndarray]:
    return np.ones((6, 4), np.float32), np.zeros(6, np.int64)


def test_callable_returning_inputs_and_labels() -> None:
    split = load_split(SPEC, "tests.unit.optimize.test_config_data:make_data", "src", 2, 100)
    assert len(split.validation) == 4 and split.validation.labels is not None
    with pytest.raises(DataError, match="no attribute"):
        load_split(SPEC, "tests.unit.optimize.test_config_data:nothing", "src", 2, 100)


def test_without_data_random_inputs_and_a_note() -> None:
    split = load_split(SPEC, None, "src", 2, 100)
    assert split.calibration is None and split.source == "random inputs"
    assert any("static int8" in n for n in split.notes)
