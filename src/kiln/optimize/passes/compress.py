"""Compression passes that change the PyTorch module itself: structured pruning and distillation.

``prune-structured`` removes whole channels, filters, attention heads and FFN units with Torch-Pruning's
dependency graph, so every engine after it does less work (unstructured masks would leave dense kernels as
slow as before). Pruning costs accuracy; ``distill`` recovers it by fine-tuning the pruned module against
the original one on the training data, within a time budget, keeping the weights that score best on
held-out data. Both read the module with :func:`~kiln.optimize.training.load_module` and write it back
with :func:`~kiln.optimize.training.save_module`, so the ONNX and ``torch.export`` artifacts the later
passes and engines read always match the module.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kiln.errors import PassNotApplicable
from kiln.optimize.data import Samples
from kiln.optimize.passes.base import PassContext, PassReport, onnx_node_count, register_pass
from kiln.optimize.passes.graph import ONNX, _quiet
from kiln.optimize.program_layers import fixed_width_layers
from kiln.optimize.training import check_trainable, held_out_split, load_module, save_module
from kiln.recipe import NO_TRAINING
from kiln.repository import MODULE_WEIGHTS_FILE

_TEACHER_CACHE_BYTES = 1 << 30  # the teacher's outputs on the training data, kept in memory up to this size

# Names under which attention modules keep their head count and q/k/v projections (BERT-style and the
# q_proj/k_proj/v_proj convention). Heads are pruned whole, keeping the head size, so a forward that
# reshapes to (..., -1, head_size) runs unchanged at the new head count.
_HEAD_ATTRS = ("num_attention_heads", "num_heads")
_QKV_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


# ---- prune-structured -------------------------------------------------------------------------------------
@register_pass("prune-structured")
def prune_structured_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Remove the least important channels (L2 norm of each dependency group's weights) at ``ratio``, widths
    rounded to the nearest multiple of ``round_to`` (SIMD-friendly); attention heads go whole, at the same
    ratio. The layers producing the model's outputs and the ``keep`` modules keep their widths."""
    import torch
    import torch_pruning as tp

    ratio = float(params["ratio"])
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"prune-structured ratio {ratio}: use a fraction of channels to remove in (0, 1), e.g. 0.5")
    round_to = int(params.get("round_to", 8))
    if round_to < 1:
        raise ValueError(f"prune-structured round_to {round_to}: use 1 (any width) or a multiple such as 8")
    keep = [str(k) for k in params.get("keep", [])]
    module = load_module(ctx.source, _version_dir(ctx), ctx.work)
    example = _example_inputs(ctx)
    names = {m: n for n, m in module.named_modules()}
    widths_before = _widths(module)
    if not widths_before:
        raise PassNotApplicable(
            "no Conv or Linear layer to prune: the model computes its convolutions and matmuls on reshaped "
            "weights (as Keras does with its kernels), which Torch-Pruning cannot follow"
        )
    nodes_before = onnx_node_count(ctx.work / ONNX) if (ctx.work / ONNX).is_file() else None
    with _quiet():  # tracing needs autograd: the dependency graph is read from the grad_fn chain
        ops_before, params_before = _ops_and_params(module, example)
        # a program's literal shapes (a view to [b, s, 12, 32]) pin the widths of the layers feeding them
        ignored = _kept_layers(module, keep) + _output_layers(module, example) + fixed_width_layers(module)
        heads, unsupported = _attention_heads(module)
        ignored += unsupported
        pruner = _pruner_class()(
            module, example, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=ignored, round_to=round_to, num_heads=heads, prune_num_heads=bool(heads),
            prune_head_dims=not heads, head_pruning_ratio=ratio if heads else 0.0, output_transform=_mark_outputs,
        )  # fmt: skip
        heads_before = dict(pruner.num_heads)
        pruner.step()
        _set_head_counts(module, pruner.num_heads)
    widths_after = _widths(module)
    changed = {n: [widths_before[n], w] for n, w in widths_after.items() if widths_before.get(n) != w}
    head_counts = {names[q]: [heads_before[q], pruner.num_heads[q]] for q in heads_before
                   if names.get(q, "").endswith(("query", "q_proj")) and heads_before[q] != pruner.num_heads[q]}  # fmt: skip
    if not changed:
        raise PassNotApplicable(
            f"pruning {ratio:.0%} of the channels removes none: every prunable layer is an output or kept layer, "
            f"or too narrow to lose channels and stay a multiple of round_to={round_to}"
        )
    with torch.no_grad(), _quiet():
        ops_after, params_after = _ops_and_params(module, example)
    _check_rebuilt(ctx, module, example)
    save_module(module, ctx.spec, ctx.work, ctx.source)
    details: dict[str, Any] = {
        "ratio": ratio, "round_to": round_to, "params_before": params_before, "params_after": params_after,
        "macs_before": ops_before, "macs_after": ops_after, "widths": changed,
        "kept": sorted({names[m] for m in ignored if names.get(m) in widths_before or _is_mha(m)}),
    }  # fmt: skip
    if head_counts:
        details["heads"] = head_counts
    return PassReport("prune-structured", nodes_before=nodes_before, nodes_after=onnx_node_count(ctx.work / ONNX),
                      details=details)  # fmt: skip


