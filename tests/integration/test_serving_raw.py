"""Raw inputs served: KServe V1 predict (b64 images, texts, numeric instances) and the V2 ``raw`` BYTES
input over HTTP and gRPC, through the model's processing, compared with the same pipeline in process."""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

import kiln
from kiln.processing import Pipeline
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests import models
from tests.fixtures.processing import IMAGE_POST, IMAGE_PRE, gradient_image, minilm_tokenizer, png_bytes

BODY_LIMIT = 64 * 1024
TEXTS = ["the kiln fires clay", "hot pots", "clay pots cool slowly in the kiln, then glaze"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("raw") / "repo"
    kiln.import_model(
        "tests.fixtures.tiny_models:tiny_classifier", root, name="cls", input_shapes=[(1, 3, 8, 8)],
        task="classification", labels=["a", "b", "c"], preprocess=IMAGE_PRE, postprocess=IMAGE_POST,
    )  # fmt: skip
    kiln.import_model(
        "tests.fixtures.tiny_models:vocab_embedder", root, name="emb", input_shapes=[(1, 6), (1, 6)],
        input_dtypes=["int64", "int64"], dynamic_axes={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}},
        assets=[minilm_tokenizer()], postprocess=[{"op": "mean_pool"}],
        preprocess=[{"op": "tokenize", "args": {"tokenizer": "tokenizer.json", "max_length": 32}}],
    )  # fmt: skip
    kiln.import_model("tests.fixtures.tiny_models:mlp", root, name="mlp", input_shapes=[(1, 4)])
    kiln.import_model(models.mixed_model(root.parent / "mixed.onnx"), root, name="mixed")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    settings = ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1, max_body_bytes=BODY_LIMIT)
    with ServerThread(settings) as srv:
        yield srv


