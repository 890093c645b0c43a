"""Quantization-aware training: NNCF int8 on the PyTorch module, fine-tuned against the original model,
saved as an OpenVINO IR and as an ONNX graph of QuantizeLinear/DequantizeLinear pairs.

Post-training quantization rounds weights and activations once and hopes the model tolerates it; where it
does not (the PTQ variants fall out of the accuracy budget), QAT lets the weights and the quantizers'
ranges adapt to the rounding. The recipe follows NNCF 3's for PyTorch: ``nncf.quantize`` inserts fake
quantizers initialised from the calibration data, the module is fine-tuned with them in place (straight-
through gradients), and OpenVINO converts it with FakeQuantize ops it runs in int8. The fine-tuning is
knowledge distillation from the unquantized original (the teacher): the student learns to answer like the
model it replaces, plus the task loss where class labels exist. It runs within a wall-clock budget, stops
early when the validation metric stops improving and keeps the best weights, the PTQ starting point
included, so QAT never hands back something worse than the PTQ it started from.

One fine-tune serves two engines. OpenVINO converts the module with FakeQuantize ops (the IR); for ONNX
Runtime each NNCF quantizer is exported as a QuantizeLinear/DequantizeLinear pair (NNCF's
``ONNX_QUANTIZE_DEQUANTIZE_PAIRS`` export mode, through the TorchScript exporter that its quantizers
trace under), which ONNX Runtime fuses into int8 kernels at load. NNCF's default ONNX export would hold
FakeQuantize custom ops that ONNX Runtime cannot run. The torch files go: nothing runs them after this.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.errors import PassNotApplicable
from kiln.optimize.data import Samples
from kiln.optimize.passes.base import PassContext, PassReport, onnx_node_count, op_histogram, register_pass
from kiln.optimize.passes.graph import _quiet
from kiln.optimize.passes.quantize import _nncf_quiet
from kiln.optimize.training import check_trainable, held_out_split, load_module
from kiln.recipe import NO_CALIBRATION, NO_TRAINING, QAT_EXPORTS
from kiln.repository import IR_FILE, MODULE_WEIGHTS_FILE, ONNX_FILE, PT2_FILE

TEMPERATURE = 4.0  # softens the teacher's logits so the student also learns the ranking of the wrong classes


@dataclass
class _Metric:
    """How a fine-tuned model is judged on held-out data: ``top-1`` (against labels) or ``agreement`` (with
    the teacher's answers), higher is better, else ``val-loss`` (the distillation loss), lower is better.
    Ties in top-1, common on a small validation set, go to the lower distillation loss."""

    name: str
    higher_is_better: bool

    def key(self, value: float, loss: float) -> tuple[float, float]:
        return (value, -loss) if self.higher_is_better else (-loss, 0.0)

    def text(self, value: float) -> str:
        return f"{self.name} {value:.1%}" if self.higher_is_better else f"{self.name} {value:.4g}"


@register_pass("qat-int8")
def qat_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """NNCF int8 quantizers on the current module, fine-tuned by distillation from the original, saved as
    the ``exports`` asked for: an OpenVINO IR with FakeQuantize ops, a QDQ ONNX graph."""
    import nncf
    import torch

    exports = [str(e) for e in params.get("exports", ["openvino-ir"])]
    if not exports or any(e not in QAT_EXPORTS for e in exports):
        raise ValueError(f"qat-int8 exports {exports}: use one or more of {list(QAT_EXPORTS)}")

    # an ONNX-only import says why it cannot be fine-tuned before anything else
    check_trainable(ctx.source, ctx.version_dir)
    if not ctx.calibration:
        raise PassNotApplicable(NO_CALIBRATION)
    if ctx.train is None or len(ctx.train) == 0:
        raise PassNotApplicable(NO_TRAINING)
    if ctx.version_dir is None:
        raise PassNotApplicable("no version directory to take the original weights from")
    budget_s = float(params.get("budget_s", ctx.train_budget_s))
    lr = float(params.get("lr", 1e-4))
    batch_size = int(params.get("batch_size", 32))
    epochs = int(params["epochs"]) if params.get("epochs") is not None else None
    patience = int(params.get("patience", 3))

    names = [t.name for t in ctx.spec.inputs]
    transformer = _has_softmax(ctx)
    before = onnx_node_count(ctx.work / ONNX_FILE) if (ctx.work / ONNX_FILE).is_file() else None
    student = _flat_outputs(load_module(ctx.source, ctx.version_dir, ctx.work))
    teacher = _flat_outputs(load_module(ctx.source, ctx.version_dir)).eval()
    # Whole batches: per-sample statistics (as the IR's PTQ pass collects them) take 5-10x longer in torch,
    # and the ranges they seed are trained from here on anyway.
    items = [tuple(torch.from_numpy(np.ascontiguousarray(b[n])) for n in names) for b in ctx.calibration]
    kwargs: dict[str, Any] = {"subset_size": len(items)}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    train, validation = held_out_split(ctx.train, ctx.validation)
    classify = ctx.spec.task == "classification"
    metric = _pick_metric(classify, validation)
    loss_fn = _distill_loss(classify)
    with torch.random.fork_rng():  # seeded for repeatable variants, without resetting the caller's generator
        torch.manual_seed(0)
        with _quiet(), _nncf_quiet():
            qmodel = nncf.quantize(student, nncf.Dataset(items), **kwargs)
        evaluate = _evaluator(teacher, validation, names, metric, loss_fn, batch_size)
        fit = _fine_tune(qmodel, teacher, train, names, loss_fn, evaluate, metric, ctx.progress,
                         budget_s=budget_s, lr=lr, batch_size=batch_size, epochs=epochs, patience=patience,
                         weight_decay=float(params.get("weight_decay", 0.0)))  # fmt: skip
    qmodel.eval()
    written: dict[str, Any] = {}
    for stale in [*ctx.work.glob(ONNX_FILE + "*"), ctx.work / PT2_FILE, ctx.work / MODULE_WEIGHTS_FILE]:
        with contextlib.suppress(FileNotFoundError):  # the fp32 files are this module before quantization
            stale.unlink()
    if "openvino-ir" in exports:
        model = _convert(qmodel, ctx)
        fq = sum(1 for op in model.get_ops() if op.get_type_name() == "FakeQuantize")
        if fq == 0:
            raise RuntimeError("the quantized module converted to an OpenVINO IR without FakeQuantize ops")
        _save_ir(model, ctx)
        written.update(fake_quantize=fq, ir_ops=len(model.get_ops()))
    if "onnx-qdq" in exports:
        written.update(_export_qdq(qmodel, ctx))
    calibrated = sum(len(b[names[0]]) for b in ctx.calibration)
    return PassReport(
        "qat-int8", nodes_before=before, nodes_after=written.get("ir_ops", written.get("onnx_nodes")),
        details={**written, "exports": exports, "transformer": transformer, "calibration_samples": calibrated,
                 "train_samples": len(train), "validation_samples": len(validation), "metric": metric.name,
                 "lr": lr, "batch_size": batch_size, **fit},
    )  # fmt: skip


def _has_softmax(ctx: PassContext) -> bool:
    """Whether the model has attention (NNCF then keeps the Softmax inputs and residual adds in fp32)."""
    for directory in (ctx.work, ctx.version_dir):
        if directory is not None and (directory / ONNX_FILE).is_file():
            return bool(op_histogram(directory / ONNX_FILE).get("Softmax"))
    return False


def _flat_outputs(module: Any) -> Any:
    """``module`` wrapped to return a tuple of tensors whatever it returns (one tensor, a tuple, a dict:
    the order the import gave the outputs). The wrapper also keeps NNCF's hook storage off a top-level
    ``nn.Sequential``, whose ``forward`` would call it as one more layer."""
    import torch

    from kiln.convert.from_pytorch import flatten_outputs

    class Outputs(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: Any) -> tuple[Any, ...]:
            return tuple(flatten_outputs(self.inner(*args))[0])

    return Outputs(module).eval()


def _class_ids(labels: np.ndarray | None) -> bool:
    return labels is not None and labels.ndim == 1 and labels.dtype.kind in "iu"


def _pick_metric(classify: bool, validation: Samples) -> _Metric:
    if classify:
        return _Metric("top-1" if _class_ids(validation.labels) else "agreement", True)
    return _Metric("val-loss", False)


def _distill_loss(classify: bool) -> Callable[[tuple[Any, ...], tuple[Any, ...], Any], Any]:
    """Classification: KL divergence between the softened logits (×T², so its gradients keep their scale
    as T changes) plus cross-entropy on the labels when they are class ids. Anything else (embeddings,
    boxes, scores): mean squared error on every floating-point output."""
    import torch
    import torch.nn.functional as F

    def loss(student: tuple[Any, ...], teacher: tuple[Any, ...], labels: Any) -> Any:
        if classify:
            s, t = student[0], teacher[0]
            total = F.kl_div(F.log_softmax(s / TEMPERATURE, dim=-1), F.log_softmax(t / TEMPERATURE, dim=-1),
                             reduction="batchmean", log_target=True) * TEMPERATURE**2  # fmt: skip
            if labels is not None and int(labels.max()) < s.shape[-1]:
                total = total + F.cross_entropy(s, labels)
            return total
        pairs = [(s, t) for s, t in zip(student, teacher, strict=True) if torch.is_floating_point(t)]
        return sum(F.mse_loss(s, t) for s, t in pairs) / max(1, len(pairs))

    return loss


def _tensors(samples: Samples, names: list[str], idx: Any) -> tuple[Any, ...]:
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(samples.inputs[n][idx])) for n in names)


def _labels(samples: Samples, idx: Any) -> Any:
    import torch

    labels = samples.labels
    return torch.from_numpy(labels[idx].astype(np.int64)) if labels is not None and _class_ids(labels) else None


def _evaluator(
    teacher: Any, validation: Samples, names: list[str], metric: _Metric, loss_fn: Any, batch_size: int
) -> Callable[[Any], tuple[float, float]]:
    """``evaluate(model)``: the metric and the distillation loss on the validation samples. The teacher's
    answers are computed once."""
    import torch

    n = len(validation)
    chunks = [np.arange(i, min(n, i + 4 * batch_size)) for i in range(0, n, 4 * batch_size)]
    with torch.no_grad():
        wanted = [teacher(*_tensors(validation, names, idx)) for idx in chunks]

    def evaluate(model: Any) -> tuple[float, float]:
        hits = loss = 0.0
        with torch.no_grad():
            for idx, target in zip(chunks, wanted, strict=True):
                out = model(*_tensors(validation, names, idx))
                loss += float(loss_fn(out, target, None)) * len(idx)
                if metric.name == "top-1":
                    hits += float((out[0].argmax(-1) == _labels(validation, idx)).sum())
                elif metric.name == "agreement":
                    hits += float((out[0].argmax(-1) == target[0].argmax(-1)).sum())
        return (hits / n if metric.higher_is_better else loss / n), loss / n

    return evaluate


def _fine_tune(
    model: Any, teacher: Any, train: Samples, names: list[str], loss_fn: Any,
    evaluate: Callable[[Any], tuple[float, float]], metric: _Metric, progress: Callable[[str], None], *,
    budget_s: float, lr: float, batch_size: int, epochs: int | None, patience: int, weight_decay: float,
) -> dict[str, Any]:  # fmt: skip
    """Distillation epochs until the budget, the epoch cap or ``patience`` epochs without a better
    validation metric; the best state (the PTQ one included) is loaded back at the end."""
    import torch

    # BatchNorm stays frozen (eval mode, running statistics kept) for the whole fine-tune. NNCF's long QAT
    # schedules train BN for a while first, but in a budget of minutes with small batches, batch statistics
    # would drift the running means away from the ones the quantizers' ranges were calibrated on, and
    # training would see per-batch normalisation that inference never does. Dropout stays off too: the
    # student should learn the teacher's function under rounding, not a noisier one. Eval mode does not stop
    # gradients: the fake quantizers pass them straight through.
    model.eval()
    quantizer = [p for n, p in model.named_parameters() if "nncf" in n and p.requires_grad]
    ids = {id(p) for p in quantizer}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW([{"params": weights, "weight_decay": weight_decay},
                             {"params": quantizer, "weight_decay": 0.0}], lr=lr)  # fmt: skip
    rng = np.random.default_rng(0)
    n = len(train)
    bs = max(1, min(batch_size, n))
    start = time.perf_counter()
    initial, initial_loss = evaluate(model)
    best, best_key = initial, metric.key(initial, initial_loss)
    best_state = copy.deepcopy(model.state_dict())
    progress(f"qat 0 PTQ {metric.text(initial)}")
    epoch = steps = stale = 0
    last_loss = math.nan
    stopped_by = "epochs"
    while epochs is None or epoch < epochs:
        epoch_start = time.perf_counter()
        if epoch_start - start >= budget_s:
            stopped_by = "budget"
            break
        order = rng.permutation(n)
        running, seen = 0.0, 0
        for i in range(0, max(1, n - bs + 1), bs):  # full batches only: no 1-sample last batch
            idx = order[i : i + bs]
            x = _tensors(train, names, idx)
            with torch.no_grad():
                target = teacher(*x)
            loss = loss_fn(model(*x), target, _labels(train, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            running += loss.item() * len(idx)
            seen += len(idx)
            if time.perf_counter() - start >= budget_s:
                break
        epoch += 1
        last_loss = running / max(1, seen)
        value, val_loss = evaluate(model)
        if metric.key(value, val_loss) > best_key:
            best, best_key, stale = value, metric.key(value, val_loss), 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        now = time.perf_counter()
        total = epochs if epochs is not None else max(epoch, int(budget_s / ((now - start) / epoch)))
        progress(f"qat {epoch}/{total} loss {last_loss:.4g} {metric.text(value)}")
        if now - start + (now - epoch_start) > budget_s:  # another epoch would not fit
            stopped_by = "budget"
            break
        if stale >= patience:
            stopped_by = "early-stop"
            break
    model.load_state_dict(best_state)
    return {"epochs": epoch, "steps": steps, "train_seconds": round(time.perf_counter() - start, 3),
            "initial_metric": round(initial, 6), "best_metric": round(best, 6), "last_loss": round(last_loss, 6),
            "stopped_by": stopped_by}  # fmt: skip


def _example(ctx: PassContext) -> tuple[bool, dict[str, np.ndarray], tuple[Any, ...]]:
    """Whether the model takes a batch dim, and the example both exports trace: random inputs at batch 2
    (1 for an unbatched model), as arrays by name and as the module's positional tensors."""
    import torch

    from kiln.convert.parity import random_inputs

    batched = ctx.spec.serving.max_batch_size != 0
    feed = random_inputs(ctx.spec.inputs, batch=2 if batched else 1, seed=0)
    return batched, feed, tuple(torch.from_numpy(feed[t.name]) for t in ctx.spec.inputs)


def _convert(qmodel: Any, ctx: PassContext) -> Any:
    """The quantized module as an OpenVINO model: inputs named and shaped as in the spec (the batch and
    every other variable dimension dynamic), outputs named as in the spec."""
    import openvino as ov
    import torch

    batched, _, example = _example(ctx)
    shapes = [ov.PartialShape([-1 if d < 0 or (i == 0 and batched) else d for i, d in enumerate(t.shape)])
              for t in ctx.spec.inputs]  # fmt: skip
    with _quiet(), torch.no_grad():  # the tracer warns that quantizer levels become constants: they are
        model = ov.convert_model(qmodel, example_input=example, input=shapes)
    for port, t in zip(model.inputs, ctx.spec.inputs, strict=True):
        port.get_tensor().set_names({t.name})
    for port, t in zip(model.outputs, ctx.spec.outputs, strict=False):
        port.get_tensor().set_names({t.name})
    return model


def _save_ir(model: Any, ctx: PassContext) -> None:
    """Write the IR beside, then rename it into place (the files may be hard links to the repository's)."""
    import openvino as ov

    tmp = ctx.work / ".qat.xml"
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    tmp.replace(ctx.work / IR_FILE)
    tmp.with_suffix(".bin").replace((ctx.work / IR_FILE).with_suffix(".bin"))


def _export_qdq(qmodel: Any, ctx: PassContext) -> dict[str, Any]:
    """Write the quantized module as ``model.onnx`` with a QuantizeLinear/DequantizeLinear pair per NNCF
    quantizer (8-bit; per channel where NNCF chose it), inputs and outputs named as in the spec, the batch
    and every other variable dimension dynamic; checked to load in ONNX Runtime and to answer like the
    module it came from. Returns the figures for the pass report."""
    import onnx
    import onnxruntime as ort
    import torch
    from nncf.torch.quantization.layers import BaseQuantizer, QuantizerExportMode

    batched, feed, example = _example(ctx)
    in_names, out_names = [t.name for t in ctx.spec.inputs], [t.name for t in ctx.spec.outputs]
    dynamic = {t.name: {i: "batch" if i == 0 and batched else f"{t.name}_{i}" for i, d in enumerate(t.shape)
                        if d < 0 or (i == 0 and batched)} for t in [*ctx.spec.inputs, *ctx.spec.outputs]}  # fmt: skip
    quantizers = [m for m in qmodel.modules() if isinstance(m, BaseQuantizer)]
    modes = [q._export_mode for q in quantizers]
    tmp = ctx.work / ".qat.onnx"
    try:
        for q in quantizers:
            q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
        with _quiet(), torch.no_grad():  # the tracer warns that quantizer levels become constants: they are
            torch.onnx.export(qmodel, example, str(tmp), dynamo=False, input_names=in_names, output_names=out_names,
                              dynamic_axes={k: v for k, v in dynamic.items() if v}, opset_version=17)  # fmt: skip
            want = [t.numpy() for t in qmodel(*example)]
    finally:
        for q, mode in zip(quantizers, modes, strict=True):
            q.set_export_mode(mode)
    graph = onnx.load(str(tmp))
    pairs = sum(1 for n in graph.graph.node if n.op_type == "QuantizeLinear")
    if pairs == 0:
        raise RuntimeError("the quantized module exported to ONNX without QuantizeLinear nodes")
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = session.run(out_names, feed)
    error = max(
        float(np.max(np.abs(g.astype(np.float64) - w))) if g.size else 0.0 for g, w in zip(got, want, strict=True)
    )
    scale = max(float(np.max(np.abs(w))) if w.size else 0.0 for w in want)
    if not np.isfinite(error) or error > 0.1 * max(scale, 1e-6):  # int8 rounding differs; a wrong graph differs more
        raise RuntimeError(
            f"the QDQ ONNX graph answers {error:.3g} away from the quantized module (outputs up to {scale:.3g})"
        )
    tmp.replace(ctx.work / ONNX_FILE)
    return {"quantize_linear": pairs, "onnx_nodes": len(graph.graph.node), "onnx_max_error": round(error, 6)}
