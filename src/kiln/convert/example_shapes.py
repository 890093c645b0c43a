"""Example shapes: sizes for an ONNX model's dynamic dims besides batch, so that the import check, the bench
and optimize without data feed the model inputs it accepts (a stride-32 network breaks at 8×8, a reflect
Pad of 32 needs more than 32 samples).

A dim the user sized (``--dim NAME=SIZE``, ``--input-shape``) keeps that size; a batch dim is 1; a dim a
consumer's weights fix (a Conv's input channels) takes that size. Every other dim gets a short list of
candidates, cheapest first, from its name and the graph:

- its name: ``seq``/``len``/``token`` → sequence lengths; ``height``/``width``/``h``/``w`` (or the spatial
  axes of a 4-D float input, NCHW or NHWC) → image sizes; ``audio``/``samples``/``time`` on a 2-D or 3-D
  float input → audio lengths; anything else → common sizes;
- the graph: a multiple of the product of Conv/Pool strides along the input's path, and at least the
  size a kernel (after that stride) or a reflect Pad needs.

Trial k gives every searched dim its k-th candidate (its last when its list is shorter); the first trial
the model runs on is kept. A name shared by several inputs is one dim with one size. ``run`` is the only
call into a runtime, so this module is tested without one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from kiln.convert.parity import random_inputs
from kiln.errors import CorruptModelError, ExampleShapeError, InvalidSourceError, SpecError, first_line
from kiln.spec import TensorSpec

Axes = Sequence[Sequence[int | str]]  # per input, per axis: a fixed size or the name of a dynamic dim
Role = Literal["sequence", "spatial", "audio", "other"]

SIZES: dict[Role, tuple[int, ...]] = {
    "sequence": (16, 64, 128),
    "spatial": (32, 64, 224, 320, 640),
    "audio": (512, 1024, 16000),
    "other": (8, 16, 32, 64, 128),
}
_AS: dict[Role, str] = {
    "sequence": "as a sequence length",
    "spatial": "as an image size",
    "audio": "as an audio length",
    "other": "as a common size",
}
MAX_TRIALS = 6
_SEQUENCE_WORDS = ("seq", "len", "token", "sentence", "text", "word", "position", "context")
_SPATIAL_WORDS = ("height", "width", "spatial", "image", "img")
_AUDIO_WORDS = ("audio", "sample", "time", "wav", "wave", "signal")
_STRIDED = {"Conv": "convs", "ConvInteger": "convs", "QLinearConv": "convs", "MaxPool": "pools",
            "AveragePool": "pools", "LpPool": "pools"}  # fmt: skip
_WEIGHT_INPUT = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}


def parse_dims(texts: Sequence[str]) -> dict[str, int]:
    """``--dim`` flags: ['seq=128', 'height=320'] -> {'seq': 128, 'height': 320}."""
    dims: dict[str, int] = {}
    for text in texts:
        name, eq, size = (p.strip() for p in text.partition("="))
        if not eq or not name or not size.isdigit() or int(size) < 1:
            raise SpecError(f"--dim {text!r}: expected NAME=SIZE, a dynamic dim's name and a positive size, "
                            "like --dim seq=128 or --dim height=320")  # fmt: skip
        if dims.setdefault(name, int(size)) != int(size):
            raise SpecError(f"--dim {name} is given twice, as {dims[name]} and {size}: give each dim one size")
    return dims


# ---- what the graph says -------------------------------------------------------------------------------
@dataclass
class Hints:
    """What an ONNX graph says of its inputs' dims, keyed by input name (and axis)."""

    stride: dict[str, int] = field(default_factory=dict)  # largest product of strides on a path from the input
    stride_ops: dict[str, set[str]] = field(default_factory=dict)  # what strides it: "convs", "pools"
    strided_rank: dict[str, int] = field(default_factory=dict)  # how many trailing axes those ops stride
    minimum: dict[tuple[str, int], tuple[int, str]] = field(default_factory=dict)  # (input, axis) -> least, why
    fixed: dict[tuple[str, int], tuple[int, str]] = field(default_factory=dict)  # (input, axis) -> size, why

    def at_least(self, key: tuple[str, int], size: int, why: str) -> None:
        if size > self.minimum.get(key, (1, ""))[0]:
            self.minimum[key] = (size, why)


