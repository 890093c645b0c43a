"""Graph and conversion passes: onnxslim, ONNX Runtime's offline-optimized graph, Conv+BN folding on
the torch side, ONNX → OpenVINO IR, and fp16 for ONNX Runtime on CUDA."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import PassNotApplicable
from kiln.optimize.passes.base import PassContext, PassReport, onnx_node_count, register_pass
from kiln.repository import IR_FILE as IR
from kiln.repository import ONNX_FILE as ONNX
from kiln.repository import PT2_FILE as PT2


def _save_onnx(model: Any, path: Path) -> None:
    """Replace ``path`` with ``model`` (weights in memory); external weights, when the model needs them,
    go to a new ``model.onnx.data``, and a data file the new model no longer uses is removed."""
    from kiln.convert import onnx_io

    tmp = path.with_name(".tmp-" + path.name)
    onnx_io.save(model, tmp)
    os.replace(tmp, path)
    if not onnx_io.external_locations(onnx_io.load(path, external_data=False)):
        (path.parent / onnx_io.EXTERNAL_DATA_FILE).unlink(missing_ok=True)


def _adopt(produced: Path, path: Path) -> None:
    """Make the file a library wrote (``produced``, with any external data it names) the variant's
    ``path``: renamed when self-contained, else re-saved so its weights sit in ``model.onnx.data``."""
    from kiln.convert import onnx_io

    locations = onnx_io.external_locations(onnx_io.load(produced, external_data=False))
    if not locations:
        os.replace(produced, path)
        (path.parent / onnx_io.EXTERNAL_DATA_FILE).unlink(missing_ok=True)
        return
    _save_onnx(onnx_io.load(produced), path)
    produced.unlink()
    for location in locations - {onnx_io.EXTERNAL_DATA_FILE}:
        (produced.parent / location).unlink(missing_ok=True)


def uses_external_data(path: Path) -> bool:
    """Whether the model at ``path`` keeps weights beside it (a model near or over 2 GB)."""
    from kiln.convert.onnx_io import EXTERNAL_DATA_FILE

    return (path.parent / EXTERNAL_DATA_FILE).is_file()


@register_pass("onnxslim")
def onnxslim_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Constant folding, dead-node removal and pattern fusion with onnxslim."""
    import onnx
    import onnxslim

    path = ctx.work / ONNX
    model = onnx.load(str(path))
    before = len(model.graph.node)
    with _quiet():
        slimmed = onnxslim.slim(model)
    if slimmed is None:
        raise RuntimeError("onnxslim returned no model")
    _save_onnx(slimmed, path)
    return PassReport("onnxslim", nodes_before=before, nodes_after=len(slimmed.graph.node))


@register_pass("ort-optimize")
def ort_optimize_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Save ONNX Runtime's optimized graph (``optimized_model_filepath``) so it is not redone at load.

    Level ``all`` adds layout transforms specific to this CPU's execution provider; the result runs
    on ONNX Runtime's CPU provider only, which the recipe's engine already is.
    """
    import onnxruntime as ort

    level = str(params.get("level", "all"))
    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ValueError(f"ort-optimize level {level!r}: use one of {sorted(levels)}")
    path = ctx.work / ONNX
    before = onnx_node_count(path)
    out = ctx.work / ".ort-optimized.onnx"
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    if uses_external_data(path):  # a graph over 2 GB cannot be saved in one protobuf
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
    ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    _adopt(out, path)
    return PassReport("ort-optimize", nodes_before=before, nodes_after=onnx_node_count(path), details={"level": level})


@register_pass("fold-conv-bn")
def fold_conv_bn_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Fold eval-mode BatchNorm into the preceding convolution of the exported program, re-export."""
    import torch

    from kiln.convert.from_pytorch import quiet_exporter
    from kiln.engines.pytorch import load_exported

    path = ctx.work / PT2
    gm = load_exported(path)
    before = _call_count(gm)
    folded = fold_conv_bn(gm)
    if folded == 0:
        raise PassNotApplicable("no Conv+BatchNorm pairs to fold")
    example, dynamic = _export_example(ctx)
    with quiet_exporter():
        try:
            program = torch.export.export(gm, example, dynamic_shapes=dynamic)
        except Exception:  # the model limits a dim (stride-2 convs) or ties two together (ids and mask)
            program = torch.export.export(gm, example, dynamic_shapes=_auto(dynamic))
    tmp = ctx.work / ".folded.pt2"
    torch.export.save(program, str(tmp))
    os.replace(tmp, path)
    return PassReport("fold-conv-bn", nodes_before=before, nodes_after=_call_count(program.module()),
                      details={"folded": folded})  # fmt: skip


