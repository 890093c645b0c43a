"""What running on Ray costs: the small CNN in process, behind ``kiln serve``, behind ``kiln serve --ray``
(1 and 2 replicas) and as the plain Ray Serve deployment a user would write, in one run.

The plain deployment is the baseline users write by hand: one ``@serve.deployment`` holding the same ONNX
Runtime session (1 thread), reached through Ray Serve's HTTP proxy; its clients send the raw float32 bytes
with a keep-alive ``http.client`` (cheaper than tritonclient, so the baseline is favoured). kiln's rows use
Triton's ``tritonclient.http`` (binary tensors). Every process shares this machine's cores; engines run on
1 thread. As root the run is inside a private network namespace (Ray listens on every interface).

    .venv/bin/python benchmarks/ray_overhead.py [--seconds 3] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_overhead import INPUT_SHAPE, drive, engine_baseline, free_port, percentiles


def build_cnn() -> Any:
    from serve_overhead import build_cnn as cnn

    return cnn()


def private_network() -> bool:
    if os.geteuid() != 0:
        return False
    if ctypes.CDLL(None, use_errno=True).unshare(0x40000000) != 0:  # CLONE_NEWNET
        return False
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    return True


class PlainRayServe:
    """The hand-written baseline: one ORT session per replica behind Ray Serve's HTTP proxy."""

    def __init__(self, onnx_path: Path, port: int, replicas: int) -> None:
        from ray import serve
        from starlette.requests import Request
        from starlette.responses import Response

        @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32)
        class Plain:
            def __init__(self, path: str) -> None:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

            async def __call__(self, request: Request) -> Response:
                x = np.frombuffer(await request.body(), np.float32).reshape(INPUT_SHAPE)
                (y,) = self.session.run(None, {"input": x})
                return Response(y.tobytes(), media_type="application/octet-stream")

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(Plain.bind(str(onnx_path)), name="plain", route_prefix="/plain")
        self.port = port


