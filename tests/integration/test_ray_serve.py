"""``kiln serve --ray`` on a real two-node Ray cluster (127.0.0.1, private network namespace): V2 over HTTP
and gRPC through kiln's ingress, replicas on both nodes, a killed replica replaced, autoscaling both ways,
and the Ray Serve config file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import kiln
from kiln.repository import Repository
from tests import models
from tests.integration.conftest import ServeProcess
from tests.ray_cluster import local_cluster, only_loopback

pytestmark = pytest.mark.timeout(600)


def _set_ray(root: Path, name: str, **ray: Any) -> None:
    repository = Repository(root)
    spec = repository.spec(name)
    serving = spec.serving.model_copy(update={"ray": spec.serving.ray.model_copy(update=ray)})
    repository.save_spec(spec.model_copy(update={"serving": serving}))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ray")
    root = d / "repo"
    kiln.import_model(models.add_model(d / "add.onnx"), root, name="add")
    kiln.import_model(models.add_model(d / "spread.onnx", const=3.0), root, name="spread")
    _set_ray(root, "add", min_replicas=1, max_replicas=2, upscale_delay_s=0.5, downscale_delay_s=2.0, num_cpus=0.5)
    _set_ray(root, "spread", min_replicas=2, max_replicas=2, max_replicas_per_node=1, num_cpus=0.5)
    for i in (1, 2):  # small models sharing one replica (Ray Serve model multiplexing)
        kiln.import_model(models.add_model(d / f"small{i}.onnx", const=10.0 * i), root, name=f"small{i}")
        _set_ray(root, f"small{i}", multiplex=True, min_replicas=1, max_replicas=1, num_cpus=0.5)
    return root


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with local_cluster(nodes=2, cpus_per_node=2) as c:
        yield c


@pytest.fixture(scope="module")
def server(repo: Path, cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("log") / "serve.log"
    # inline runs on for every request (a lone request runs in the event loop's thread): a Ray handle call
    # must never be made there, so the server keeps batches for Ray on its batcher threads
    inline = {"KILN_SERVE_INLINE_BELOW_MS": "60000"}
    proc = ServeProcess(repo, "--ray", "--ray-address", cluster.address, log=log, env=inline)
    try:
        yield proc.wait_ready(timeout=240)
    finally:
        assert proc.terminate() == 0, proc.output()


def _feed(rows: int = 1, value: float = 1.0) -> np.ndarray:
    return np.full((rows, 4), value, np.float32) + np.arange(4, dtype=np.float32)


def _infer(client: Any, module: Any, model: str, x: np.ndarray) -> np.ndarray:
    i = module.InferInput("x", list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    out: np.ndarray = client.infer(model, [i]).as_numpy("y")
    return out


def _replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return int(status.deployments["replica"].replica_states.get("RUNNING", 0))


def _describe_all(app: str, calls: int = 24) -> list[dict[str, Any]]:
    from ray import serve

    handle = serve.get_app_handle(app)
    return [handle.describe.remote().result(timeout_s=30) for _ in range(calls)]


def test_the_cluster_is_reachable_only_through_loopback(cluster: Any) -> None:
    assert only_loopback() == ["lo"]  # Ray listens on every interface: there is just no other one here


def test_v2_over_http_and_grpc_through_ray_matches_in_process_predict(server: ServeProcess, repo: Path) -> None:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    x = _feed(3, 2.5)
    with kiln.load(repo, "add") as local:
        want = local.predict({"x": x})["y"]
    http = httpclient.InferenceServerClient(server.http_url)
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert http.is_server_ready() and grpc.is_model_ready("spread")
        np.testing.assert_array_equal(_infer(http, httpclient, "add", x), want)
        np.testing.assert_array_equal(_infer(grpc, grpcclient, "add", x), want)
        np.testing.assert_array_equal(_infer(grpc, grpcclient, "spread", x), x + 3.0)
        index = {m["name"]: m["state"] for m in http.get_model_repository_index()}
        assert index == {"add": "READY", "spread": "READY", "small1": "READY", "small2": "READY"}
    finally:
        http.close()
        grpc.close()
    assert server.metric("kiln_requests_total", model="add", outcome="ok") >= 2
    # the lone requests awaited a handle routing on the server's own loop, not the default handle
    assert "cannot route on the server's event loop" not in server.output()


def test_one_model_is_served_by_replicas_on_two_nodes(server: ServeProcess) -> None:
    nodes = {d["node_id"] for d in _describe_all("kiln-spread-v1")}
    assert len(nodes) == 2
    assert all(d["engine"] == "onnxruntime" for d in _describe_all("kiln-spread-v1", 2))


def test_small_models_share_one_replica_through_multiplexing(server: ServeProcess) -> None:
    import tritonclient.http as httpclient
    from ray import serve

    client = httpclient.InferenceServerClient(server.http_url)
    try:
        for i in (1, 2):
            np.testing.assert_array_equal(_infer(client, httpclient, f"small{i}", _feed()), _feed() + 10.0 * i)
    finally:
        client.close()
    shared = serve.get_app_handle("kiln-shared")
    seen = [shared.options(multiplexed_model_id=f"small{i}:1").describe.remote().result(timeout_s=30) for i in (1, 2)]
    assert seen[0]["pid"] == seen[1]["pid"], "both models answer from the one shared replica"
    assert {"small1:1", "small2:1"} <= set(seen[1]["models"])
    assert "kiln-small1-v1" not in serve.status().applications  # no replicas of their own
    assert "cannot route on the server's event loop" not in server.output()


class _Load:
    """Closed-loop clients over HTTP until stopped; records every answer's status and when it came."""

    def __init__(self, url: str, model: str, clients: int) -> None:
        import tritonclient.http as httpclient

        self.stop = threading.Event()
        self.results: list[tuple[float, bool]] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(httpclient, url, model), daemon=True) for _ in range(clients)
        ]

    def _loop(self, module: Any, url: str, model: str) -> None:
        from tritonclient.utils import InferenceServerException

        client = module.InferenceServerClient(url, network_timeout=30.0)
        x = _feed()
        try:
            while not self.stop.is_set():
                try:
                    _infer(client, module, model, x)
                    ok = True
                except InferenceServerException:
                    ok = False
                with self._lock:
                    self.results.append((time.monotonic(), ok))
        finally:
            client.close()

    def __enter__(self) -> _Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)
        assert not any(t.is_alive() for t in self._threads), "a request hung"

    def ok_after(self, t0: float) -> int:
        with self._lock:
            return sum(1 for t, ok in self.results if ok and t > t0)


