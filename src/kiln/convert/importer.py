"""``import_model``: one entry point that turns a trained model into a repository version.

Each source framework has an importer (``from_pytorch``, ``from_onnx``; more register the same way)
that loads the source, fingerprints it, and stages the artifacts; this module owns the rest: the
spec, the compatibility check with earlier versions, the manifest, and the atomic publish.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.convert.parity import ParityResult
from kiln.errors import InvalidNameError, InvalidSourceError, KilnError, SpecError, spec_error
from kiln.files import STAGING_PREFIX
from kiln.repository import NAME_RULE, Repository, VersionManifest, check_model_name
from kiln.spec import DType, ModelSpec, ProcessingStep, ServingSettings, Task, TensorSpec


class ImportConfig(BaseModel):
    """How to import a model. Fields a source does not need are ignored by its importer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, description=f"the model's name in the repository: {NAME_RULE}")
    task: Task = "generic"
    labels: list[str] | None = None
    input_shapes: list[tuple[int, ...]] | None = Field(
        default=None, description="example shape per input, batch first (for ONNX: the sizes of its dynamic dims)"
    )
    dims: dict[str, Annotated[int, Field(ge=1)]] | None = Field(
        default=None,
        description="sizes of an ONNX model's named dynamic dims, {'seq': 128}: the import check runs at them and "
        "they become the example shapes (default: sizes kiln finds the model runs at)",
    )
    input_dtypes: list[DType] | None = None
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    dynamic_batch: bool = True
    dynamic_axes: dict[str, dict[int, str]] | None = Field(
        default=None,
        description="dynamic dims besides batch, per input: {'ids': {1: 'seq'}}; one name shared by inputs is one dim",
    )
    trust_pickle: bool = Field(
        default=False, description="allow loading pickles (scikit-learn .pkl/.joblib): they run code from the file"
    )
    assets: list[Path] | None = Field(
        default=None, description="files copied into the version (a tokenizer.json); steps name them relative to it"
    )
    preprocess: list[ProcessingStep] | None = Field(default=None, description="pre-processing steps for the spec")
    postprocess: list[ProcessingStep] | None = Field(default=None, description="post-processing steps for the spec")
    weights: Path | None = Field(default=None, description="safetensors file or a state_dict (.pt/.pth)")
    atol: float = Field(default=1e-4, ge=0)
    rtol: float = Field(default=1e-3, ge=0)
    opset: int | None = Field(default=None, ge=7)
    force: bool = Field(default=False, description="import again even if this exact source is already a version")

    @field_validator("name")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        """The repository's own rule and words (the pattern alone told a user nothing)."""
        if value is None:
            return None
        try:
            return check_model_name(value)
        except InvalidNameError as exc:  # pydantic names the option; the problem is the repository's words
            raise ValueError(exc.problem) from None

    @field_validator("opset")
    @classmethod
    def _known_opset(cls, value: int | None) -> int | None:
        """An opset past the installed onnx's newest is refused here: the exporter would log a traceback and
        quietly write another opset."""
        import onnx

        newest = onnx.defs.onnx_opset_version()
        if value is not None and value > newest:
            raise ValueError(f"must be at most {newest}, the newest opset the installed onnx knows, not {value}")
        return value


