"""What serving costs: a small CNN in process against the same model behind ``kiln serve``.

Everything is measured in one run on this machine, so the ratios hold even where absolute figures
are noisy. The server runs as a separate process (``kiln serve``, engine on 1 thread); the clients are
Triton's own (``tritonclient.http`` / ``tritonclient.grpc``, binary tensors on), one client per thread,
on the same cores as the server. The ``json`` rows are ``tritonclient.http`` with ``binary_data=False``
on the input and the output: tensors as JSON lists both ways, as clients without the binary extension send.

    .venv/bin/python benchmarks/serve_overhead.py [--seconds 3] [--concurrency 1 4 8 16] [--rounds 3]
                                                  [--batching-only]

Each point is measured in ``--rounds`` interleaved rounds (the protocols' order rotating), each bracketed by
in-process engine runs, and the median round is what counts: at concurrency 8 binary HTTP must reach 0.95
of the engine and JSON tensors (``json1``) 0.85.

The batching section serves the same CNN three times from the one server, under ``dynamic_batching``
``off`` (each request runs as sent), ``auto`` (the default: merge as far as the batch-size curve measured
at load pays) and ``on`` (merge up to the preferred size whatever it pays), and drives them in turn at
each concurrency: auto must stay within 3 % of off at concurrency 1 and not fall below it (beyond the same
3 % of noise) at any concurrency.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

INPUT_SHAPE = (1, 3, 32, 32)


def build_cnn() -> Any:
    """A small CNN (about 1-2 ms per image on one core): the kind of model this benchmark is about."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(128, 10),
    ).eval()  # fmt: skip


