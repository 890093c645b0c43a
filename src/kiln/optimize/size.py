"""How big a variant is: parameters, multiply-accumulates per item, file size and peak memory.

Parameters and MACs are read from the artifact the variant's engine runs, without running it (a
``.pt2`` is the exception: its MACs come from one batch-1 call under ``FlopCounterMode``), at batch 1
with the spec's input shapes (a dynamic dimension other than the batch at 8, as
:func:`kiln.convert.parity.random_inputs` makes it):

- **parameters**: the elements of every stored tensor, except scalars, int64 tensors (shapes, axes,
  indices) and the scales and zero points of quantize / dequantize / integer ops, so that an int8
  variant counts the same weights as its fp32 one. What the file holds is counted: ONNX Runtime's
  NCHWc layout pads channels to its block, and the padding counts.
- **MACs**: Conv, ConvInteger, QLinearConv, ConvTranspose, MatMul, MatMulInteger, QLinearMatMul and
  Gemm (and ONNX Runtime's fused forms of them: FusedConv, NCHWc Conv, FusedGemm, FusedMatMul,
  Attention); in OpenVINO IR Convolution, GroupConvolution, their backprop-data forms and MatMul. Every
  other op counts 0 (elementwise work, norms, pooling, softmax). Shapes come from onnx's shape
  inference; one that depends on values (a ``Range`` over the sequence length, an attention mask) is
  computed by onnx's reference evaluator from the inputs and small constants alone, never the weights.
  When a shape these ops need is still unknown the MACs are None, never an undercount.

Peak memory is measured by the search (:mod:`kiln.memory`) and added with :meth:`SizeFigures.with_peak`.
Nothing heavy is imported at module level: onnx, openvino and torch load only for the artifact counted.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.repository import IR_FILE, ONNX_FILE, PT2_FILE

if TYPE_CHECKING:
    from kiln.repository import Variant
    from kiln.spec import TensorSpec

log = logging.getLogger(__name__)
Shape = tuple[int, ...]


@dataclass(frozen=True)
class SizeFigures:
    params: int | None  # None: the artifact's format is not one counted here
    macs: int | None  # per item at batch 1; None where a shape could not be inferred
    file_bytes: int
    peak_memory_bytes: int | None = None  # resident growth while loading and timing
    memory_kind: str | None = None  # how the peak was read (kiln.memory.HostKind)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> SizeFigures | None:
        """Read back from figures.json; None for anything else (an older kiln wrote none)."""
        if not isinstance(data, dict) or not isinstance(data.get("file_bytes"), int):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_peak(self, peak_bytes: int, kind: str) -> SizeFigures:
        return dataclasses.replace(self, peak_memory_bytes=peak_bytes, memory_kind=kind)

    def ratios(self, base: SizeFigures) -> dict[str, float]:
        """This variant's figures over ``base``'s (the baseline's), for those both have."""
        out = {}
        for name in ("params", "macs", "file_bytes", "peak_memory_bytes"):
            mine, theirs = getattr(self, name), getattr(base, name)
            if isinstance(mine, int) and isinstance(theirs, int) and theirs > 0:
                out[name] = mine / theirs
        return out


def count_size(variant: Variant, artifact: str | None = None) -> SizeFigures:
    """Parameters, MACs and file size of what ``variant``'s engine runs (``artifact``: its file name,
    default the engine's). A file that cannot be read gives None figures, never an error: a size report
    must not fail a variant that runs."""
    from kiln.engines.base import get_engine

    name = artifact or get_engine(variant.engine).artifact
    path = variant.path / name
    if not path.is_file() and (variant.path / ONNX_FILE).is_file():
        path = variant.path / ONNX_FILE  # OpenVINO also runs the ONNX file when there is no IR
    file_bytes = variant.artifact_bytes(name)
    counter = _COUNTERS.get(path.name)
    if counter is None or not path.is_file():
        return SizeFigures(None, None, file_bytes)
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, tuple(variant.spec.inputs))
    if key not in _COUNTED:  # variants that differ in run options share (hard-link) one file: count it once
        try:
            _COUNTED[key] = counter(path, list(variant.spec.inputs))
        except Exception as exc:  # a library failing on one file must not end the search
            log.warning("cannot count the parameters of %s: %s: %s", path, type(exc).__name__, exc)
            return SizeFigures(None, None, file_bytes)
    params, macs = _COUNTED[key]
    return SizeFigures(params, macs, file_bytes)


