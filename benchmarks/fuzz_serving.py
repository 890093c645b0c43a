"""Malformed V2 requests at volume against ``kiln serve``: answers by status class, the slowest answer,
the server's RSS before and after, and what a malformed request costs against a valid one (same run).

The generators are those of ``tests/integration/test_serving_fuzz.py`` (``tests/fixtures/v2_fuzz.py``);
the server runs as its own process (``kiln serve``, engine on 1 thread) on 127.0.0.1.

    .venv/bin/python benchmarks/fuzz_serving.py [--requests 20000] [--grpc-share 0.3] [--seed 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the generators live with the tests

import psutil  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tests.fixtures import v2_fuzz  # noqa: E402
from tests.integration.conftest import ServeProcess  # noqa: E402


def drive(strategy: st.SearchStrategy[Any], count: int, handle: Callable[[Any], None], rng_seed: int) -> None:
    """``handle`` each of ``count`` generated cases (generation only: nothing fails, so nothing shrinks)."""
    if count <= 0:
        return

    @seed(rng_seed)
    @settings(
        max_examples=count, deadline=None, database=None, phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(strategy)
    def run(case: Any) -> None:
        handle(case)

    run()


def valid_seconds(sender: v2_fuzz.HttpSender, n: int = 300) -> list[float]:
    """Answer times of a correct JSON request: the baseline a malformed request is compared with."""
    case = v2_fuzz.HttpCase("valid", "/v2/models/add/infer", v2_fuzz.dumps({"inputs": [v2_fuzz.add_tensor()]}),
                            expect=(200,))  # fmt: skip
    times = []
    for _ in range(n):
        answer = sender.send(case)
        if answer.problems:
            raise RuntimeError(f"a valid request failed: {answer.problems}")
        times.append(answer.seconds)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20000, help="malformed requests in all (HTTP and gRPC)")
    ap.add_argument("--grpc-share", type=float, default=0.3, help="the share of them sent over gRPC")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=20, help="problems to print")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = v2_fuzz.build_repo(work / "repo", work)
        server = ServeProcess(repo, "--max-body-bytes", str(v2_fuzz.LIMIT), log=work / "serve.log").wait_ready()
        try:
            proc = psutil.Process(server.proc.pid)
            http = v2_fuzz.HttpSender(server.http_port)
            grpc = v2_fuzz.GrpcSender(server.grpc_port)
            base = valid_seconds(http)
            rss_before = proc.memory_info().rss
            tally = v2_fuzz.Tally()
            times: list[float] = []

            def record(case: v2_fuzz.HttpCase | v2_fuzz.GrpcCase) -> None:
                sender = grpc if isinstance(case, v2_fuzz.GrpcCase) else http
                answer = sender.send(case)  # type: ignore[arg-type]
                tally.add(case, answer)
                times.append(answer.seconds)

            n_grpc = round(args.requests * args.grpc_share)
            start = time.perf_counter()
            drive(v2_fuzz.http_cases(), args.requests - n_grpc, record, args.seed)
            drive(v2_fuzz.grpc_cases(), n_grpc, record, args.seed)
            wall = time.perf_counter() - start
            rss_after = proc.memory_info().rss
            after = valid_seconds(http, 50)  # still answering, and correctly
            http.close()
            grpc.close()
        finally:
            code = server.terminate()
        log_text = (work / "serve.log").read_text(errors="replace")

    print(f"{tally.sent} malformed requests in {wall:.1f} s ({tally.sent / wall:.0f}/s); server exit code {code}")
    print("answers by status class:")
    for cls, n in sorted(tally.by_class.items()):
        print(f"  {cls:>18}  {n:>7}")
    print(f"slowest answer: {tally.slowest[0] * 1e3:.1f} ms ({tally.slowest[1]})")
    med_bad, med_ok = statistics.median(times), statistics.median(base)
    print(f"median answer: malformed {med_bad * 1e3:.2f} ms, valid {med_ok * 1e3:.2f} ms "
          f"(ratio {med_bad / med_ok:.2f}); valid after the run {statistics.median(after) * 1e3:.2f} ms")  # fmt: skip
    print(f"server RSS: {rss_before / 2**20:.1f} MiB before, {rss_after / 2**20:.1f} MiB after "
          f"({(rss_after - rss_before) / 2**20:+.1f} MiB)")  # fmt: skip
    logged = log_text.count("unexpected error while serving")
    print(f"unexpected errors in the server log: {logged}")
    print(f"problems: {len(tally.problems)}")
    for p in tally.problems[: args.show]:
        print("  " + p[:300])
    return 1 if tally.problems or logged else 0


if __name__ == "__main__":
    sys.exit(main())
