"""int8 passes: ONNX Runtime dynamic and static (QDQ) quantization, NNCF post-training quantization of
the OpenVINO IR, and the check behind torch's dynamic quantization of Linear layers.

Static quantization needs real calibration data. Without it these passes refuse to run rather than
calibrate on noise; the search skips their variants with a note.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import PassNotApplicable
from kiln.optimize.passes.base import PassContext, PassReport, op_histogram, register_pass
from kiln.optimize.passes.graph import IR, ONNX, PT2, _adopt, _quiet, uses_external_data
from kiln.recipe import NO_CALIBRATION

# Op types that dynamic quantization targets: MatMul-like ops gain from it, ConvInteger is slow on CPU.
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM")
_INT_OPS = ("MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul")


def _require_calibration(ctx: PassContext) -> list[dict[str, Any]]:
    if not ctx.calibration:
        raise PassNotApplicable(NO_CALIBRATION)
    return ctx.calibration


@register_pass("ort-dynamic")
def ort_dynamic_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Weights int8 ahead of time, activations quantized per batch at run time (MatMul/Gemm); 7-bit
    weights with ``reduce_range`` (what the planner asks for on CPUs without VNNI, where 8 bits saturate)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = ctx.work / ONNX
    ops = op_histogram(path)
    targets = list(params.get("op_types", DYNAMIC_OPS))  # all of them: the quantizer turns Gemm into MatMul
    if not any(ops.get(op) for op in targets):
        raise PassNotApplicable(f"no {'/'.join(targets)} nodes for dynamic quantization")
    _strip_value_info(path)
    tmp = ctx.work / ".quantized.onnx"
    with _quiet():
        quantize_dynamic(
            str(path), str(tmp), weight_type=QuantType.QInt8, per_channel=bool(params.get("per_channel", False)),
            op_types_to_quantize=targets, use_external_data_format=uses_external_data(path),
            reduce_range=bool(params.get("reduce_range", False)),
        )  # fmt: skip
    _adopt(tmp, path)
    after = op_histogram(path)
    return PassReport(
        "ort-dynamic", nodes_before=sum(ops.values()), nodes_after=sum(after.values()),
        details={"quantized_nodes": sum(after.get(op, 0) for op in _INT_OPS), "op_types": targets},
    )  # fmt: skip


def _strip_value_info(path: Path) -> None:
    """Drop the exporter's intermediate shape annotations: the quantizer re-infers shapes and fails
    when its own inference and a stale annotation disagree (it rewrites Gemm as MatMul)."""
    import onnx

    from kiln.optimize.passes.graph import _save_onnx

    model = onnx.load(str(path))
    if len(model.graph.value_info):
        del model.graph.value_info[:]
        _save_onnx(model, path)


class _Reader:
    """onnxruntime's CalibrationDataReader over kiln's calibration batches."""

    def __init__(self, batches: list[dict[str, Any]]) -> None:
        self._it = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - the calibrators in use read once
        pass


@register_pass("ort-static")
def ort_static_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """QDQ static quantization: activations uint8 with ranges from calibration, weights int8 (7-bit with
    ``reduce_range``, as on CPUs without VNNI)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    batches = _require_calibration(ctx)
    method = str(params.get("method", "minmax"))
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}  # fmt: skip
    if method not in methods:
        raise ValueError(f"calibration method {method!r}: use one of {sorted(methods)}")

    class Reader(_Reader, CalibrationDataReader):
        pass

    path = ctx.work / ONNX
    before = op_histogram(path)
    _strip_value_info(path)
    scope = _transformer_scope(path) if before.get("Softmax") else {}
    tmp = ctx.work / ".quantized.onnx"
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress
        quantize_static(
            str(path), str(tmp), Reader(batches), quant_format=QuantFormat.QDQ,
            per_channel=bool(params.get("per_channel", True)), calibrate_method=methods[method],
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            use_external_data_format=uses_external_data(path), reduce_range=bool(params.get("reduce_range", False)),
            **scope,
        )  # fmt: skip
    _adopt(tmp, path)
    folded = fold_input_scaling(path) if params.get("fold_scaling", False) else 0
    after = op_histogram(path)
    return PassReport(
        "ort-static", nodes_before=sum(before.values()), nodes_after=sum(after.values()),
        details={"method": method, "quantize_linear": after.get("QuantizeLinear", 0),
                 "dequantize_linear": after.get("DequantizeLinear", 0), "calibration_batches": len(batches),
                 "transformer": bool(scope), "excluded_nodes": len(scope.get("nodes_to_exclude", [])),
                 "folded_scalings": folded},
    )  # fmt: skip


