"""The README runs as written: its Python blocks and its shell commands (```bash, ```sh, ```console), in
order, in one directory, as a user following it would (LitServe's test_readme.py does the Python half).

- Files the README takes to be the user's own (``model.onnx``, ``mypkg/``, ``classifier.keras`` …) are made
  first by :func:`user_files`; ``mypkg`` is put on the path, as an installed package would be.
- A command that would run for minutes, or that needs what CI lacks (a GPU, a Ray cluster), runs shortened
  or is only parsed (its options checked by the CLI's own parser), by the rules of :func:`stand_in`, each
  with its reason; every other command runs as written. ``python -c`` and ``python - <<'PY'`` run in this
  process, with the detector trained on a short schedule (``tests/e2e/test_detector.py`` trains the real one).
- ``kiln serve`` runs in the background on free ports, waits until ready and is stopped with SIGTERM.
- A block that talks to ``127.0.0.1:8000`` (HTTP) or ``:8001`` (gRPC) reaches a real kiln server over the
  repository the earlier blocks built.
- ``pip install`` lines name this project's distribution and extras; ``make`` targets are dry-run.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TEXT = README.read_text()
SHELLS = ("bash", "sh", "console")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
BLOCKS = [(m.group(1), m.group(2), TEXT[: m.start()].count("\n") + 1) for m in FENCE.finditer(TEXT)]
PYTHON_BLOCKS = [code for lang, code, _ in BLOCKS if lang == "python"]
HTTP, GRPC = "127.0.0.1:8000", "127.0.0.1:8001"
QUICK_BENCH = ["--min-time", "0.05", "--repeats", "1", "--seconds", "0.5", "--time-budget", "4"]
LARGE_DETECTOR = 'SIZES["large"]'  # its block trains the 256 px detector: minutes


@dataclass
class Command:
    text: str  # continuation lines joined, the comment dropped
    heredoc: str | None  # the body of ``<<'PY'`` … ``PY``
    line: int  # where its block starts in the README

    @property
    def argv(self) -> list[str]:
        return [os.path.expandvars(a) for a in shlex.split(self.text.split("<<")[0])]


def _without_comment(line: str) -> str:
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def commands(lang: str, code: str, line: int) -> list[Command]:
    """The commands of one shell block: ``\\``-continued lines joined, comments dropped, heredocs kept."""
    lines, out, i = code.splitlines(), [], 0
    while i < len(lines):
        raw = lines[i]
        i += 1
        if lang == "console":
            if not raw.startswith("$ "):
                continue
            raw = raw[2:]
        while raw.rstrip().endswith("\\") and i < len(lines):
            raw = raw.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
        text = " ".join(_without_comment(raw).split())
        if not text:
            continue
        body = None
        if m := re.search(r"<<\s*'?(\w+)'?", text):
            end, start = m.group(1), i
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            body, i = "\n".join(lines[start:i]) + "\n", i + 1
        out.append(Command(text, body, line))
    return out


SHELL_COMMANDS = [c for lang, code, line in BLOCKS if lang in SHELLS for c in commands(lang, code, line)]


def stand_in(argv: list[str]) -> tuple[list[str] | None, str]:
    """What runs instead of a README command, and why: ``(argv, "")`` runs it as written, ``(other argv,
    reason)`` runs a shortened form, ``(None, reason)`` only parses it."""
    verb = argv[1] if len(argv) > 1 else ""
    if argv[0] != "kiln":
        return argv, ""
    if "--ray" in argv or "--ray-address" in argv or "--emit-config" in argv:
        return None, "starts a Ray cluster (tests/integration/test_ray_serve.py and test_ray_data.py run it)"
    if "--device" in argv and argv[argv.index("--device") + 1].startswith("cuda"):
        return None, "needs a CUDA device (tests/integration/test_gpu.py runs on one)"
    if verb == "optimize" and argv[2] in ("minilm", "resnet", "shapes-large"):
        return None, f"{argv[2]} is imported only in a block that is not run (MiniLM, ResNet-50, the large detector)"
    if verb == "optimize" and argv[2] == "shapes":
        return None, "a minute or more even with --preset quick (tests/e2e/test_detector.py runs it)"
    if verb == "optimize":
        preset = [] if "--preset" in argv else ["--preset", "quick"]
        return [*argv, *preset, "--min-time", "0.02"], "quick preset, short timing (the Python block runs cpu-latency)"
    if verb == "bench" and "--url" in argv:
        return [*argv, "--duration", "0.5", "--requests", "100"], "a shorter load per concurrency level"
    if verb == "bench" and "--compare" not in argv:
        return [*argv, *QUICK_BENCH], "shorter timed runs, within a time budget of 4 s"
    return argv, ""


def parse(argv: list[str]) -> None:
    """Check a ``kiln`` command line with the CLI's own parser, without running it: unknown options, missing
    arguments and bad values fail here."""
    import typer

    from kiln.cli import app
    from kiln.cli_support import readable_help

    group = readable_help(typer.main.get_command(app))
    ctx = group.make_context("kiln", argv[1:], resilient_parsing=False)
    name, command, rest = group.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
    command.make_context(name, rest, parent=ctx)


# ---- the user's own files ------------------------------------------------------------------------------
MYPKG = """\
import torch
from torch import nn


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))
"""


def user_files(root: Path) -> None:
    """What the README's commands take to be the user's: one file per format, arrays to predict on, and the
    package behind ``mypkg.models:build`` with its weights."""
    import joblib
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from kiln.convert.from_keras import import_keras
    from tests.fixtures import onnx_models, tiny_models

    onnx_models.save(onnx_models.linear_model(), root / "model.onnx")  # x: float32 [N, 4]
    (root / "arrays").mkdir()
    for i in range(3):
        np.save(root / "arrays" / f"{i}.npy", np.full(4, i, np.float32))
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "models.py").write_text(MYPKG)
    scope: dict[str, Any] = {}
    exec(MYPKG, scope)
    save_file(scope["build"]().state_dict(), str(root / "w.safetensors"))
    keras = import_keras()
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
    classifier.save(root / "classifier.keras")
    x, y = load_iris(return_X_y=True)
    joblib.dump(make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(x, y), root / "pipeline.joblib")
    torch.jit.script(tiny_models.token_embedder().eval()).save(str(root / "traced.pt"))  # input_ids, attention_mask
    batch, seq = torch.export.Dim("batch", max=1024), torch.export.Dim("seq", max=512)
    example = (torch.randint(0, 10, (2, 5)), torch.ones(2, 5, dtype=torch.int64))
    program = torch.export.export(
        tiny_models.seq_pool().eval(), example, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq})
    )
    torch.export.save(program, str(root / "program.pt2"))


def short_detector_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """``detector.train()`` on a short schedule: the README's flow needs weights of the right shape, not a
    good detector (its own cache key, so they never stand in for the real recipe's)."""
    from kiln.zoo import detector

    real = detector.train

    def train(*args: Any, size: Any = "small", overrides: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        if size == "small" and overrides is None:
            overrides = {"epochs": 1, "train_images": 64, "val_images": 16}
        return real(*args, size=size, overrides=overrides, **kwargs)

    monkeypatch.setattr(detector, "train", train)


# ---- running the blocks ----------------------------------------------------------------------------------
class Walk:
    """The README's blocks run in order, in ``root``; one kiln server, started when a block first needs it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.scope: dict[str, object] = {"__name__": "__readme__"}
        self.server: Any = None
        self.ran: list[str] = []
        self.instead: list[str] = []
        self.took: list[tuple[float, str]] = []  # seconds per block or command, printed at the end

    def close(self) -> None:
        if self.server is not None:
            self.server.__exit__(None, None, None)

    def addresses(self, text: str) -> str:
        if HTTP not in text and GRPC not in text:
            return text
        if self.server is None:
            from kiln.serving import ServerSettings
            from kiln.serving.server import ServerThread

            settings = ServerSettings(repo=self.root / "repo", http_port=0, grpc_port=0, log_level="WARNING",
                                      load_mode="lazy", engine_threads=1)  # fmt: skip
            self.server = ServerThread(settings).__enter__()
        return text.replace(HTTP, f"127.0.0.1:{self.server.http_port}").replace(
            GRPC, f"127.0.0.1:{self.server.grpc_port}"
        )

    def python(self, code: str, where: str, scope: dict[str, object] | None = None) -> None:
        exec(compile(self.addresses(code), where, "exec"), self.scope if scope is None else scope)

    def shell(self, cmd: Command) -> None:
        where = f"{README}:{cmd.line}: {cmd.text}"
        argv = cmd.argv
        if argv[0] == "make":
            done = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"{where}\n{done.stderr}"
        elif argv[0] == "pip":
            check_pip(argv, where)
        elif argv[0] == "python" and argv[1:2] == ["-c"]:
            self.python(argv[2], where, {"__name__": "__main__"})
        elif argv[0] == "python" and argv[1:2] == ["-"] and cmd.heredoc is not None:
            if LARGE_DETECTOR in cmd.heredoc:  # compiled, not run: training takes minutes
                compile(cmd.heredoc, where, "exec")
                self.instead.append(
                    f"compiled only: the large detector's block at line {cmd.line} (trains for minutes)"
                )
                return
            self.python(cmd.heredoc, where, {"__name__": "__main__"})
        elif argv[0] == "curl":
            self.curl(cmd, where)
        elif argv[0] == "kiln":
            self.kiln(argv, where)
        else:
            pytest.fail(f"{where}: the README test has no runner for {argv[0]!r}")

    def curl(self, cmd: Command, where: str) -> None:
        done = subprocess.run(["bash", "-c", self.addresses(cmd.text)], cwd=self.root, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, f"{where}\n{done.stderr}"
        answer = json.loads(done.stdout)
        assert "predictions" in answer, f"{where}\n{done.stdout}"

    def kiln(self, argv: list[str], where: str) -> None:
        parse(argv)  # every command's options exist and parse, run or not
        run, reason = stand_in(argv)
        if run is None:
            self.instead.append(f"parsed only: {' '.join(argv)} ({reason})")
            return
        if reason:
            self.instead.append(f"shortened: {' '.join(run)} ({reason})")
        if run[1] == "serve":
            self.serve(run, where)
            return
        from kiln.cli import main

        run = [self.addresses(a) for a in run]
        try:
            main(run[1:])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        allowed = (0, 1) if "--compare" in run else (0,)  # a regression between two runs exits 1
        assert code in allowed, f"{where}: exit {code}"
        self.ran.append(" ".join(argv))

    def serve(self, argv: list[str], where: str) -> None:
        """``kiln serve`` as a process on free ports: ready within the deadline, then SIGTERM exits 0."""
        from tests.integration.conftest import free_port

        http, grpc = free_port(), free_port()
        log = self.root / f"serve-{http}.log"
        cmd = [sys.executable, "-m", "kiln", *argv[1:], "--http-port", str(http), "--grpc-port", str(grpc)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"{where}: kiln serve exited {proc.returncode}\n{log.read_text()}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                assert time.monotonic() < deadline, f"{where}: not ready in 120 s\n{log.read_text()}"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, f"{where}\n{log.read_text()}"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.ran.append(" ".join(argv))


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def check_pip(argv: list[str], where: str) -> None:
    """``pip install 'NAME[extra]'`` names this distribution (not a project of the same name on the package
    index) and extras it declares."""
    project = pyproject()
    for spec in argv[2:]:
        if spec.startswith("-") or spec.startswith("."):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[([\w,\-]+)\])?", spec)
        assert m is not None, f"{where}: {spec!r}"
        assert m.group(1) == project["name"], (
            f"{where}: installs {m.group(1)!r}, the distribution is {project['name']!r}"
        )
        for extra in (m.group(2) or "").split(","):
            assert not extra or extra in project["optional-dependencies"], f"{where}: no extra {extra!r}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # mypkg, as if installed
    monkeypatch.setenv("TOKEN", "readme-token")
    user_files(tmp_path)
    short_detector_training(monkeypatch)
    (tmp_path / "b.json").symlink_to(tmp_path / "a.json")  # `kiln bench --compare a.json b.json`: a second run
    walk = Walk(tmp_path)
    try:
        for lang, code, line in BLOCKS:
            if lang == "python":
                start = time.perf_counter()
                walk.python(code, f"{README}:{line}")
                walk.took.append((time.perf_counter() - start, f"python block at line {line}"))
            elif lang in SHELLS:
                for cmd in commands(lang, code, line):
                    start = time.perf_counter()
                    walk.shell(cmd)
                    walk.took.append((time.perf_counter() - start, cmd.text[:90]))
    finally:
        walk.close()
    slowest = [f"{s:6.1f} s  {what}" for s, what in sorted(walk.took, reverse=True)[:12]]
    with capsys.disabled():
        print(f"\nREADME: {len(walk.ran)} kiln commands run;", *walk.instead, "slowest:", *slowest, sep="\n  ")
    assert len(walk.ran) >= 20


def test_readme_has_python_and_shell_blocks() -> None:
    assert PYTHON_BLOCKS and len(SHELL_COMMANDS) > 20


@pytest.mark.parametrize("cmd", [c for c in SHELL_COMMANDS if c.argv[0] == "kiln"], ids=lambda c: c.text[:60])
def test_readme_kiln_commands_parse(cmd: Command) -> None:
    """Every ``kiln`` command of the README, run by the slow test or not, has options the CLI takes."""
    parse(cmd.argv)


def test_readme_pip_installs_name_this_distribution() -> None:
    inline = [shlex.split(text) for text in re.findall(r"`(pip install\s[^`]+)`", TEXT)]
    blocks = [c.argv for c in SHELL_COMMANDS if c.argv[0] == "pip"]
    assert inline and blocks
    for argv in inline + blocks:
        check_pip(argv, f"{README}: {' '.join(argv)}")


def test_readme_shell_commands_have_runners() -> None:
    assert {c.argv[0] for c in SHELL_COMMANDS} <= {"kiln", "make", "pip", "python", "curl"}
