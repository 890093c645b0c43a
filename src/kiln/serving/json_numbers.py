"""An infer request's JSON header with its tensors' numbers read straight into numpy.

orjson reads a JSON document fast, but a tensor of N numbers still becomes N Python floats, which
``np.asarray`` then walks again: 107 µs for a 3,072-float image here, as much as the engine's own time on a
small CNN. simdjson (``pysimdjson``) parses the document once into its tape, and ``as_buffer`` copies an
array's numbers out of it in C: 43 µs for the same body. So :func:`load_infer_json` reads the header with
simdjson and keeps each input's ``data`` array as :class:`JsonNumbers` (int64, uint64 or float64, as
``np.asarray`` would pick), everything else as the Python objects orjson would make (the last of duplicate
keys wins, as with orjson).

Nothing new is accepted or refused: a document simdjson does not read (a BOM-less non-UTF-8 body, NaN or
Infinity literals, numbers past 64 bits or past a double, escaped lone surrogates, nesting past 1,024)
goes to :func:`kiln.serving.protocol.load_json`, which reads it or says why not, as before; ``data`` that
is not all numbers (booleans, strings, null, objects) becomes the Python list and takes the checks it
always took. Nested ``data`` is read in C when its element count is the product of the sizes along its first
elements (regular, as far as that tells; a ragged array almost always fails it and goes to
``np.asarray``, which refuses it), and only up to 32 levels deep.

pysimdjson counts an array's elements in 24 bits: past 2**24 - 1 elements ``len`` is wrong and ``as_list``
corrupts the heap (the process dies in ``free``). A JSON array of n elements takes at least 2n + 1 bytes,
so a document of at most 2**24 bytes holds at most 2**23; larger documents go the usual way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import simdjson


@dataclass(frozen=True)
class JsonNumbers:
    """An input's ``data``: every element a JSON number, flattened in row-major order. ``array`` is what
    ``np.asarray`` makes of the list where it makes one kind (int64, else uint64, else float64);
    :meth:`as_list` gives the list itself, for the exact checks of integers that only a float64 holds.
    Valid while the request is decoded (``source`` is simdjson's array, alive with its parser)."""

    array: np.ndarray
    source: Any

    def as_list(self) -> list[Any]:
        out: list[Any] = self.source.as_list()
        return out


_KINDS = (("i", np.int64), ("u", np.uint64), ("d", np.float64))


_MAX_SIMDJSON_BYTES = 2**24  # no array in a document this size comes near pysimdjson's 2**24-element limit
_MAX_DIMS = 32  # numpy's own limit is 64; deeper data takes the usual path, which refuses it


def _first_path(arr: Any) -> tuple[int, ...] | None:
    """The sizes along ``arr``'s first elements (its shape, if it is regular), or None past ``_MAX_DIMS``."""
    sizes: list[int] = []
    node = arr
    while isinstance(node, simdjson.Array):
        if len(sizes) == _MAX_DIMS:
            return None
        sizes.append(len(node))
        node = node[0] if len(node) else None
    return tuple(sizes)


def _numbers(arr: Any) -> JsonNumbers | list[Any]:
    dims = _first_path(arr)
    if dims is not None:
        for code, dtype in _KINDS:
            try:
                buffer = arr.as_buffer(of_type=code)
            except (TypeError, ValueError):  # an element of another kind or out of this kind's range
                continue
            values = np.frombuffer(buffer, dtype)
            if len(values) != math.prod(dims):  # ragged (say [[1, 2], [3]]): np.asarray decides, as before
                break
            if code == "u" and values.min(initial=2**63) < 2**63:
                values = values.astype(np.float64)  # numpy's kind for integers of both ranges: [0, 2**63]
            return JsonNumbers(values, arr)
    out: list[Any] = arr.as_list()
    return out


class _Duplicated(Exception):
    """A key given twice in an object simdjson reads lazily (its lookup finds the first, orjson keeps the last)."""


def _python(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()  # the last of duplicate keys wins, as with orjson
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _fields(obj: Any) -> list[str]:
    keys: list[str] = list(obj.keys())
    if len(set(keys)) != len(keys):
        raise _Duplicated
    return keys


def _tensor(value: Any) -> Any:
    if not isinstance(value, simdjson.Object):
        return _python(value)
    out: dict[str, Any] = {}
    for key in _fields(value):
        v = value[key]  # lazy: an array stays simdjson's
        out[key] = _numbers(v) if key == "data" and isinstance(v, simdjson.Array) else _python(v)
    return out


def load_infer_json(header: bytes) -> Any | None:
    """The infer header as Python objects with each input's numeric ``data`` as :class:`JsonNumbers`, or
    None where simdjson does not read it (the caller reads it the usual way)."""
    if len(header) > _MAX_SIMDJSON_BYTES:
        return None
    parser = simdjson.Parser()  # one per document: a parser's objects die with its next parse
    try:
        doc = parser.parse(header)
    except (ValueError, RuntimeError, UnicodeDecodeError):  # not JSON, or JSON only the usual way reads
        return None
    if not isinstance(doc, simdjson.Object):
        return None  # the usual way refuses it, naming what it is
    try:
        out: dict[str, Any] = {}
        for key in _fields(doc):
            value = doc[key]
            if key == "inputs" and isinstance(value, simdjson.Array):
                out[key] = [_tensor(value[i]) for i in range(len(value))]
            else:
                out[key] = _python(value)
        return out
    except Exception:  # a duplicate key, a key simdjson's lookup cannot find ("\u0000"), ...:
        return None  # whatever the lazy walk trips on, the usual parser reads the document and decides


__all__ = ["JsonNumbers", "load_infer_json"]
