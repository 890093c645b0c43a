"""The model repository on disk, laid out like Triton's so users recognise it::

    repo/<model>/model.yaml                 the ModelSpec
    repo/<model>/<version>/manifest.json    where it came from, content hashes, parity figures
    repo/<model>/<version>/model.onnx       (+ model.onnx.data for external weights)
    repo/<model>/<version>/model.pt2        torch.export program (PyTorch sources)
    repo/<model>/<version>/variants/<id>/   optimized variants: their artifacts, recipe.json, figures.json
    repo/<model>/<version>/report/          optimize and bench reports

This module is the only code that knows these file names. A variant is reached through
:meth:`Repository.variant`, which answers a :class:`Variant` handle (spec, directory, recipe, figures,
engine); the optimizer stores what it built through :meth:`Repository.save_variant`.

Writes are atomic: a version is assembled in a hidden staging directory and renamed into place, and
files are written to a temporary name then replaced, so an interrupted import never leaves a
half-written model visible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import CorruptModelError, InvalidNameError, NotFoundError, RepositoryUnreadableError, SpecError
from kiln.files import (
    EXTERNAL_DATA_SUFFIX,
    STAGING_PREFIX,
    is_abandoned,
    read_json,
    read_record,
    read_text,
    sha256_file,
    staging_dir,
    write_atomic,
)
from kiln.files import link as _link
from kiln.recipe import Recipe
from kiln.spec import MODEL_NAME_PATTERN, ModelSpec

SPEC_FILE = "model.yaml"
MANIFEST_FILE = "manifest.json"
ONNX_FILE = "model.onnx"  # + model.onnx.data for weights stored beside a model over 2 GB
PT2_FILE = "model.pt2"  # a torch.export program
IR_FILE = "model.xml"  # OpenVINO IR (+ model.bin)
IR_WEIGHTS_FILE = "model.bin"
MODULE_WEIGHTS_FILE = "module.safetensors"  # a compressed variant's torch weights (their shapes: its widths)
VARIANTS_DIR = "variants"
RECIPE_FILE = "recipe.json"
FIGURES_FILE = "figures.json"
SKIPS_FILE = ".not-applicable.json"  # variant id -> why its pass had nothing to do
REPORT_DIR = "report"
REFERENCE = "reference"  # the imported fp32 artifact, as imported
CHOSEN = "chosen"  # what `kiln optimize` chose, else the reference
REFERENCE_ENGINE = "onnxruntime"  # what runs the reference: the imported model.onnx
_STAGE_PREFIX = ".stage-"  # variants/.stage-<key>: a build step shared by several variants (hidden: not one)
_STAGE_REPORTS = "stage.json"  # what the stage's passes reported
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


def is_version_name(name: str) -> bool:
    """Whether a directory name is a version number: ASCII digits only (``str.isdigit`` also takes ``"²"``,
    which ``int`` then refuses)."""
    return _VERSION.fullmatch(name) is not None


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
    """How a variant was built and how to run it, as stored in its directory: the fields of the
    optimizer's :class:`~kiln.recipe.Recipe` plus the record of the build."""

    model_config = ConfigDict(extra="allow", frozen=True)

    engine: str
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    int8: str | None = None
    passes: list[dict[str, Any]] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"  # where the optimizer measured it; kiln.load runs it there unless told otherwise
    label: str = ""
    variant_id: str = ""
    artifact_key: str = ""  # variants with equal keys share their files (they differ in run options only)
    source_hash: str = ""
    pass_reports: list[dict[str, Any]] = Field(default_factory=list)
    kiln_version: str = ""
    built: str = ""

    @classmethod
    def of(cls, recipe: Recipe, **record: Any) -> VariantRecipe:
        return cls.model_validate({**recipe.model_dump(mode="json"), **record})

    def recipe(self) -> Recipe:
        return Recipe.model_validate(self.model_dump(include=set(Recipe.model_fields)))


