"""Models from Keras, scikit-learn, TorchScript and torch.export, imported and served through V2 over HTTP
and gRPC by Triton's clients (binary tensors), answering what ``kiln.load(...).predict`` answers."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

import kiln
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests.fixtures import tiny_models
from tests.integration.test_import_interop import SEQ_AXES, iris_pipeline, keras_two_in_two_out, seq_feed

_V2 = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("interop")
    root = d / "repo"
    keras_path = d / "twin.keras"
    keras_two_in_two_out().save(keras_path)
    kiln.import_model(keras_path, root)

    pipe, _ = iris_pipeline()
    pkl = d / "iris.pkl"
    pkl.write_bytes(pickle.dumps(pipe))
    kiln.import_model(pkl, root, trust_pickle=True)

    scripted = d / "scripted.pt"
    torch.jit.script(tiny_models.seq_pool().eval()).save(str(scripted))
    kiln.import_model(
        scripted, root, input_shapes=[(1, 6), (1, 6)], input_dtypes=["int64", "int64"], dynamic_axes=SEQ_AXES,
        output_names=["logits", "pooled"],
    )  # fmt: skip

    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=512)
    example = (torch.randint(0, 20, (2, 5)), torch.ones(2, 5, dtype=torch.int64))
    program = torch.export.export(
        tiny_models.seq_pool().eval(), example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})
    )
    torch.export.save(program, str(d / "exported.pt2"))
    kiln.import_model(d / "exported.pt2", root, output_names=["logits", "pooled"])
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1)) as srv:
        yield srv


def feed_for(repo: Path, model: str) -> dict[str, np.ndarray]:
    if model == "twin":
        rng = np.random.default_rng(0)
        return {
            "seq": rng.standard_normal((3, 7, 6)).astype(np.float32),
            "extra": rng.standard_normal((3, 4)).astype(np.float32),
        }
    if model == "iris":
        (name,) = [t.name for t in kiln.Repository(repo).spec("iris").inputs]
        return {name: iris_pipeline()[1][::15]}
    return seq_feed(3, 9) if model == "scripted" else seq_feed(2, 13)


def infer(
    srv: ServerThread, protocol: str, model: str, feed: dict[str, np.ndarray], outputs: list[str]
) -> dict[str, np.ndarray]:
    module: Any = httpclient if protocol == "http" else grpcclient
    port = srv.http_port if protocol == "http" else srv.grpc_port
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        inputs = []
        for name, arr in feed.items():
            i = module.InferInput(name, list(arr.shape), _V2[arr.dtype])
            i.set_data_from_numpy(arr)  # binary tensors: the clients' default
            inputs.append(i)
        result = client.infer(model, inputs, outputs=[module.InferRequestedOutput(n) for n in outputs])
        return {n: result.as_numpy(n) for n in outputs}
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["twin", "iris", "scripted", "exported"])
def test_imported_model_served_over_v2_matches_in_process_predict(
    server: ServerThread, repo: Path, model: str, protocol: str
) -> None:
    feed = feed_for(repo, model)
    with kiln.load(repo, model) as predictor:
        want = predictor.predict(feed)
    got = infer(server, protocol, model, feed, sorted(want))
    assert len(want) == 2  # every importer here gives two outputs; both must come back
    for name, w in want.items():
        g = got[name]
        assert g is not None and g.shape == w.shape, (name, g, w.shape)
        if w.dtype == object:  # scikit-learn's string labels come back as BYTES
            assert [x.decode() if isinstance(x, bytes) else x for x in g.reshape(-1)] == w.reshape(-1).tolist()
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"{model}.{name} over {protocol}")
