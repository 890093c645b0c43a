"""The zoo's MiniLM with its real weights, served raw: KServe V1 ``:predict`` takes sentences and returns
the embeddings that sentence-transformers computes for them."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kiln
from kiln.optimize.accuracy import cosine_rows
from kiln.serving import ServerSettings
from kiln.serving.server import ServerThread
from kiln.zoo import minilm

pytestmark = pytest.mark.slow

TEXTS = [
    "The kiln reached its firing temperature just after midnight.",
    "Bread rises faster in a warm kitchen.",
    "How do I reset my password if I no longer have access to my email?",
    "ok",
    " ".join(minilm.sentences()[:12]),  # about 180 word pieces: past the example length, within 256
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("minilm") / "repo"
    minilm.import_into(root)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1)) as srv:
        yield srv


def predict_v1(srv: ServerThread, instances: list[Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        conn.request("POST", "/v1/models/minilm:predict", json.dumps({"instances": instances}),
                     {"Content-Type": "application/json"})  # fmt: skip
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_import_keeps_the_sequence_dynamic_and_carries_the_tokenizer(repo: Path) -> None:
    spec = kiln.Repository(repo).spec("minilm")
    assert [t.shape for t in spec.inputs] == [(-1, -1), (-1, -1)]
    assert spec.outputs[0].name == minilm.OUTPUT_NAME and spec.outputs[0].shape == (-1, minilm.DIM)
    assert (repo / "minilm" / "1" / "tokenizer.json").is_file()


def test_v1_predict_with_raw_sentences_matches_the_fp32_original(server: ServerThread) -> None:
    from sentence_transformers import SentenceTransformer

    status, body = predict_v1(server, TEXTS)
    assert status == 200, body
    served = np.asarray(body["predictions"], dtype=np.float64)  # one output: each prediction is its row
    assert served.shape == (len(TEXTS), minilm.DIM)
    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu", local_files_only=True)
    want = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    cosine = cosine_rows(want, served)
    assert cosine.min() >= 0.999, cosine
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


def test_a_bad_instance_is_a_400_naming_it(server: ServerThread) -> None:
    status, body = predict_v1(server, ["fine", {"b64": "aGk="}])
    assert status == 400 and "instance 1" in body["error"] and "string" in body["error"], body


def test_kiln_predicts_batches_by_length_with_the_embeddings_of_each_sentence_alone(repo: Path) -> None:
    """The fp32 reference through ``kiln predict``'s runner: sentences batched by length and padded to the
    default buckets embed as each sentence run alone at its exact length does."""
    from kiln.predictor import load
    from kiln.processing import Pipeline
    from kiln.processing.prefetch import predict_overlapped

    texts = [*TEXTS, *minilm.sentences()]
    with load(kiln.Repository(repo), "minilm") as predictor:
        assert predictor.variant == "reference"  # the fp32 export
        pipe = Pipeline.from_spec(predictor.spec, root=repo / "minilm" / "1")
        padding: list[tuple[int, int]] = []

        def run(feed: Any) -> dict[str, np.ndarray]:
            padding.append((int(feed["attention_mask"].sum(axis=1).max()), feed["input_ids"].shape[1]))
            return predictor.predict(feed)

        results = list(predict_overlapped(texts, lambda t: t, pipe, run, batch_size=16))
        assert [r.item for r in results] == texts and all(r.ok for r in results)
        batched = np.asarray([r.output[minilm.OUTPUT_NAME] for r in results], dtype=np.float64)
        assert all(longest <= padded <= 1.25 * longest for longest, padded in padding), padding

        tokenizer = pipe.collate_op.tokenizer  # type: ignore[union-attr]
        alone = []
        for text in texts:
            ids = np.asarray([tokenizer.encode(text).ids], dtype=np.int64)  # its exact length, no padding
            outputs = predictor.predict({"input_ids": ids, "attention_mask": np.ones_like(ids)})
            alone.append(outputs[minilm.OUTPUT_NAME][0])
    cosine = cosine_rows(np.asarray(alone, dtype=np.float64), batched)
    assert cosine.min() >= 0.999, cosine
