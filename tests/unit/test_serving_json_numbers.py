"""JSON tensors read by simdjson straight into numpy decode exactly as the orjson path decodes them: the same
array (values and dtype) or the same error, for every datatype and every kind of element a client can send."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.errors import ProtocolError
from kiln.serving import protocol
from kiln.serving.json_numbers import JsonNumbers, load_infer_json
from kiln.serving.protocol import decode_http
from kiln.spec import ModelSpec, TensorSpec

DATATYPES = {"FP32": "float32", "FP64": "float64", "INT32": "int32", "INT64": "int64", "UINT8": "uint8",
             "UINT64": "uint64", "BOOL": "bool", "BYTES": "string"}  # fmt: skip
SPEC = ModelSpec(
    name="m",
    inputs=[TensorSpec(name=v, dtype=d, shape=(-1,)) for v, d in DATATYPES.items()],
    outputs=[TensorSpec(name="y", dtype="float32", shape=(-1,))],
)

element = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 255, 256, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, -0.0, 1e308, 5e-324, 1.0, 3.0]),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
)


def _decode(body: bytes, fast: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Any]:
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(protocol, "load_infer_json", lambda header: None)
        try:
            with np.errstate(over="ignore"):  # 3.5e38 as FP32 is inf on both paths, with numpy's warning
                arr = decode_http(body, None, SPEC).inputs
        except ProtocolError as exc:
            return "error", str(exc)
    (only,) = arr.values()
    return "ok", (only.dtype, only.tolist())


def _same(a: tuple[str, Any], b: tuple[str, Any]) -> bool:
    if a[0] != b[0] or a[0] == "error":
        return a == b
    (da, va), (db, vb) = a[1], b[1]
    return bool(da == db and len(va) == len(vb) and all(
        x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)) for x, y in zip(va, vb, strict=True)
    ))  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    datatype=st.sampled_from(sorted(DATATYPES)),
    data=st.lists(element, min_size=0, max_size=6),
    nest=st.sampled_from(["flat", "ones", "pairs", "deep"]),
)
def test_both_paths_decode_alike(datatype: str, data: list[Any], nest: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: Any = data
    if nest == "ones":  # [[a], [b], ...]
        sent = [[x] for x in data]
    elif nest == "pairs":  # [[a, b], [c, d], ...], ragged when the count is odd: [[a, b], [c]]
        sent = [data[i : i + 2] for i in range(0, len(data), 2)]
    elif nest == "deep":  # past numpy's 64 dims
        for _ in range(70):
            sent = [sent]
    body = json.dumps({"inputs": [{"name": datatype, "shape": [len(data)], "datatype": datatype, "data": sent}]})
    fast, usual = _decode(body.encode(), True, monkeypatch), _decode(body.encode(), False, monkeypatch)
    assert _same(fast, usual), (fast, usual)


def test_a_float_tensor_is_read_by_simdjson_exactly() -> None:
    x = np.random.default_rng(0).standard_normal(3072).astype(np.float32)
    header = json.dumps({"inputs": [{"name": "FP32", "shape": [3072], "datatype": "FP32", "data": x.tolist()}]})
    doc = load_infer_json(header.encode())
    assert isinstance(doc["inputs"][0]["data"], JsonNumbers)  # the fast path, not a Python list
    assert np.array_equal(decode_http(header.encode(), None, SPEC).inputs["FP32"], x)


@pytest.mark.parametrize(
    "body",
    [b'{"inputs": [{"data": [NaN, 1]}]}', b'{"inputs": [{"data": [1e400]}]}', b'{"x": "\\ud800"}',
     b'{"inputs": [{"data": [18446744073709551616]}]}', b"\xff", b"[" * 2000 + b"]" * 2000, b'{"a": 1} x',
     b'{"\\u0000": null}', b'{"inputs": [{"\\u0000": 1}]}'],
)  # fmt: skip
def test_what_simdjson_does_not_read_goes_the_usual_way(body: bytes) -> None:
    assert load_infer_json(body) is None


def test_duplicate_keys_go_the_usual_way_and_nested_ones_keep_the_last() -> None:
    assert load_infer_json(b'{"id": "a", "id": "b", "inputs": []}') is None
    assert load_infer_json(b'{"inputs": [{"name": "x", "name": "FP32", "data": [1]}]}') is None
    doc = load_infer_json(b'{"parameters": {"t": 1, "t": 2}, "inputs": [{"name": "FP32", "data": [1]}]}')
    assert doc["parameters"] == {"t": 2}


@pytest.mark.parametrize("where", ["data", "extra"])
def test_an_array_past_simdjsons_element_limit_is_read_the_usual_way(where: str) -> None:
    # pysimdjson counts elements in 24 bits: as_list on a longer array corrupted the heap and killed the server
    n = 2**24 + 5
    zeros = b"[" + b"0," * (n - 1) + b"0]"
    if where == "data":
        body = b'{"inputs": [{"name": "FP32", "shape": [4], "datatype": "FP32", "data": ' + zeros + b"}]}"
    else:
        body = (
            b'{"unknown": ' + zeros + b', "inputs": [{"name": "FP32", "shape": [1], "datatype": "FP32", "data": [0]}]}'
        )
    assert load_infer_json(body) is None
    if where == "data":
        with pytest.raises(ProtocolError, match=f"holds {n} elements but shape \\[4\\] needs 4"):
            decode_http(body, None, SPEC)
    else:
        assert decode_http(body, None, SPEC).inputs["FP32"].tolist() == [0.0]