def drive_plain(port: int, x: np.ndarray, concurrency: int, seconds: float) -> tuple[float, float, float, int]:
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    warmed = threading.Barrier(concurrency + 1)
    stop = threading.Event()
    body = x.tobytes()

    def worker(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def once() -> None:
            conn.request("POST", "/plain", body, {"Content-Type": "application/octet-stream"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200 or len(data) != 40:
                raise RuntimeError(f"HTTP {r.status}")

        for _ in range(10):
            once()
        warmed.wait()
        while not stop.is_set():
            t = time.perf_counter()
            try:
                once()
            except Exception:
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            lat[i].append(time.perf_counter() - t)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    warmed.wait()
    start = time.perf_counter()
    time.sleep(seconds)  # the measurement window
    stop.set()
    elapsed = time.perf_counter() - start
    for t in threads:
        t.join()
    flat = [v for per in lat for v in per]
    p50, p99 = percentiles(flat)
    return len(flat) / elapsed, p50, p99, sum(errors)


class KilnServe:
    def __init__(self, repo: Path, log: Path, *args: str) -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli", "serve", str(repo), "--http-port", str(self.http_port),
             "--grpc-port", str(self.grpc_port), "--engine-threads", "1", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "KILN_SERVE_INLINE_BELOW_MS": "3"},
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(log.read_text()[-3000:])
            time.sleep(0.1)  # readiness poll with a deadline

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(120)
        self._log.close()


def _configure(repo: Path, replicas: int = 1) -> None:
    """A queue budget of 2 s: this benchmark measures throughput at saturation (32 closed-loop clients), where
    kiln's default admission would refuse requests early (the plain deployment has no admission)."""
    from kiln.repository import Repository

    repository = Repository(repo)
    spec = repository.spec("cnn")
    ray = spec.serving.ray.model_copy(
        update={"min_replicas": replicas, "max_replicas": replicas, "num_cpus": 0.5, "engine_threads": 1}
    )
    serving = spec.serving.model_copy(update={"ray": ray, "queue_budget_ms": 2000.0})
    repository.save_spec(spec.model_copy(update={"serving": serving}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = ap.parse_args()
    isolated = private_network()
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", os.urandom(32).hex())

    import ray
    from ray import serve

    import kiln

    work = Path(tempfile.mkdtemp(prefix="kiln-ray-bench-"))
    repo = work / "repo"
    kiln.import_model(f"{Path(__file__).resolve()}:build_cnn", repo, name="cnn", input_shapes=[INPUT_SHAPE],
                      input_names=["input"], output_names=["logits"])  # fmt: skip
    onnx_path = next((repo / "cnn" / "1").glob("*.onnx"))
    x = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
        num_cpus=os.cpu_count(),
    )
    address = ray.get_runtime_context().gcs_address
    print(f"machine: {os.cpu_count()} logical cores, shared by clients, servers and Ray; engine threads: 1; "
          f"private network namespace: {isolated}; Ray {ray.__version__} at {address}")  # fmt: skip
    rows: list[tuple[str, int, float, float, float, int]] = []

    def row(name: str, c: int, rate: float, p50: float, p99: float, errors: int) -> None:
        rows.append((name, c, rate, p50, p99, errors))
        print(f"{name:22} {c:>4} {rate:9.1f} {p50:9.3f} {p99:9.3f} {errors:>6}", flush=True)

    print(f"{'setup':22} {'conc':>4} {'infer/s':>9} {'p50 ms':>9} {'p99 ms':>9} {'errors':>6}")
    for c in args.concurrency:
        if c == 1:
            rate, p50, p99 = engine_baseline(repo, x, args.seconds)
            row("engine in process", 1, rate, p50, p99, 0)
    for n in (1, 2):
        plain = PlainRayServe(onnx_path, free_port(), replicas=n)
        for c in args.concurrency:
            row(f"plain Ray Serve ({n})", c, *drive_plain(plain.port, x, c, args.seconds))
        serve.shutdown()
    _configure(repo)
    server = KilnServe(repo, work / "kiln.log")
    try:
        for c in args.concurrency:
            rate, p50, p99, errors, *_ = drive("http", f"127.0.0.1:{server.http_port}", x, c, args.seconds)
            row("kiln serve", c, rate, p50, p99, errors)
    finally:
        server.stop()
    for n in (1, 2):
        _configure(repo, n)
        server = KilnServe(repo, work / f"kiln-ray-{n}.log", "--ray", "--ray-address", address)
        try:
            for c in args.concurrency:
                rate, p50, p99, errors, *_ = drive("http", f"127.0.0.1:{server.http_port}", x, c, args.seconds)
                row(f"kiln serve --ray ({n})", c, rate, p50, p99, errors)
        finally:
            server.stop()
    serve.shutdown()
    ray.shutdown()

    def get(name: str, c: int) -> tuple[float, float]:
        for r in rows:
            if r[0] == name and r[1] == c:
                return r[2], r[3]
        return float("nan"), float("nan")

    c1 = min(args.concurrency)
    added = {n: get(f"kiln serve --ray ({n})", c1)[1] - get("kiln serve", c1)[1] for n in (1, 2)}
    plain_peak = max(r[2] for r in rows if r[0].startswith("plain"))
    ray_peak = max(r[2] for r in rows if r[0].startswith("kiln serve --ray"))
    print(
        f"\np50 added by Ray at concurrency {c1} over kiln serve: 1 replica {added[1]:+.3f} ms, "
        f"2 replicas {added[2]:+.3f} ms (bar, on 1 replica: at most +2 ms): {'PASS' if added[1] <= 2 else 'FAIL'}"
    )
    print(f"peak throughput, kiln serve --ray / plain Ray Serve: {ray_peak:.1f} / {plain_peak:.1f} = "
          f"{ray_peak / plain_peak:.2f}x (bar: 3x): {'PASS' if ray_peak >= 3 * plain_peak else 'FAIL'}")  # fmt: skip


if __name__ == "__main__":
    main()