_COUNTED: dict[tuple[Any, ...], tuple[int, int | None]] = {}


def input_feeds(inputs: Sequence[TensorSpec]) -> dict[str, Any]:
    """Batch 1 and the spec's shapes, a dynamic dimension at 8: what ``random_inputs`` feeds."""
    from kiln.convert.parity import random_inputs

    return random_inputs(list(inputs), 1, seed=0)


def _static(dims: Sequence[Any]) -> Shape | None:
    out = tuple(int(d) for d in dims)
    return out if all(d > 0 for d in out) else None


def _fill(dims: Sequence[int | None]) -> Shape:
    """A graph input's own dims with unknown ones at batch 1 / 8 (an input the spec does not name)."""
    return tuple(d if d else (1 if i == 0 else 8) for i, d in enumerate(dims))


# ---- ONNX ---------------------------------------------------------------------------------------------
# Input positions that hold scales and zero points, not weights.
_QUANT_PARAMS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2), "ConvInteger": (2, 3), "MatMulInteger": (2, 3),
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7), "QGemm": (1, 2, 4, 5, 7, 8),
    "MatMulIntegerToFloat": (2, 3, 4, 5), "DynamicQuantizeMatMul": (2, 3),
    "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7),
}  # fmt: skip


def onnx_counts(path: Path, inputs: Sequence[TensorSpec]) -> tuple[int, int | None]:
    """(parameters, MACs) of an ONNX file; external data is never read (its dims are in the graph)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    skip = {n.input[i] for n in graph.node for i in _QUANT_PARAMS.get(n.op_type, ()) if i < len(n.input)}
    tensors = [*graph.initializer]
    tensors += [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    params = sum(
        math.prod(t.dims)
        for t in tensors
        if t.name not in skip and t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.BOOL)
        if math.prod(t.dims) > 1
    )
    shapes = _onnx_shapes(model, input_feeds(inputs), path.parent)
    return params, _onnx_macs(graph, shapes)


def _onnx_shapes(model: Any, feeds: dict[str, Any], base_dir: Path) -> dict[str, Shape]:
    """Static shapes of every value onnx's shape inference reaches, inferring again after each step over
    what it cannot follow: ONNX Runtime's own ops (the rules in ``_ORT_SHAPES``), and a shape that
    depends on values (``Range`` over a sequence length, a mask) computed by onnx's reference evaluator
    from the inputs alone (:func:`_evaluate`), never from the weights."""
    import numpy as np
    import onnx

    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    for value in graph.input:
        if value.name in init_names:
            continue
        tt = value.type.tensor_type
        if value.name not in feeds:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type or onnx.TensorProto.FLOAT)
            feeds[value.name] = np.zeros(_fill([d.dim_value or None for d in tt.shape.dim]), dtype)
        if len(feeds[value.name].shape) == len(tt.shape.dim):
            for d, n in zip(tt.shape.dim, feeds[value.name].shape, strict=True):
                d.dim_value = n
    # Big tensors become typed graph inputs: inference needs their dims, not their bytes. Small ones
    # (shapes, axes) stay, their values read even when stored beside the model.
    limit = {onnx.TensorProto.INT64: _SMALL_INT64}
    small = [t for t in graph.initializer if math.prod(t.dims) <= limit.get(t.data_type, _SMALL)]
    kept = {t.name for t in small}
    big = {t.name: t for t in graph.initializer if t.name not in kept}
    for t in small:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            onnx.external_data_helper.load_external_data_for_tensor(t, str(base_dir))
            t.data_location = onnx.TensorProto.DEFAULT
            del t.external_data[:]
    del graph.initializer[:]
    graph.initializer.extend(small)
    listed = {v.name for v in graph.input}  # before IR 4 initializers are listed as inputs too
    graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in big.values()
        if t.name not in listed
    )
    types: dict[str, int] = {}
    shapes: dict[str, Shape] = {}
    tried: set[int] = set()
    for _ in range(len(graph.node) + 1):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            tt = value.type.tensor_type
            if tt.HasField("shape"):
                static = _static([d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim])
                if static is not None:
                    shapes[value.name], types[value.name] = static, tt.elem_type
        for t in small:
            shapes[t.name], types[t.name] = tuple(t.dims), t.data_type
        found: dict[str, tuple[int, Shape]] = {}
        for k, node in enumerate(graph.node):
            if not node.output or all(o in shapes for o in node.output if o) or k in tried:
                continue
            if node.domain.startswith("com.microsoft"):
                rule = _ORT_SHAPES.get(node.op_type)
                if rule is None or not node.input or any(n and n not in shapes for n in node.input[:2]):
                    continue
                elem = types.get(node.input[0], onnx.TensorProto.FLOAT)
                for name, shape in zip(node.output, rule(node, shapes), strict=False):
                    if name and shape is not None:
                        found[name] = (onnx.TensorProto.INT32 if name == _MASK_INDEX.get(node.op_type, -1)
                                       else elem, shape)  # fmt: skip
            elif node.domain in ("", "ai.onnx") and all(n in shapes for n in node.input if n):
                tried.add(k)  # inference stopped here: the shape depends on values
                found |= _evaluate(model, k, feeds, big)
        for name, (elem, shape) in found.items():
            if name not in shapes:
                graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, list(shape)))
                shapes[name], types[name] = shape, elem
        if not found:
            break
    return shapes


_SMALL = 64  # elements: a tensor this small stays in the graph for inference and evaluation
_SMALL_INT64 = 4096  # int64 tensors hold shapes and indices: kept up to this size
_MASK_INDEX = {"EmbedLayerNormalization": 1}  # which output is int32


def _evaluate(model: Any, index: int, feeds: dict[str, Any], big: dict[str, Any]) -> dict[str, tuple[int, Shape]]:
    """The outputs of ``model.graph.node[index]``, computed with onnx's reference evaluator from the inputs
    and small constants it depends on; nothing when it depends on a weight (that would be running the
    model) or on more than a few hundred nodes."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    inputs = {v.name: v for v in graph.input}
    needed, used, stack = {index}, set(), list(graph.node[index].input)
    while stack:
        name = stack.pop()
        if not name or name in used:
            continue
        used.add(name)
        if name in big or len(needed) > 300:
            return {}
        if name in producer:
            needed.add(producer[name])
            stack += graph.node[producer[name]].input
    nodes = [graph.node[k] for k in sorted(needed)]
    feed_names = [n for n in used if n in feeds and n in inputs and n not in producer]
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(
            nodes, "shapes", [inputs[n] for n in feed_names],
            [onnx.helper.make_empty_tensor_value_info(o) for o in graph.node[index].output if o],
            [t for t in graph.initializer if t.name in used],
        ),
        opset_imports=list(model.opset_import), ir_version=model.ir_version,
    )  # fmt: skip
    try:
        values = ReferenceEvaluator(sub).run(None, {n: feeds[n] for n in feed_names})
    except Exception:  # an op the evaluator lacks: the shape stays unknown
        return {}
    import numpy as np

    names = [o for o in graph.node[index].output if o]
    return {
        n: (onnx.helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), tuple(np.asarray(v).shape))
        for n, v in zip(names, values, strict=True)
    }


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv_shape(x: Shape, w: Shape, a: dict[str, Any], channels: int) -> Shape:
    spatial = len(x) - 2
    kernel = list(a.get("kernel_shape") or w[2:])
    strides = list(a.get("strides") or [1] * spatial)
    dilations = list(a.get("dilations") or [1] * spatial)
    pads = list(a.get("pads") or [0] * (2 * spatial))
    auto = a.get("auto_pad", b"NOTSET")
    out = []
    for i in range(spatial):
        if auto in (b"SAME_UPPER", b"SAME_LOWER"):
            out.append(-(-x[2 + i] // strides[i]))
        else:
            span = dilations[i] * (kernel[i] - 1) + 1
            size = (x[2 + i] + pads[i] + pads[i + spatial] - span) / strides[i] + 1
            out.append(math.ceil(size) if a.get("ceil_mode") else math.floor(size))
    return (x[0], channels, *out)


def _same(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    return [s[node.input[0]]]


def _fused_conv(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    w = s[node.input[1]]
    return [_conv_shape(s[node.input[0]], w, _attrs(node), w[0])]


def _pool(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    x = s[node.input[0]]
    if node.op_type.startswith("Global"):
        return [(x[0], x[1], *(1,) * (len(x) - 2))]
    return [_conv_shape(x, x, _attrs(node), x[1])]


def _reorder_input(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    x = s[node.input[0]]
    return [(x[0], x[-1], *x[1:-1]) if _attrs(node).get("channels_last") else x]


def _reorder_output(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    x, a = s[node.input[0]], _attrs(node)
    c = int(a.get("channels", x[1]))
    return [(x[0], *x[2:], c) if a.get("channels_last") else (x[0], c, *x[2:])]


def _upsample(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    x, scales = s[node.input[0]], list(_attrs(node).get("scales", []))
    return [(x[0], x[1], *(d * k for d, k in zip(x[2:], scales, strict=False)))]


def _fused_gemm(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    a, b, at = s[node.input[0]], s[node.input[1]], _attrs(node)
    return [(a[1] if at.get("transA") else a[0], b[0] if at.get("transB") else b[1])]


def _fused_matmul(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    a, b, at = list(s[node.input[0]]), list(s[node.input[1]]), _attrs(node)
    if at.get("transA") and len(a) >= 2:
        a[-1], a[-2] = a[-2], a[-1]
    if at.get("transB") and len(b) >= 2:
        b[-1], b[-2] = b[-2], b[-1]
    if len(a) < 2 or len(b) < 2:
        return [None]
    batch = a[:-2] if len(a) >= len(b) else b[:-2]
    return [(*batch, a[-2], b[-1])]


def _attention(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    x, w = s[node.input[0]], s[node.input[1]]
    sizes = list(_attrs(node).get("qkv_hidden_sizes") or [w[1] // 3] * 3)
    return [(x[0], x[1], sizes[2])]


def _embed_layer_norm(node: Any, s: dict[str, Shape]) -> list[Shape | None]:
    ids, words = s[node.input[0]], s.get(node.input[2]) if len(node.input) > 2 else None
    if words is None:
        return [None]
    out = (ids[0], ids[1], words[1])
    return [out, (ids[0],), out]


_ORT_SHAPES: dict[str, Callable[[Any, dict[str, Shape]], list[Shape | None]]] = {
    "Conv": _fused_conv, "FusedConv": _fused_conv, "MaxPool": _pool, "AveragePool": _pool,
    "GlobalMaxPool": _pool, "GlobalAveragePool": _pool, "ReorderInput": _reorder_input,
    "ReorderOutput": _reorder_output, "Upsample": _upsample, "FusedGemm": _fused_gemm, "FusedMatMul": _fused_matmul,
    "Attention": _attention, "EmbedLayerNormalization": _embed_layer_norm,
    **dict.fromkeys(("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "BiasAdd", "SkipLayerNormalization",
                     "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization", "BiasSoftmax",
                     "BiasDropout"), _same),
}  # fmt: skip
_CONV_WEIGHT = {"Conv": 1, "FusedConv": 1, "ConvInteger": 1, "QLinearConv": 3}
_MATMUL_B = {"MatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3, "FusedMatMul": 1, "MatMulIntegerToFloat": 1,
             "DynamicQuantizeMatMul": 1}  # fmt: skip
_GEMMS = ("Gemm", "FusedGemm", "QGemm")


def _onnx_node_macs(node: Any, s: dict[str, Shape]) -> int | None:
    """The node's MACs; 0 for an op not counted; None when a shape it needs is unknown."""
    op = node.op_type
    if op == "QLinearConv" and node.domain.startswith("com.microsoft"):
        return None  # the NHWC form: its shapes follow another layout
    counted = op in _CONV_WEIGHT or op in _MATMUL_B or op in _GEMMS or op in ("ConvTranspose", "Attention")
    if not counted or (op == "Attention" and not node.domain.startswith("com.microsoft")):
        return 0
    out = s.get(node.output[0])
    if op in _CONV_WEIGHT:
        w = s.get(node.input[_CONV_WEIGHT[op]])
        return None if out is None or w is None else math.prod(out) * math.prod(w[1:])
    a = s.get(node.input[0])
    if op == "ConvTranspose":
        w = s.get(node.input[1])
        return None if a is None or w is None else math.prod(a) * math.prod(w[1:])
    if op == "Attention":
        w = s.get(node.input[1])
        if a is None or w is None or out is None:
            return None
        sizes = list(_attrs(node).get("qkv_hidden_sizes") or [w[1] // 3] * 3)
        return a[0] * a[1] * a[2] * w[1] + a[0] * a[1] * a[1] * (sizes[0] + sizes[2])
    if a is None or out is None:
        return None
    if op in _GEMMS:
        k = a[0] if _attrs(node).get("transA") else a[-1]
    else:
        k = a[-2] if op == "FusedMatMul" and _attrs(node).get("transA") and len(a) > 1 else a[-1]
    return math.prod(out) * k


def _onnx_macs(graph: Any, shapes: dict[str, Shape]) -> int | None:
    total = 0
    for node in graph.node:
        macs = _onnx_node_macs(node, shapes)
        if macs is None:
            return None
        total += macs
    return total


# ---- OpenVINO IR --------------------------------------------------------------------------------------
_OV_SHAPE_TYPES = ("i64", "i32", "boolean")


def openvino_counts(path: Path, inputs: Sequence[TensorSpec]) -> tuple[int, int | None]:
    """(parameters, MACs) of an OpenVINO IR, reshaped to batch 1 so that every shape is static."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    feeds = {k: tuple(v.shape) for k, v in input_feeds(inputs).items()}
    wanted = {}
    for port in model.inputs:
        name = port.get_any_name()
        own = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        wanted[name] = ov.PartialShape(list(feeds.get(name) or _fill(own)))
    model.reshape(wanted)
    params, macs = 0, 0
    static = True
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind == "Constant":
            if op.get_element_type().get_type_name() not in _OV_SHAPE_TYPES and not _ov_quant_param(op):
                n = math.prod(op.get_output_shape(0))
                params += n if n > 1 else 0
            continue
        if kind not in _OV_MACS:
            continue
        ps = [op.get_input_partial_shape(0), op.get_input_partial_shape(1), op.get_output_partial_shape(0)]
        static = static and all(p.is_static for p in ps)
        if static:
            x, w, out = (tuple(int(d.get_length()) for d in p) for p in ps)
            macs += _OV_MACS[kind](x, w, out, op)
    return params, macs if static else None


def _ov_matmul(x: Shape, w: Shape, out: Shape, op: Any) -> int:
    k = x[-2] if op.get_attributes().get("transpose_a") and len(x) > 1 else x[-1]
    return math.prod(out) * k


_OV_MACS: dict[str, Callable[[Shape, Shape, Shape, Any], int]] = {
    "Convolution": lambda x, w, out, op: math.prod(out) * math.prod(w[1:]),  # w: [O, I, k…]
    "GroupConvolution": lambda x, w, out, op: math.prod(out) * math.prod(w[2:]),  # w: [G, O/G, I/G, k…]
    "ConvolutionBackpropData": lambda x, w, out, op: math.prod(x) * math.prod(w[1:]),  # w: [I, O, k…]
    "GroupConvolutionBackpropData": lambda x, w, out, op: math.prod(x) * math.prod(w[2:]),
    "MatMul": _ov_matmul,
}


def _ov_quant_param(op: Any) -> bool:
    """A FakeQuantize range, or the zero point / scale of a weight stored in int8 (Convert → Subtract →
    Multiply): quantization bookkeeping, not a weight."""
    for target in op.output(0).get_target_inputs():
        node, port = target.get_node(), target.get_index()
        kind = node.get_type_name()
        if kind == "FakeQuantize" and port > 0:
            return True
        if kind in ("Subtract", "Multiply") and port == 1:
            source = node.input_value(0).get_node()
            if source.get_type_name() == "Subtract":
                source = source.input_value(0).get_node()
            if source.get_type_name() == "Convert" and source.input_value(0).get_node().get_type_name() == "Constant":
                return True
    return False


# ---- torch.export -------------------------------------------------------------------------------------
def torch_counts(path: Path, inputs: Sequence[TensorSpec]) -> tuple[int, int | None]:
    """(parameters, MACs) of a ``torch.export`` program: its state dict and constants; MACs from one
    batch-1 call under ``FlopCounterMode`` (FLOPs / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from kiln.convert.parity import random_inputs

    program = torch.export.load(str(path))
    tensors = [*program.state_dict.values(), *program.constants.values()]
    params = sum(
        t.numel()
        for t in tensors
        if isinstance(t, torch.Tensor) and t.numel() > 1 and t.dtype not in (torch.int64, torch.bool)
    )
    feeds = random_inputs(list(inputs), 1, seed=0)
    args = [torch.from_numpy(feeds[t.name]) for t in inputs]
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        program.module()(*args)
    return params, counter.get_total_flops() // 2


_COUNTERS: dict[str, Callable[[Path, Sequence[TensorSpec]], tuple[int, int | None]]] = {
    ONNX_FILE: onnx_counts,
    IR_FILE: openvino_counts,
    PT2_FILE: torch_counts,
}
