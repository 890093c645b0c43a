"""Triton's perf_analyzer against ``kiln serve`` in every mode, at every concurrency issue #11 names.

    .venv/bin/python benchmarks/perf_analyzer_modes.py [--concurrency 1 4 8 16] [--requests 300]

perf_analyzer is set up with ``../shared/tools/perf_analyzer_setup.sh`` into ``~/.cache/kiln-tests`` (as the
integration test does) or taken from ``KILN_PERF_ANALYZER``. A 4-float Add model is imported into a
temporary repository and served by ``kiln serve`` on free ports; then HTTP and gRPC, sync and async, gRPC
streaming and system shared memory each run at each concurrency, one perf_analyzer process per point (it
stops at the first failed request and aborts on inconsistent server statistics). Printed per point: its exit
status, whether it wrote its CSV, infer/s and p99 latency as it measured them, and the server-side
breakdown it read from the statistics extension; then one verdict line.
"""

from __future__ import annotations

import argparse
import csv
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=300, help="requests per measurement window")
    args = ap.parse_args()

    from tests import models
    from tests.fixtures import perf_analyzer as fixtures

    import kiln

    pa = fixtures.perf_analyzer()
    work = Path(tempfile.mkdtemp(prefix="kiln-pa-"))
    kiln.import_model(models.add_model(work / "add.onnx"), work / "repo", name="add")
    http_port, grpc_port = free_port(), free_port()
    kiln_bin = Path(sys.executable).with_name("kiln")
    log = (work / "serve.log").open("w")
    serve = subprocess.Popen(
        [str(kiln_bin), "serve", "--repo", str(work / "repo"), "--http-port", str(http_port),
         "--grpc-port", str(grpc_port)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2):
                    break
            except OSError:
                if serve.poll() is not None or time.monotonic() > deadline:
                    print((work / "serve.log").read_text()[-2000:])
                    return 1
                time.sleep(0.2)  # polling the server's start-up, not synchronising two threads
        print(f"{'mode':16s} {'conc':>4s} {'exit':>4s} {'csv':>4s} {'infer/s':>9s} {'p99 ms':>8s}  server side (µs)")
        failed = []
        for mode, flags in fixtures.MODES.items():
            url = f"127.0.0.1:{grpc_port if flags[1] == 'grpc' else http_port}"
            for c in args.concurrency:
                out = work / f"{mode}-{c}.csv"
                cmd = [
                    str(pa), "-m", "add", "-u", url, *flags, "--shape", "x:1,4", "--concurrency-range", f"{c}:{c}",
                    "--measurement-mode", "count_windows", "--measurement-request-count", str(args.requests),
                    "--stability-percentage", "100", "--max-trials", "5", "-f", str(out),
                ]  # fmt: skip
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                rows = list(csv.DictReader(out.open())) if out.exists() else []
                ok = run.returncode == 0 and bool(rows) and "Server side statistics" not in run.stderr
                if not ok:
                    failed.append(f"{mode} c{c}")
                r = rows[-1] if rows else {}
                side = (
                    f"queue {r.get('Server Queue', '?')}, compute in {r.get('Server Compute Input', '?')} / "
                    f"infer {r.get('Server Compute Infer', '?')} / out {r.get('Server Compute Output', '?')}"
                )
                p99 = float(r.get("p99 latency", "nan")) / 1e3
                print(
                    f"{mode:16s} {c:4d} {run.returncode:4d} {'yes' if rows else 'NO':>4s} "
                    f"{float(r.get('Inferences/Second', 'nan')):9.1f} {p99:8.3f}  {side}"
                )
                if not ok:
                    print("   ", (run.stdout + run.stderr).strip()[-600:])
        points = len(fixtures.MODES) * len(args.concurrency)
        verdict = "PASS" if not failed else f"FAIL ({', '.join(failed)})"
        print(f"perf_analyzer: {points - len(failed)} of {points} runs exit 0 with their CSV: {verdict}")
        return 0 if not failed else 1
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=120)
        log.close()
        print(f"kiln serve exited with {code} after SIGTERM")


if __name__ == "__main__":
    sys.exit(main())