def _wait_for(condition: Any, timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held (polled with a deadline); fails naming ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if condition():
            return time.monotonic() - t0
        time.sleep(0.1)  # the poll interval of a condition with a deadline, not synchronisation
    raise AssertionError(f"{what} did not happen within {timeout} s")


def test_a_killed_replica_is_replaced_and_requests_resume(server: ServeProcess) -> None:
    before = {d["pid"] for d in _describe_all("kiln-spread-v1")}
    assert len(before) == 2
    with _Load(server.http_url, "spread", clients=4) as load:
        _wait_for(lambda: load.ok_after(0) > 20, 30, "requests under load")
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:  # two live replicas answer, and neither is the one killed
            pids = {d["pid"] for d in _describe_all("kiln-spread-v1", 12)}
            return len(pids) == 2 and victim not in pids

        recovered = _wait_for(replaced, 30, "a replacement replica")
        _wait_for(lambda: load.ok_after(time.monotonic() - 0.5) > 5, 10, "requests after the replacement")
    print(f"replica replaced in {recovered:.1f} s; {len([r for r in load.results if not r[1]])} requests failed")
    assert recovered < 20, f"the killed replica took {recovered:.1f} s to be replaced"
    failed = [t for t, ok in load.results if not ok]
    assert all(t >= killed_at for t in failed)  # only requests in flight on the dead replica may fail
    assert len(failed) <= 8, f"{len(failed)} requests failed after one replica died"


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(server: ServeProcess) -> None:
    app = "kiln-add-v1"
    _wait_for(lambda: _replicas(app) == 1, 60, "one idle replica")
    with _Load(server.http_url, "add", clients=8) as load:
        t0 = time.monotonic()
        up = _wait_for(lambda: _replicas(app) == 2, 30, "a second replica under load")
        assert load.ok_after(t0) > 0
    assert up < 20, f"scale-up took {up:.1f} s"
    down = _wait_for(lambda: _replicas(app) == 1, 30, "scale-down after the load")
    print(f"scale-up in {up:.1f} s, scale-down {down:.1f} s after the load stopped")


def test_emitted_serve_config_deploys_the_replicas(repo: Path, cluster: Any, tmp_path: Path) -> None:
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    path = tmp_path / "serve.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "serve", str(repo), "--ray", "--emit-config", str(path), "--model", "add"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    assert config.proxy_location == "Disabled"
    (app,) = config.applications
    assert app.name == "kiln-add-v1" and app.import_path == "kiln.ray.serve:build_app"
    (deployment,) = app.deployments
    assert deployment.autoscaling_config["max_replicas"] == 2
    from kiln.ray.serve import build_app

    handle = serve.run(build_app(dict(app.args)), name="emitted-add", route_prefix=None)
    try:
        out = handle.run.remote({"x": _feed(2)}).result(timeout_s=60)
        np.testing.assert_array_equal(out["y"], _feed(2) + 1.0)
    finally:
        serve.delete("emitted-add")


def test_a_cluster_kiln_starts_is_private_and_token_protected(
    repo: Path, cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil
    import tritonclient.http as httpclient

    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)  # kiln must switch token auth on by itself
    proc = ServeProcess(repo, "--ray", "--model", "add", log=tmp_path / "private.log")
    try:
        proc.wait_ready(timeout=240)
        gcs = [p for p in psutil.Process(proc.proc.pid).children(recursive=True) if p.name() == "gcs_server"]
        assert len(gcs) == 1, "kiln serve --ray without an address starts its own cluster"
        env = gcs[0].environ()
        assert env.get("RAY_AUTH_MODE") == "token" and len(env.get("RAY_AUTH_TOKEN", "")) >= 32
        assert "--node-ip-address=127.0.0.1" in " ".join(gcs[0].cmdline()) or "127.0.0.1" in " ".join(gcs[0].cmdline())
        client = httpclient.InferenceServerClient(proc.http_url)
        try:
            np.testing.assert_array_equal(_infer(client, httpclient, "add", _feed()), _feed() + 1.0)
        finally:
            client.close()
        children = psutil.Process(proc.proc.pid).children(recursive=True)
    finally:
        code = proc.terminate()
    assert code == 0, proc.output()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running after kiln serve stopped: {[p.name() for p in alive]}"
    assert "RAY_AUTH_TOKEN" not in proc.output()  # the token is never logged
