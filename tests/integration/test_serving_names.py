"""Model names and versions are hostile: none reaches a file outside the repository, none loads a model
twice under another name, and no answer carries a server path. Every entry is tried (HTTP paths raw,
percent-encoded and double-encoded; gRPC fields; V1; the repository extension; the CLI) against a
server in this process whose opens and directory listings are watched by an audit hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

import kiln
from kiln.errors import InvalidNameError
from kiln.repository import Repository, check_model_name, parse_version
from kiln.serving.server import ServerThread
from kiln.serving.settings import ServerSettings
from tests import models

_WATCHED: list[str] = []  # path prefixes whose opens are recorded (the planted model, while a test runs)
_TOUCHED: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _WATCHED or event not in ("open", "os.listdir", "os.scandir"):
        return
    path = args[0] if args else None
    if isinstance(path, str | bytes | os.PathLike):
        text = os.fsdecode(path)
        if any(text.startswith(w) for w in _WATCHED):
            _TOUCHED.append(f"{event} {text}")


sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while _WATCHED is set

# Names that must never resolve: traversal, aliases of 'm', encodings, hidden and oversized names, and
# symbolic links planted in the repository ('link' leads outside it, 'alias' to 'm', 'loop' to itself).
BAD_NAMES = [
    "..",
    ".",
    "...",
    "../outside/evil",
    "../outside",
    "../../etc/passwd",
    "./m",
    "m/.",
    "m/../m",
    "m/",
    "/m",
    "//m",
    "/tmp",
    "m\\..",
    "..\\outside\\evil",
    ".m",
    ".staging-1-x",
    "m\x00",
    "\x00",
    "m\n",
    " m",
    "m ",
    "a" * 129,
    "mé",
    "m;id",
    "~",
    "$HOME",
    "m:1",
    "m@1",
    "C:\\m",
    "\u2024\u2024",
    "\uff0e\uff0e",
    "m%2F..",
    "%2e%2e",
    "..%2Foutside%2Fevil",
    "%252e%252e",
    "link",
    "alias",
    "loop",
    "link/../m",
    "-m",
    "",
]
BAD_VERSIONS = ["-1", "0", "1.0", "1e0", "\u00b2", "１", "../1", "1/..", "99999999999999999999", " 1", "0x1"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, ServerThread]]:
    root = tmp_path_factory.mktemp("names")
    outside = root / "outside"
    kiln.import_model(models.add_model(root / "evil.onnx", const=666.0), outside, name="evil")
    repo = root / "repo"
    kiln.import_model(models.add_model(root / "add.onnx", const=1.0), repo, name="m")
    (repo / "link").symlink_to(outside / "evil", target_is_directory=True)
    (repo / "alias").symlink_to(repo / "m", target_is_directory=True)
    (repo / "loop").symlink_to(repo / "loop")
    (repo / "m" / "7").symlink_to(outside / "evil" / "1", target_is_directory=True)  # a version leading out
    settings = ServerSettings(repo=repo, http_port=0, grpc_port=0, engine_threads=1, load_mode="lazy")
    with ServerThread(settings) as srv:
        _WATCHED[:] = [str(outside), str(outside.resolve())]
        try:
            yield root, outside, srv
        finally:
            _WATCHED.clear()


def _http(srv: ServerThread, method: str, path: str, body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{srv.http_port}{path}", data=body, method=method)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def _infer_body() -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()


def _forms(name: str) -> list[str]:
    """The name as a path segment: raw (where HTTP can carry it), percent-encoded, and encoded twice."""
    once = urllib.parse.quote(name, safe="")
    forms = [once, urllib.parse.quote(once, safe="")]
    if name and all(33 <= ord(c) < 127 and c not in "?#%" for c in name):
        forms.append(name)
    return forms


def _no_server_path(text: str, root: Path) -> None:
    for p in (str(root), str(root.resolve()), os.getcwd(), sys.prefix, str(Path(kiln.__file__).parent)):
        assert p not in text, f"the answer carries a server path ({p}): {text}"


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[1:-1][:24] or "empty" for n in BAD_NAMES])
def test_no_name_reaches_outside_or_aliases_a_model(planted: tuple[Path, Path, ServerThread], name: str) -> None:
    root, _, srv = planted
    _TOUCHED.clear()
    for seg in _forms(name):
        for method, path, body in (
            ("GET", f"/v2/models/{seg}", None),
            ("GET", f"/v2/models/{seg}/ready", None),
            ("GET", f"/v2/models/{seg}/config", None),
            ("GET", f"/v2/models/{seg}/stats", None),
            ("GET", f"/v2/models/{seg}/versions/1", None),
            ("POST", f"/v2/models/{seg}/infer", _infer_body()),
            ("POST", f"/v2/models/{seg}/versions/1/infer", _infer_body()),
            ("POST", f"/v2/repository/models/{seg}/load", b"{}"),
            ("POST", f"/v2/repository/models/{seg}/unload", b"{}"),
            ("GET", f"/v1/models/{seg}", None),
            ("POST", f"/v1/models/{seg}:predict", b'{"instances": [[1, 2, 3, 4]]}'),
        ):
            status, text = _http(srv, method, path, body)
            # 'm/.' and the like may route as another endpoint (405) or none (404); never a success
            assert status in (400, 404, 405), f"{method} {path}: {status} {text}"
            assert json.loads(text)["error"], text
            _no_server_path(text, root)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        infer = service_pb2.ModelInferRequest(model_name=name)
        infer.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        infer.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        for call, request in (
            (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name=name)),
            (stub.ModelReady, service_pb2.ModelReadyRequest(name=name)),
            (stub.ModelConfig, service_pb2.ModelConfigRequest(name=name)),
            (stub.ModelStatistics, service_pb2.ModelStatisticsRequest(name=name)),
            (stub.ModelInfer, infer),
            (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name=name)),
            (stub.RepositoryModelUnload, service_pb2.RepositoryModelUnloadRequest(model_name=name)),
        ):
            if name == "" and call in (stub.ModelStatistics,):
                continue  # an empty name asks for every model's statistics, as in Triton
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            code = info.value.code()
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (call, code)
            _no_server_path(info.value.details() or "", root)
    assert _TOUCHED == [], f"the server read outside the repository: {_TOUCHED[:5]}"
    mgr = srv.server.manager
    assert set(mgr.entries) <= {"m"}, f"loaded under another name: {sorted(mgr.entries)}"
    assert {row["name"] for row in mgr.index()} == {"m"}


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_versions_are_400_naming_the_field(planted: tuple[Path, Path, ServerThread], version: str) -> None:
    root, _, srv = planted
    for seg in _forms(version)[:1]:
        status, text = _http(srv, "POST", f"/v2/models/m/versions/{seg}/infer", _infer_body())
        assert status in (400, 404), (version, status, text)
        _no_server_path(text, root)
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelMetadata(service_pb2.ModelMetadataRequest(name="m", version=version), timeout=10)
        assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)


def test_a_version_directory_linking_outside_is_never_served(planted: tuple[Path, Path, ServerThread]) -> None:
    _, _, srv = planted
    _TOUCHED.clear()
    status, text = _http(srv, "POST", "/v2/models/m/versions/7/infer", _infer_body())
    assert status == 404, text  # version 7 is a symbolic link out of the repository: not a version
    assert "version 7" in text
    assert _TOUCHED == []


def test_the_real_model_still_serves_and_errors_name_files_relative_to_the_repository(
    planted: tuple[Path, Path, ServerThread],
) -> None:
    root, _, srv = planted
    status, text = _http(srv, "POST", "/v2/models/m/infer", _infer_body())
    assert status == 200, text
    assert json.loads(text)["outputs"][0]["data"] == [2.0, 3.0, 4.0, 5.0]
    status, text = _http(srv, "GET", "/v2/models/nope")
    assert status == 404 and "the repository" in text
    _no_server_path(text, root)
    status, text = _http(srv, "GET", "/v2/models/..%2Foutside")
    assert status == 400 and "model name" in json.loads(text)["error"]


def test_the_grammar_and_confinement_in_one_place(tmp_path: Path) -> None:
    for good in ("m", "M_1", "resnet-50.v2", "_x", "a" * 128, "0"):
        assert check_model_name(good) == good
    for bad in BAD_NAMES:
        if bad in ("link", "alias", "loop"):
            continue  # grammatical; refused by confinement below
        with pytest.raises(InvalidNameError, match="is not a model name"):
            check_model_name(bad)
    for text in BAD_VERSIONS:
        with pytest.raises(InvalidNameError, match="not a version number"):
            parse_version(text)
    assert parse_version("3") == 3 and parse_version("") is None
    repo = tmp_path / "repo"
    kiln.import_model(models.add_model(tmp_path / "a.onnx"), repo, name="m")
    (repo / "alias").symlink_to(repo / "m", target_is_directory=True)
    r = Repository(repo)
    assert r.models() == ["m"]
    with pytest.raises(InvalidNameError, match="symbolic link"):
        r.spec("alias")
    assert not r.has_model("alias") and not r.has_model("../repo/m")
    hidden = Repository(repo, show_root=False)
    with pytest.raises(Exception, match="not in the repository") as info:
        hidden.spec("nope")
    assert str(repo) not in str(info.value)
    assert hidden.relative(f"cannot read {repo}/m/1/model.onnx") == "cannot read m/1/model.onnx"
    # `kiln serve models` from the folder above: the root as given, one relative name, is taken out too
    bare = Repository("models", show_root=False)
    said = "models/m/2/model.onnx is not valid: Load model from models/m/2/model.onnx failed (not my_models/x)"
    assert bare.relative(said) == "m/2/model.onnx is not valid: Load model from m/2/model.onnx failed (not my_models/x)"


def test_the_cli_refuses_the_same_names(planted: tuple[Path, Path, ServerThread]) -> None:
    root, _, _ = planted
    for name in ("../outside/evil", "link"):
        run = subprocess.run(
            [sys.executable, "-m", "kiln.cli", "bench", name, "--repo", str(root / "repo")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr + run.stdout
        assert "model name" in run.stderr + run.stdout
