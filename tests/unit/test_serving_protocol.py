"""The V2 codec: JSON and binary tensors, BYTES, and errors that name the field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kiln.errors import InputError, ProtocolError
from kiln.serving.protocol import (
    InferRequest,
    RequestedOutput,
    decode_http,
    deserialize_bytes,
    encode_http,
    serialize_bytes,
)
from kiln.spec import ModelSpec, TensorSpec

SPEC = ModelSpec(
    name="m",
    inputs=[
        TensorSpec(name="x", dtype="float32", shape=(-1, 2)),
        TensorSpec(name="text", dtype="string", shape=(-1,)),
    ],
    outputs=[TensorSpec(name="y", dtype="float32", shape=(-1, 2)), TensorSpec(name="t", dtype="string", shape=(-1,))],
)


def _binary_body(x: np.ndarray, text: list[str], **params: object) -> tuple[bytes, int]:
    raw_text = serialize_bytes(np.array(text, dtype=object))
    header = json.dumps({
        "id": "r1",
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
            {"name": "text", "shape": [len(text)], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw_text)}},
        ],
        "parameters": params,
    }).encode()  # fmt: skip
    return header + x.tobytes() + raw_text, len(header)


def test_binary_inputs_decode_as_views_of_the_body() -> None:
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    body, hlen = _binary_body(x, ["héllo", ""])
    req = decode_http(body, hlen, SPEC)
    assert np.array_equal(req.inputs["x"], x)
    assert not req.inputs["x"].flags.owndata  # np.frombuffer view, no copy
    assert list(req.inputs["text"]) == ["héllo", ""]
    assert req.id == "r1"


def test_json_inputs_decode() -> None:
    body = json.dumps({
        "inputs": [
            {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [[1, 2]]},
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    req = decode_http(body, None, SPEC)
    assert req.inputs["x"].dtype == np.float32 and req.inputs["x"].tolist() == [[1.0, 2.0]]
    assert req.outputs == [RequestedOutput("y", True)]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (
            lambda d: d.update(inputs=[{**d["inputs"][0], "datatype": "INT64"}, d["inputs"][1]]),
            InputError,
            "datatype must be FP32",
        ),
        (lambda d: d["inputs"][0].update(name="nope"), InputError, "one of \\['text', 'x'\\]|one of \\['x', 'text'\\]"),
        (lambda d: d["inputs"][0].update(shape="2x2"), ProtocolError, "shape"),
        (
            lambda d: d["inputs"][0].update(data=[1, 2, 3]),
            ProtocolError,
            "holds 3 elements but shape \\[1, 2\\] needs 2",
        ),
        (lambda d: d["inputs"][0].pop("data"), ProtocolError, "input 'x': data: is missing"),
        (lambda d: d["inputs"][1].update(data=[3]), ProtocolError, "BYTES elements in JSON must be strings"),
        (lambda d: d.update(outputs=[{"name": "zz"}]), ProtocolError, "unknown output 'zz'"),
        (lambda d: d.pop("inputs"), ProtocolError, "inputs: must be a non-empty list"),
    ],
)
def test_bad_requests_name_the_field(mutate: object, error: type[Exception], match: str) -> None:
    doc = {
        "inputs": [
            {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
            {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]},
        ]
    }
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(error, match=match):
        decode_http(json.dumps(doc).encode(), None, SPEC)


def test_malformed_json_and_missing_binary_bytes() -> None:
    with pytest.raises(ProtocolError, match="body: not valid JSON"):
        decode_http(b"{nope", None, SPEC)
    x = np.zeros((2, 2), np.float32)
    body, hlen = _binary_body(x, ["a", "b"])
    with pytest.raises(ProtocolError, match="binary_data_size: 16 bytes announced but only"):
        decode_http(body[: hlen + 8], hlen, SPEC)
    with pytest.raises(ProtocolError, match="not claimed by any input"):
        decode_http(body + b"xx", hlen, SPEC)
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
        decode_http(body, len(body) + 1, SPEC)


def test_bytes_round_trip_and_truncation() -> None:
    arr = np.array([b"a", "é", b""], dtype=object)
    raw = serialize_bytes(arr)
    assert list(deserialize_bytes(raw, 3, "t")) == ["a", "é", ""]
    with pytest.raises(ProtocolError, match="element 1 claims 2 bytes but only 1 remain"):
        deserialize_bytes(raw[:-5], 3, "t")
    with pytest.raises(ProtocolError, match="ends after 2 of 3 elements"):
        deserialize_bytes(raw[:-3], 3, "t")


def test_encode_binary_and_json_outputs() -> None:
    outputs = {"y": np.ones((2, 2), np.float32), "t": np.array(["a", "bc"], dtype=object)}
    req = InferRequest(id="7", inputs={}, outputs=[RequestedOutput("y", True), RequestedOutput("t", False)])
    parts, hlen = encode_http("m", 3, req, outputs)
    body = b"".join(parts)
    assert hlen is not None
    doc = json.loads(body[:hlen])
    assert doc["model_version"] == "3" and doc["id"] == "7"
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 16
    assert doc["outputs"][1]["data"] == ["a", "bc"]
    assert np.array_equal(np.frombuffer(body[hlen:], np.float32).reshape(2, 2), outputs["y"])
    parts, hlen = encode_http("m", 3, InferRequest(id="", inputs={}), {"y": outputs["y"]})
    assert hlen is None and json.loads(parts[0])["outputs"][0]["data"] == [1.0] * 4


TYPED = ModelSpec(
    name="typed",
    inputs=[
        TensorSpec(name="i64", dtype="int64", shape=(-1,)),
        TensorSpec(name="i8", dtype="int8", shape=(-1,)),
        TensorSpec(name="u8", dtype="uint8", shape=(-1,)),
        TensorSpec(name="f32", dtype="float32", shape=(-1,)),
        TensorSpec(name="flag", dtype="bool", shape=(-1,)),
    ],
    outputs=[TensorSpec(name="y", dtype="float32", shape=(-1,))],
)
_DATATYPES = {"i64": "INT64", "i8": "INT8", "u8": "UINT8", "f32": "FP32", "flag": "BOOL"}


def _typed(name: str, data: list[object]) -> np.ndarray:
    doc = {"inputs": [{"name": name, "shape": [len(data)], "datatype": _DATATYPES[name], "data": data}]}
    return decode_http(json.dumps(doc).encode(), None, TYPED).inputs[name]


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("i64", [1.9, -2.7], "must hold integers for INT64, got non-integer numbers"),
        ("i64", ["1", "2"], "must hold integers for INT64, got strings"),
        ("f32", [True, False], "must hold numbers for FP32, got true/false"),
        ("f32", ["1.5"], "must hold numbers for FP32, got strings"),
        ("f32", [1.0, None], "must hold numbers for FP32, got null"),
        ("flag", [1, 0], "must hold true/false for BOOL, got integers"),
        ("i8", [1, 300], "300 is out of range for INT8 \\(-128..127\\)"),
        ("u8", [-1, 2], "-1 is out of range for UINT8 \\(0..255\\)"),
    ],
)
def test_json_data_of_the_wrong_kind_is_refused_not_coerced(name: str, data: list[object], match: str) -> None:
    with pytest.raises(ProtocolError, match=f"^input '{name}': data: {match}"):
        _typed(name, data)


def test_json_data_of_the_right_kind_keeps_its_values() -> None:
    assert _typed("i64", [1, -2, 2**40]).tolist() == [1, -2, 2**40]
    assert _typed("f32", [1, 2.5]).dtype == np.float32  # integers are numbers
    assert _typed("f32", [1, 2.5]).tolist() == [1.0, 2.5]
    assert _typed("flag", [True, False]).tolist() == [True, False]
    assert _typed("u8", [0, 255]).dtype == np.uint8
    assert _typed("i8", []).shape == (0,)
