"""Example shapes for dynamic dims besides batch: the candidates kiln derives from names and the graph, the
trials, and what the spec stores and random inputs (bench, optimize without data) read (issue 16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.convert import example_shapes as ex
from kiln.convert import onnx_io
from kiln.convert.parity import random_inputs
from kiln.errors import ExampleShapeError
from kiln.optimize.data import load_split
from kiln.spec import ModelSpec, TensorSpec
from tests.fixtures import onnx_models


@pytest.mark.parametrize(
    ("role", "stride", "least", "want"),
    [
        ("spatial", 1, 1, (32, 64, 224, 320, 640)),
        ("spatial", 32, 1, (32, 64, 224, 320, 640)),
        ("spatial", 64, 1, (64, 320, 640)),
        ("spatial", 32, 224, (224, 320, 640)),
        ("sequence", 1, 1, (16, 64, 128)),
        ("other", 1, 1, (8, 16, 32, 64, 128)),
        ("other", 1, 33, (40, 64, 80, 128, 160)),  # a reflect Pad of 32: the first multiple of 8 past it
        ("audio", 320, 400, (640, 1280, 2560, 16000)),  # wav2vec-like: stride 320, a 400-sample window
    ],
)
def test_candidates_are_multiples_of_the_stride_and_at_least_the_minimum(
    role: ex.Role, stride: int, least: int, want: tuple[int, ...]
) -> None:
    assert ex.candidates(role, stride, least) == want


@pytest.mark.parametrize(
    ("name", "dtype", "shape", "axis", "role"),
    [
        ("seq_len", "int64", ["batch", "seq_len"], 1, "sequence"),
        ("sequenceLength", "int64", ["batch", "sequenceLength"], 1, "sequence"),
        ("num_tokens", "int64", ["batch", "num_tokens"], 1, "sequence"),
        ("height", "float32", ["N", 3, "height", "width"], 2, "spatial"),
        ("H", "float32", ["N", "H", "W", 3], 1, "spatial"),
        ("unk__12", "float32", ["N", 3, "unk__12", "unk__13"], 2, "spatial"),  # NCHW position
        ("unk__12", "float32", ["N", "unk__12", "unk__13", 3], 1, "spatial"),  # NHWC position
        ("audio_length", "float32", ["N", "audio_length"], 1, "audio"),
        ("samples", "int64", ["N", "samples"], 1, "other"),  # not a waveform: ints
        ("n", "float32", ["N", "n"], 1, "other"),
        ("batch", "float32", ["N", "batch"], 1, "other"),  # "h" is a whole word, not a letter of "batch"
    ],
)
def test_roles_from_names_then_positions(name: str, dtype: str, shape: list[Any], axis: int, role: str) -> None:
    t = TensorSpec(name="x", dtype=dtype, shape=tuple(d if isinstance(d, int) else -1 for d in shape))  # type: ignore[arg-type]
    assert ex.role_of(ex.Dim(name, [(0, axis)]), [t], [shape]) == role


def _import(tmp_path: Path, model: Any, name: str, **options: Any) -> kiln.ImportResult:
    return kiln.import_model(onnx_models.save(model, tmp_path / f"{name}.onnx"), tmp_path / "repo", **options)


def test_a_fixed_pool_after_stride_32_needs_224(tmp_path: Path) -> None:
    # ResNet exported with AveragePool(7) instead of a global pool: only 224×224 runs.
    hints = ex.analyse(onnx_models.pooled_classifier())
    assert hints.stride["x"] == 32 and hints.minimum[("x", 2)] == (224, "a 7×7 AveragePool kernel after stride 32")
    result = _import(tmp_path, onnx_models.pooled_classifier(), "resnet")
    assert result.spec.inputs[0].example_shape == (1, 3, 224, 224)
    assert "H=224, W=224 from the stride-32 convs" in result.notes[0]


def test_weights_fix_a_dynamic_channel_and_a_matmul_width(tmp_path: Path) -> None:
    result = _import(tmp_path, onnx_models.strided_unet(channels="C"), "unet")
    assert result.spec.inputs[0].example_shape == (1, 3, 32, 32)
    assert "C=3 from the Conv weights" in result.notes[0]
    w = numpy_helper.from_array(np.ones((6, 2), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "seq", "features"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "seq", 2])], initializer=[w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    result = _import(tmp_path, model, "mm")
    assert result.spec.inputs[0].example_shape == (1, 16, 6)
    assert result.notes == ["example shapes: input 'x' 1×16×6 (seq=16 as a sequence length; features=6 from the "
                            "MatMul weights)"]  # fmt: skip


def _plan_inputs() -> tuple[list[TensorSpec], list[list[int | str]]]:
    axes: list[list[int | str]] = [["batch", "seq"], ["batch", "seq"], ["batch", 3, "height", "width"]]
    inputs = [
        TensorSpec(name="ids", dtype="int64", shape=(-1, -1)),
        TensorSpec(name="mask", dtype="int64", shape=(-1, -1)),
        TensorSpec(name="image", dtype="float32", shape=(-1, 3, -1, -1)),
    ]
    return inputs, axes


def test_trials_go_cheapest_first_with_one_size_per_shared_name() -> None:
    inputs, axes = _plan_inputs()
    seen: list[dict[str, tuple[int, ...]]] = []

    def run(feed: dict[str, np.ndarray]) -> None:
        seen.append({k: v.shape for k, v in feed.items()})
        if feed["image"].shape[2] < 200:
            raise RuntimeError("too small")

    choice = ex.choose("m.onnx", inputs, axes, True, ex.Hints(), run)
    assert [s["image"][2] for s in seen] == [32, 64, 224]
    assert [s["ids"][1] for s in seen] == [16, 64, 128]  # the shorter list stays at its last size
    assert all(s["ids"] == s["mask"] for s in seen)
    assert choice.example == [(1, 128), (1, 128), (1, 3, 224, 224)]
    assert choice.summary == (
        "example shapes: input 'ids' 1×128, input 'mask' 1×128, input 'image' 1×3×224×224 "
        "(seq=128 as a sequence length; height=224, width=224 as an image size)"
    )


def test_failure_lists_each_dims_sizes_and_the_flags() -> None:
    inputs, axes = _plan_inputs()

    def run(feed: dict[str, np.ndarray]) -> None:
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Add node. "
                           "Name:'add_1' Status Message: /src/ops.h:563 void f(long) axis == 1 was false. "
                           "Attempting to broadcast an axis by a dimension other than 1. 2 by 8")  # fmt: skip

    with pytest.raises(ExampleShapeError) as info:
        ex.choose("m.onnx", inputs, axes, True, ex.Hints(), run, dims={"width": 100})
    assert str(info.value) == (
        "m.onnx: could not find sizes for the dynamic dims seq, height (tried seq: 16, 64, 128; height: 32, 64, "
        "224, 320, 640; with width=100): pass --dim seq=SIZE --dim height=SIZE or --input-shape 1,SEQ "
        "--input-shape 1,SEQ --input-shape 1,3,H,100; ONNX Runtime's last error: Add node 'add_1': Attempting to "
        "broadcast an axis by a dimension other than 1. 2 by 8"
    )
    assert info.value.dims == ["seq", "height"]


def test_a_model_without_dynamic_dims_runs_once(tmp_path: Path) -> None:
    calls: list[int] = []
    t = TensorSpec(name="x", dtype="float32", shape=(-1, 4))
    choice = ex.choose("m.onnx", [t], [["N", 4]], True, ex.Hints(), lambda feed: calls.append(1))
    assert calls == [1] and choice.example == [None] and choice.summary is None


# ---- the spec field and its readers ----------------------------------------------------------------------
def test_spec_stores_example_shapes_and_reads_old_files_without_them() -> None:
    old = ModelSpec.model_validate({"name": "m", "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3, -1, -1]}],
                                    "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}]})  # fmt: skip
    assert old.inputs[0].example_shape is None and "example_shape" not in old.to_yaml()
    new = old.model_copy(update={"inputs": [old.inputs[0].model_copy(update={"example_shape": (1, 3, 32, 32)})]})
    back = ModelSpec.from_yaml(new.to_yaml())
    assert back.inputs[0].example_shape == (1, 3, 32, 32)
    assert back.inputs[0] == old.inputs[0]  # a hint, not the signature: versions with other sizes stay compatible
    with pytest.raises(ValueError, match=r"example_shape \[1, 4, 32, 32\] does not fit shape \[\?, 3, \?, \?\]"):
        TensorSpec(name="x", dtype="float32", shape=(-1, 3, -1, -1), example_shape=(1, 4, 32, 32))


def test_random_inputs_follow_the_example_shape_at_the_asked_batch() -> None:
    with_example = TensorSpec(name="x", dtype="float32", shape=(-1, 3, -1, -1), example_shape=(1, 3, 32, 64))
    old = TensorSpec(name="ids", dtype="int64", shape=(-1, -1))
    feed = random_inputs([with_example, old], batch=4, seed=0)
    assert feed["x"].shape == (4, 3, 32, 64) and feed["ids"].shape == (4, 8)
    line = ex.random_inputs_line([with_example, old])
    assert line is not None and "input 'x' N×3×32×64, input 'ids' N×8 (N: the batch size)" in line
    assert "predates example shapes" in line
    assert ex.random_inputs_line([TensorSpec(name="x", dtype="float32", shape=(-1, 4))]) is None


def test_optimize_without_data_keeps_random_samples_small_at_large_example_shapes() -> None:
    spec = ModelSpec.model_validate({
        "name": "m", "outputs": [{"name": "y", "dtype": "float32", "shape": [-1]}],
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 3, -1, -1], "example_shape": [1, 3, 640, 640]}],
    })  # fmt: skip
    split = load_split(spec, None, "src", 8, 200)
    assert split.validation.inputs["x"].shape == (13, 3, 640, 640)  # 64 MiB of 4.7 MiB samples
    assert any("input 'x' N×3×640×640" in n for n in split.notes)


def test_torch_importers_record_the_example_they_ran() -> None:
    t = TensorSpec(name="ids", dtype="int64", shape=(-1, -1))
    assert ex.with_example(t, (2, 6), batched=True).example_shape == (1, 6)
    assert ex.with_example(TensorSpec(name="x", dtype="float32", shape=(-1, 4)), (2, 4), True).example_shape is None


def test_runtime_errors_read_as_one_line() -> None:
    raw = ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Non-zero status code returned while running Pad node. "
           "Name:'' Status Message: Pad reflect: pre-pad (32) exceeds maximum allowed (7) for axis 2.")  # fmt: skip
    assert (
        ex.runtime_error(RuntimeError(raw))
        == "Pad node: Pad reflect: pre-pad (32) exceeds maximum allowed (7) for axis 2."
    )
    assert onnx_io.input_dims(onnx_models.strided_unet(dims=("N", "", "w"))) == [["N", 3, "x_2", "w"]]
