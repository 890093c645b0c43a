from __future__ import annotations

from pathlib import Path

import pytest

from kiln.errors import CorruptModelError, NotFoundError, SpecError
from kiln.files import sha256_file, write_atomic
from kiln.repository import Repository
from kiln.spec import ModelSpec


def spec(name: str = "m", width: int = 4) -> ModelSpec:
    return ModelSpec.model_validate(
        {
            "name": name,
            "inputs": [{"name": "x", "dtype": "float32", "shape": [-1, width]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 2]}],
        }
    )


def add_version(repo: Repository, name: str = "m", payload: bytes = b"onnx", source_hash: str = "h1") -> int:
    with repo.new_version(name) as pending:
        (pending.path / "model.onnx").write_bytes(payload)
        repo.commit_version(pending.path, framework="onnx", source="x.onnx", source_hash=source_hash)
        repo.save_spec(spec(name))
    assert pending.version is not None
    return pending.version


def test_versions_are_numbered_and_hashed(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    assert add_version(repo, payload=b"one") == 1
    assert add_version(repo, payload=b"two", source_hash="h2") == 2
    assert repo.models() == ["m"]
    assert repo.versions("m") == [1, 2]
    manifest = repo.manifest("m")
    assert manifest.version == 2
    assert manifest.artifacts["model.onnx"] == sha256_file(tmp_path / "m" / "2" / "model.onnx")
    assert repo.find_source("m", "h1") == 1
    assert repo.find_source("m", "nope") is None
    repo.verify("m", 1)


def test_interrupted_version_leaves_nothing_visible(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    add_version(repo)
    with pytest.raises(KeyboardInterrupt), repo.new_version("m") as pending:
        (pending.path / "model.onnx").write_bytes(b"half")
        raise KeyboardInterrupt
    assert repo.versions("m") == [1]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "model.yaml"]


def test_block_without_commit_is_not_published(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    with pytest.raises(RuntimeError, match="commit_version"), repo.new_version("m") as pending:
        (pending.path / "model.onnx").write_bytes(b"x")
    assert repo.versions("m") == []


def test_stray_numbered_directory_does_not_block_publish(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "junk").write_text("left by hand")
    assert add_version(repo) == 2


def test_verify_detects_tampering(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    add_version(repo)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(CorruptModelError, match="content hash"):
        repo.verify("m", 1)


def test_resolve_errors_list_what_exists(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    add_version(repo)
    with pytest.raises(NotFoundError, match=r"no version 7; available versions: \[1\]"):
        repo.resolve("m", 7)
    with pytest.raises(NotFoundError, match=r"'other' is not in repository .*\['m'\]"):
        repo.resolve("other")
    with pytest.raises(NotFoundError):
        repo.spec("other")


def test_new_version_must_keep_the_signature(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    add_version(repo)
    repo.check_compatible(spec())
    with pytest.raises(SpecError, match="another --name"):
        repo.check_compatible(spec(width=5))


def test_write_atomic_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "a" / "f.txt"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]


def test_cleanup_keeps_a_live_import_and_removes_a_dead_one(tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Repository(tmp_path)
    add_version(repo)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "m" / f".staging-{dead.stdout.strip()}-abc"  # its process has exited
    stale.mkdir()
    with repo.new_version("m") as pending:  # a live import, as another process's cleanup sees it
        (pending.path / "model.onnx").write_bytes(b"live")
        repo.cleanup_staging("m")
        assert pending.path.is_dir() and not stale.exists()
        repo.commit_version(pending.path, framework="onnx", source="x.onnx", source_hash="h2")
    assert pending.version == 2 and repo.manifest("m", 2).artifacts.keys() == {"model.onnx"}


def test_files_and_directories_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        repo = Repository(tmp_path)
        add_version(repo)
        write_atomic(tmp_path / "m" / "1" / "note.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "m" / "1").stat().st_mode & 0o777 == 0o755  # readable by a server running as another user
    for name in ("manifest.json", "note.json"):
        assert (tmp_path / "m" / "1" / name).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m" / "model.yaml").stat().st_mode & 0o777 == 0o644