def _pruner_class() -> Any:
    """Torch-Pruning's pruner, rounding each width to the *nearest* multiple of ``round_to`` (at least one):
    its own rounds down, so that 24 channels at ratio 0.5 would keep 8, not 16."""
    import torch_pruning as tp

    class NearestRoundPruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            kept = max(round_to, math.floor((current_channels - n_pruned) / round_to + 0.5) * round_to)
            return max(current_channels - kept, 0)

    return NearestRoundPruner


def _version_dir(ctx: PassContext) -> Path:
    if ctx.version_dir is None:
        raise PassNotApplicable("needs the model version's directory (its imported weights) to rebuild the module")
    return ctx.version_dir


def _example_inputs(ctx: PassContext) -> tuple[Any, ...]:
    """One sample for tracing the module: a real one when there is data (so value ranges and masks are
    realistic), else random inputs at the spec's shapes."""
    import torch

    from kiln.convert.parity import random_inputs

    samples = ctx.validation if ctx.validation is not None else ctx.train
    if samples is not None and len(samples) > 0:
        feed = {t.name: np.ascontiguousarray(samples.inputs[t.name][:1]).astype(t.numpy_dtype) for t in ctx.spec.inputs}
    else:
        feed = random_inputs(ctx.spec.inputs, batch=1, seed=0)
    return tuple(torch.from_numpy(feed[t.name]) for t in ctx.spec.inputs)


def _mark_outputs(out: Any) -> list[Any]:
    """The model's outputs, each through an identity op, so the dependency graph gives every output a node
    of its own (a Linear whose result is returned as is would otherwise *be* the output node)."""
    from kiln.convert.from_pytorch import flatten_outputs

    return [o * 1 for o in flatten_outputs(out)[0] if getattr(o, "grad_fn", None) is not None]


def _output_layers(module: Any, example: tuple[Any, ...]) -> list[Any]:
    """The layers whose output channels reach a model output (a classifier's last Linear, a detector's class
    and box convs, the hidden size of a transformer whose states are pooled into the output): pruning them
    would change the output's shape."""
    import torch
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example, output_transform=_mark_outputs)
    layers: list[Any] = []
    for group in graph.get_all_groups():
        if any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group):
            layers += [dep.target.module for dep, _ in group
                       if graph.is_out_channel_pruning_fn(dep.handler) and isinstance(dep.target.module, torch.nn.Module)]  # fmt: skip
    return layers


def _kept_layers(module: Any, keep: list[str]) -> list[Any]:
    """The modules the user named, with every layer inside them."""
    modules = dict(module.named_modules())
    unknown = [k for k in keep if k not in modules]
    if unknown:
        layers = [n for n, m in modules.items() if n and not list(m.children())]
        raise ValueError(f"prune-structured keep {unknown}: no such module; the model's layers are {layers[:20]}")
    return [sub for k in keep for sub in modules[k].modules()]


def _attention_heads(module: Any) -> tuple[dict[Any, int], list[Any]]:
    """``{q/k/v projection: head count}`` of the attention modules whose heads can be pruned whole, and the
    layers to leave alone: attention whose layout the rebuild cannot follow (``nn.MultiheadAttention`` keeps
    its width in attributes; grouped-query projections of different widths)."""
    import torch

    heads: dict[Any, int] = {}
    unsupported: list[Any] = []
    for layer in module.modules():
        if isinstance(layer, torch.nn.MultiheadAttention):
            unsupported += list(layer.modules())
            continue
        count = next((getattr(layer, a) for a in _HEAD_ATTRS if isinstance(getattr(layer, a, None), int)), None)
        if count is None:
            continue
        for names in _QKV_NAMES:
            projections = [p for p in (getattr(layer, n, None) for n in names) if isinstance(p, torch.nn.Linear)]
            if len(projections) != len(names):
                continue
            if len({p.out_features for p in projections}) == 1 and projections[0].out_features % count == 0:
                heads.update(dict.fromkeys(projections, count))
            else:
                unsupported += projections
    return heads, unsupported