def build_floor_model(path: Path) -> Path:
    """y = x + 1 on 4 floats: served, it shows the protocol and client cost with no engine time."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["input", "one"], ["logits"])], "floor",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "one")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(lat: list[float]) -> tuple[float, float]:
    ms = np.array(lat) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def batch_scaling(repo: Path, x: np.ndarray) -> dict[int, float]:
    """Engine ms per row at batch 1, 2, 4, 8, 16: where batching stops paying on this CPU."""
    import kiln

    out: dict[int, float] = {}
    with kiln.load(repo, "cnn", threads=1) as p:
        name = p.spec.inputs[0].name
        for b in (1, 2, 4, 8, 16):
            feed = {name: np.repeat(x, b, axis=0)}
            for _ in range(5):
                p.engine.run(feed)
            times = []
            for _ in range(max(10, 160 // b)):
                t = time.perf_counter()
                p.engine.run(feed)
                times.append(time.perf_counter() - t)
            out[b] = float(np.median(times)) / b * 1e3
    return out


def engine_baseline(repo: Path, x: np.ndarray, seconds: float) -> tuple[float, float, float]:
    import kiln

    with kiln.load(repo, "cnn", threads=1) as p:
        feed = {p.spec.inputs[0].name: x}
        for _ in range(50):
            p.engine.run(feed)
        lat: list[float] = []
        end = time.perf_counter() + seconds
        start = time.perf_counter()
        while time.perf_counter() < end:
            t = time.perf_counter()
            p.engine.run(feed)
            lat.append(time.perf_counter() - t)
        rate = len(lat) / (time.perf_counter() - start)
    p50, p99 = percentiles(lat)
    return rate, p50, p99


def drive(
    protocol: str, url: str, x: np.ndarray, concurrency: int, seconds: float, model: str = "cnn", server_pid: int = 0
) -> tuple[float, float, float, int, float, float]:
    """req/s, p50 and p99 ms, errors, and CPU ms per request in the window: the server's (``server_pid``) and
    this process's (the clients)."""
    import psutil
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    module: Any = grpcclient if protocol == "grpc" else httpclient
    as_json = protocol == "json"  # HTTP with tensors as JSON lists, input and output
    lat: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    warmed = threading.Barrier(concurrency + 1)
    stop = threading.Event()

    def worker(i: int) -> None:
        if protocol == "json1":
            json_once(i)
            return
        client = module.InferenceServerClient(url)
        inp = module.InferInput("input", list(x.shape), "FP32")
        if as_json:
            inp.set_data_from_numpy(x, binary_data=False)
            outputs = [httpclient.InferRequestedOutput("logits", binary_data=False)]
        else:
            inp.set_data_from_numpy(x)
            outputs = None
        for _ in range(20):
            with contextlib.suppress(Exception):  # refused under overload: counted in the window, not here
                client.infer(model, [inp], outputs=outputs)
        warmed.wait()
        mine = lat[i]
        while not stop.is_set():
            t = time.perf_counter()
            try:
                client.infer(model, [inp], outputs=outputs)
            except Exception:
                errors[i] += 1
                continue
            mine.append(time.perf_counter() - t)
        client.close()

    def json_once(i: int) -> None:
        """JSON tensors both ways, the body serialized once (as perf_analyzer does): the server's JSON cost
        without tritonclient's Python serialization of every request (about 2 ms here)."""
        import http.client
        import json

        host, port = url.split(":")
        conn = http.client.HTTPConnection(host, int(port))
        body = json.dumps({
            "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}],
            "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
        }).encode()  # fmt: skip
        headers = {"Content-Type": "application/json"}
        path = f"/v2/models/{model}/infer"

        def once() -> None:
            conn.request("POST", path, body, headers)
            r = conn.getresponse()
            data = r.read()
            if r.status != 200 or not data.startswith(b"{"):
                raise RuntimeError(f"HTTP {r.status}")

        for _ in range(20):
            once()
        warmed.wait()
        mine = lat[i]
        while not stop.is_set():
            t = time.perf_counter()
            try:
                once()
            except Exception:
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port))
                continue
            mine.append(time.perf_counter() - t)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    server = psutil.Process(server_pid) if server_pid else None
    warmed.wait()  # every client has finished its warm-up requests
    server_cpu = sum(server.cpu_times()[:2]) if server else 0.0
    client_cpu = time.process_time()
    start = time.perf_counter()
    time.sleep(seconds)  # the measurement window
    stop.set()
    elapsed = time.perf_counter() - start
    client_cpu = time.process_time() - client_cpu
    server_cpu = sum(server.cpu_times()[:2]) - server_cpu if server else float("nan")
    for t in threads:
        t.join()
    flat = [v for per in lat for v in per]
    p50, p99 = percentiles(flat)
    n = max(1, len(flat))
    return len(flat) / elapsed, p50, p99, sum(errors), server_cpu / n * 1e3, client_cpu / n * 1e3


BATCHING = ("off", "auto", "on")
PROTOCOLS = ("http", "grpc", "json", "json1")