def analyse(model: Any) -> Hints:
    """Strides, least sizes and weight-fixed sizes of the graph's inputs, from one pass over its nodes (in
    the topological order ONNX requires); nodes inside subgraphs are not read."""
    g = model.graph
    consts: dict[str, Any] = {t.name: t for t in g.initializer}
    names = [v.name for v in g.input if v.name not in consts]
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*g.input, *g.value_info]
            if v.type.tensor_type.HasField("shape")}  # fmt: skip
    deps: dict[str, frozenset[str]] = {n: frozenset([n]) for n in names}
    factor: dict[str, int] = dict.fromkeys(names, 1)
    hints = Hints()
    for node in g.node:
        if node.op_type == "Constant":
            value = _attrs(node).get("value")
            if value is not None:
                consts[node.output[0]] = value
            continue
        src = frozenset().union(*(deps[i] for i in node.input if i in deps))
        if not src:
            continue
        f = max((factor[i] for i in node.input if i in factor), default=1)
        data = node.input[0] if node.input else ""
        if data in names:
            _weights_fix(node, data, rank.get(data, 0), consts, hints)
        if node.op_type in _STRIDED:
            f = _strided(node, src, f, consts, rank, hints)
        elif node.op_type == "Pad":
            _reflect_pad(node, src, f, consts, rank, hints)
        for out in node.output:
            deps[out] = src
            factor[out] = f
    return hints


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const(consts: Mapping[str, Any], name: str) -> np.ndarray | None:
    """A constant's values, or None when it is not a constant (or its data is stored outside the file)."""
    from onnx import numpy_helper

    t = consts.get(name)
    if t is None or t.data_location == 1:  # onnx.TensorProto.EXTERNAL: not loaded for the analysis
        return None
    try:
        return np.asarray(numpy_helper.to_array(t))
    except Exception:  # external data not loaded
        return None


def _ranks_of(src: frozenset[str], rank: Mapping[str, int]) -> list[tuple[str, int]]:
    return [(n, rank.get(n, 0)) for n in sorted(src)]


def _strided(node: Any, src: frozenset[str], f: int, consts: Mapping[str, Any], rank: Mapping[str, int],
             hints: Hints) -> int:  # fmt: skip
    """Record the least size the node's kernel needs (scaled by the stride before it) and return the stride
    after it."""
    a = _attrs(node)
    kernel = list(a.get("kernel_shape") or [])
    if not kernel and node.op_type in _WEIGHT_INPUT and len(node.input) > _WEIGHT_INPUT[node.op_type]:
        w = consts.get(node.input[_WEIGHT_INPUT[node.op_type]])
        kernel = list(w.dims[2:]) if w is not None else []
    k = len(kernel) or len(a.get("strides") or [])
    if not k:
        return f
    strides = list(a.get("strides") or [1] * k)
    dilations = list(a.get("dilations") or [1] * k)
    pads = list(a.get("pads") or [0] * 2 * k)
    auto_pad = a.get("auto_pad", b"NOTSET")
    same = (auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)).startswith("SAME")
    why = f"a {'×'.join(map(str, kernel))} {node.op_type} kernel" + (f" after stride {f}" if f > 1 else "")
    for i, size in enumerate(kernel):
        need = (size - 1) * dilations[i] + 1 - (0 if same else pads[i] + pads[i + k])
        for name, r in _ranks_of(src, rank) if need > 1 else ():
            if r >= k:
                hints.at_least((name, r - k + i), need * f, why)
    s = max(strides, default=1)
    if s <= 1:
        return f
    for name in src:
        hints.stride[name] = max(hints.stride.get(name, 1), f * s)
        hints.stride_ops.setdefault(name, set()).add(_STRIDED[node.op_type])
        hints.strided_rank[name] = max(hints.strided_rank.get(name, 0), k)
    return f * s