def _set_head_counts(module: Any, counts: dict[Any, int]) -> None:
    """Tell the attention modules their new head counts (their forward may read them)."""
    for layer in module.modules():
        for names in _QKV_NAMES:
            query = getattr(layer, names[0], None)
            if query is None or query not in counts:
                continue
            for attr in _HEAD_ATTRS:
                if isinstance(getattr(layer, attr, None), int):
                    setattr(layer, attr, counts[query])
            if isinstance(getattr(layer, "all_head_size", None), int):
                layer.all_head_size = query.out_features


def _is_mha(layer: Any) -> bool:
    import torch

    return isinstance(layer, torch.nn.MultiheadAttention)


def _widths(module: Any) -> dict[str, int]:
    """Output width of every Conv and Linear layer, by name."""
    import torch

    widths = {}
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.modules.conv._ConvNd):
            widths[name] = int(layer.out_channels)
        elif isinstance(layer, torch.nn.Linear):
            widths[name] = int(layer.out_features)
    return widths


def _ops_and_params(module: Any, example: tuple[Any, ...]) -> tuple[int | None, int]:
    """Multiply-accumulates of one sample through the Conv/Linear-like layers (attention's activation
    products are not counted), and the number of parameters."""
    import torch_pruning as tp

    params = sum(p.numel() for p in module.parameters())
    try:
        macs, _ = tp.utils.count_ops_and_params(module, example)
    except Exception:  # the counter cannot run some models; the parameter count still can
        return None, int(params)
    return int(macs), int(params)


def _forward(module: Any, inputs: tuple[Any, ...]) -> list[Any]:
    from kiln.convert.from_pytorch import flatten_outputs

    return list(flatten_outputs(module(*inputs))[0])