def fold_conv_bn(gm: Any) -> int:
    """Fold ``batch_norm(conv(x))`` (inference, single use of the conv) in place; returns how many.

    The arithmetic is PyTorch's own ``fuse_conv_bn_weights``; this only rewires the graph.
    """
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    aten = torch.ops.aten
    convs = (aten.conv2d.default, aten.conv1d.default, aten.conv3d.default)
    bns = {aten.batch_norm.default: 0, aten._native_batch_norm_legit_no_training.default: 0}
    folded = 0
    for bn in list(gm.graph.nodes):
        if bn.op != "call_function" or bn.target not in bns:
            continue
        conv = bn.args[0]
        if getattr(conv, "target", None) not in convs or len(conv.users) != 1:
            continue
        if bn.target is aten.batch_norm.default:
            _, w, b, mean, var, training, _momentum, eps = bn.args[:8]
            if training:
                continue
        else:
            _, w, b, mean, var, _momentum, eps = bn.args[:7]
        tensors = [_get(gm, n) for n in (conv.args[1], conv.args[2] if len(conv.args) > 2 else None, mean, var, w, b)]
        if tensors[0] is None or tensors[2] is None or tensors[3] is None:
            continue
        cw, cb, rm, rv, bw, bb = tensors
        new_w, new_b = fuse_conv_bn_weights(cw, cb, rm, rv, float(eps), bw, bb)
        wname, bname = f"kiln_folded_w{folded}", f"kiln_folded_b{folded}"
        gm.register_parameter(wname, torch.nn.Parameter(new_w.detach(), requires_grad=False))
        gm.register_parameter(bname, torch.nn.Parameter(new_b.detach(), requires_grad=False))
        with gm.graph.inserting_before(conv):
            wnode, bnode = gm.graph.get_attr(wname), gm.graph.get_attr(bname)
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[1], args[2] = wnode, bnode
        conv.args = tuple(args)
        users = list(bn.users)
        if bn.target is aten.batch_norm.default:
            bn.replace_all_uses_with(conv)
        else:  # returns (out, mean, invstd): only getitem 0 may be used
            if any(u.target is not __import__("operator").getitem or u.args[1] != 0 for u in users):
                continue
            for u in users:
                u.replace_all_uses_with(conv)
                gm.graph.erase_node(u)
        gm.graph.erase_node(bn)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded


def _get(gm: Any, node: Any) -> Any:
    if node is None or getattr(node, "op", None) != "get_attr":
        return None
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _call_count(gm: Any) -> int:
    return sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_module"))


def _export_example(ctx: PassContext) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    import torch

    from kiln.convert.parity import random_inputs

    batched = ctx.spec.serving.max_batch_size > 0
    feed = random_inputs(ctx.spec.inputs, batch=2 if batched else 1, seed=0)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    dynamic = []
    for t in ctx.spec.inputs:
        dims = {i: (batch if i == 0 else torch.export.Dim(f"{t.name}_{i}", min=1, max=1 << 16))
                for i, d in enumerate(t.shape) if d == -1}  # fmt: skip
        dynamic.append(dims or None)
    return tuple(torch.from_numpy(a) for a in feed.values()), tuple(dynamic) if batched else None


def _auto(dynamic: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """The same dynamic dims, each ``Dim.AUTO``: torch infers their ranges and equalities itself."""
    import torch

    if dynamic is None:
        return None
    return tuple(None if d is None else dict.fromkeys(d, torch.export.Dim.AUTO) for d in dynamic)


@register_pass("ov-convert")
def ov_convert_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """ONNX → OpenVINO IR, weights kept in fp32 (``save_model`` would compress them to fp16)."""
    import openvino as ov

    src = ctx.work / ONNX
    before = onnx_node_count(src)
    model = ov.convert_model(str(src))
    ov.save_model(model, str(ctx.work / IR), compress_to_fp16=False)
    for p in ctx.work.glob(ONNX + "*"):
        p.unlink()
    return PassReport("ov-convert", nodes_before=before, nodes_after=len(model.get_ops()))


@register_pass("ort-fp16")
def ort_fp16_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Weights and activations to fp16, inputs and outputs kept fp32. Offered on CUDA only: ONNX
    Runtime's CPU provider has few fp16 kernels and inserts casts, which is slower than fp32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    path = ctx.work / ONNX
    model = onnx.load(str(path))
    before = len(model.graph.node)
    with _quiet():
        half = convert_float_to_float16(model, keep_io_types=True)
    _save_onnx(half, path)
    fp16 = sum(1 for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
    return PassReport("ort-fp16", nodes_before=before, nodes_after=len(half.graph.node),
                      details={"fp16_initializers": fp16})  # fmt: skip


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Libraries' warnings and INFO logs are noise in a progress bar; errors still raise."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
