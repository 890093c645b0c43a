"""The GIL between a process's event loop and its engine threads.

An engine thread lets go of the GIL while the runtime computes and must take it back to hand the batch
on. CPython makes a thread that wants the GIL wait out the switch interval (5 ms by default) before it
asks the holder to let go, so whenever the event loop is busy parsing requests, a batch that took 1 ms
to compute can take up to 6 ms to come back. ``benchmarks/gil_handoff.py`` measures it: a small CNN on
ONNX Runtime (1 thread, batch 1) ran 0.87 ms a call alone and 6.3 ms beside a thread running Python at
the default interval; at 0.1 ms, 1.1 ms. The Python thread's pace beside it is noisy on this machine:
0.6-1.1 of its pace alone at 0.1 ms across runs, 0.8-0.9 at the default. Behind ``kiln serve`` at concurrency 8, where the loop is busy only
part of the time, the engine's wall time per row over its CPU time fell from 0.045 to 0.032 ms (median of
5 runs each): about 1.5 % of the engine's time.

Only a process kiln owns sets it (``kiln serve``, a Ray Serve replica): an embedded server or
``kiln.load`` leaves the caller's interpreter as it is.
"""

from __future__ import annotations

import sys

SWITCH_INTERVAL_S = 0.0001


def favour_engine_threads() -> float:
    """Shorten the interpreter's switch interval to :data:`SWITCH_INTERVAL_S` (never lengthen it); return
    the interval it had."""
    before = sys.getswitchinterval()
    if before > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
    return before
