"""The V2 codec: JSON and binary tensors, BYTES, and errors that name the field."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tritonclient.http as tritonhttp

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
        (
            lambda d: d.update(outputs=[{"name": "y"}, {"name": "t"}, {"name": "y"}]),
            ProtocolError,
            "outputs: output 'y' is requested more than once",
        ),
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
        TensorSpec(name="u64", dtype="uint64", shape=(-1,)),
        TensorSpec(name="f32", dtype="float32", shape=(-1,)),
        TensorSpec(name="flag", dtype="bool", shape=(-1,)),
    ],
    outputs=[TensorSpec(name="y", dtype="float32", shape=(-1,))],
)
_DATATYPES = {"i64": "INT64", "i8": "INT8", "u8": "UINT8", "u64": "UINT64", "f32": "FP32", "flag": "BOOL"}


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
        ("f32", [True, 2.5], "must hold numbers for FP32, got true/false among them"),  # numpy: [1.0, 2.5]
        ("i64", [3, False], "must hold integers for INT64, got true/false among them"),  # numpy: [3, 0]
        ("u8", [1, True], "must hold integers for UINT8, got true/false among them"),
        ("flag", [True, 1], "must hold true/false for BOOL, got integers"),
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


# ---- JSON tensors through orjson: exact values, strict kinds ----------------------------------------------
def _tritonclient_reads(model_outputs: dict[str, np.ndarray]) -> tritonhttp.InferResult:
    """The response body as tritonclient parses it (rapidjson, then ``np.array(data, dtype)``)."""
    parts, hlen = encode_http("m", 1, InferRequest(id="", inputs={}), model_outputs)
    return tritonhttp.InferResult.from_response_body(b"".join(parts), header_length=hlen)


def test_json_float32_outputs_come_back_bit_for_bit() -> None:
    # 0x15AE43FD's shortest float32 text, 7.038531e-26, read as a double and narrowed, is 0x15AE43FE: a codec
    # that wrote float32 shortest text (orjson's numpy default) would hand the client a different number.
    special = np.array([0x15AE43FD, 0x00000001, 0x007FFFFF, 0x7F7FFFFF, 0x80000000, 0x3DCCCCCD], np.uint32)
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 20_000, dtype=np.uint32)
    bits = bits[np.isfinite(bits.view(np.float32))]
    y = np.concatenate([special, bits]).view(np.float32)
    back = _tritonclient_reads({"y": y.reshape(1, -1)}).as_numpy("y")
    assert back.dtype == np.float32 and back.shape == (1, y.size)
    assert np.array_equal(back.reshape(-1).view(np.uint32), y.view(np.uint32))
    half = rng.standard_normal(100).astype(np.float16)
    assert np.array_equal(_tritonclient_reads({"h": half}).as_numpy("h").view(np.uint16), half.view(np.uint16))


def test_json_non_finite_outputs_are_written_as_nan_and_infinity_not_null() -> None:
    y = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)
    parts, _ = encode_http("m", 1, InferRequest(id="", inputs={}), {"y": y})
    assert b"null" not in parts[0] and b"NaN,Infinity,-Infinity,1.5" in parts[0]
    back = _tritonclient_reads({"y": y}).as_numpy("y")
    assert np.array_equal(back, y, equal_nan=True)


def test_json_integer_bool_and_bytes_outputs_keep_their_values() -> None:
    info64, infou = np.iinfo(np.int64), np.iinfo(np.uint64)
    outs: dict[str, np.ndarray] = {
        "i64": np.array([[info64.min, -1], [0, info64.max]], np.int64),
        "u64": np.array([0, infou.max], np.uint64),
        "i8": np.array([-128, 127], np.int8),
        "b": np.array([True, False, True]),
        "s": np.array(["héllo", b"\xff", ""], dtype=object),
        "empty": np.zeros((0, 3), np.float32),
        "strided": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],
    }
    res = _tritonclient_reads(outs)
    for name in ("i64", "u64", "i8", "b", "empty", "strided"):
        got = res.as_numpy(name)
        assert got.dtype == outs[name].dtype and np.array_equal(got, outs[name]), name
    doc = res.get_response()
    assert doc["outputs"][4]["datatype"] == "BYTES" and doc["outputs"][4]["data"] == ["héllo", "\ufffd", ""]
    assert doc["outputs"][0]["data"] == [info64.min, -1, 0, info64.max]  # exact integers, not doubles


def test_json_output_text_orjson_refuses_falls_back_to_the_standard_library() -> None:
    parts, _ = encode_http("m", 1, InferRequest(id="\ud800", inputs={}), {"t": np.array(["a"], dtype=object)})
    assert json.loads(bytes(parts[0]))["id"] == "\ud800"


def test_json_float32_inputs_are_exact() -> None:
    x = np.concatenate(
        [np.array([0x15AE43FD, 1, 0x7F7FFFFF], np.uint32).view(np.float32), np.array([0.1, -0.0], np.float32)]
    )
    data = [v.item() for v in x]  # what tritonclient sends with binary_data=False (rapidjson writes repr text)
    assert np.array_equal(_typed("f32", data).view(np.uint32), x.view(np.uint32))


def test_json_int64_extremes_and_bool_inputs() -> None:
    assert _typed("i64", [-(2**63), 2**63 - 1, 0]).tolist() == [-(2**63), 2**63 - 1, 0]
    assert _typed("flag", [True, False]).dtype == np.bool_
    with pytest.raises(ProtocolError, match=r"^input 'i64': data: 9223372036854775808 is out of range for INT64"):
        _typed("i64", [2**63, 0])
    # Past 64 bits orjson reads an integer as a double: still out of range for an integer input, a number for FP32.
    with pytest.raises(ProtocolError, match=r"^input 'i64': data: 18446744073709551616 is out of range for INT64"):
        _typed("i64", [2**64, 0])
    with pytest.raises(ProtocolError, match=r"for INT64, got numbers written as floats, or integers past 64 bits$"):
        _typed("i64", [-(2**63) - 1])  # the double is -2**63 itself: refused as a float, not out of range
    # numpy reads 2**64 - 1 beside 5 as float64 (digits lost); the codec reads them exactly.
    assert _typed("u64", [2**64 - 1, 5]).tolist() == [2**64 - 1, 5]
    with pytest.raises(ProtocolError, match=r"^input 'u64': data: -1 is out of range for UINT64"):
        _typed("u64", [2**64 - 1, -1])
    with pytest.raises(ProtocolError, match="must hold integers for INT64, got non-integer numbers"):
        _typed("i64", [2**64, 0.5])
    assert _typed("f32", [10**30]).tolist() == [np.float32(1e30)]


def test_json_nan_and_infinity_inputs_are_read_as_before() -> None:
    # Not JSON (orjson refuses them) but tritonclient writes them for non-finite inputs; the standard library reads them.
    assert np.isnan(_typed("f32", [float("nan"), float("inf")])).tolist() == [True, False]
    with pytest.raises(ProtocolError, match="must hold integers for INT64, got non-integer numbers"):
        _typed("i64", [float("nan")])


def test_json_floats_past_the_types_range_are_infinity_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in cast" went raw to the server's stderr
        assert _typed("f32", [1e39, -1e39, 2.5]).tolist() == [float("inf"), float("-inf"), 2.5]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            b'{"inputs":[{"name":"f32","shape":[1],"datatype":"FP32","data":'
            + b"[" * 1000
            + b"1"
            + b"]" * 1000
            + b"}]}",
            "input 'f32': data: cannot be read as FP32",
        ),
        (b"[" * 5000 + b"]" * 5000, "body: nests arrays or objects too deeply"),
        (b'{"inputs": [1.5,]}', "body: not valid JSON"),
        (b'{"inputs":[{"name":"f32","shape":[2],"datatype":"FP32","data":[[1],[2,3]]}]}', "input 'f32': data"),
        (b'{"inputs":[{"name":"flag","shape":[2],"datatype":"BOOL","data":[true,1]}]}', "true/false for BOOL"),
    ],
)
def test_json_bodies_orjson_and_json_refuse_alike(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_http(body, None, TYPED)


def test_json_bytes_inputs_unchanged() -> None:
    doc = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a", "é", ""]}]}
    req = decode_http(json.dumps(doc).encode(), None, SPEC)
    assert req.inputs["text"].dtype == object and list(req.inputs["text"]) == ["a", "é", ""]
    doc["inputs"][0]["data"] = ["a", "\ud800", "b"]  # a lone surrogate: orjson refuses it, json reads it, we refuse
    with pytest.raises(ProtocolError, match="input 'text': data: cannot be read as BYTES"):
        decode_http(json.dumps(doc).encode(), None, SPEC)