def post(srv: ServerThread, path: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def get(srv: ServerThread, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def in_process(repo: Path, model: str, instances: list[Any]) -> list[Any]:
    """What the same pipeline and engine give without a server."""
    spec = kiln.Repository(repo).spec(model)
    pipe = Pipeline.from_spec(spec, root=repo / model / "1")
    batch = pipe.preprocess(instances)
    with kiln.load(repo, model) as predictor:
        return pipe.postprocess(predictor.predict(batch.inputs), batch)


def vectors(predictions: list[Any]) -> np.ndarray:
    """The pooled embedding of each prediction (mean_pool keeps the output's name: one key each)."""
    assert all(isinstance(p, dict) and len(p) == 1 for p in predictions), predictions
    return np.asarray([next(iter(p.values())) for p in predictions], dtype=np.float64)


def assert_close(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (got, want)
        return all(assert_close(got[k], want[k]) for k in want)
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        return all(assert_close(g, w) for g, w in zip(got, want, strict=True))
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), (got, want)
        return True
    assert got == want
    return True


PNGS = [png_bytes(gradient_image(h, w)) for h, w in ((8, 8), (16, 12), (30, 21))]


# ---- KServe V1 --------------------------------------------------------------------------------------------
def test_v1_model_list_and_status(server: ServerThread) -> None:
    assert get(server, "/v1/models") == (200, {"models": ["cls", "emb", "mixed", "mlp"]})
    assert get(server, "/v1/models/cls") == (200, {"name": "cls", "ready": True})
    status, body = get(server, "/v1/models/nope")
    assert status == 404 and "nope" in body["error"]


def test_v1_predict_b64_images_gives_top_k_labels(server: ServerThread, repo: Path) -> None:
    instances = [{"b64": base64.b64encode(p).decode()} for p in PNGS]
    status, body = post(server, "/v1/models/cls:predict", {"instances": instances})
    assert status == 200, body
    preds = body["predictions"]
    assert len(preds) == 3 and all(len(p) == 2 and {"label", "score"} <= p[0].keys() for p in preds)
    assert_close(preds, in_process(repo, "cls", PNGS))


def test_v1_predict_texts_gives_normalized_embeddings(server: ServerThread, repo: Path) -> None:
    status, body = post(server, "/v1/models/emb:predict", {"instances": TEXTS})
    assert status == 200, body
    emb = vectors(body["predictions"])
    assert emb.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(emb, vectors(in_process(repo, "emb", TEXTS)), atol=1e-5)


def test_v1_numeric_instances_for_a_model_without_processing(server: ServerThread, repo: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    status, body = post(server, "/v1/models/mlp:predict", {"instances": x.tolist()})
    assert status == 200, body
    with kiln.load(repo, "mlp") as predictor:
        (want,) = predictor.predict(x).values()
    np.testing.assert_allclose(np.asarray(body["predictions"]), want, rtol=1e-5, atol=1e-6)
    status, body = post(server, "/v1/models/mlp:predict", {"instances": [[1, 2, 3, 4], [1, 2, 3]]})
    assert status == 400 and "instance 1" in body["error"], body


def test_v1_instances_of_a_string_integer_and_float_model_keep_their_datatypes(server: ServerThread) -> None:
    instance = {"text": ["héllo", ""], "ids": [1, -2, 2**40], "x": [0.5, -1]}
    status, body = post(server, "/v1/models/mixed:predict", {"instances": [instance, {**instance, "ids": [0, 0, 0]}]})
    assert status == 200, body
    first, second = body["predictions"]
    assert first == {"text_out": ["héllo", ""], "ids_out": [2, -1, 2**40 + 1], "z": [1.0, -2.0]}
    assert second["ids_out"] == [1, 1, 1]


MIXED = {"text": ["a", "b"], "ids": [1, 2, 3], "x": [0.5, 1.0]}


@pytest.mark.parametrize(
    ("instance", "reason"),
    [
        ({**MIXED, "text": ["a", 7]}, "input 'text' is a string input: it takes strings only, got int"),
        ({**MIXED, "text": [True, "b"]}, "input 'text' is a string input: it takes strings only, got bool"),
        ({**MIXED, "text": [None, "b"]}, "input 'text' is a string input: it takes strings only, got NoneType"),
        ({**MIXED, "ids": [True, 2, 3]}, "input 'ids' must hold integers for INT64, got true/false among them"),
        ({**MIXED, "ids": [1.5, 2, 3]}, "input 'ids' must hold integers for INT64, got non-integer numbers"),
        ({**MIXED, "ids": ["1", "2", "3"]}, "input 'ids' must hold integers for INT64, got strings"),
        ({**MIXED, "ids": [1, 2, 2**63]}, "out of range for INT64"),
        ({**MIXED, "x": [False, 1.0]}, "input 'x' must hold numbers for FP32, got true/false among them"),
        ({**MIXED, "x": "0.5"}, "input 'x' must be numbers"),
        ({**MIXED, "extra": [1]}, "'extra' is not an input of the model; its inputs are ['ids', 'text', 'x']"),
        (["a", "b"], "the model takes inputs ['ids', 'text', 'x']; give each instance as a dict of them"),
    ],
)  # fmt: skip
def test_v1_instances_of_the_wrong_kind_are_refused_not_converted(
    server: ServerThread, instance: Any, reason: str
) -> None:
    status, body = post(server, "/v1/models/mixed:predict", {"instances": [MIXED, instance]})
    assert status == 400, body
    assert body["error"].startswith("instance 1: ") and reason in body["error"], body


def test_v1_booleans_among_a_numeric_models_numbers_are_refused(server: ServerThread) -> None:
    status, body = post(server, "/v1/models/mlp:predict", {"instances": [[1, 2, 3, 4], [True, 2, 3, 4]]})
    assert status == 400 and "instance 1" in body["error"] and "true/false among them" in body["error"], body


@pytest.mark.parametrize(
    ("model", "instances", "where", "reason"),
    [
        ("cls", [{"b64": base64.b64encode(PNGS[0]).decode()}, {"b64": base64.b64encode(b"GIF89a?").decode()}],
         "instance 1", "cannot decode the image"),
        ("cls", [{"b64": base64.b64encode(PNGS[0]).decode()}, {"b64": "%%%"}], "instance 1", "not valid base64"),
        ("emb", ["fine", "also fine", 42], "instance 2", "expected a string"),
        ("cls", [{"b64": base64.b64encode(PNGS[0]).decode()}] * 33, "instances", "max batch size 32"),
    ],
)  # fmt: skip
def test_v1_bad_instances_are_a_400_naming_the_instance(
    server: ServerThread, model: str, instances: list[Any], where: str, reason: str
) -> None:
    status, body = post(server, f"/v1/models/{model}:predict", {"instances": instances})
    assert status == 400, body
    assert where in body["error"] and reason in body["error"], body


def test_v1_body_over_the_limit_is_413(server: ServerThread) -> None:
    big = {"instances": [{"b64": base64.b64encode(bytes(BODY_LIMIT)).decode()}]}
    status, body = post(server, "/v1/models/cls:predict", big)
    assert status == 413 and "exceeds the limit" in body["error"]
    status, body = post(server, "/v1/models/cls:predict", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]


# ---- V2 BYTES ---------------------------------------------------------------------------------------------
def raw_input(module: Any, elements: list[bytes] | list[str]) -> Any:
    arr = np.array(elements, dtype=object)
    i = module.InferInput("raw", [len(elements)], "BYTES")
    i.set_data_from_numpy(arr)
    return i


@pytest.fixture(scope="module")
def http_client(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    yield client
    client.close()


def predictions(result: Any) -> list[Any]:
    return [json.loads(x) for x in result.as_numpy("predictions")]


def test_metadata_and_config_list_the_raw_input_beside_the_tensors(
    http_client: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    md = http_client.get_model_metadata("cls")
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]] == [
        ("image", "FP32", [-1, 3, 8, 8]),
        ("raw", "BYTES", [-1]),
    ]
    assert [t["name"] for t in md["outputs"]] == [md["outputs"][0]["name"], "predictions"]
    config = grpc_client.get_model_config("cls", as_json=True)["config"]
    assert [(i["name"], i.get("optional")) for i in config["input"]] == [("image", True), ("raw", True)]
    assert [t["name"] for t in http_client.get_model_metadata("mlp")["inputs"]] == ["features"]


def test_v2_bytes_images_over_http_and_grpc(
    http_client: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient, repo: Path
) -> None:
    want = in_process(repo, "cls", PNGS)
    via_http = http_client.infer("cls", [raw_input(httpclient, PNGS)])
    assert via_http.as_numpy("predictions").shape == (3,)
    assert_close(predictions(via_http), want)
    via_grpc = grpc_client.infer("cls", [raw_input(grpcclient, PNGS)])
    assert_close(predictions(via_grpc), want)
    # the model's own outputs may be asked for beside the predictions
    out = [grpcclient.InferRequestedOutput("predictions"), grpcclient.InferRequestedOutput(via_http_output(repo))]
    both = grpc_client.infer("cls", [raw_input(grpcclient, PNGS)], outputs=out)
    assert both.as_numpy(via_http_output(repo)).shape == (3, 3)


def via_http_output(repo: Path) -> str:
    return kiln.Repository(repo).spec("cls").outputs[0].name


def test_v2_bytes_texts_over_grpc_and_json(
    http_client: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient, server: ServerThread,
    repo: Path,
) -> None:  # fmt: skip
    want = vectors(in_process(repo, "emb", TEXTS))
    got = vectors(predictions(grpc_client.infer("emb", [raw_input(grpcclient, TEXTS)])))
    np.testing.assert_allclose(got, want, atol=1e-5)
    body = {"inputs": [{"name": "raw", "datatype": "BYTES", "shape": [3], "data": TEXTS}]}
    status, doc = post(server, "/v2/models/emb/infer", body)
    assert status == 200, doc
    (out,) = doc["outputs"]
    assert out["name"] == "predictions" and out["datatype"] == "BYTES" and out["shape"] == [3]
    np.testing.assert_allclose(vectors([json.loads(x) for x in out["data"]]), want, atol=1e-5)


def test_tensor_requests_to_a_processing_model_work_unchanged(
    http_client: httpclient.InferenceServerClient, repo: Path
) -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    i = httpclient.InferInput("image", [2, 3, 8, 8], "FP32")
    i.set_data_from_numpy(x)
    result = http_client.infer("cls", [i])
    name = via_http_output(repo)
    assert result.as_numpy("predictions") is None
    with kiln.load(repo, "cls") as predictor:
        np.testing.assert_allclose(result.as_numpy(name), predictor.predict(x)[name], rtol=1e-5, atol=1e-6)


def test_v2_bad_image_or_text_is_400_and_invalid_argument(
    http_client: httpclient.InferenceServerClient, grpc_client: grpcclient.InferenceServerClient
) -> None:
    bad_images = [PNGS[0], PNGS[1], b"\x89PNG not really"]
    with pytest.raises(InferenceServerException, match=r"instance 2: decode_image: cannot decode") as err:
        http_client.infer("cls", [raw_input(httpclient, bad_images)])
    assert err.value.status() == "400"
    with pytest.raises(InferenceServerException, match=r"instance 2: decode_image") as err:
        grpc_client.infer("cls", [raw_input(grpcclient, bad_images)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    bad_text = [b"ok", b"\xff\xfe not utf-8"]
    with pytest.raises(InferenceServerException, match=r"instance 1: tokenize: the text is not valid UTF-8") as err:
        grpc_client.infer("emb", [raw_input(grpcclient, bad_text)])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match=r"'raw' input goes alone") as err:
        x = httpclient.InferInput("image", [1, 3, 8, 8], "FP32")
        x.set_data_from_numpy(np.zeros((1, 3, 8, 8), np.float32))
        http_client.infer("cls", [raw_input(httpclient, PNGS[:1]), x])
    assert err.value.status() == "400"


def test_raw_requests_are_counted_like_tensor_requests(server: ServerThread) -> None:
    def ok_requests() -> float:
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        lines = [ln for ln in text.splitlines() if ln.startswith("kiln_requests_total{") and 'model="mlp"' in ln]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if 'outcome="ok"' in ln)

    before = ok_requests()
    assert post(server, "/v1/models/mlp:predict", {"instances": [[0, 0, 0, 0]]})[0] == 200
    assert ok_requests() == before + 1
