"""Files written so that readers never see half of one: atomic replaces, staging directories named after
their process (so a clean-up can tell a live build from an abandoned one), content hashes and shared links; and
kiln's own files read back so that a damaged one is an error naming it, never a codec traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from pydantic import BaseModel, ValidationError

from kiln.errors import CorruptModelError

STAGING_PREFIX = ".staging-"
EXTERNAL_DATA_SUFFIX = ".data"  # ONNX weights stored beside a model over 2 GB


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where Linux tells it (``os.umask`` can only swap)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shareable(path: Path) -> Path:
    """Give a file or directory made by ``tempfile`` (0600 / 0700) the permissions the umask allows, as
    ``open``/``mkdir`` would, so a server running as another user can read the repository."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
    return path


def staging_dir(parent: Path) -> Path:
    """A hidden directory to assemble something in, named after this process so that a clean-up in
    another process can tell a live import from one that was killed."""
    return shareable(Path(tempfile.mkdtemp(dir=parent, prefix=f"{STAGING_PREFIX}{os.getpid()}-")))


def is_abandoned(staging: Path) -> bool:
    """Whether a staging directory's process is gone (or the name carries no process id)."""
    pid = staging.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _replacing(path, "wb", follow=False) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def replacing(path: Path, encoding: str = "utf-8") -> contextlib.AbstractContextManager[IO[str]]:
    """A text file that becomes ``path`` only when the block ends without error: it is written under a
    temporary name beside ``path`` and then replaces it, so a failure or Ctrl-C part-way leaves the old file
    as it was, never a truncated one. A ``path`` that is there and is no regular file (``/dev/null``, a FIFO)
    is written directly, as ``open`` would. The file gets the old file's mode, else the umask's."""
    return _replacing(path, "w", encoding)


@contextlib.contextmanager
def _replacing(path: Path, mode: str, encoding: str | None = None, follow: bool = True) -> Iterator[IO[Any]]:
    """``follow``: write through a symbolic link (and into a device) as ``open`` does, for a user's file;
    kiln's own files replace whatever is at ``path``, so a planted link never redirects a write."""
    target = Path(os.path.realpath(path)) if follow else path
    try:
        info: os.stat_result | None = target.stat() if follow else target.lstat()
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        if follow:
            with target.open(mode, encoding=encoding) as f:
                yield f
            return
        info = None  # a link or a FIFO where kiln keeps a file: replaced by a new file
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if info is not None:
            os.chmod(tmp, stat.S_IMODE(info.st_mode))
        else:
            shareable(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def link(src: Path, dst: Path) -> None:
    """Share a file: a hard link, except for ONNX external data, which onnx refuses to read once it has
    several links (its guard against hard-link attacks), so it is copied."""
    if src.name.endswith(EXTERNAL_DATA_SUFFIX):
        shutil.copy2(src, dst)
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


_Record = TypeVar("_Record", bound=BaseModel)


def read_text(path: Path, shown: str) -> str:
    """A file kiln wrote itself (``shown`` relative to the repository): one that became unreadable or is no
    UTF-8 text is a :class:`CorruptModelError` naming it, not an OS or codec error."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptModelError(
            shown, f"{exc.strerror or exc}" if isinstance(exc, OSError) else "not UTF-8 text"
        ) from None


def read_record(cls: type[_Record], path: Path, shown: str) -> _Record:
    """A pydantic record kiln wrote as JSON (a manifest, a recipe); a damaged one is a :class:`CorruptModelError`."""
    try:
        return cls.model_validate_json(read_text(path, shown))
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise CorruptModelError(shown, f"{problem['msg']} at {'.'.join(map(str, problem['loc'])) or 'the top'}; "
                                "restore the file or import the model again") from None  # fmt: skip


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object kiln keeps as a cache or a note (figures, skips): missing or damaged reads as empty."""
    with contextlib.suppress(FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            return data
    return {}