@dataclass(frozen=True)
class Variant:
    """One runnable form of a model version: the reference (the imported artifact) or a built variant.
    The rule "which artifact runs on which engine" lives here; every stage passes this handle down."""

    model: str
    version: int
    id: str  # a variant id, or 'reference'
    spec: ModelSpec
    version_dir: Path  # the version's directory (its processing files: vocabularies, labels)
    path: Path  # the directory the engine loads from
    recipe: VariantRecipe | None = None  # None for the reference
    # The chosen variant's partner for large batches (``ModelSpec.chosen_large``): batches of at least
    # ``large_from`` rows run on it. Only the handle of "chosen" carries one.
    large: Variant | None = None
    large_from: int = 0

    @property
    def is_reference(self) -> bool:
        return self.recipe is None

    @property
    def engine(self) -> str:
        return REFERENCE_ENGINE if self.recipe is None else self.recipe.engine

    @property
    def precision(self) -> Literal["fp32", "bf16", "fp16"]:
        return "fp32" if self.recipe is None else self.recipe.precision

    @property
    def options(self) -> dict[str, Any]:
        """The engine's run options from the recipe."""
        return {} if self.recipe is None else dict(self.recipe.options)

    @property
    def device(self) -> str:
        """Where the optimizer measured it (the CPU for the reference)."""
        return "cpu" if self.recipe is None else self.recipe.device

    @property
    def label(self) -> str:
        """The optimizer's words for it, else the engine and precision."""
        fallback = f"{self.engine} {self.precision}"
        return fallback if self.recipe is None else self.recipe.label or fallback

    def figures(self) -> dict[str, Any]:
        """What the optimizer measured (accuracy, timing); empty for the reference or when never measured."""
        return {} if self.recipe is None else read_json(self.path / FIGURES_FILE)

    def save_figures(self, figures: dict[str, Any]) -> None:
        write_atomic(self.path / FIGURES_FILE, json.dumps(figures, indent=2))

    def artifact_files(self, artifact: str | None = None) -> list[Path]:
        """The files an engine loads: the variant's own (not its recipe and figures); for the reference,
        or a variant that holds more than one engine's artifact (a QAT build: IR and QDQ ONNX), only the
        named ``artifact`` (default the reference engine's) with its weights or external data."""
        files = [p for p in self.path.iterdir() if p.is_file() and p.name not in (RECIPE_FILE, FIGURES_FILE)]
        name = artifact or ONNX_FILE
        held = {p.name for p in files} & {ONNX_FILE, IR_FILE, PT2_FILE}
        if self.recipe is None or (artifact in held and len(held) > 1):
            side = {name + EXTERNAL_DATA_SUFFIX, IR_WEIGHTS_FILE if name == IR_FILE else ""}
            files = [p for p in files if p.name == name or p.name in side]
        return files

    def artifact_bytes(self, artifact: str | None = None) -> int:
        return sum(p.stat().st_size for p in self.artifact_files(artifact))


def policy_versions(spec: ModelSpec, available: list[int]) -> list[int]:
    """The versions ``spec.serving``'s version policy serves out of ``available`` (ascending)."""
    s = spec.serving
    if s.version_policy == "all":
        return list(available)
    if s.version_policy == "specific":
        missing = [v for v in s.versions if v not in available]
        if missing:
            raise NotFoundError("version", missing[0], available, owner=f"model {spec.name!r}",
                                fix=f"serving.versions lists {missing}; import them or fix the list")  # fmt: skip
        return sorted(s.versions)
    return list(available[-s.num_versions :])


