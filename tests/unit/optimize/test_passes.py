"""Each pass on a tiny model: the structure it leaves (dtypes, quantized nodes) and an accuracy bound."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from kiln.engines.base import EngineOptions, load_engine
from kiln.errors import PassNotApplicable, UnsupportedError
from kiln.hardware import int8_saturates
from kiln.optimize.accuracy import sqnr_db
from kiln.optimize.passes import PassContext, get_pass, known_passes, run_passes
from kiln.optimize.passes.base import op_histogram
from kiln.recipe import PassStep
from kiln.repository import Repository
from tests.unit.optimize.conftest import Imported

# What the planner asks for here: 7-bit weights where ONNX Runtime's int8 kernels saturate (no VNNI)
NARROW = {"reduce_range": True} if int8_saturates() else {}


def _work(imported: Imported, dst: Path, artifact: str) -> PassContext:
    for p in imported.version_dir.glob(artifact + "*"):
        os.link(p, dst / p.name)
    spec = Repository(imported.repo).spec(imported.name)
    calib = np.load(imported.data)["calibration/x"]
    return PassContext(dst, spec, [{"x": calib[i : i + 16]} for i in range(0, len(calib), 16)])


def _run(engine: str, directory: Path, imported: Imported, **options: object) -> np.ndarray:
    spec = Repository(imported.repo).spec(imported.name)
    precision = options.pop("precision", "fp32")
    with load_engine(engine, directory, spec, EngineOptions(precision=precision, run=options)) as e:  # type: ignore[arg-type]
        return e.run({"x": imported.x})["y"]


def _reference(imported: Imported) -> np.ndarray:
    return _run("onnxruntime", imported.version_dir, imported)


def test_registry_lists_known_passes_and_rejects_unknown_names() -> None:
    names = known_passes()
    for name in ("onnxslim", "ort-optimize", "fold-conv-bn", "ov-convert", "ort-fp16", "ort-dynamic",
                 "ort-static", "nncf", "torch-dynamic"):  # fmt: skip
        assert name in names
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="known passes"):
        get_pass("no-such-pass")


def test_passes_never_write_through_the_hard_link_to_the_version(cnn: Imported, work: Path) -> None:
    original = (cnn.version_dir / "model.onnx").read_bytes()
    ctx = _work(cnn, work, "model.onnx")
    run_passes([PassStep(name="onnxslim"), PassStep(name="ort-static", params={"method": "minmax"})], ctx)
    assert (cnn.version_dir / "model.onnx").read_bytes() == original
    assert (work / "model.onnx").read_bytes() != original


@pytest.mark.parametrize("name", ["onnxslim", "ort-optimize"])
def test_graph_passes_report_node_counts_and_keep_outputs(cnn: Imported, work: Path, name: str) -> None:
    ctx = _work(cnn, work, "model.onnx")
    [report] = run_passes([PassStep(name=name)], ctx)
    assert report.nodes_before is not None and report.nodes_after is not None
    assert report.nodes_after <= report.nodes_before
    np.testing.assert_allclose(_run("onnxruntime", work, cnn), _reference(cnn), atol=1e-4)


def test_fold_conv_bn_removes_batch_norm_and_keeps_outputs(cnn: Imported, work: Path) -> None:
    import torch

    from kiln.engines.pytorch import load_exported

    ctx = _work(cnn, work, "model.pt2")
    [report] = run_passes([PassStep(name="fold-conv-bn")], ctx)
    assert report.details["folded"] == 2
    assert report.nodes_after == report.nodes_before - 2
    targets = {str(n.target) for n in load_exported(work / "model.pt2").graph.nodes}
    assert not any("batch_norm" in t for t in targets)
    np.testing.assert_allclose(_run("torch", work, cnn), _run("torch", cnn.version_dir, cnn), atol=1e-4)
    assert torch.export.load(str(work / "model.pt2")) is not None


def test_fold_conv_bn_keeps_dynamic_height_and_width(tmp_path: Path) -> None:
    import kiln

    repo = tmp_path / "repo"
    imported = kiln.import_model("tests.fixtures.tiny_models:bn_fcn", repo, name="fcn", input_shapes=[(1, 3, 16, 12)],
                                 input_names=["x"], output_names=["y"], dynamic_axes={"x": {2: "h", 3: "w"}})  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    os.link(imported.path / "model.pt2", work / "model.pt2")
    spec = Repository(repo).spec("fcn")
    [report] = run_passes([PassStep(name="fold-conv-bn")], PassContext(work, spec, None))
    assert report.details["folded"] == 1
    for h, w in ((8, 8), (21, 14)):  # other sizes than the example, one odd
        x = np.random.default_rng(h).standard_normal((2, 3, h, w)).astype(np.float32)
        with (
            load_engine("torch", work, spec, EngineOptions()) as folded,
            load_engine("torch", imported.path, spec, EngineOptions()) as original,
        ):
            np.testing.assert_allclose(folded.run({"x": x})["y"], original.run({"x": x})["y"], atol=1e-4)


def test_fold_conv_bn_is_not_applicable_without_batch_norm(mlp: Imported, work: Path) -> None:
    with pytest.raises(PassNotApplicable, match="Conv"):
        run_passes([PassStep(name="fold-conv-bn")], _work(mlp, work, "model.pt2"))


def test_ort_dynamic_quantizes_every_matmul(mlp: Imported, work: Path) -> None:
    [report] = run_passes([PassStep(name="ort-dynamic", params=NARROW)], _work(mlp, work, "model.onnx"))
    ops = op_histogram(work / "model.onnx")
    assert ops.get("MatMulInteger", 0) + ops.get("DynamicQuantizeMatMul", 0) == 2 == report.details["quantized_nodes"]
    assert sqnr_db(_reference(mlp), _run("onnxruntime", work, mlp)) > 25


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
@pytest.mark.parametrize("per_channel", [True, False])
def test_ort_static_inserts_qdq_with_per_channel_weights(
    cnn: Imported, work: Path, method: str, per_channel: bool
) -> None:
    import onnx

    steps = [PassStep(name="ort-static", params={"method": method, "per_channel": per_channel})]
    [report] = run_passes(steps, _work(cnn, work, "model.onnx"))
    model = onnx.load(str(work / "model.onnx"))
    ops = op_histogram(work / "model.onnx")
    assert ops["QuantizeLinear"] >= 3 and ops["DequantizeLinear"] > ops["QuantizeLinear"]
    assert report.details["quantize_linear"] == ops["QuantizeLinear"]
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8_weights) == 3  # two convolutions and the Linear layer
    per_channel_scales = [
        t for t in model.graph.initializer if t.name.endswith("_scale") and len(t.dims) == 1 and t.dims[0] > 1
    ]
    assert bool(per_channel_scales) is per_channel
    assert sqnr_db(_reference(cnn), _run("onnxruntime", work, cnn)) > 20


def test_ort_static_folds_the_input_scaling_into_the_quantize_scale(scaled: Imported, tmp_path: Path) -> None:
    import onnx

    plain, folded = tmp_path / "plain", tmp_path / "folded"
    for d, fold in ((plain, False), (folded, True)):
        d.mkdir()
        [report] = run_passes([PassStep(name="ort-static", params={"fold_scaling": fold, **NARROW})],
                              _work(scaled, d, "model.onnx"))  # fmt: skip
        assert report.details["folded_scalings"] == int(fold)
    assert op_histogram(plain / "model.onnx")["Div"] == 1
    assert "Div" not in op_histogram(folded / "model.onnx")
    graph = onnx.load(str(folded / "model.onnx")).graph
    [first] = [n for n in graph.node if graph.input[0].name in n.input]
    assert first.op_type == "QuantizeLinear"  # the raw input goes straight to quantization
    assert not {i.name for i in graph.initializer} - {i for n in graph.node for i in n.input}  # nothing left over
    # the same quantized tensor: Q(x / 16, s) == Q(x, 16 s), so the outputs agree but for rounding ties
    ref, a, b = (_run("onnxruntime", d, scaled) for d in (scaled.version_dir, plain, folded))
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert sqnr_db(ref, b) > 20


def _scaling_graph(op: str, factor: np.ndarray, also_used: bool, twice: bool, path: Path) -> Path:
    """x → op(x, factor) → QuantizeLinear → DequantizeLinear → y; with ``also_used`` the scaled x is a second
    output too, with ``twice`` a second QuantizeLinear → DequantizeLinear on the same scale gives ``y2``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node(op, ["x", "c"], ["xs"], name="scale"),
             helper.make_node("QuantizeLinear", ["xs", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if also_used:
        nodes.append(helper.make_node("Relu", ["xs"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    if twice:
        nodes += [helper.make_node("QuantizeLinear", ["xs", "s", "z"], ["q2"]),
                  helper.make_node("DequantizeLinear", ["q2", "s", "z"], ["y2"])]  # fmt: skip
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
    inits = [numpy_helper.from_array(factor.astype(np.float32), "c"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])], outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(("op", "factor", "also_used", "twice", "folds"), [
    ("Div", 16.0, False, False, True), ("Mul", 0.25, False, False, True), ("Div", [4.0], False, False, True),
    ("Div", 8.0, False, True, True),  # two QuantizeLinear nodes on one scale: one folded scale for both
    ("Div", -2.0, False, False, False),  # a negative scale would flip the rounding direction: not folded
    ("Div", 0.0, False, False, False), ("Div", 4.0, True, False, False),  # the scaled tensor is used elsewhere
    ("Div", [[4.0]], False, False, False),  # a [1, 1] factor broadcasts x from rank 1 to 2: not folded
    ("Div", [2.0, 4.0, 2.0, 4.0], False, False, False),  # one factor per element is not one scale
])  # fmt: skip
def test_input_scaling_folds_only_where_the_quantized_values_stay_the_same(
    tmp_path: Path, op: str, factor: object, also_used: bool, twice: bool, folds: bool
) -> None:
    import onnx
    import onnxruntime as ort

    from kiln.optimize.passes.quantize import fold_input_scaling

    path = _scaling_graph(op, np.array(factor), also_used, twice, tmp_path / "model.onnx")
    x = {"x": np.array([-3.0, 0.5, 2.0, 7.9], np.float32)}
    with np.errstate(divide="ignore", invalid="ignore"):
        before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    assert fold_input_scaling(path) == int(folds)
    graph = onnx.load(str(path)).graph
    assert ("scale" not in {n.name for n in graph.node}) is folds
    assert len({i.name for i in graph.initializer}) == len(graph.initializer)  # no name twice
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    for a, b in zip(before, after, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_ort_static_on_attention_quantizes_only_the_weighted_matmuls(attention: Imported, work: Path) -> None:
    import onnx

    [report] = run_passes([PassStep(name="ort-static", params=NARROW)], _work(attention, work, "model.onnx"))
    assert report.details["transformer"] and report.details["excluded_nodes"] == 2  # Q·Kᵀ and attention·V
    model = onnx.load(str(work / "model.onnx"))
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(int8_weights) == 5  # q, k, v, out and the head
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    weights = {t.name for t in int8_weights}
    dequantized_weights = {
        n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights
    }
    for node in model.graph.node:
        if node.op_type == "Softmax" or (node.op_type == "MatMul" and not set(node.input) & dequantized_weights):
            assert all(producer.get(i) != "DequantizeLinear" for i in node.input), node.name  # stays float
    assert sqnr_db(_reference(attention), _run("onnxruntime", work, attention)) > 20


def test_static_quantization_refuses_to_run_without_calibration_data(cnn: Imported, work: Path) -> None:
    ctx = _work(cnn, work, "model.onnx")
    ctx.calibration = None
    for step in ("ort-static",):
        with pytest.raises(PassNotApplicable, match="calibration data"):
            run_passes([PassStep(name=step)], ctx)


def test_ov_convert_and_nncf_quantize_with_a_bound(cnn: Imported, work: Path) -> None:
    ctx = _work(cnn, work, "model.onnx")
    run_passes([PassStep(name="ov-convert")], ctx)
    assert (work / "model.xml").is_file() and not (work / "model.onnx").exists()
    fp32 = _run("openvino", work, cnn)
    np.testing.assert_allclose(fp32, _reference(cnn), atol=1e-4)  # f32 hint: a true fp32 run
    int8_dir = work / "int8"
    int8_dir.mkdir()
    for p in ("model.xml", "model.bin"):
        shutil.copy(work / p, int8_dir / p)
    ctx.work = int8_dir
    [report] = run_passes([PassStep(name="nncf")], ctx)
    assert report.details["fake_quantize"] >= 3
    assert sqnr_db(fp32, _run("openvino", int8_dir, cnn)) > 15


def test_ort_fp16_converts_weights_and_keeps_fp32_io(mlp: Imported, work: Path) -> None:
    import onnx

    [report] = run_passes([PassStep(name="ort-fp16")], _work(mlp, work, "model.onnx"))
    model = onnx.load(str(work / "model.onnx"))
    floats = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert floats and all(t.data_type == onnx.TensorProto.FLOAT16 for t in floats)
    assert report.details["fp16_initializers"] == len(floats)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_onnxruntime_fp16_needs_a_converted_graph(mlp: Imported, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 for ONNX Runtime is the ort-fp16 graph: asked of the fp32 reference it is refused, not run as fp32."""
    from kiln.engines import ort as ort_engine

    run_passes([PassStep(name="ort-fp16")], _work(mlp, work, "model.onnx"))
    assert ort_engine._has_fp16_weights(work / "model.onnx")
    assert not ort_engine._has_fp16_weights(mlp.version_dir / "model.onnx")
    spec = Repository(mlp.repo).spec(mlp.name)
    monkeypatch.setattr(ort_engine.OrtEngine, "check_options", classmethod(lambda cls, d, o: None))  # as on a GPU
    with pytest.raises(UnsupportedError, match="holds fp32 weights"):
        ort_engine.OrtEngine.load(mlp.version_dir, spec, EngineOptions(precision="fp16"))


def test_torch_dynamic_int8_quantizes_linear_layers(mlp: Imported, work: Path) -> None:
    from kiln.engines.torch_runtime import count_dynamic_quantized

    [report] = run_passes([PassStep(name="torch-dynamic")], _work(mlp, work, "model.pt2"))
    assert report.details["linear_layers"] == 2
    spec = Repository(mlp.repo).spec(mlp.name)
    with load_engine("torch", work, spec, EngineOptions(run={"quantize": "dynamic-int8"})) as engine:
        assert count_dynamic_quantized(engine.module) == 2  # type: ignore[attr-defined]
        out = engine.run({"x": mlp.x})["y"]
    assert out.dtype == np.float32
    assert sqnr_db(_run("torch", mlp.version_dir, mlp), out) > 25


def test_torch_bf16_cast_runs_bf16_weights(mlp: Imported) -> None:
    import torch

    from kiln.hardware import detect

    if not detect().device("cpu").bf16.supported:
        pytest.skip("no native bf16 on this CPU")
    spec = Repository(mlp.repo).spec(mlp.name)
    with load_engine("torch", mlp.version_dir, spec, EngineOptions(precision="bf16", run={"cast": True})) as e:
        dtypes = {p.dtype for p in e.module.parameters()}  # type: ignore[attr-defined]
        out = e.run({"x": mlp.x})["y"]
    assert dtypes == {torch.bfloat16}
    assert out.dtype == np.float32
    assert sqnr_db(_run("torch", mlp.version_dir, mlp), out) > 20


def test_openvino_engine_sets_the_precision_it_was_asked_for(mlp: Imported) -> None:
    from kiln.hardware import detect

    spec = Repository(mlp.repo).spec(mlp.name)
    with load_engine("openvino", mlp.version_dir, spec, EngineOptions()) as e:  # reads model.onnx directly
        assert e.inference_precision == "f32"  # type: ignore[attr-defined]
    if detect().device("cpu").bf16.supported:
        with load_engine("openvino", mlp.version_dir, spec, EngineOptions(precision="bf16")) as e:
            assert e.inference_precision == "bf16"  # type: ignore[attr-defined]


def test_openvino_throughput_hint_runs_a_batch_across_its_infer_requests(cnn: Imported) -> None:
    spec = Repository(cnn.repo).spec(cnn.name)
    feed = {"x": cnn.x[:7]}  # an odd batch: uneven chunks
    with load_engine("openvino", cnn.version_dir, spec, EngineOptions(run={"hint": "latency"})) as e:
        want = e.run(feed)["y"]
        assert len(e._parallel) == 1  # type: ignore[attr-defined]
    options = EngineOptions(intra_op_threads=2, run={"hint": "throughput", "num_requests": 2})
    with load_engine("openvino", cnn.version_dir, spec, options) as e:
        optimal = int(e.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))  # type: ignore[attr-defined]
        assert optimal == 2 and len(e._parallel) == optimal  # type: ignore[attr-defined]
        np.testing.assert_allclose(e.run(feed)["y"], want, rtol=1e-5, atol=1e-6)
        assert e.run({"x": cnn.x[:1]})["y"].shape == (1, 10)  # one row: one request
