"""The size report: parameters and MACs counted from each artifact format (exact on a hand-built graph,
unchanged by int8 and by the format conversion), and what the optimizer records and shows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

import kiln
from kiln.optimize.passes import PassContext, run_passes
from kiln.optimize.size import SizeFigures, count_size, onnx_counts, openvino_counts, torch_counts
from kiln.optimize.table import count_text, ratio_text, result_table, summary_lines
from kiln.recipe import PassStep
from kiln.repository import Repository
from kiln.spec import TensorSpec
from tests.unit.optimize.conftest import Imported

FAST: dict[str, Any] = {
    "min_time_s": 0.02,
    "warmup": 2,
    "compile_modes": [],
    "calibration_methods": ["minmax"],
    "batch_size": 8,
}
# The cnn fixture: Conv 1→8 3×3 and Conv 8→8 3×3 at 8×8 (BatchNorm folded on export), Linear 512→10.
CNN_PARAMS = (8 * 9 + 8) + (8 * 8 * 9 + 8) + (512 * 10 + 10)
CNN_MACS = 64 * 8 * 9 + 64 * 8 * 72 + 512 * 10


def _conv_gemm(path: Path, external: bool = False) -> Path:
    """x [N,3,8,8] → Conv 3→4 3×3 stride 2 pad 1 → [N,4,4,4] → Reshape [N,64] (an int64 shape) → Gemm 64→10."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((10, 64)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=0)  # fmt: skip
    return path


X = [TensorSpec(name="x", dtype="float32", shape=(-1, 3, 8, 8))]


@pytest.mark.parametrize("external", [False, True])
def test_onnx_params_and_macs_of_a_conv_and_a_gemm_are_exact(tmp_path: Path, external: bool) -> None:
    path = _conv_gemm(tmp_path / "m.onnx", external)
    params, macs = onnx_counts(path, X)
    assert params == 4 * 3 * 9 + 4 + 10 * 64 + 10  # the int64 reshape target is not a parameter
    assert macs == (4 * 4 * 4) * (3 * 9) + 64 * 10  # output elements × (C_in · k²), then M·N·K at batch 1
    if external:
        assert (tmp_path / "m.onnx.data").is_file()


def test_a_dynamic_sequence_dimension_counts_at_8(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((16, 32), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "s", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "s", 32])], [w],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "mm.onnx"))
    spec = [TensorSpec(name="x", dtype="float32", shape=(-1, -1, 16))]
    assert onnx_counts(tmp_path / "mm.onnx", spec) == (16 * 32, 8 * 32 * 16)


def _work(imported: Imported, dst: Path) -> PassContext:
    os.link(imported.version_dir / "model.onnx", dst / "model.onnx")
    spec = Repository(imported.repo).spec(imported.name)
    calib = np.load(imported.data)["calibration/x"]
    return PassContext(dst, spec, [{"x": calib[i : i + 16]} for i in range(0, len(calib), 16)])


def test_the_reference_and_its_torch_program_are_counted(cnn: Imported) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    assert onnx_counts(cnn.version_dir / "model.onnx", spec.inputs) == (CNN_PARAMS, CNN_MACS)
    params, macs = torch_counts(cnn.version_dir / "model.pt2", spec.inputs)
    assert macs == CNN_MACS
    assert params == CNN_PARAMS + 2 * 4 * 8  # the program still holds both BatchNorms (weight, bias, mean, var)


@pytest.mark.parametrize("per_channel", [True, False])
def test_an_int8_qdq_graph_counts_its_weights_once(cnn: Imported, work: Path, per_channel: bool) -> None:
    import onnx

    ctx = _work(cnn, work)
    run_passes([PassStep(name="ort-static", params={"method": "minmax", "per_channel": per_channel})], ctx)
    model = onnx.load(str(work / "model.onnx"))
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    # int8 weights and int32 biases are the same parameters; scales and zero points are not parameters
    assert onnx_counts(work / "model.onnx", ctx.spec.inputs) == (CNN_PARAMS, CNN_MACS)


def test_dynamic_int8_counts_matmul_integer(mlp: Imported, work: Path) -> None:
    ctx = _work(mlp, work)
    fp32 = onnx_counts(work / "model.onnx", ctx.spec.inputs)
    assert fp32 == (16 * 64 + 64 + 64 * 4 + 4, 16 * 64 + 64 * 4)
    run_passes([PassStep(name="ort-dynamic")], ctx)
    assert onnx_counts(work / "model.onnx", ctx.spec.inputs) == fp32


