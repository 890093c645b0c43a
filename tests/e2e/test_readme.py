"""The README's Python blocks run as written, in order, in one directory (LitServe's test_readme.py does the same).

A block that talks to ``127.0.0.1:8000`` runs against a real ``kiln serve`` over the repository the
earlier blocks built, on a free port.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
SERVER_ADDRESS = "127.0.0.1:8000"


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.serving import ServerSettings
    from kiln.serving.server import ServerThread

    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {"__name__": "__readme__"}
    for index, code in enumerate(BLOCKS):
        if SERVER_ADDRESS in code:
            settings = ServerSettings(repo=tmp_path / "repo", http_port=0, grpc_port=None, log_level="WARNING")
            with ServerThread(settings) as server:
                code = code.replace(SERVER_ADDRESS, f"127.0.0.1:{server.http_port}")
                exec(compile(code, f"{README}#block{index}", "exec"), scope)
        else:
            exec(compile(code, f"{README}#block{index}", "exec"), scope)


def test_readme_has_python_blocks() -> None:
    assert BLOCKS
