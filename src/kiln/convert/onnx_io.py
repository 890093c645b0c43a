"""Reading, checking and writing ONNX files (including models over 2 GB with external data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.errors import CorruptModelError, first_line
from kiln.files import EXTERNAL_DATA_SUFFIX, shareable
from kiln.repository import ONNX_FILE
from kiln.spec import TensorSpec, dtype_name

EXTERNAL_DATA_FILE = ONNX_FILE + EXTERNAL_DATA_SUFFIX
PROTOBUF_LIMIT = 2**31 - 1  # a single serialized ModelProto cannot exceed 2 GB


def check(path: Path) -> None:
    """Run the ONNX checker on a file (path-based, so external data and >2 GB work)."""
    import onnx

    if not path.is_file():
        raise CorruptModelError(str(path), "file not found")
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, OSError...
        raise CorruptModelError(str(path), first_line(exc)) from None


def load(path: Path, external_data: bool = True) -> Any:
    import onnx

    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:
        raise CorruptModelError(str(path), first_line(exc)) from None


def save(model: Any, path: Path, force_external: bool = False) -> None:
    """Save next to ``model.onnx.data`` when the weights cannot fit a protobuf (or when asked)."""
    import onnx

    external = force_external or model.ByteSize() > PROTOBUF_LIMIT // 2 or _has_external(model)
    if external:
        if not _has_external(model):  # every weight is in memory: start a new data file, since onnx
            (path.parent / EXTERNAL_DATA_FILE).unlink(missing_ok=True)  # appends to an existing one
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE, size_threshold=0 if force_external else 1024,
        )  # fmt: skip
        data = path.parent / EXTERNAL_DATA_FILE
        if data.is_file():  # onnx creates it 0600, which a server running as another user could not read
            shareable(data)
    else:
        onnx.save_model(model, str(path))


def _has_external(model: Any) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def infer_shapes(path: Path) -> None:
    import onnx

    try:
        onnx.shape_inference.infer_shapes_path(str(path), str(path))
    except Exception as exc:
        raise CorruptModelError(str(path), f"shape inference failed: {first_line(exc)}") from None


def graph_tensors(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs (without initializers) and outputs of a graph as TensorSpecs; symbolic dims become -1."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [_tensor(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_tensor(v) for v in model.graph.output]
    return inputs, outputs


def _tensor(value_info: Any) -> TensorSpec:
    import onnx

    tt = value_info.type.tensor_type
    if tt.elem_type == onnx.TensorProto.STRING:
        dtype = "string"
    elif tt.elem_type == onnx.TensorProto.BFLOAT16:
        dtype = "bfloat16"
    else:
        dtype = dtype_name(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
    dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tt.shape.dim)
    return TensorSpec(name=value_info.name, dtype=dtype, shape=dims)  # type: ignore[arg-type]


def input_dims(model: Any) -> list[list[int | str]]:
    """Per graph input (as :func:`graph_tensors` lists them), each axis: its size, or for a dynamic one its
    symbolic name (``dim_param``), ``<input>_<axis>`` where it has none. One name in several places is one dim."""
    initializers = {t.name for t in model.graph.initializer}
    out: list[list[int | str]] = []
    for v in model.graph.input:
        if v.name in initializers:
            continue
        axes: list[int | str] = []
        for axis, d in enumerate(v.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                axes.append(int(d.dim_value))
            else:
                axes.append(d.dim_param or f"{v.name}_{axis}")
        out.append(axes)
    return out


def rename_io(model: Any, inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """Rename graph inputs/outputs in place, rewriting every node that refers to them.

    An internal value that already carries a wanted name (exporters name values after ops, so a
    value called ``embedding`` is common) is moved aside first, keeping the graph in SSA form.
    """
    mapping = {old: new for old, new in {**inputs, **outputs}.items() if old != new}
    if not mapping:
        return
    taken = _value_names(model)
    for new in set(mapping.values()):
        if new in taken and new not in mapping:
            spare = _unique(f"{new}__internal", taken)
            _rename_everywhere(model, {new: spare})
            taken.add(spare)
    _rename_everywhere(model, mapping)


def _value_names(model: Any) -> set[str]:
    g = model.graph
    names = {v.name for v in [*g.input, *g.output, *g.value_info]} | {t.name for t in g.initializer}
    for node in g.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _unique(base: str, taken: set[str]) -> str:
    i, name = 0, base
    while name in taken:
        i += 1
        name = f"{base}{i}"
    return name


def _rename_everywhere(model: Any, mapping: dict[str, str]) -> None:
    g = model.graph
    for v in [*g.input, *g.output, *g.value_info, *g.initializer]:
        if v.name in mapping:
            v.name = mapping[v.name]
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]


def name_batch_dim(model: Any, name: str = "batch") -> None:
    """Give the leading symbolic dim of every input and output one readable name."""
    for v in list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def name_dims(model: Any, dims: dict[str, dict[int, str]]) -> None:
    """Give the named dynamic dims of the inputs readable names (``seq``, ``height`` …)."""
    for v in model.graph.input:
        for axis, name in dims.get(v.name, {}).items():
            shape = v.type.tensor_type.shape.dim
            if axis < len(shape) and not shape[axis].HasField("dim_value"):
                shape[axis].dim_param = name


def external_locations(model: Any) -> set[str]:
    """Files that a model's initializers keep their data in (relative to the model file)."""
    import onnx

    locations: set[str] = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations
