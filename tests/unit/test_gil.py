"""The switch interval kiln's own processes (``kiln serve``, a Ray Serve replica) run with."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from kiln.execution.gil import SWITCH_INTERVAL_S, favour_engine_threads


@pytest.fixture
def interval() -> Iterator[None]:
    before = sys.getswitchinterval()
    yield
    sys.setswitchinterval(before)


def test_shortens_the_default_interval_and_returns_it(interval: None) -> None:
    sys.setswitchinterval(0.005)  # CPython's default
    assert favour_engine_threads() == pytest.approx(0.005)
    assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S, abs=1e-6)
    assert SWITCH_INTERVAL_S < 0.005


def test_never_lengthens_a_shorter_interval(interval: None) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S / 2)
    shorter = sys.getswitchinterval()  # CPython keeps whole microseconds
    favour_engine_threads()
    favour_engine_threads()
    assert sys.getswitchinterval() == shorter


def test_the_server_process_sets_it() -> None:
    """``serve`` (what ``kiln serve`` runs) sets it before anything else; checked on a repository that
    fails at once, in a child process so that this one keeps its own interval."""
    import subprocess

    code = (
        "import sys; from pathlib import Path\n"
        "from kiln.serving.server import serve\n"
        "from kiln.serving.settings import ServerSettings\n"
        "try:\n"
        "    serve(ServerSettings(repo=Path('/nonexistent-kiln-repo'), http_port=0, grpc_port=None))\n"
        "except Exception:\n"
        "    pass\n"
        "print(sys.getswitchinterval())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.strip().splitlines()[-1]) == pytest.approx(SWITCH_INTERVAL_S, abs=1e-6)