def _reflect_pad(node: Any, src: frozenset[str], f: int, consts: Mapping[str, Any], rank: Mapping[str, int],
                 hints: Hints) -> None:  # fmt: skip
    """A reflect Pad of p along an axis needs more than p there (ONNX Runtime refuses p >= the size)."""
    a = _attrs(node)
    mode = a.get("mode", b"constant")
    if (mode.decode() if isinstance(mode, bytes) else str(mode)) != "reflect":
        return
    pads = _const(consts, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if pads is None:
        pads = np.asarray(a.get("pads") or [], dtype=np.int64)
    pads = pads.astype(np.int64).ravel()
    n = len(pads) // 2
    if not n:
        return
    axes = _const(consts, node.input[3]) if len(node.input) > 3 and node.input[3] else None
    data_rank = n if axes is None else rank.get(node.input[0], 0)
    for j, axis in enumerate(range(n) if axes is None else [int(x) for x in axes.ravel()]):
        p = int(max(pads[j], pads[j + n]))
        from_end = -axis if axis < 0 else data_rank - axis
        if p <= 0 or from_end <= 0:
            continue
        for name, r in _ranks_of(src, rank):
            if r - from_end >= 0:
                hints.at_least((name, r - from_end), (p + 1) * f, f"a reflect Pad of {p}")


def _weights_fix(node: Any, data: str, r: int, consts: Mapping[str, Any], hints: Hints) -> None:
    """The size that the weights of a node reading a graph input directly fix: a Conv's input channels, a
    MatMul's or Gemm's inner dim."""
    op = node.op_type
    if op in _WEIGHT_INPUT and len(node.input) > _WEIGHT_INPUT[op]:
        w = consts.get(node.input[_WEIGHT_INPUT[op]])
        if w is not None and len(w.dims) >= 3 and r >= 2:
            hints.fixed[(data, 1)] = (int(w.dims[1]) * int(_attrs(node).get("group", 1)), f"from the {op} weights")
    elif op in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in consts and r >= 1:
        dims = list(consts[node.input[1]].dims)
        a = _attrs(node)
        if len(dims) >= 2 and not a.get("transA", 0):
            inner = dims[1] if a.get("transB", 0) else dims[-2]
            hints.fixed[(data, r - 1)] = (int(inner), f"from the {op} weights")


# ---- which sizes to try ----------------------------------------------------------------------------------
@dataclass
class Dim:
    """One dynamic dim: where it appears, and its size (given or found) or the sizes to try."""

    name: str
    uses: list[tuple[int, int]] = field(default_factory=list)  # (input index, axis)
    size: int | None = None
    why: str = ""
    candidates: tuple[int, ...] = ()
    batch: bool = False
    given: bool = False  # by --dim or --input-shape


@dataclass(frozen=True)
class Choice:
    """The shapes the model ran with, per input; ``example`` holds them for the inputs with dynamic dims
    besides batch (None for the others), and ``summary`` says which sizes came from where."""

    shapes: list[tuple[int, ...]]
    example: list[tuple[int, ...] | None]
    summary: str | None


def plan(inputs: Sequence[TensorSpec], axes: Axes, batched: bool, hints: Hints, source: str,
         dims: Mapping[str, int] | None = None, shapes: Sequence[Sequence[int]] | None = None) -> list[Dim]:  # fmt: skip
    """The model's dynamic dims in first-use order, each with its size or its candidates."""
    found: dict[str, Dim] = {}
    for i, ax in enumerate(axes):
        for a, d in enumerate(ax):
            if isinstance(d, str):
                found.setdefault(d, Dim(d)).uses.append((i, a))
    for dim in found.values():
        if batched and any(a == 0 for _, a in dim.uses):
            dim.size, dim.batch = 1, True
    if shapes is not None:
        _given_shapes(inputs, axes, shapes, found, source)
    for name, size in (dims or {}).items():
        if name not in found:
            known = ", ".join(d.name for d in found.values() if not d.batch)
            has = f"its dynamic dims besides batch are {known}" if known else "it has no dynamic dims besides batch"
            raise SpecError(f"--dim {name}={size}: {source} has no dynamic dim {name!r}; {has}")
        dim = found[name]
        if dim.batch:
            raise SpecError(f"--dim {name}={size}: {name!r} is the batch dim, which bench and optimize size "
                            "(--batch-sizes, --batch-size); --dim sizes the other dynamic dims")  # fmt: skip
        if dim.given and dim.size != size:
            raise SpecError(f"--dim {name}={size} disagrees with --input-shape, which gives {name} = {dim.size}")
        dim.size, dim.why, dim.given = size, dim.why or "from --dim", True
    for dim in found.values():
        if dim.size is None:
            _searched(dim, inputs, axes, hints)
    return list(found.values())


def _given_shapes(inputs: Sequence[TensorSpec], axes: Axes, shapes: Sequence[Sequence[int]], found: dict[str, Dim],
                  source: str) -> None:  # fmt: skip
    if len(shapes) != len(inputs):
        names = ", ".join(t.name for t in inputs)
        raise SpecError(f"--input-shape was given {len(shapes)} time(s), but {source} has {len(inputs)} input(s) "
                        f"({names}): give one per input, in order")  # fmt: skip
    sized: dict[str, int] = {}
    for t, ax, shape in zip(inputs, axes, shapes, strict=True):
        text = ",".join(map(str, shape))
        if len(shape) != len(ax):
            raise SpecError(f"--input-shape {text} for input {t.name!r}: {len(shape)} dims, but the input has "
                            f"{len(ax)} ({_named(ax)})")  # fmt: skip
        for a, (d, v) in enumerate(zip(ax, shape, strict=True)):
            if isinstance(d, int):
                if d != v:
                    raise SpecError(f"--input-shape {text} for input {t.name!r}: axis {a} is fixed at {d}, not {v}")
            elif sized.setdefault(d, v) != v:
                raise SpecError(f"--input-shape gives dim {d!r} two sizes ({sized[d]} and {v}): inputs that share "
                                "a dim name share its size")  # fmt: skip
    for name, v in sized.items():
        if not found[name].batch:  # the batch stays 1: bench and optimize choose their batch sizes
            found[name].size, found[name].why, found[name].given = v, "from --input-shape", True


def _named(ax: Sequence[int | str]) -> str:
    return "×".join(map(str, ax))


def _searched(dim: Dim, inputs: Sequence[TensorSpec], axes: Axes, hints: Hints) -> None:
    """Give ``dim`` the size the weights fix, or the candidates its role and the graph's constraints allow."""
    for i, a in dim.uses:
        fixed = hints.fixed.get((inputs[i].name, a))
        if fixed is not None:
            dim.size, dim.why = fixed
            return
    role = role_of(dim, inputs, axes)
    stride, ops, least, least_why = 1, set(), 1, ""
    for i, a in dim.uses:
        name, r = inputs[i].name, len(axes[i])
        s = hints.stride.get(name, 1)
        if s > stride and (a >= r - hints.strided_rank.get(name, 0) or role == "spatial"):
            stride, ops = s, hints.stride_ops.get(name, set())
        m, why = hints.minimum.get((name, a), (1, ""))
        if m > least:
            least, least_why = m, why
    dim.candidates = candidates(role, stride, least)
    if stride > 1:
        dim.why = f"from the stride-{stride} {' and '.join(sorted(ops))}"
    elif least > 1:
        dim.why = f"as {least_why} needs at least {least}"
    else:
        dim.why = _AS[role]


def candidates(role: Role, stride: int = 1, least: int = 1) -> tuple[int, ...]:
    """The role's sizes that are multiples of ``stride`` and at least ``least``; when fewer than three are
    left, the smallest such multiple (of 8 without a stride) and its doubles join them. Ascending, at most
    :data:`MAX_TRIALS`."""
    fits = [c for c in SIZES[role] if c % stride == 0 and c >= least]
    if len(fits) < 3:
        step = stride if stride > 1 else 8
        first = -(-max(least, stride) // step) * step
        fits += [first, 2 * first, 4 * first]
    return tuple(sorted(set(fits)))[:MAX_TRIALS]


def words(name: str) -> list[str]:
    """A dim name's words, lower case: ``input_height`` → input, height; ``seqLen`` → seq, len."""
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [w.lower() for w in re.split(r"[^A-Za-z]+", spaced) if w]


def role_of(dim: Dim, inputs: Sequence[TensorSpec], axes: Axes) -> Role:
    """What a dim most likely measures: by its name first (an audio name on a 2-D or 3-D float input), else by
    its place in a 4-D or 5-D float input."""
    ws = words(dim.name)
    floats = [(axes[i], a) for i, a in dim.uses if inputs[i].numpy_dtype.kind == "f"]
    if any(w.startswith(_AUDIO_WORDS) for w in ws) and any(len(ax) in (2, 3) for ax, _ in floats):
        return "audio"  # before sequence: audio_length is a waveform's length
    if any(w.startswith(_SEQUENCE_WORDS) for w in ws):
        return "sequence"
    if any(w.startswith(_SPATIAL_WORDS) or w in ("h", "w") for w in ws):
        return "spatial"
    if any(_spatial_axis(ax, a) for ax, a in floats):
        return "spatial"
    return "other"


def _spatial_axis(ax: Sequence[int | str], a: int) -> bool:
    """Whether axis ``a`` of a float input of these axes is an image axis: NCHW, or NHWC where the last axis
    is a fixed 1 to 4 channels and axis 1 is not."""
    r = len(ax)
    if r not in (4, 5):
        return False

    def few(d: int | str) -> bool:
        return isinstance(d, int) and d <= 4

    if few(ax[-1]) and not few(ax[1]):
        return 1 <= a <= r - 2
    return a >= 2


def random_inputs_line(inputs: Sequence[TensorSpec]) -> str | None:
    """What the bench and optimize without data say of the random inputs they feed: their shapes, where a dim
    besides batch is dynamic (None when none is: the spec's shapes say it all)."""
    shown, stale = [], False
    for t in inputs:
        if not any(d == -1 for d in t.shape[1:]):
            continue
        dims = t.sample_shape(1)
        shown.append(f"input {t.name!r} " + "×".join("N" if i == 0 and t.shape[0] == -1 else str(d)
                                                    for i, d in enumerate(dims)))  # fmt: skip
        stale = stale or t.example_shape is None
    if not shown:
        return None
    line = "inputs are random, at the example shapes chosen at import: " + ", ".join(shown) + " (N: the batch size)"
    if stale:
        return (
            line + "; a dim without an example size is at 8 (the spec predates example shapes: import the "
            "model again with --force, or with --dim NAME=SIZE)"
        )
    return line + "; the figures hold for these sizes (kiln import --dim NAME=SIZE sets others)"


def with_example(t: TensorSpec, example: Sequence[int], batched: bool) -> TensorSpec:
    """``t`` with ``example`` (its batch dim at 1) as its example shape, when it has a dynamic dim besides
    batch: what the PyTorch and Keras importers, which run the user's example shapes, record."""
    dynamic = [i for i, d in enumerate(t.shape) if d == -1 and not (i == 0 and batched)]
    if not dynamic or len(example) != len(t.shape):
        return t
    shape = tuple(1 if i == 0 and batched and t.shape[0] == -1 else int(e) for i, e in enumerate(example))
    return t.model_copy(update={"example_shape": shape})


# ---- trying them ---------------------------------------------------------------------------------------
def choose(source: str, inputs: Sequence[TensorSpec], axes: Axes, batched: bool, hints: Hints,
           run: Callable[[dict[str, np.ndarray]], object], dims: Mapping[str, int] | None = None,
           shapes: Sequence[Sequence[int]] | None = None) -> Choice:  # fmt: skip
    """Run the model on random inputs at each trial's sizes until it runs; raise naming the dims, the sizes
    tried and the flags to pass when it runs at none."""
    planned = plan(inputs, axes, batched, hints, source, dims, shapes)
    searched = [d for d in planned if d.size is None]
    trials: list[dict[str, int]] = []
    for k in range(max((len(d.candidates) for d in searched), default=1)):
        trial = {d.name: d.candidates[min(k, len(d.candidates) - 1)] for d in searched}
        if trial not in trials:
            trials.append(trial)
    error: BaseException | None = None
    for trial in trials:
        sizes = {**{d.name: d.size for d in planned if d.size is not None}, **trial}
        at = [tuple(d if isinstance(d, int) else sizes[d] for d in ax) for ax in axes]
        try:
            run(random_inputs(list(inputs), 1, seed=0, shapes=at))
        except Exception as exc:  # ONNX Runtime's errors have no common base class worth naming
            error = exc
            continue
        for d in searched:
            d.size = trial[d.name]
        return Choice(at, _example(planned, axes, at), _summary(inputs, planned, axes, at))
    raise _failure(source, inputs, planned, axes, error)


def _example(planned: list[Dim], axes: Axes, at: list[tuple[int, ...]]) -> list[tuple[int, ...] | None]:
    """The shapes of the inputs with a dynamic dim besides batch (the others need no example)."""
    batch = {d.name for d in planned if d.batch}
    return [s if any(isinstance(d, str) and d not in batch for d in ax) else None
            for ax, s in zip(axes, at, strict=True)]  # fmt: skip


def shape_text(shape: Sequence[int]) -> str:
    return "×".join(map(str, shape)) or "scalar"


def _summary(inputs: Sequence[TensorSpec], planned: list[Dim], axes: Axes, at: list[tuple[int, ...]]) -> str | None:
    """``example shapes: input 'x' 1×3×32×32 (height=32, width=32 from the stride-32 convs)``, or None when
    no input has a dynamic dim besides batch."""
    shown = [(t, s) for t, s, e in zip(inputs, at, _example(planned, axes, at), strict=True) if e is not None]
    if not shown:
        return None
    by_why: dict[str, list[str]] = {}
    for d in planned:
        if not d.batch:
            by_why.setdefault(d.why, []).append(f"{d.name}={d.size}")
    reasons = "; ".join(f"{', '.join(sizes)} {why}" for why, sizes in by_why.items())
    return "example shapes: " + ", ".join(f"input {t.name!r} {shape_text(s)}" for t, s in shown) + f" ({reasons})"


def runtime_error(exc: BaseException, limit: int = 240) -> str:
    """ONNX Runtime's error as one readable line: the failing node and its message, without the error code,
    the C++ source location and the failed check (``Add node: Attempting to broadcast an axis by a dimension
    other than 1. 32 by 8``)."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", first_line(exc, 4000))
    m = re.match(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if m:
        op, node, message = m.groups()
        message = re.sub(r"^\S+:\d+ (?:.*? was false\. )?", "", message)
        text = f"{op} node{f' {node!r}' if node else ''}: {message}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failure(source: str, inputs: Sequence[TensorSpec], planned: list[Dim], axes: Axes,
             error: BaseException | None) -> Exception:  # fmt: skip
    reason = runtime_error(error) if error is not None else "unknown error"
    searched = [d for d in planned if not d.batch and not d.given and d.candidates]
    given = [d for d in planned if d.given]
    if not searched and not given:
        return CorruptModelError(source, f"ONNX Runtime cannot run it: {reason}")
    if not searched:
        at = ", ".join(f"{d.name}={d.size} ({d.why})" for d in given)
        return InvalidSourceError(source, f"ONNX Runtime cannot run it at {at}: {reason}; give sizes the model accepts")
    lists = {d.candidates for d in searched}
    if len(lists) == 1:
        tried = ", ".join(map(str, searched[0].candidates))
    else:
        tried = "; ".join(f"{d.name}: {', '.join(map(str, d.candidates))}" for d in searched)
    if given:
        tried += "; with " + ", ".join(f"{d.name}={d.size}" for d in given)
    names = [d.name for d in searched]
    flags = " ".join(f"--dim {n}=SIZE" for n in names)
    placeholders = {d.name: _placeholder(d.name) for d in searched}
    sizes = {d.name: d.size for d in planned if d.size is not None}
    hint = " ".join(
        "--input-shape "
        + ",".join(str(d) if isinstance(d, int) else placeholders.get(d, str(sizes.get(d))) for d in ax)
        for ax in axes
    )
    problem = f"could not find sizes for the dynamic dims {', '.join(names)} (tried {tried}): pass {flags} or {hint}"
    return ExampleShapeError(source, names, f"{problem}; ONNX Runtime's last error: {reason}")


def _placeholder(name: str) -> str:
    ws = words(name)
    if any(w.startswith("height") or w == "h" for w in ws):
        return "H"
    if any(w.startswith("width") or w == "w" for w in ws):
        return "W"
    return name.upper()