def test_onnx_runtimes_optimized_graph_is_followed_through_its_own_ops(cnn: Imported, work: Path) -> None:
    """Level ``all`` writes NCHWc convolutions that onnx's shape inference does not know; they are
    counted as stored, their output channels padded to the block."""
    from kiln.optimize.passes.base import op_histogram

    ctx = _work(cnn, work)
    run_passes([PassStep(name="ort-optimize", params={"level": "all"})], ctx)
    params, macs = onnx_counts(work / "model.onnx", ctx.spec.inputs)
    if "ReorderOutput" not in op_histogram(work / "model.onnx"):
        assert (params, macs) == (CNN_PARAMS, CNN_MACS)  # this CPU has no NCHWc kernels
        return
    assert params >= CNN_PARAMS and macs is not None and macs >= CNN_MACS


def test_openvino_ir_is_counted_like_the_onnx_it_came_from(cnn: Imported, work: Path) -> None:
    ctx = _work(cnn, work)
    run_passes([PassStep(name="ov-convert")], ctx)
    assert openvino_counts(work / "model.xml", ctx.spec.inputs) == (CNN_PARAMS, CNN_MACS)
    run_passes([PassStep(name="nncf")], ctx)  # int8 weights, FakeQuantize ranges, per-channel scales
    assert openvino_counts(work / "model.xml", ctx.spec.inputs) == (CNN_PARAMS, CNN_MACS)


def test_a_file_it_cannot_read_gives_no_figures_and_no_error(cnn: Imported, tmp_path: Path) -> None:
    import dataclasses

    reference = Repository(cnn.repo).variant(cnn.name, which="reference")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a model")
    figures = count_size(dataclasses.replace(reference, path=broken, version_dir=broken))
    assert figures == SizeFigures(None, None, len(b"not a model"))


def test_figures_round_trip_and_ratios() -> None:
    before = SizeFigures(1_000_000, 4_000_000, 4_000_000, 9_000_000, "vmhwm-delta")
    after = SizeFigures(500_000, 1_680_000, 1_000_000, 3_000_000, "vmhwm-delta")
    assert SizeFigures.from_dict(json.loads(json.dumps(after.to_dict()))) == after
    assert SizeFigures.from_dict(None) is None and SizeFigures.from_dict({"params": 3}) is None
    assert ratio_text(after, before) == "0.50× params · 0.42× MACs · 0.25× file"
    assert ratio_text(before, before) == "same"
    assert (count_text(1_234), count_text(4_900_000), count_text(None)) == ("1.23k", "4.90M", "–")


def test_optimize_records_the_size_of_every_variant_and_shows_it(cnn: Imported) -> None:
    options: dict[str, Any] = {
        "data": str(cnn.data),
        "engines": ["onnxruntime", "openvino"],
        "int8": ["ort-static"],
        **FAST,
    }
    result = kiln.optimize(cnn.repo, cnn.name, **options)
    repository = Repository(cnn.repo)
    measured = [v for v in result.variants if v.timing is not None]
    assert measured and all(v.size is not None for v in measured)
    for v in measured:
        stored = repository.variant(cnn.name, result.version, v.id).figures()["size"]
        assert v.size is not None and SizeFigures.from_dict(stored) == v.size
        assert stored["params"] > 0 and stored["file_bytes"] > 0
        assert isinstance(stored["peak_memory_bytes"], int) and stored["memory_kind"] in (
            "vmhwm-delta",
            "rss-sampled-delta",
        )
    plain = next(
        v for v in measured if v.recipe is not None and v.recipe.engine == "onnxruntime" and not v.recipe.passes
    )
    assert plain.size is not None and (plain.size.params, plain.size.macs) == (CNN_PARAMS, CNN_MACS)
    report = json.loads((cnn.version_dir / "report" / "optimize.json").read_text())
    assert all(v["size"] == (None if v["id"] == "-" else result.variant(v["id"]).size.to_dict())  # type: ignore[union-attr]
               for v in report["variants"] if v["status"] != "skipped")  # fmt: skip

    console = Console(record=True, width=240)
    console.print(result_table(result))
    for line in summary_lines(result):
        console.print(line)
    text = console.export_text()
    assert "params · MACs" in text and "file · peak mem" in text and "vs baseline" in text
    assert f"{count_text(CNN_PARAMS)} · {count_text(CNN_MACS)}" in text
    chosen = result.chosen_variant
    assert chosen is not None and chosen.timing is not None and plain.timing is not None
    ratio = plain.timing.latency_ms / chosen.timing.latency_ms  # the headline's ratio to plain ONNX Runtime fp32
    assert f"{ratio:.2f}× plain ONNX Runtime fp32" in text
    int8 = next(v for v in measured if v.recipe is not None and v.recipe.int8 == "ort-static")
    assert "× file" in ratio_text(int8.size, result.variant(result.baseline or "").size)

    again = kiln.optimize(cnn.repo, cnn.name, **options)  # figures reused: the size is read back, not measured
    assert not any(v.fresh for v in again.variants)
    assert {v.id: v.size for v in again.variants if v.timing} == {v.id: v.size for v in measured}