class Repository:
    """A directory of models, each with a spec and numbered versions."""

    def __init__(self, root: str | Path, *, show_root: bool = True) -> None:
        """``show_root=False`` (the server) keeps the repository's path out of every message."""
        self.root = Path(root)
        self._where = f"repository {self.root}" if show_root else "the repository"
        self._forms: list[str] | None = None
        self._bare: re.Pattern[str] | None = None

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
            self._bare = (
                None
                if os.sep in str(self.root)
                else re.compile(rf"(?<![\w.{re.escape(os.sep)}-]){re.escape(str(self.root) + os.sep)}")
            )
        for form in self._forms:
            text = text.replace(form + os.sep, "").replace(form, "the repository")
        return text if self._bare is None else self._bare.sub("", text)  # a root of one name, relative: "rr/m/1"

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
            if is_version_name(p.name) and _is_own_dir(p) and (p / MANIFEST_FILE).is_file()
        )

    def _missing(self, model: str) -> NotFoundError:
        return NotFoundError("model", model, self.models(), where=self._where)

    def spec(self, model: str) -> ModelSpec:
        path = self.model_dir(model) / SPEC_FILE
        if not path.is_file():
            raise self._missing(model)
        _confine(path, SPEC_FILE, f"model {model!r}: {SPEC_FILE}")
        return ModelSpec.from_yaml(read_text(path, f"{model}/{SPEC_FILE}"), source=f"{model}/{SPEC_FILE}")

    def resolve(self, model: str, version: int | None = None) -> tuple[int, Path]:
        """The version number and directory for ``version`` (the latest when None)."""
        versions = self.versions(model)
        if not versions:
            if not self.has_model(model):
                raise self._missing(model)
            raise NotFoundError("version", None, owner=f"model {model!r}", where=self._where,
                                fix="import one with `kiln import`")  # fmt: skip
        if version is None:
            version = versions[-1]
        elif not isinstance(version, int) or isinstance(version, bool) or version < 1:  # True == 1 to Python
            raise InvalidNameError("version", str(version), "is not a version number; versions are positive integers")
        elif version not in versions:
            raise NotFoundError("version", version, versions, owner=f"model {model!r}")
        return version, self.version_dir(model, version)

    def manifest(self, model: str, version: int | None = None) -> VersionManifest:
        version, vdir = self.resolve(model, version)
        return read_record(VersionManifest, vdir / MANIFEST_FILE, f"{model}/{version}/{MANIFEST_FILE}")

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

    # ---- variants ----------------------------------------------------------------------------------------
    def variant_ids(self, model: str, version: int | None = None) -> list[str]:
        """The variants built for a version (those whose recipe is stored)."""
        _, vdir = self.resolve(model, version)
        return sorted(p.name for p in (vdir / VARIANTS_DIR).glob("*") if _is_variant_dir(p))

    def variant(self, model: str, version: int | None = None, which: str = CHOSEN) -> Variant:
        """``which``: ``"chosen"`` (what ``kiln optimize`` chose, else the reference), ``"reference"`` (the
        imported artifact) or a variant id."""
        spec = self.spec(model)
        number, vdir = self.resolve(model, version)
        if which == CHOSEN:
            chosen = spec.chosen_variant
            which = chosen if chosen and _is_variant_dir(vdir / VARIANTS_DIR / chosen) else REFERENCE
            large = spec.chosen_large
            if which != REFERENCE and large is not None and _is_variant_dir(vdir / VARIANTS_DIR / large.variant):
                return dataclasses.replace(
                    self.variant(model, number, which), large=self.variant(model, number, large.variant),
                    large_from=large.from_rows,
                )  # fmt: skip
        if which == REFERENCE:
            return Variant(model, number, REFERENCE, spec, vdir, vdir)
        if not which or which.startswith(".") or any(c in which for c in "/\\\0"):
            raise InvalidNameError("variant", which, "is not a variant id (one path component, not hidden)")
        path = vdir / VARIANTS_DIR / which
        if not _is_variant_dir(path):
            available = [REFERENCE, *self.variant_ids(model, number)]
            raise NotFoundError("variant", which, available, owner=f"model {model!r} version {number}")
        recipe = read_record(
            VariantRecipe, path / RECIPE_FILE, f"{model}/{number}/{VARIANTS_DIR}/{which}/{RECIPE_FILE}"
        )
        return Variant(model, number, which, spec, vdir, path, recipe)

    def original(self, model: str, version: int | None = None) -> Variant:
        """The model as trained, for accuracy checks: the torch.export program when the version was
        imported from PyTorch (run on torch), else the reference."""
        reference = self.variant(model, version, REFERENCE)
        if (reference.path / PT2_FILE).is_file():
            return dataclasses.replace(reference, recipe=VariantRecipe(engine="torch", label="torch fp32"))
        return reference

    def find_variant(self, model: str, version: int, artifact_key: str) -> Variant | None:
        """A built variant whose files are those of ``artifact_key`` (it differs in run options only)."""
        for vid in self.variant_ids(model, version):
            found = self.variant(model, version, vid)
            if found.recipe is not None and found.recipe.artifact_key == artifact_key:
                return found
        return None

    @contextlib.contextmanager
    def new_variant(self, model: str, version: int) -> Iterator[Path]:
        """A staging directory to build a variant in; removed at exit unless :meth:`save_variant` took it."""
        variants = self.version_dir(model, version) / VARIANTS_DIR
        self._make_dir(variants, f"the variants of model {model!r} version {version}")
        staging = staging_dir(variants)
        try:
            yield staging
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def save_variant(self, model: str, version: int, staging: Path, recipe: VariantRecipe) -> Variant:
        """Publish the variant built in ``staging`` under ``recipe.variant_id``; when another process
        published it meanwhile, theirs is kept."""
        write_atomic(staging / RECIPE_FILE, recipe.model_dump_json(indent=2))
        path = self.version_dir(model, version) / VARIANTS_DIR / recipe.variant_id
        try:
            os.rename(staging, path)
        except OSError:
            if not _is_variant_dir(path):
                raise
        return self.variant(model, version, recipe.variant_id)

    def share_artifacts(self, donor: Variant, staging: Path, artifact: str | None = None) -> None:
        """Hard-link what ``donor`` runs into ``staging``: a built variant's files, or for the reference
        ``artifact`` and its external data. Passes replace files, never write through a link, so the
        version's own files stay as imported."""
        for p in donor.artifact_files(artifact):
            _link(p, staging / p.name)

    def stage(self, model: str, version: int, key: str) -> tuple[Path, list[dict[str, Any]]] | None:
        """A cached intermediate build (a compression prefix: its model.pt2, model.onnx and module weights),
        shared by every variant that starts with it, and the reports of its passes; None until
        :meth:`save_stage` stored it."""
        path = self.version_dir(model, version) / VARIANTS_DIR / f"{_STAGE_PREFIX}{key}"
        if not _is_own_dir(path) or not (path / _STAGE_REPORTS).is_file():
            return None
        with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):  # a damaged cache is rebuilt
            reports = json.loads((path / _STAGE_REPORTS).read_text())
            return path, reports if isinstance(reports, list) else []
        return None

    def save_stage(self, model: str, version: int, key: str, staging: Path, reports: list[dict[str, Any]]) -> Path:
        """Publish ``staging`` as the stage ``key`` (a stage another process published first is kept)."""
        write_atomic(staging / _STAGE_REPORTS, json.dumps(reports, indent=2))
        path = self.version_dir(model, version) / VARIANTS_DIR / f"{_STAGE_PREFIX}{key}"
        try:
            os.rename(staging, path)
        except OSError:
            if not _is_own_dir(path):
                raise
        return path

    def share_stage(self, stage: Path, staging: Path) -> None:
        """Hard-link a stage's artifacts into ``staging`` (a variant built on top of it)."""
        for p in stage.iterdir():
            if p.is_file() and p.name != _STAGE_REPORTS:
                _link(p, staging / p.name)

    @staticmethod
    def keep_artifact(staging: Path, artifact: str) -> None:
        """After a compression stage: leave in ``staging`` what an engine running ``artifact`` loads (drop the
        module weights and the other format), so the variant's size is what runs."""
        drop = [MODULE_WEIGHTS_FILE, *([PT2_FILE] if artifact != PT2_FILE else [])]
        if artifact == PT2_FILE:
            drop += [ONNX_FILE, ONNX_FILE + EXTERNAL_DATA_SUFFIX]
        for name in drop:
            with contextlib.suppress(FileNotFoundError):
                (staging / name).unlink()

    def skipped_variants(self, model: str, version: int) -> dict[str, str]:
        """Variant id -> why its pass had nothing to do on this model (remembered, so reruns skip it)."""
        return read_json(self.version_dir(model, version) / VARIANTS_DIR / SKIPS_FILE)

    def save_skipped_variants(self, model: str, version: int, skips: dict[str, str]) -> None:
        write_atomic(self.version_dir(model, version) / VARIANTS_DIR / SKIPS_FILE, json.dumps(skips, indent=2))

    def save_report(self, model: str, version: int, name: str, data: dict[str, Any]) -> Path:
        path = self.version_dir(model, version) / REPORT_DIR / name
        write_atomic(path, json.dumps(data, indent=2))
        return path

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
        self._make_dir(mdir, f"model {model!r}")
        staging = staging_dir(mdir)
        pending = PendingVersion(staging)
        try:
            yield pending
            if not (staging / MANIFEST_FILE).is_file():
                raise RuntimeError("new_version() block ended without commit_version()")
            pending.version = self._publish(mdir, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _make_dir(self, path: Path, what: str) -> None:
        """``mkdir -p path``; a file where one of its directories goes (the repository itself, or a model's
        folder) is a one-line error naming it, not an OS error."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            below = [path, *path.parents]
            blocker = next((p for p in reversed(below) if p.exists() and not p.is_dir()), None)
            if blocker is None:
                problem = f"cannot hold {what}: creating {path} failed ({exc.strerror or type(exc).__name__})"
                raise RepositoryUnreadableError(str(self.root), problem, "check its permissions") from None
            fix = ("pass a directory as --repo" if blocker == self.root
                   else f"move the file {blocker} away, or use another model name (--name)")  # fmt: skip
            problem = f"cannot hold {what}: {blocker} is a file, not a directory"
            raise RepositoryUnreadableError(str(self.root), problem, fix) from None

    def commit_version(self, staging: Path, **fields: Any) -> VersionManifest:
        """Hash every file in ``staging`` and write its manifest (the version number is set at publish)."""
        if not staging.is_dir():
            raise RuntimeError(f"the staging directory {staging} is gone; another process removed it")
        artifacts = {
            str(p.relative_to(staging)): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE
        }
        from kiln._version import __version__

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
            taken = [int(p.name) for p in mdir.iterdir() if is_version_name(p.name)]
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
        for p in self.model_dir(model).glob(f"{STAGING_PREFIX}*"):
            if is_abandoned(p):
                shutil.rmtree(p, ignore_errors=True)


def _is_variant_dir(path: Path) -> bool:
    return not path.name.startswith(".") and _is_own_dir(path) and (path / RECIPE_FILE).is_file()


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
