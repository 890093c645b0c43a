"""The model repository on disk, laid out like Triton's so users recognise it::

    repo/<model>/model.yaml                 the ModelSpec
    repo/<model>/<version>/manifest.json    where it came from, content hashes, parity figures
    repo/<model>/<version>/model.onnx       (+ model.onnx.data for external weights)
    repo/<model>/<version>/model.pt2        torch.export program (PyTorch sources)
    repo/<model>/<version>/variants/<id>/   optimized variants and their figures
    repo/<model>/<version>/report/          bench reports

Writes are atomic: a version is assembled in a hidden staging directory and renamed into place, and
files are written to a temporary name then replaced, so an interrupted import never leaves a
half-written model visible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import CorruptModelError, InvalidNameError, NotFoundError, SpecError
from kiln.spec import MODEL_NAME_PATTERN, ModelSpec

SPEC_FILE = "model.yaml"
MANIFEST_FILE = "manifest.json"
VARIANTS_DIR = "variants"
RECIPE_FILE = "recipe.json"
_STAGING_PREFIX = ".staging-"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(r"[0-9]{1,18}")
NAME_RULE = "use 1-128 letters, digits, '_', '.' or '-', starting with a letter, digit or '_'"


def check_model_name(name: object, field: str = "model name", kind: str = "model name") -> str:
    """``name`` if it follows the name grammar (so it is one path component, never '.' or '..'); models
    and shared-memory regions share it."""
    if not isinstance(name, str) or _MODEL_NAME.fullmatch(name) is None:
        raise InvalidNameError(field, str(name), f"is not a {kind}: {NAME_RULE}")
    return name


def parse_version(text: str | None, field: str = "version") -> int | None:
    """A version as a client sends it (``"3"``; empty or None: the default); ASCII digits only."""
    if text is None or text == "":
        return None
    if _VERSION.fullmatch(text) is None or int(text) < 1:
        raise InvalidNameError(field, text, "is not a version number; versions are positive integers")
    return int(text)


@dataclass
class PendingVersion:
    """A version being assembled in ``path``; ``version`` is set once it is published."""

    path: Path
    version: int | None = None


class VersionManifest(BaseModel):
    """What a version is and where it came from; written once when the version is created."""

    model_config = ConfigDict(extra="allow")

    version: int
    created: str
    framework: str
    source: str
    source_hash: str = Field(description="hash of what was imported; the same source is not imported twice")
    artifacts: dict[str, str] = Field(description="file name -> sha256 of its bytes")
    exporter: str = ""
    parity: list[dict[str, Any]] = Field(default_factory=list)
    kiln_version: str = ""


class VariantRecipe(BaseModel):
    """How a variant was built and how to run it; ``variants/<id>/recipe.json``.

    The optimizer writes it (with its own fields: passes, quantization …); ``kiln.load`` reads
    ``engine``, ``precision`` and ``options`` to run the artifact in that directory.
    """

    model_config = ConfigDict(extra="allow")

    engine: str
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    options: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"  # where the optimizer measured it; kiln.load runs it there unless told otherwise


def read_recipe(variant_dir: Path, model: str, version: int) -> VariantRecipe:
    path = variant_dir / RECIPE_FILE
    if not path.is_file():
        available = sorted(p.name for p in variant_dir.parent.glob("*") if (p / RECIPE_FILE).is_file())
        raise NotFoundError(
            f"model {model!r} version {version} has no variant {variant_dir.name!r}; "
            f"available: {available or 'none (run kiln optimize)'}, or 'reference'"
        )
    return VariantRecipe.model_validate_json(path.read_text())


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
    return shareable(Path(tempfile.mkdtemp(dir=parent, prefix=f"{_STAGING_PREFIX}{os.getpid()}-")))


def is_abandoned(staging: Path) -> bool:
    """Whether a staging directory's process is gone (or the name carries no process id)."""
    pid = staging.name.removeprefix(_STAGING_PREFIX).split("-", 1)[0]
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        shareable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class Repository:
    """A directory of models, each with a spec and numbered versions."""

    def __init__(self, root: str | Path, *, show_root: bool = True) -> None:
        """``show_root=False`` (the server) keeps the repository's path out of every message."""
        self.root = Path(root)
        self._where = f"repository {self.root}" if show_root else "the repository"
        self._forms: list[str] | None = None

    def __repr__(self) -> str:
        return f"Repository({str(self.root)!r})"

    # ---- names -> paths ----------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        """The one place a model name becomes a path: the name must follow the grammar, and the directory
        must be itself, inside the root (a symbolic link could read outside, or alias another model)."""
        check_model_name(model)
        path = self.root / model
        _confine(path, model, "model name")
        return path

    def version_dir(self, model: str, version: int) -> Path:
        path = self.model_dir(model) / str(version)
        _confine(path, str(version), "version")
        return path

    def relative(self, text: str) -> str:
        """``text`` with this repository's absolute path taken out: files named relative to the repository
        (what the server answers with; full paths stay in its log)."""
        if self._forms is None:  # the spellings of the root, found once (resolving costs syscalls)
            forms = {str(self.root.absolute()), str(self.root)}
            with contextlib.suppress(OSError, RuntimeError):
                forms.add(str(self.root.resolve()))
            self._forms = sorted((f for f in forms if os.sep in f), key=len, reverse=True)
        for form in self._forms:
            text = text.replace(form + os.sep, "").replace(form, "the repository")
        return text

    # ---- reading -----------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _is_own_dir(p) and self.has_model(p.name))

    def has_model(self, model: str) -> bool:
        try:
            return (self.model_dir(model) / SPEC_FILE).is_file()
        except InvalidNameError:
            return False

    def versions(self, model: str) -> list[int]:
        mdir = self.model_dir(model)
        if not mdir.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in mdir.iterdir()
            if _VERSION.fullmatch(p.name) and _is_own_dir(p) and (p / MANIFEST_FILE).is_file()
        )

    def _missing(self, model: str) -> NotFoundError:
        return NotFoundError(f"model {model!r} is not in {self._where}; it holds {self.models() or 'no models'}")

    def spec(self, model: str) -> ModelSpec:
        path = self.model_dir(model) / SPEC_FILE
        if not path.is_file():
            raise self._missing(model)
        _confine(path, SPEC_FILE, f"model {model!r}: {SPEC_FILE}")
        return ModelSpec.from_yaml(path.read_text(), source=f"{model}/{SPEC_FILE}")

    def resolve(self, model: str, version: int | None = None) -> tuple[int, Path]:
        """The version number and directory for ``version`` (the latest when None)."""
        versions = self.versions(model)
        if not versions:
            if not self.has_model(model):
                raise self._missing(model)
            raise NotFoundError(f"model {model!r} has no versions in {self._where}; import one with `kiln import`")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise NotFoundError(f"model {model!r} has no version {version}; available versions: {versions}")
        return version, self.version_dir(model, version)

    def manifest(self, model: str, version: int | None = None) -> VersionManifest:
        version, vdir = self.resolve(model, version)
        return VersionManifest.model_validate_json((vdir / MANIFEST_FILE).read_text())

    def find_source(self, model: str, source_hash: str) -> int | None:
        """The version that was imported from exactly this source, if any."""
        for v in reversed(self.versions(model)):
            if self.manifest(model, v).source_hash == source_hash:
                return v
        return None

    def verify(self, model: str, version: int | None = None) -> None:
        """Recompute each artifact's hash and raise :class:`CorruptModelError` on a mismatch."""
        version, vdir = self.resolve(model, version)
        for name, digest in self.manifest(model, version).artifacts.items():
            path = vdir / name
            shown = f"{model}/{version}/{name}"  # relative to the repository
            if not path.is_file():
                raise CorruptModelError(shown, "the file is missing; re-import the model")
            if sha256_file(path) != digest:
                raise CorruptModelError(shown, "its content hash differs from the manifest; re-import the model")

    # ---- writing -----------------------------------------------------------------------------------------
    def save_spec(self, spec: ModelSpec) -> Path:
        path = self.model_dir(spec.name) / SPEC_FILE
        write_atomic(path, spec.to_yaml())
        return path

    def check_compatible(self, spec: ModelSpec) -> None:
        """A new version must keep the model's signature; a different one needs a new model name."""
        if not self.has_model(spec.name):
            return
        old = self.spec(spec.name)
        for kind, a, b in (("inputs", old.inputs, spec.inputs), ("outputs", old.outputs, spec.outputs)):
            if list(a) != list(b):
                raise SpecError(
                    f"model {spec.name!r} already exists with {kind} {_sig(a)}, but the new version has "
                    f"{_sig(b)}; import it under another --name"
                )

    @contextlib.contextmanager
    def new_version(self, model: str) -> Iterator[PendingVersion]:
        """Yield a staging directory; on success it becomes the next version, on error it is removed.

        Call :meth:`commit_version` inside the block to write the manifest; the rename happens at exit.
        """
        mdir = self.model_dir(model)
        mdir.mkdir(parents=True, exist_ok=True)
        staging = staging_dir(mdir)
        pending = PendingVersion(staging)
        try:
            yield pending
            if not (staging / MANIFEST_FILE).is_file():
                raise RuntimeError("new_version() block ended without commit_version()")
            pending.version = self._publish(mdir, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def commit_version(self, staging: Path, **fields: Any) -> VersionManifest:
        """Hash every file in ``staging`` and write its manifest (the version number is set at publish)."""
        if not staging.is_dir():
            raise RuntimeError(f"the staging directory {staging} is gone; another process removed it")
        artifacts = {
            str(p.relative_to(staging)): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE
        }
        from kiln import __version__

        manifest = VersionManifest(
            version=0,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            artifacts=artifacts,
            kiln_version=__version__,
            **fields,
        )
        write_atomic(staging / MANIFEST_FILE, manifest.model_dump_json(indent=2))
        return manifest

    def _publish(self, mdir: Path, staging: Path) -> int:
        data = json.loads((staging / MANIFEST_FILE).read_text())
        while True:
            taken = [int(p.name) for p in mdir.iterdir() if p.name.isdigit()]
            version = max(taken, default=0) + 1
            data["version"] = version
            write_atomic(staging / MANIFEST_FILE, json.dumps(data, indent=2))
            try:
                os.rename(staging, mdir / str(version))  # fails if another import took this number
                return version
            except OSError:
                if not (mdir / str(version)).exists():
                    raise
        raise AssertionError("unreachable")

    def cleanup_staging(self, model: str) -> None:
        """Remove staging directories left by a process that was killed mid-import (never a live one)."""
        for p in self.model_dir(model).glob(f"{_STAGING_PREFIX}*"):
            if is_abandoned(p):
                shutil.rmtree(p, ignore_errors=True)


def _is_own_dir(path: Path) -> bool:
    """A real directory, not a symbolic link to one (which could lead outside the repository)."""
    return path.is_dir() and not path.is_symlink()


def _confine(path: Path, shown: str, field: str) -> None:
    """Refuse ``path`` unless it resolves to itself: no symbolic link in its last component may lead
    elsewhere, inside the repository (an alias) or out of it."""
    try:
        real = path.resolve()
        expected = path.parent.resolve() / path.name
    except (OSError, RuntimeError):  # a symlink loop
        real, expected = Path(), Path("/")
    if real != expected:
        raise InvalidNameError(
            field, shown, "is a symbolic link; the server follows none, so that no name reaches a file outside "
            "the repository or loads a model twice under another name; copy or move the model instead",
        )  # fmt: skip


def _sig(tensors: list[Any]) -> str:
    return ", ".join(f"{t.name}:{t.dtype}{list(t.shape)}" for t in tensors)