@dataclass
class Staged:
    """What an importer produced in the staging directory."""

    framework: str
    exporter: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batched: bool
    parity: list[ParityResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    labels: list[str] | None = None  # what the source knows (a classifier's classes)
    task: Task | None = None


class Importer(Protocol):
    framework: str
    default_name: str

    def source_hash(self) -> str: ...

    def stage(self, staging: Path) -> Staged: ...


@dataclass
class ImportResult:
    model: str
    version: int
    path: Path
    spec: ModelSpec
    manifest: VersionManifest
    reused: bool
    notes: list[str] = field(default_factory=list)


ImporterFactory = Callable[[Any, ImportConfig], Importer]
_BY_SUFFIX: dict[str, str] = {
    ".onnx": "onnx",
    ".keras": "keras",
    ".h5": "keras",
    ".pkl": "sklearn",
    ".pickle": "sklearn",
    ".joblib": "sklearn",
    ".pt": "torchscript",
    ".pt2": "torch_export",
}
_IMPORTERS: dict[str, str] = {
    "onnx": "kiln.convert.from_onnx:OnnxImporter",
    "pytorch": "kiln.convert.from_pytorch:TorchImporter",
    "keras": "kiln.convert.from_keras:KerasImporter",
    "sklearn": "kiln.convert.from_sklearn:SklearnImporter",
    "torchscript": "kiln.convert.from_torch_files:TorchScriptImporter",
    "torch_export": "kiln.convert.from_torch_files:ExportedProgramImporter",
}


def _object_format(source: Any) -> str:
    """Python objects: a scikit-learn estimator, a Keras model, else PyTorch (a module or a factory)."""
    module = type(source).__module__.split(".")[0]
    if module == "sklearn" or (hasattr(source, "fit") and hasattr(source, "get_params")):
        return "sklearn"
    if module == "keras":
        return "keras"
    return "pytorch"


def detect_format(source: Any) -> str:
    """Which importer reads ``source``: a file by suffix, a factory path, or a Python object."""
    from kiln.convert.factory import is_factory_path

    if not isinstance(source, (str, Path)):
        return _object_format(source)
    text = str(source)
    path = Path(text)
    if path.suffix.lower() in _BY_SUFFIX:
        if not path.is_file():
            raise InvalidSourceError(text, "file not found")
        return _BY_SUFFIX[path.suffix.lower()]
    if not path.exists() and is_factory_path(text):
        return "pytorch"
    if not path.exists():
        raise InvalidSourceError(text, "no such file, and not a factory path like 'package.module:callable'")
    raise InvalidSourceError(
        text, f"unknown model format {path.suffix or '(no suffix)'!r}; kiln imports {sorted(_BY_SUFFIX)} files "
        "and PyTorch factories 'package.module:callable'"
    )  # fmt: skip


def make_importer(source: Any, config: ImportConfig) -> Importer:
    import importlib

    fmt = detect_format(source)
    module, _, cls = _IMPORTERS[fmt].partition(":")
    factory: ImporterFactory = getattr(importlib.import_module(module), cls)
    return factory(source, config)


def import_model(
    source: Any, repo: str | Path | Repository, config: ImportConfig | None = None, **overrides: Any
) -> ImportResult:
    """Import ``source`` as a new version: an ONNX file, a PyTorch factory path or ``nn.Module``, a
    Keras ``.keras``/``.h5`` file or model, a scikit-learn estimator or pickle (``trust_pickle=True``),
    a TorchScript ``.pt`` or a ``torch.export`` ``.pt2`` file.

    The same source imported twice gives back the existing version (``reused=True``) unless
    ``force=True``. Keyword arguments override fields of ``config``.
    """
    try:
        config = ImportConfig.model_validate({**(config.model_dump() if config else {}), **overrides})
    except ValidationError as exc:
        raise spec_error(exc, "import option") from None
    if config.preprocess is not None or config.postprocess is not None:
        from kiln.processing import check_steps

        check_steps(config.preprocess or [], config.postprocess or [])
    repository = repo if isinstance(repo, Repository) else Repository(repo)
    importer = make_importer(source, config)
    name = config.name or _safe_name(importer.default_name)
    source_hash = _with_assets(importer.source_hash(), config.assets or [], str(source))
    if not config.force and repository.has_model(name):
        existing = repository.find_source(name, source_hash)
        if existing is not None:
            _, vdir = repository.resolve(name, existing)
            return ImportResult(
                name, existing, vdir, repository.spec(name), repository.manifest(name, existing), reused=True,
                notes=[f"{source} is already version {existing} of {name!r}; nothing imported (--force imports it again)"],
            )  # fmt: skip
    repository.cleanup_staging(name)
    with _nothing_half_made(repository, name), repository.new_version(name) as pending:
        staged = importer.stage(pending.path)
        _copy_assets(config.assets or [], pending.path)
        spec = _build_spec(repository, name, config, staged)
        repository.check_compatible(spec)
        manifest = repository.commit_version(
            pending.path, framework=staged.framework, source=str(source) if isinstance(source, (str, Path))
            else f"<{type(source).__name__} object>", source_hash=source_hash, exporter=staged.exporter,
            parity=[p.to_dict() for p in staged.parity],
        )  # fmt: skip
        repository.save_spec(spec)
    if pending.version is None:  # new_version() publishes or raises; this keeps the type checker honest
        raise RuntimeError(f"the new version of {name!r} was not published")
    manifest = repository.manifest(name, pending.version)
    return ImportResult(name, pending.version, repository.root / name / str(pending.version), spec, manifest,
                        reused=False, notes=staged.notes)  # fmt: skip


@contextlib.contextmanager
def _nothing_half_made(repository: Repository, name: str) -> Iterator[None]:
    """A failed import leaves nothing behind: the model folder (and the repository) it created are removed
    when empty, and an error that names a file in the hidden staging directory names it in the model instead."""
    created = [d for d in (repository.root, repository.model_dir(name)) if not d.exists()]
    try:
        yield
    except KilnError as exc:
        _remove_empty(created)
        shown = f"{repository.root / name}/<new version>/"
        sep = re.escape(os.sep)
        pattern = re.compile(rf"[^\s'\"]*{sep}{re.escape(STAGING_PREFIX)}[^\s'\"{sep}]*{sep}?")
        for key, value in list(vars(exc).items()):
            if isinstance(value, str):
                setattr(exc, key, pattern.sub(shown, value))
        exc.args = (exc.message,)
        raise
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(created: list[Path]) -> None:
    for d in reversed(created):  # the model folder, then the repository
        with contextlib.suppress(OSError):
            d.rmdir()  # only when empty: another import may have put something there meanwhile


def _with_assets(source_hash: str, assets: list[Path], source: str) -> str:
    """The source hash extended with the assets' names and contents (a new tokenizer is a new version)."""
    if not assets:
        return source_hash
    import hashlib

    from kiln.files import sha256_file

    h = hashlib.sha256(source_hash.encode())
    for path in assets:
        if not Path(path).is_file():
            raise InvalidSourceError(source, f"asset {path} does not exist")
        h.update(f"{Path(path).name}|{sha256_file(Path(path))}".encode())
    return h.hexdigest()


def _copy_assets(assets: list[Path], staging: Path) -> None:
    import shutil

    for path in assets:
        dst = staging / Path(path).name
        if dst.exists():
            raise SpecError(f"asset {path}: the version already holds a file named {dst.name!r}; rename the asset")
        shutil.copyfile(path, dst)


def _build_spec(repository: Repository, name: str, config: ImportConfig, staged: Staged) -> ModelSpec:
    base: dict[str, Any] = {}
    if repository.has_model(name):
        # A new version keeps what the user set on the model: labels, processing, serving settings.
        base = repository.spec(name).model_dump(exclude={"inputs", "outputs", "chosen_variant", "chosen_large"})
    serving = ServingSettings.model_validate(base.get("serving", {}))
    if not staged.batched:
        serving = serving.model_copy(update={"max_batch_size": 0})
    data = {
        **base,
        "name": name,
        "task": config.task if config.task != "generic" or "task" not in base else base["task"],
        "inputs": staged.inputs,
        "outputs": staged.outputs,
        "serving": serving,
    }
    if config.task == "generic" and "task" not in base and staged.task is not None:
        data["task"] = staged.task
    if config.labels is not None:
        data["labels"] = config.labels
    elif staged.labels is not None and "labels" not in base:
        data["labels"] = staged.labels
    for kind in ("preprocess", "postprocess"):
        steps = getattr(config, kind)
        if steps is not None:
            data[kind] = steps
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as exc:
        raise spec_error(exc, f"spec for {name!r}:", empty="spec") from None


def _safe_name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", raw).strip("-.") or "model"
    return name