def fold_input_scaling(path: Path) -> int:
    """Fold a division or multiplication by a positive constant that feeds only QuantizeLinear nodes (a
    model's ``pixels / 16``) into their scales: ``Q(x / c, s, z) == Q(x, s·c, z)``. The DequantizeLinear
    after each keeps its scale, so the graph computes what it did, one node (and one pass over the
    tensor) lighter. Returns how many were folded."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if uses_external_data(path):
        return 0
    model = onnx.load(str(path))
    graph = model.graph
    init = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
             if v.type.tensor_type.HasField("shape")}  # fmt: skip
    folded, touched = [], set()
    for n in graph.node:
        if n.op_type not in ("Div", "Mul") or len(n.input) != 2 or n.output[0] in outputs:
            continue
        x, c = n.input
        if n.op_type == "Mul" and x in init and c not in init:
            x, c = c, x
        if c not in init or x in init:
            continue
        factor = numpy_helper.to_array(init[c])
        users = consumers.get(n.output[0], [])
        if factor.size != 1 or not np.isfinite(factor).all() or float(factor.reshape(())) <= 0 or not users:
            continue
        if factor.ndim > 1 or (factor.ndim == 1 and ranks.get(x, 0) < 1):  # broadcasting would change x's rank
            continue
        if not all(u.op_type == "QuantizeLinear" and u.input[0] == n.output[0] and u.input[1] in init for u in users):
            continue
        k = float(factor.reshape(()))
        for u in users:
            scale = numpy_helper.to_array(init[u.input[1]])
            new = (scale * k if n.op_type == "Div" else scale / k).astype(scale.dtype)
            name = f"{u.input[1]}_folded_{n.name or n.output[0]}"
            if name not in init:  # two QuantizeLinear nodes may share one scale
                init[name] = numpy_helper.from_array(new, name)
                graph.initializer.append(init[name])
            touched.add(u.input[1])
            u.input[0], u.input[1] = x, name
        touched.add(c)
        folded.append(n)
    if not folded:
        return 0
    for n in folded:
        graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs | {i.name for i in graph.input}
    for t in [t for t in graph.initializer if t.name in touched - used]:  # the constants folded away
        graph.initializer.remove(t)
    tmp = path.with_name(".folded-" + path.name)
    onnx.save(model, str(tmp))
    _adopt(tmp, path)
    return len(folded)


def _transformer_scope(path: Path) -> dict[str, Any]:
    """What static quantization may touch in an attention model: the MatMul/Gemm nodes that carry
    weights. Quantizing everything puts the attention mask's huge negative constants and the
    activation-by-activation products (Q·Kᵀ, attention·V) on one uint8 scale each, which measured on
    MiniLM drops the embeddings' mean cosine to 0.40; weights only keeps 0.95 and runs faster."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    products = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and not set(n.input) & constants]
    return {"op_types_to_quantize": ["MatMul", "Gemm"], "nodes_to_exclude": products}


@register_pass("nncf")
def nncf_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """NNCF post-training quantization of the OpenVINO IR (transformer-aware when it sees Softmax)."""
    import nncf
    import openvino as ov

    batches = _require_calibration(ctx)
    items = [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]
    core = ov.Core()
    model = core.read_model(str(ctx.work / IR))
    before = len(model.get_ops())
    transformer = any(op.get_type_name() == "Softmax" for op in model.get_ops())
    kwargs: dict[str, Any] = {"subset_size": len(items)}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    with _quiet(), _nncf_quiet():
        quantized = nncf.quantize(model, nncf.Dataset(items), **kwargs)
    tmp = ctx.work / ".quantized.xml"
    ov.save_model(quantized, str(tmp), compress_to_fp16=False)
    tmp.replace(ctx.work / IR)
    tmp.with_suffix(".bin").replace(ctx.work / "model.bin")
    fq = sum(1 for op in quantized.get_ops() if op.get_type_name() == "FakeQuantize")
    return PassReport("nncf", nodes_before=before, nodes_after=len(quantized.get_ops()),
                      details={"fake_quantize": fq, "samples": len(items), "transformer": transformer})  # fmt: skip


@contextlib.contextmanager
def _nncf_quiet() -> Iterator[None]:
    import nncf

    nncf.set_log_level(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        yield


@register_pass("torch-dynamic")
def torch_dynamic_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Check that the program has Linear layers for the engine to quantize at load (its packed int8
    weights are not something ``torch.export`` saves), and count them."""
    from kiln.engines.pytorch import load_exported
    from kiln.engines.torch_runtime import linear_to_modules

    gm = load_exported(ctx.work / PT2)
    count = linear_to_modules(gm)
    if count == 0:
        raise PassNotApplicable("no Linear layers for torch dynamic int8")
    return PassReport("torch-dynamic", details={"linear_layers": count})