def batching(url: str, x: np.ndarray, args: argparse.Namespace, pid: int) -> None:
    """The same CNN under dynamic_batching off, auto and on, driven in turn (binary HTTP) at each concurrency,
    in rounds so that drift hits them alike; the median round counts."""
    print("\ndynamic batching, binary HTTP, the same CNN served three times (req/s, p50 ms; median of 3 rounds)")
    print(f"{'conc':>4} " + " ".join(f"{m + ' req/s':>12} {m + ' p50':>9}" for m in BATCHING) + f" {'auto/off':>9}")
    checks: list[str] = []
    for c in args.concurrency:
        rates: dict[str, list[float]] = {m: [] for m in BATCHING}
        p50s: dict[str, list[float]] = {m: [] for m in BATCHING}
        refused = dict.fromkeys(BATCHING, 0)
        for _ in range(3):
            for mode in BATCHING:
                rate, p50, _, errors, _, _ = drive("http", url, x, c, args.seconds / 2, f"cnn-{mode}", pid)
                refused[mode] += errors
                rates[mode].append(rate)
                p50s[mode].append(p50)
        med_rate = {m: float(np.median(v)) for m, v in rates.items()}
        med_p50 = {m: float(np.median(v)) for m, v in p50s.items()}
        ratio = med_rate["auto"] / med_rate["off"]
        print(
            f"{c:>4} "
            + " ".join(f"{med_rate[m]:12.1f} {med_p50[m]:9.3f}" for m in BATCHING)
            + f" {ratio:9.3f}"
            + (
                "   refused (503): " + ", ".join(f"{m} {n}" for m, n in refused.items())
                if any(refused.values())
                else ""
            )
        )
        need = "within 3 % of off" if c == 1 else "not below off (3 % noise allowance)"
        checks.append(f"concurrency {c}: auto ÷ off {ratio:.3f}, needs {need}: {'PASS' if ratio >= 0.97 else 'FAIL'}")
    print("\n".join(checks))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point; the median round counts")
    ap.add_argument("--max-queue-delay-us", type=int, default=0)
    ap.add_argument("--no-inline", action="store_true", help="always hand requests to the batcher's thread")
    ap.add_argument("--preferred", type=int, default=4, help="preferred batch size (this CNN gains nothing past 4)")
    ap.add_argument("--batching-only", action="store_true", help="only the batching off / auto / on section")
    args = ap.parse_args()

    import kiln
    from kiln.repository import Repository

    work = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    repo = work / "repo"
    kiln.import_model(f"{Path(__file__).resolve()}:build_cnn", repo, name="cnn", input_shapes=[INPUT_SHAPE],
                      input_names=["input"], output_names=["logits"])  # fmt: skip
    kiln.import_model(build_floor_model(work / "floor.onnx"), repo, name="floor")
    repository = Repository(repo)
    x = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
    per_row = batch_scaling(repo, x)
    update: dict[str, Any] = {"max_queue_delay_us": args.max_queue_delay_us, "preferred_batch_sizes": [args.preferred]}
    for mode in BATCHING:  # the same CNN under each dynamic_batching mode, served side by side
        kiln.import_model(f"{Path(__file__).resolve()}:build_cnn", repo, name=f"cnn-{mode}", input_shapes=[INPUT_SHAPE],
                          input_names=["input"], output_names=["logits"])  # fmt: skip
    for name in ("cnn", *(f"cnn-{m}" for m in BATCHING)):
        spec = repository.spec(name)
        mode = name.removeprefix("cnn-") if name != "cnn" else spec.serving.dynamic_batching
        serving = spec.serving.model_copy(update={**update, "dynamic_batching": mode})
        repository.save_spec(spec.model_copy(update={"serving": serving}))
    print(f"machine: {os.cpu_count()} logical cores, shared; server engine threads: 1; clients in this process")
    print("engine ms per row by batch size: " + ", ".join(f"{b}: {t:.3f}" for b, t in per_row.items()))
    print(f"served with max_batch_size {serving.max_batch_size}, preferred_batch_sizes {serving.preferred_batch_sizes}, "
          f"max_queue_delay_us {serving.max_queue_delay_us}")  # fmt: skip

    http_port, grpc_port = free_port(), free_port()
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    env = {**os.environ, "KILN_SERVE_INLINE_BELOW_MS": "0" if args.no_inline else "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli", "serve", str(repo), "--http-port", str(http_port), "--grpc-port",
         str(grpc_port), "--engine-threads", "1"], stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((work / "serve.log").read_text())
            time.sleep(0.05)
        urls = {"http": f"127.0.0.1:{http_port}", "json": f"127.0.0.1:{http_port}", "json1": f"127.0.0.1:{http_port}",
                "grpc": f"127.0.0.1:{grpc_port}"}  # fmt: skip
        base_s = max(1.0, args.seconds / 2)
        print(
            "\neach served point is bracketed by in-process engine runs (ORT, 1 thread, batch 1) of "
            f"{base_s:.1f} s, and its ratio uses their mean: the machine's load drifts; http and grpc send binary "
            "tensors, json is http with tensors as JSON lists (binary_data=False on input and output), json1 the same "
            "body serialized once by a plain keep-alive client (as perf_analyzer does)"
        )
        print(
            f"{args.rounds} rounds per concurrency, the protocols' order rotating each round; the 'median' rows "
            "take each column's median over the rounds"
        )
        print(
            f"{'protocol':8} {'conc':>4} {'round':>6} {'req/s':>8} {'engine':>8} {'served/engine':>14} {'p50 ms':>8} "
            f"{'engine p50':>10} {'p99 ms':>8} {'errors':>6}"
        )
        if args.batching_only:
            batching(urls["http"], x, args, proc.pid)
            return
        cpu: dict[tuple[str, int], tuple[float, float]] = {}
        ratios: dict[tuple[str, int], float] = {}
        for c in args.concurrency:
            rows: dict[str, list[tuple[float, ...]]] = {p: [] for p in PROTOCOLS}
            for r in range(args.rounds):  # protocols alternate, in a rotating order, so drift hits them alike
                for protocol in PROTOCOLS[r % len(PROTOCOLS) :] + PROTOCOLS[: r % len(PROTOCOLS)]:
                    before = engine_baseline(repo, x, base_s)
                    rate, p50, p99, errors, s_cpu, c_cpu = drive(
                        protocol, urls[protocol], x, c, args.seconds, "cnn", proc.pid
                    )
                    after = engine_baseline(repo, x, base_s)
                    e_rate, e_p50 = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
                    rows[protocol].append((rate, e_rate, rate / e_rate, p50, e_p50, p99, errors, s_cpu, c_cpu))
                    print(
                        f"{protocol:8} {c:>4} {r + 1:>6} {rate:8.1f} {e_rate:8.1f} {rate / e_rate:14.2f} {p50:8.3f} "
                        f"{e_p50:10.3f} {p99:8.3f} {errors:>6}"
                    )
            for protocol in PROTOCOLS:
                rate, e_rate, ratio, p50, e_p50, p99, errors, s_cpu, c_cpu = np.median(rows[protocol], axis=0)
                ratios[protocol, c], cpu[protocol, c] = ratio, (s_cpu, c_cpu)
                print(
                    f"{protocol:8} {c:>4} {'median':>6} {rate:8.1f} {e_rate:8.1f} {ratio:14.2f} {p50:8.3f} "
                    f"{e_p50:10.3f} {p99:8.3f} {int(errors):>6}"
                    + (f"   p50 added: {p50 - e_p50:.3f} ms" if c == 1 else "")
                )
        for protocol in ("http", "grpc", "json"):
            f_rate, f_p50, *_ = drive(protocol, urls[protocol], np.ones((1, 4), np.float32), 1, args.seconds, "floor")
            print(f"{protocol} floor: a 4-float Add model served at concurrency 1: p50 {f_p50:.3f} ms, "
                  f"{f_rate:.0f} req/s (protocol + client + server, almost no engine time)")  # fmt: skip
        for c, protocol, need in ((8, "http", 0.95), (8, "json1", 0.85)):
            if (protocol, c) in ratios:
                got = ratios[protocol, c]
                print(f"concurrency {c}: {protocol} served ÷ engine {got:.2f} (median round), needs >= {need}: "
                      f"{'PASS' if got >= need else 'FAIL'}")  # fmt: skip
        print("\nCPU ms per request (median round), server (the kiln serve process) / clients (this process):")
        for c in args.concurrency:
            print(f"  concurrency {c}: " + ", ".join(f"{p} {cpu[p, c][0]:.2f} / {cpu[p, c][1]:.2f}" for p in urls))
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        sums = {}
        for line in text.splitlines():
            for name in ("kiln_batch_size_sum", "kiln_batch_size_count", "kiln_compute_seconds_sum"):
                if line.startswith(name + "{") and 'model="cnn"' in line:
                    sums[name] = float(line.rsplit(" ", 1)[1])
        if sums.get("kiln_batch_size_count"):
            n = sums["kiln_batch_size_count"]
            print(f"\nserver: mean batch {sums['kiln_batch_size_sum'] / n:.2f} rows over {int(n)} batches, "
                  f"mean engine time per batch {sums['kiln_compute_seconds_sum'] / n * 1e3:.3f} ms")  # fmt: skip
        batching(urls["http"], x, args, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        log.close()
        print(f"kiln serve exited with {code} after SIGTERM")


if __name__ == "__main__":
    main()