def _check_rebuilt(ctx: PassContext, module: Any, example: tuple[Any, ...]) -> None:
    """The next pass rebuilds the module from the factory at the saved widths: make sure that module is the
    one that was pruned (a layer keeping its width in an attribute the rebuild does not set would differ).
    Checked on weights saved aside, so a model that fails leaves ``ctx.work`` as it was."""
    import shutil
    import tempfile

    import torch
    from safetensors.torch import save_file

    with torch.no_grad():
        reference = _forward(module, example)
    aside = Path(tempfile.mkdtemp(prefix=".rebuild-", dir=ctx.work))
    try:
        save_file(
            {k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(aside / MODULE_WEIGHTS_FILE)
        )
        rebuilt = load_module(ctx.source, _version_dir(ctx), aside)
        with torch.no_grad():
            outputs = _forward(rebuilt, example)
        same = len(outputs) == len(reference) and all(
            o.shape == r.shape and torch.allclose(o, r, rtol=1e-4, atol=1e-4) for o, r in zip(outputs, reference, strict=True)
        )  # fmt: skip
    except PassNotApplicable:
        raise
    except Exception as exc:
        raise PassNotApplicable(
            f"the pruned model cannot be rebuilt from {ctx.source!r} at its new widths ({type(exc).__name__}: {exc})"
        ) from None
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    if not same:
        raise PassNotApplicable(f"the model rebuilt from {ctx.source!r} at the pruned widths computes something else")


# ---- distill ----------------------------------------------------------------------------------------------
LossKind = Literal["auto", "kl", "mse"]


@dataclass
class _Objective:
    """How the student is scored against the teacher: KL on the class logits (``kl_outputs``) with the
    temperature, variance-scaled MSE on the other outputs, and cross-entropy on class-id labels."""

    kl_outputs: set[int]
    temperature: float
    scale: list[float]  # 1 / teacher variance per output, so each output weighs alike in the MSE
    ce_weight: float = 0.0  # the labels' share when they are class ids

    def loss(self, student: list[Any], teacher: list[Any], labels: Any = None) -> Any:
        import torch.nn.functional as F

        t = self.temperature
        terms = []
        for i, (s, r) in enumerate(zip(student, teacher, strict=True)):
            if i in self.kl_outputs:
                kl = F.kl_div(F.log_softmax(s / t, dim=-1), F.log_softmax(r / t, dim=-1), log_target=True,
                              reduction="batchmean") * t * t  # fmt: skip
                if labels is not None and self.ce_weight > 0 and i == 0:  # class ids label the first output
                    kl = (1 - self.ce_weight) * kl + self.ce_weight * F.cross_entropy(s, labels)
                terms.append(kl)
            else:
                terms.append(F.mse_loss(s.float(), r.float()) * self.scale[i])
        return sum(terms) / len(terms)


@dataclass
class _Validator:
    """Scores the student on held-out samples, larger is better: top-1 when the labels are class ids (ties
    broken by the distillation loss), else the distillation loss against the teacher's outputs."""

    samples: Samples
    teacher: list[Any]
    names: list[str]
    objective: _Objective
    top1: bool

    def __call__(self, student: Any) -> tuple[float, ...]:
        import torch

        outputs = _predict(student, self.samples, self.names)
        with torch.inference_mode():
            loss = float(self.objective.loss(outputs, self.teacher))
        if not self.top1:
            return (-loss,)
        return (float((outputs[0].argmax(dim=1).numpy() == np.asarray(self.samples.labels)).mean()), -loss)

    @property
    def metric(self) -> str:
        return "top-1" if self.top1 else "validation loss"

    def value(self, score: tuple[float, ...]) -> float:
        return score[0] if self.top1 else -score[0]

    def show(self, score: tuple[float, ...]) -> str:
        return f"top-1 {score[0]:.2%}" if self.top1 else f"val loss {-score[0]:.4f}"


@dataclass
class _Run:
    epochs: int = 0
    steps: int = 0
    best_epoch: int = 0
    stopped_by: Literal["budget", "early-stop", "epochs"] = "epochs"


@register_pass("distill")
def distill_pass(ctx: PassContext, params: dict[str, Any]) -> PassReport:
    """Fine-tune the compressed module (the student) towards the original (the teacher) on the training
    data, for at most ``budget_s`` seconds (wall clock, from the pass's start), and keep the weights that
    score best on validation: early stopping after ``patience`` evaluations without improvement."""
    import torch

    check_trainable(ctx.source, ctx.version_dir)  # an ONNX-only model says so before anything else
    if ctx.train is None or len(ctx.train) == 0:
        raise PassNotApplicable(NO_TRAINING)
    if not (ctx.work / MODULE_WEIGHTS_FILE).is_file():
        raise PassNotApplicable("nothing to recover: no pass before distill changed the model (prune it first)")
    budget = float(params.get("budget_s", ctx.train_budget_s))
    kind = str(params.get("loss", "auto"))
    if kind not in ("auto", "kl", "mse"):
        raise ValueError(f"distill loss {kind!r}: use 'auto', 'kl' (logits) or 'mse' (outputs)")
    max_epochs, patience = int(params.get("epochs", 100)), int(params.get("patience", 5))
    base_lr = float(params.get("lr", 1e-3))
    start = time.perf_counter()
    torch.manual_seed(0)
    student = load_module(ctx.source, _version_dir(ctx), ctx.work)
    teacher = load_module(ctx.source, _version_dir(ctx)).requires_grad_(False)
    names = [t.name for t in ctx.spec.inputs]
    train, held_out = held_out_split(ctx.train, ctx.validation)
    probe = _predict(teacher, train.take(0, min(len(train), 256)), names)
    objective = _objective(ctx, kind, float(params.get("temperature", 4.0)), probe, train.labels)
    # The teacher is frozen: its outputs on the training data are computed once, unless they would not fit.
    fits = sum(t.element_size() * t.numel() for t in probe) * len(train) / len(probe[0]) <= _TEACHER_CACHE_BYTES
    teacher_train = _predict(teacher, train, names) if fits else None
    top1 = _class_ids(held_out.labels, probe) is not None
    validate = _Validator(held_out, _predict(teacher, held_out, names), names, objective, top1)

    batch = max(2, min(int(params.get("batch_size", 64)), len(train)))
    steps_per_epoch = max(1, len(train) // batch)  # whole batches only: BatchNorm cannot train on one sample
    total_steps = max_epochs * steps_per_epoch
    opt = torch.optim.AdamW(student.parameters(), lr=base_lr, weight_decay=1e-4)
    labels = _class_ids(train.labels, probe)
    rng = np.random.default_rng(0)
    run = _Run()

    tick = time.perf_counter()
    before = best = validate(student)
    eval_s = time.perf_counter() - tick
    best_state = copy.deepcopy(student.state_dict())
    ctx.progress(f"distill 0/{max_epochs} {validate.show(before)}")
    stale, step_s = 0, 0.0
    while run.epochs < max_epochs:
        student.train()
        order = rng.permutation(len(train))
        losses = []
        for b in range(steps_per_epoch):
            elapsed = time.perf_counter() - start
            if elapsed + step_s + eval_s > budget:  # room for one more step and the evaluation after it
                run.stopped_by = "budget"
                break
            progress = max(run.steps / total_steps, elapsed / budget)
            for group in opt.param_groups:  # cosine decay over whichever runs out first: epochs or time
                group["lr"] = base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
            idx = np.sort(order[b * batch : (b + 1) * batch])
            xs = tuple(torch.from_numpy(np.ascontiguousarray(train.inputs[n][idx])) for n in names)
            if teacher_train is not None:
                target = [t[idx] for t in teacher_train]
            else:
                with torch.no_grad():
                    target = _forward(teacher, xs)
            loss = objective.loss(_forward(student, xs), target, None if labels is None else labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run.steps += 1
            step_s = time.perf_counter() - start - elapsed
            losses.append(float(loss.detach()))
        if not losses:
            break
        run.epochs += 1
        student.eval()
        tick = time.perf_counter()
        score = validate(student)
        eval_s = time.perf_counter() - tick
        ctx.progress(f"distill {run.epochs}/{max_epochs} loss {np.mean(losses):.4f} {validate.show(score)}")
        if score > best:
            best, run.best_epoch, stale = score, run.epochs, 0
            best_state = copy.deepcopy(student.state_dict())
        elif (stale := stale + 1) >= patience:
            run.stopped_by = "early-stop"
        if run.stopped_by != "epochs":
            break
    seconds = time.perf_counter() - start
    student.load_state_dict(best_state)
    save_module(student.eval(), ctx.spec, ctx.work, ctx.source)
    return PassReport("distill", nodes_after=onnx_node_count(ctx.work / ONNX), details={
        "epochs": run.epochs, "steps": run.steps, "seconds": round(seconds, 2), "budget_s": budget,
        "stopped_by": run.stopped_by, "metric": validate.metric, "before": round(validate.value(before), 6),
        "best": round(validate.value(best), 6), "best_epoch": run.best_epoch,
        "loss": "kl" if objective.kl_outputs else "mse",
    })  # fmt: skip


def _objective(ctx: PassContext, kind: str, temperature: float, teacher: list[Any], labels: Any) -> _Objective:
    """``auto``: KL on a classifier's logits (plus cross-entropy when the labels are class ids), MSE on every
    other output (embeddings, a detector's raw scores and boxes)."""
    logits = [i for i, t in enumerate(teacher) if t.ndim == 2 and t.shape[1] > 1 and t.is_floating_point()]
    if kind == "kl":
        if not logits:
            raise PassNotApplicable("distill loss 'kl' needs logits ([batch, classes] outputs); use 'mse'")
        kl = set(logits)
    elif kind == "auto" and ctx.spec.task == "classification" and logits:
        kl = {logits[0]}
    else:
        kl = set()
    scale = [1.0 / max(float(t.float().var()), 1e-8) if t.numel() > 1 else 1.0 for t in teacher]
    ce = 0.5 if kl and _class_ids(labels, teacher) is not None else 0.0
    return _Objective(kl, temperature, scale, ce)


def _class_ids(labels: Any, teacher: list[Any]) -> Any:
    """The labels as a LongTensor of class ids when they are that (one integer per sample, within the classes
    of the model's first output, [batch, classes] logits), else None (boxes, embeddings, no labels)."""
    import torch

    if labels is None or labels.ndim != 1 or not teacher or teacher[0].ndim != 2:
        return None
    arr = np.asarray(labels)
    if arr.dtype.kind == "f" and not np.all(np.mod(arr, 1) == 0):
        return None
    if arr.dtype.kind not in "iuf" or arr.min() < 0 or arr.max() >= teacher[0].shape[1]:
        return None
    return torch.from_numpy(arr.astype(np.int64))


def _predict(module: Any, samples: Samples, names: list[str], batch: int = 256) -> list[Any]:
    """Every output of ``module`` on all of ``samples``, batched, without autograd."""
    import torch

    chunks: list[list[Any]] = []
    with torch.inference_mode():
        for feed in samples.batches(batch):
            chunks.append(
                _forward(module.eval(), tuple(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names))
            )
    return [torch.cat([c[i] for c in chunks]).clone() for i in range(len(chunks[0]))]
