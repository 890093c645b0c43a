"""The V2 (Open Inference Protocol) tensor codec: JSON, the binary tensor extension, BYTES tensors.

Decoding checks every field against the model's spec and raises :class:`ProtocolError` or
:class:`InputError` naming it. Binary tensors become ``np.frombuffer`` views of the request body (no
copy); binary outputs are joined into the response body once. gRPC messages use the same helpers
(see ``grpc_service.py``).
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from kiln.errors import InputError, ProtocolError, SharedMemoryError, UnknownSharedMemoryRegionError
from kiln.serving.json_numbers import JsonNumbers, load_infer_json
from kiln.serving.shared_memory import ShmSession, ShmTarget, shm_ref
from kiln.spec import V2_DATATYPES, ModelSpec

# V2 datatype -> numpy dtype; BYTES is an object array (of ``str`` once decoded).
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded inference request: validated input arrays and the outputs asked for."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None = None  # None: every output
    binary_output: bool = False  # request-level ``binary_data_output``
    parameters: dict[str, Any] = field(default_factory=dict)
    version: int | None = None  # the version asked for; None: the model's default
    shm_outputs: dict[str, ShmTarget] | None = None  # outputs to write into system shared memory, by name

    @property
    def output_names(self) -> tuple[str, ...] | None:
        return None if self.outputs is None else tuple(o.name for o in self.outputs)


# ---- BYTES tensors ---------------------------------------------------------------------------------------
def serialize_bytes(arr: np.ndarray) -> bytes:
    """Each element as a 4-byte little-endian length and its bytes, row-major (Triton's layout)."""
    parts: list[bytes] = []
    for item in arr.reshape(-1):
        b = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LEN.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def deserialize_bytes(buf: bytes | memoryview, count: int, name: str, text: bool = True) -> np.ndarray:
    """The inverse of :func:`serialize_bytes`; exactly ``count`` elements must fill ``buf``.

    Elements become ``str`` (UTF-8): string tensors in ONNX Runtime, like ``predict`` in process, take text.
    With ``text=False`` they stay ``bytes`` (encoded images for the raw input, see ``raw.py``).
    """
    view = memoryview(buf)
    # No more than len // 4 elements fit (each has its 4-byte length), and the loop stops there: a shape that
    # claims more (2**40, say) must not allocate for it.
    out = np.empty(min(count, len(view) // _LEN.size), dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(view):
            raise ProtocolError(f"input {name!r}", f"BYTES data ends after {i} of {count} elements")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > len(view):
            raise ProtocolError(
                f"input {name!r}", f"BYTES element {i} claims {n} bytes but only {len(view) - pos} remain"
            )
        try:
            out[i] = str(view[pos : pos + n], "utf-8") if text else bytes(view[pos : pos + n])
        except UnicodeDecodeError:
            raise ProtocolError(f"input {name!r}", f"BYTES element {i} is not valid UTF-8 text") from None
        pos += n
    if pos != len(view):
        raise ProtocolError(f"input {name!r}", f"{len(view) - pos} bytes left over after {count} BYTES elements")
    return out


# ---- shared checks ---------------------------------------------------------------------------------------
def check_datatype(spec: ModelSpec, name: str, datatype: Any) -> np.dtype[Any]:
    want = spec.input(name).datatype
    if datatype != want:
        raise InputError(name, "datatype", want, repr(datatype))
    if want not in NUMPY_DTYPES:
        raise InputError(name, "datatype", f"one of {sorted(NUMPY_DTYPES)}", want, "this server cannot carry it")
    return NUMPY_DTYPES[want]


MAX_RANK = 32  # numpy's limit (1.x; 2.x allows 64): more dimensions would fail in numpy, not here
# numpy refuses an array whose sizes (zeros left out) times the item size pass 2**63, even an empty one.
_MAX_ELEMENTS = 2**59


def check_shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ProtocolError(
            f"input {name!r}: shape", f"must be a list of non-negative integers, got {short_repr(shape)}"
        )
    return check_dims(name, tuple(shape))


def check_dims(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Sizes numpy can hold: at most :data:`MAX_RANK` non-negative sizes, not too many elements (O(rank))."""
    if len(shape) > MAX_RANK:
        raise ProtocolError(f"input {name!r}: shape", f"has {len(shape)} dimensions; at most {MAX_RANK} are supported")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape", f"must hold non-negative sizes, got {list(shape)}")
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise ProtocolError(
            f"input {name!r}: shape", f"{list(shape)} is too large for any tensor (2**59 elements at most)"
        )
    return shape


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 4, 60, 60


def short_repr(value: Any) -> str:
    """A short ``repr`` of what a client sent: bounded in length and depth however big or deep it is."""
    return _REPR.repr(value)


def from_raw(
    name: str, raw: bytes | memoryview, dtype: np.dtype[Any], shape: tuple[int, ...], text: bool = True
) -> np.ndarray:
    """A tensor from its binary (raw) form: a zero-copy view for fixed-size types."""
    count = math.prod(shape)
    if dtype.kind == "O":
        return deserialize_bytes(raw, count, name, text).reshape(shape)
    want = count * dtype.itemsize
    if len(raw) != want:
        raise ProtocolError(
            f"input {name!r}", f"binary data holds {len(raw)} bytes, but shape {list(shape)} of {dtype} needs {want}"
        )
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


def to_raw(arr: np.ndarray) -> bytes | memoryview:
    """The binary form of an output tensor (a view where the array is contiguous)."""
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        return serialize_bytes(arr)
    if arr.size == 0:  # a batch of 0 rows: memoryview cannot cast a view with a zero in its shape
        return b""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    return memoryview(arr).cast("B")  # type: ignore[arg-type]


# numpy dtype -> V2 datatype for outputs: a dict lookup (``str(dtype)`` costs 2-3 us in numpy 2).
_V2_OF_DTYPE = {dt: name for name, dt in NUMPY_DTYPES.items() if dt.kind != "O"}


def output_datatype(arr: np.ndarray) -> str:
    known = _V2_OF_DTYPE.get(arr.dtype)
    if known is not None:
        return known
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        return "BYTES"
    return V2_DATATYPES.get(str(arr.dtype), str(arr.dtype).upper())


def check_outputs(spec: ModelSpec, names: Sequence[str]) -> None:
    known = {t.name for t in spec.outputs}
    seen: set[str] = set()
    for n in names:
        if n not in known:
            raise ProtocolError("outputs", f"unknown output {n!r}; the model has outputs {sorted(known)}")
        if n in seen:  # as Triton: an output is asked for once, or its answer would carry it twice
            raise ProtocolError("outputs", f"output {n!r} is requested more than once")
        seen.add(n)


# ---- system shared memory (the regions: shared_memory.py) ---------------------------------------------------
def shm_input(
    shm: ShmSession | None, name: str, params: Any, dtype: np.dtype[Any], shape: tuple[int, ...], text: bool = True
) -> np.ndarray:
    """An input read in place from the region its parameters name: a read-only zero-copy view for fixed-size
    types, BYTES elements decoded from it. ``shm`` is None while no region is registered."""
    what = f"input {name!r}"
    ref = shm_ref(params, what)
    if shm is None:
        raise UnknownSharedMemoryRegionError(ref.region, [])
    view = shm.part(ref, what)
    count = math.prod(shape)
    if dtype.kind == "O":
        try:
            return deserialize_bytes(view, count, name, text).reshape(shape)
        except ProtocolError as exc:
            raise SharedMemoryError(ref.region, f"{what}: {exc.problem}") from None
    want = count * dtype.itemsize
    if want != ref.byte_size:
        raise SharedMemoryError(
            ref.region,
            f"{what}: shape {list(shape)} of {dtype} needs {want} bytes, but shared_memory_byte_size is "
            f"{ref.byte_size}; make them equal",
        )
    return np.frombuffer(view.toreadonly(), dtype=dtype, count=count).reshape(shape)


def shm_output(
    shm: ShmSession | None, targets: dict[str, ShmTarget] | None, name: str, params: Any
) -> dict[str, ShmTarget]:
    """``targets`` with output ``name`` going to the region its parameters name (checked now, written later)."""
    what = f"output {name!r}"
    ref = shm_ref(params, what)
    if shm is None:
        raise UnknownSharedMemoryRegionError(ref.region, [])
    targets = {} if targets is None else targets
    targets[name] = shm.target(ref, what)
    return targets


def write_shm_output(target: ShmTarget, name: str, arr: np.ndarray) -> dict[str, Any]:
    """Write an output into its region; the parameters that tell the client where it lies."""
    return target.write(to_raw(arr), f"output {name!r}")


# ---- HTTP (JSON + binary extension) ----------------------------------------------------------------------
def decode_http(
    body: bytes,
    header_length: int | None,
    spec: ModelSpec,
    keep_bytes: frozenset[str] = frozenset(),
    shm: ShmSession | None = None,
) -> InferRequest:
    """Decode an HTTP infer body; ``header_length`` is ``Inference-Header-Content-Length`` when present.

    BYTES inputs named in ``keep_bytes`` keep their binary elements as ``bytes`` instead of text. Tensors in
    system shared memory go through ``shm`` (None while no region is registered); the caller releases it.
    """
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(
            "Inference-Header-Content-Length", f"{header_length} must lie in 1..{len(body)} (the body size)"
        )
    end = len(body) if header_length is None else header_length
    header = body[:end]
    doc = load_infer_json(header)  # numeric tensors straight into numpy, else (None) the usual way
    if doc is None:
        doc = load_json(header)
    if not isinstance(doc, dict):
        raise ProtocolError("body", f"must be a JSON object, got {type(doc).__name__}")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("inputs", "must be a non-empty list of tensors")
    inputs = _http_inputs(raw_inputs, body, end, spec, keep_bytes, shm)
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise ProtocolError("id", f"must be a string, got {short_repr(rid)}")
    req = InferRequest(id=rid, inputs=inputs)
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("parameters", f"must be an object, got {short_repr(params)}")
    req.parameters = params
    req.binary_output = _flag(params, "binary_data_output", False, "parameters.binary_data_output")
    timeout = params.get("timeout")
    if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout >= 2**63:  # the type: service.py
        raise ProtocolError("parameters.timeout", f"must be below 2**63 microseconds, got {short_repr(timeout)}")
    outs = doc.get("outputs")
    if outs is not None:
        req.outputs, req.shm_outputs = _http_outputs(outs, req.binary_output, spec, shm)
    return req


def _http_inputs(
    docs: list[Any], body: bytes, start: int, spec: ModelSpec, keep_bytes: frozenset[str], shm: ShmSession | None
) -> dict[str, np.ndarray]:
    """The request's ``inputs``, checked against ``spec``; binary ones are views of ``body`` from ``start`` on,
    in their order, and must claim every byte of it."""
    binary = memoryview(body)
    offset = start
    inputs: dict[str, np.ndarray] = {}
    for i, t in enumerate(docs):
        if not isinstance(t, dict):
            raise ProtocolError(f"inputs[{i}]", "must be an object with name, shape, datatype and data")
        name = t.get("name")
        if not isinstance(name, str):
            raise ProtocolError(f"inputs[{i}].name", "is missing or not a string")
        spec.input(name)  # unknown names raise, listing the known ones
        if name in inputs:
            raise ProtocolError(f"inputs[{i}].name", f"input {name!r} is given twice")
        dtype = check_datatype(spec, name, t.get("datatype"))
        shape = check_shape(name, t.get("shape"))
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError(f"input {name!r}: parameters", "must be an object")
        if "shared_memory_region" in params:
            if "data" in t or "binary_data_size" in params:
                raise ProtocolError(f"input {name!r}", "is in shared memory: send neither data nor binary_data_size")
            inputs[name] = shm_input(shm, name, params, dtype, shape, name not in keep_bytes)
            continue
        size = params.get("binary_data_size")
        if size is not None:
            inputs[name] = _binary_input(name, size, binary, offset, dtype, shape, name not in keep_bytes)
            offset += size
        else:
            if "data" not in t:
                raise ProtocolError(f"input {name!r}: data", "is missing (and no binary_data_size parameter)")
            inputs[name] = _from_json(name, t["data"], dtype, shape, name in keep_bytes)
    if offset != len(body):
        raise ProtocolError("body", f"{len(body) - offset} bytes of binary data are not claimed by any input")
    return inputs


def _binary_input(
    name: str, size: Any, binary: memoryview, offset: int, dtype: np.dtype[Any], shape: tuple[int, ...], text: bool
) -> np.ndarray:
    """Input ``name``: the ``size`` (its ``binary_data_size``) bytes of ``binary`` at ``offset``."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ProtocolError(
            f"input {name!r}: binary_data_size", f"must be a non-negative integer, got {short_repr(size)}"
        )
    if offset + size > len(binary):
        raise ProtocolError(
            f"input {name!r}: binary_data_size",
            f"{size} bytes announced but only {len(binary) - offset} binary bytes remain in the body",
        )
    return from_raw(name, binary[offset : offset + size], dtype, shape, text)


def _http_outputs(
    docs: Any, binary_default: bool, spec: ModelSpec, shm: ShmSession | None
) -> tuple[list[RequestedOutput], dict[str, ShmTarget] | None]:
    """The request's ``outputs``, checked against ``spec``, and those of them to write into shared memory."""
    if not isinstance(docs, list):
        raise ProtocolError("outputs", f"must be a list of {{name, parameters}}, got {short_repr(docs)}")
    outputs: list[RequestedOutput] = []
    shm_outputs: dict[str, ShmTarget] | None = None
    for j, o in enumerate(docs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise ProtocolError(f"outputs[{j}]", f"must be an object with a string name, got {short_repr(o)}")
        oparams = o.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise ProtocolError(f"outputs[{j}].parameters", f"must be an object, got {short_repr(oparams)}")
        if "classification" in oparams:
            raise ProtocolError(f"outputs[{j}].parameters.classification", "is not supported by this server")
        if "shared_memory_region" in oparams:
            shm_outputs = shm_output(shm, shm_outputs, o["name"], oparams)
        as_binary = _flag(oparams, "binary_data", binary_default, f"outputs[{j}].parameters.binary_data")
        outputs.append(RequestedOutput(o["name"], as_binary))
    check_outputs(spec, tuple(o.name for o in outputs))
    return outputs, shm_outputs


def load_json(body: bytes) -> Any:
    """A JSON document; 400 for anything that is not one (bad UTF-8, nesting too deep, huge numbers).

    orjson reads the document (5-7x faster than ``json`` on tensor data). What it refuses, the standard
    library reads as before: ``NaN``/``Infinity`` (tritonclient writes them for non-finite inputs), a
    UTF-8 BOM, UTF-16/32, lone surrogates; or it says why the body is not JSON. One difference: orjson
    reads integer literals past 64 bits as the nearest double (as rapidjson and JavaScript do), so a
    float input takes them as numbers, and an integer input refuses them as out of range.
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body)
    except RecursionError:
        raise ProtocolError("body", "nests arrays or objects too deeply to be read") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers past Python's 4300 digits
        raise ProtocolError("body", f"not valid JSON ({_clip(exc)})") from None


def _clip(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:197] + "..."


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = params.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(where, f"must be true or false, got {short_repr(value)}")
    return value


# The element kinds JSON data may hold per numpy kind of the datatype (numpy's kinds of the array that
# ``np.asarray`` makes of the JSON list): integers for integer types, true/false for BOOL, any number
# for floats. Strings are only for BYTES. Triton refuses the rest; numpy would silently convert them.
_JSON_KINDS = {"b": ("b", "true/false"), "i": ("iu", "integers"), "u": ("iu", "integers"), "f": ("iuf", "numbers")}
_KIND_NAMES = {"b": "true/false", "i": "integers", "u": "integers", "f": "non-integer numbers", "U": "strings"}


def _from_json(name: str, data: Any, dtype: np.dtype[Any], shape: tuple[int, ...], raw: bool = False) -> np.ndarray:
    if isinstance(data, JsonNumbers) and dtype.kind == "O":
        data = data.as_list()  # numbers for a BYTES input: refused element by element below
    if not isinstance(data, (list, JsonNumbers)):
        data = [data]
    count = math.prod(shape)
    try:
        if dtype.kind == "O":
            convert = _to_raw_element if raw else _to_text
            flat = np.array([convert(x) for x in _flatten(data)] or [], dtype=object)
        else:
            flat = numbers_from_json(name, data, dtype).reshape(-1)
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # ragged, mixed, too deep
        datatype = V2_DATATYPES.get(str(dtype), "BYTES" if dtype.kind == "O" else str(dtype).upper())
        raise ProtocolError(f"input {name!r}: data", f"cannot be read as {datatype} ({_clip(exc)})") from None
    if flat.size != count:
        raise ProtocolError(
            f"input {name!r}: data", f"holds {flat.size} elements but shape {list(shape)} needs {count}"
        )
    return flat.reshape(shape)


def numbers_from_json(name: str, data: list[Any] | JsonNumbers, dtype: np.dtype[Any]) -> np.ndarray:
    """``data`` as ``dtype``, refusing elements of the wrong kind (checked on the array, not per element,
    but for booleans among numbers in a Python list, which numpy reads as 1 and 0)."""
    # numpy picks the kind: bool, int64 (uint64 past it), float64, str, or object; simdjson's numbers come so
    arr = data.array if isinstance(data, JsonNumbers) else np.asarray(data)
    if arr.size == 0:
        return arr.astype(dtype)
    allowed, wanted = _JSON_KINDS[dtype.kind]
    got = _KIND_NAMES.get(arr.dtype.kind, "null, objects, mixed kinds or integers past 64 bits")
    if dtype.kind != "b" and arr.dtype.kind in "iuf" and not isinstance(data, JsonNumbers) and _holds_bool(data):
        datatype = V2_DATATYPES.get(str(dtype), str(dtype).upper())
        raise ProtocolError(f"input {name!r}: data", f"must hold {wanted} for {datatype}, got true/false among them")
    if dtype.kind in "iu" and arr.dtype.kind == "f":
        exact = data.as_list() if isinstance(data, JsonNumbers) else data
        arr, got = _integers_read_as_floats(name, exact, arr, dtype)
    if arr.dtype.kind not in allowed:
        datatype = V2_DATATYPES.get(str(dtype), str(dtype).upper())
        raise ProtocolError(f"input {name!r}: data", f"must hold {wanted} for {datatype}, got {got}")
    if dtype.kind in "iu" and arr.dtype != dtype:
        low, high = arr.min(), arr.max()
        _check_range(name, int(low), int(high), dtype)
    if dtype.kind == "f" and arr.dtype != dtype:
        with np.errstate(over="ignore"):  # past the type's range is +-inf, as Triton's JSON reader gives it
            return arr.astype(dtype)
    return arr.astype(dtype, copy=False)


def _integers_read_as_floats(
    name: str, data: list[Any], arr: np.ndarray, dtype: np.dtype[Any]
) -> tuple[np.ndarray, str]:
    """Integer data that came out of ``np.asarray`` as float64, read exactly; or why it is refused.

    numpy makes float64 (losing digits) of integers that need uint64 beside ones that do not
    (``[2**64 - 1, 5]``), and orjson reads integer literals past 64 bits as doubles. Returns the
    integers as ``dtype``, or ``arr`` and the kind to name for numbers that are not whole.
    """
    exact = np.asarray(data, dtype=object)
    if all(type(v) is int for v in exact.flat):  # Python integers: exact, whatever their size
        _check_range(name, min(exact.flat), max(exact.flat), dtype)
        return exact.astype(dtype), ""
    if not np.all(np.isfinite(arr) & (arr == np.floor(arr))):
        return arr, _KIND_NAMES["f"]
    info = np.iinfo(dtype)
    low, high = float(arr.min()), float(arr.max())
    if low < info.min or high >= info.max + 1:  # doubles: 2**63 - 1 rounds to 2**63
        _check_range(name, int(low), int(high), dtype)
    return arr, "numbers written as floats, or integers past 64 bits"


def _check_range(name: str, low: int, high: int, dtype: np.dtype[Any]) -> None:
    info = np.iinfo(dtype)
    if low < info.min or high > info.max:
        bad = low if low < info.min else high
        datatype = V2_DATATYPES.get(str(dtype), str(dtype).upper())
        raise ProtocolError(f"input {name!r}: data", f"{bad} is out of range for {datatype} ({info.min}..{info.max})")


def _holds_bool(data: Any) -> bool:
    """Whether nested lists hold a bool (simdjson's all-number arrays never come here)."""
    return isinstance(data, bool) or (isinstance(data, list) and any(type(x) is bool for x in _flatten(data)))


def _flatten(data: list[Any]) -> list[Any]:
    """The leaves of nested lists in order; iterative, so no nesting depth can exhaust the stack."""
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for x in stack[-1]:
            if isinstance(x, list):
                stack.append(iter(x))
                break
            out.append(x)
        else:
            stack.pop()
    return out


def _to_text(x: Any) -> str:
    if isinstance(x, str):
        if not x.isascii():  # O(1): CPython knows; only non-ASCII text pays for the check
            x.encode("utf-8")  # a lone surrogate ("\ud800", which JSON allows) raises UnicodeEncodeError
        return x
    raise TypeError(f"BYTES elements in JSON must be strings, got {type(x).__name__}")


def _to_raw_element(x: Any) -> Any:
    """A raw-input element in JSON: text, or binary data as ``{"b64": "..."}`` (decoded by the pipeline)."""
    if isinstance(x, str) or (isinstance(x, dict) and isinstance(x.get("b64"), str) and len(x) == 1):
        return x
    raise TypeError(f'raw elements in JSON must be strings or {{"b64": "..."}}, got {type(x).__name__}')


def encode_http(
    model: str, version: int, req: InferRequest, outputs: Mapping[str, np.ndarray]
) -> tuple[list[bytes | memoryview], int | None]:
    """The response body as parts to join, and the JSON header length when binary parts follow."""
    names = req.output_names or tuple(outputs)
    wanted = {o.name: o.binary for o in req.outputs} if req.outputs is not None else {}
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    finite = True
    shm = req.shm_outputs
    for name in names:
        arr = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": output_datatype(arr), "shape": list(arr.shape)}
        if shm is not None and name in shm:  # written into its region: no data and, as Triton, no parameters
            write_shm_output(shm[name], name, arr)  # (Triton's C++ client reads binary_data_size in any it finds)
        elif wanted.get(name, req.binary_output):
            raw = to_raw(arr)
            entry["parameters"] = {"binary_data_size": len(raw) if isinstance(raw, bytes) else raw.nbytes}
            blobs.append(raw)
        elif arr.dtype == object:
            entry["data"] = [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr.reshape(-1)]
        else:
            flat = arr.reshape(-1)
            if flat.dtype.kind == "f":
                # As float64 (exact, the text ``tolist()`` gave): the shortest text of a float32 does not always
                # survive a client that reads it as a double and narrows it (7.038531e-26 comes back one ulp off).
                flat = flat.astype(np.float64)
                # A finite sum means every element is finite (a large one may overflow it: then check anyway).
                finite = finite and math.isfinite(np.add.reduce(flat))
            entry["data"] = np.ascontiguousarray(flat)  # orjson writes a C-contiguous array as a flat list
        tensors.append(entry)
    doc: dict[str, Any] = {"model_name": model, "model_version": str(version), "outputs": tensors}
    if req.id:
        doc["id"] = req.id
    header = dump_json(doc) if finite else _std_dump(doc)  # orjson would write NaN and Infinity as null
    if not blobs:
        return [header], None
    return [header, *blobs], len(header)


def dump_json(doc: Any) -> bytes:
    """Compact JSON with orjson, numpy arrays as lists; the standard library for text orjson refuses."""
    try:
        return orjson.dumps(doc, default=_as_list, option=orjson.OPT_SERIALIZE_NUMPY)
    except orjson.JSONEncodeError:  # a lone surrogate in a string (which ``json`` escapes), a type neither knows
        return _std_dump(doc)


def _std_dump(doc: Any) -> bytes:
    """The standard library's JSON: non-finite floats as NaN/Infinity, as before (tritonclient reads them)."""
    return json.dumps(doc, separators=(",", ":"), default=_as_list).encode()


def _as_list(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):  # dtypes orjson does not write (and every array, for ``json``)
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
