"""What the GIL's switch interval costs an engine thread beside a busy Python thread, in one process.

An engine thread (the server's batcher worker) releases the GIL while ONNX Runtime computes and takes it
back to hand the batch on. Beside another thread that is running Python (the event loop parsing
requests), CPython makes it wait out the switch interval first. This times a small CNN (ONNX Runtime,
1 thread, batch 1, through ``kiln.load``) in a worker thread, alone and beside a thread spinning on
Python, at several switch intervals in interleaved rounds, and counts the spinning thread's progress: a
shorter interval must help the engine without slowing the Python thread.

    .venv/bin/python benchmarks/gil_handoff.py [--rounds 3] [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_overhead import INPUT_SHAPE  # the same CNN as the serving benchmarks

from kiln.execution.gil import SWITCH_INTERVAL_S

INTERVALS = (0.005, 0.001, 0.0005, SWITCH_INTERVAL_S)  # 5 ms is CPython's default


class Spinner:
    """A thread running Python (as a busy event loop does) for the length of a ``with`` block; ``rate`` is
    its iterations/s over the block."""

    def __enter__(self) -> Spinner:
        self._stop, self._count = threading.Event(), 0
        self._thread = threading.Thread(target=self._spin)
        self._thread.start()
        self._start = time.perf_counter()
        return self

    def _spin(self) -> None:
        n = 0
        while not self._stop.is_set():
            sum(range(200))
            n += 1
        self._count = n

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.rate = self._count / (time.perf_counter() - self._start)


def engine_ms(run: Callable[[dict[str, np.ndarray]], object], feed: dict[str, np.ndarray], seconds: float) -> float:
    """ms per call of ``run(feed)`` in a worker thread (as the batcher runs it) for ``seconds``."""
    out: list[float] = []

    def work() -> None:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run(feed)
            n += 1
        out.append((time.perf_counter() - start) / n * 1e3)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    return out[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=0.5)
    args = ap.parse_args()

    import kiln

    repo = Path(tempfile.mkdtemp(prefix="kiln-bench-")) / "repo"
    kiln.import_model(f"{Path(__file__).resolve().parent / 'serve_overhead.py'}:build_cnn", repo, name="cnn",
                      input_shapes=[INPUT_SHAPE], input_names=["input"], output_names=["logits"])  # fmt: skip
    x = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
    before = sys.getswitchinterval()
    alone: dict[float, list[float]] = {s: [] for s in INTERVALS}
    beside: dict[float, list[float]] = {s: [] for s in INTERVALS}
    spun: dict[float, list[float]] = {s: [] for s in INTERVALS}
    spun_alone: dict[float, list[float]] = {s: [] for s in INTERVALS}
    with kiln.load(repo, "cnn", threads=1) as p:
        feed = {p.spec.inputs[0].name: x}
        for _ in range(100):
            p.engine.run(feed)
        try:
            for _ in range(args.rounds):
                for s in INTERVALS:
                    sys.setswitchinterval(s)
                    with Spinner() as idle:
                        time.sleep(args.seconds)
                    spun_alone[s].append(idle.rate)
                    alone[s].append(engine_ms(p.engine.run, feed, args.seconds))
                    with Spinner() as busy:
                        beside[s].append(engine_ms(p.engine.run, feed, args.seconds))
                    spun[s].append(busy.rate)
        finally:
            sys.setswitchinterval(before)

    med = statistics.median
    print(f"small CNN, ONNX Runtime 1 thread, batch 1, in a worker thread; median of {args.rounds} rounds")
    print(f"{'switch interval':>16} {'engine alone':>13} {'beside Python':>14} {'slowdown':>9} {'Python thread':>14}")
    for s in INTERVALS:
        tag = " (CPython default)" if s == 0.005 else " (kiln serve)" if s == SWITCH_INTERVAL_S else ""
        print(f"{s * 1e3:13.2f} ms {med(alone[s]):10.3f} ms {med(beside[s]):11.3f} ms {med(beside[s]) / med(alone[s]):8.2f}x "
              f"{med(spun[s]) / med(spun_alone[s]):13.2f}x{tag}")  # fmt: skip
    default, kiln_s = (
        med(beside[0.005]) / med(alone[0.005]),
        med(beside[SWITCH_INTERVAL_S]) / med(alone[SWITCH_INTERVAL_S]),
    )
    python = med(spun[SWITCH_INTERVAL_S]) / med(spun_alone[SWITCH_INTERVAL_S])
    print(f"engine beside a busy Python thread ÷ alone: {default:.2f}x at 5 ms, {kiln_s:.2f}x at "
          f"{SWITCH_INTERVAL_S * 1e3:g} ms; the Python thread keeps {python:.2f} of its pace alone")  # fmt: skip


if __name__ == "__main__":
    main()
