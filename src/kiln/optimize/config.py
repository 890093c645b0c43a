"""What to search and what to keep: :class:`OptimizeConfig`, its presets, and the recipe of a variant.

A :class:`Recipe` says how a variant is built (passes over the imported artifact) and how it runs
(engine, precision, run options). Its id derives from the recipe and the version's source hash, so
the same recipe on the same model is never built twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kiln.errors import SpecError

EngineName = Literal["onnxruntime", "openvino", "torch"]
PrecisionName = Literal["fp32", "bf16", "fp16"]
Int8Kind = Literal["ort-dynamic", "ort-static", "nncf", "torch-dynamic"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CompileModeName = Literal["default", "max-autotune", "reduce-overhead"]
Objective = Literal["latency", "throughput"]
Metric = Literal["auto", "top1", "agreement", "cosine", "map50", "sqnr", "max-abs"]
Hint = Literal["latency", "throughput"]

ENGINES: tuple[EngineName, ...] = ("onnxruntime", "openvino", "torch")
INT8_KINDS: tuple[Int8Kind, ...] = ("ort-dynamic", "ort-static", "nncf", "torch-dynamic")
CALIBRATION_METHODS: tuple[CalibrationMethod, ...] = ("minmax", "entropy", "percentile")
PRECISIONS: tuple[PrecisionName, ...] = ("fp32", "bf16", "fp16")
DEFAULT_COMPILE: tuple[CompileModeName, ...] = ("default",)
DEFAULT_HINTS: tuple[Hint, ...] = ("latency",)

# Presets: a table of defaults; fields the caller sets win. (optimum's optimization levels.)
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-latency": {"objective": "latency", "compile_modes": ["default"], "openvino_hints": ["latency"]},
    "cpu-throughput": {"objective": "throughput", "compile_modes": ["default"], "openvino_hints": ["throughput"]},
    # Variants that build in seconds: no torch.compile, one calibration method. `kiln demo` uses it.
    "quick": {
        "objective": "latency",
        "compile_modes": [],
        "calibration_methods": ["minmax"],
        "openvino_hints": ["latency"],
        "min_time_s": 0.25,
    },
    # Everything, max-autotune and both OpenVINO hints included: slow, for a final pick.
    "thorough": {
        "compile_modes": ["default", "max-autotune"],
        "compile_fp32": True,
        "openvino_hints": ["latency", "throughput"],
        "min_time_s": 1.0,
    },
}


class OptimizeConfig(BaseModel):
    """How ``kiln.optimize`` searches: what it may build, the accuracy budget, and how it times."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: str | None = Field(default=None, description=f"defaults from a table: {sorted(PRESETS)}")
    objective: Objective = "latency"
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N")
    # ---- accuracy budget ---------------------------------------------------------------------------
    metric: Metric = Field(
        default="auto",
        description="auto: top1 with labels, map50 for detection with boxes, cosine for embeddings, else sqnr",
    )
    max_drop: float = Field(default=0.01, ge=0, le=1, description="allowed drop of top1/agreement/cosine/map50")
    min_sqnr_db: float = Field(default=30.0, description="the bound when the metric is sqnr")
    max_abs_error: float | None = Field(default=None, gt=0, description="also bound the max abs error")
    # ---- what to build -----------------------------------------------------------------------------
    engines: list[EngineName] = Field(default_factory=lambda: list(ENGINES))
    precisions: list[PrecisionName] = Field(default_factory=lambda: list(PRECISIONS))
    int8: list[Int8Kind] = Field(default_factory=lambda: list(INT8_KINDS))
    calibration_methods: list[CalibrationMethod] = Field(default_factory=lambda: list(CALIBRATION_METHODS))
    per_channel: bool = True
    graph_passes: bool = True
    compile_modes: list[CompileModeName] = Field(default_factory=lambda: list(DEFAULT_COMPILE))
    compile_fp32: bool = Field(default=False, description="also compile in fp32 (bf16 + freezing is tried first)")
    openvino_hints: list[Hint] = Field(default_factory=lambda: list(DEFAULT_HINTS))
    include: list[str] = Field(default_factory=list, description="keep only variants whose label has one of these")
    exclude: list[str] = Field(default_factory=list, description="drop variants whose label has one of these")
    # ---- data --------------------------------------------------------------------------------------
    data: str | None = Field(default=None, description="a .npz file or 'module:callable'; default: the zoo's split")
    calibration_samples: int = Field(default=128, ge=1)
    validation_samples: int = Field(default=512, ge=1)
    # ---- timing ------------------------------------------------------------------------------------
    batch_size: int = Field(default=16, ge=1, description="batch for throughput and for the accuracy run")
    threads: int | None = Field(default=None, ge=1, description="intra-op threads (default: physical cores)")
    min_time_s: float = Field(default=0.5, gt=0, description="minimum timed seconds per variant and batch size")
    warmup: int = Field(default=10, ge=1)
    finalists: int = Field(default=3, ge=0, description="fastest variants timed again, interleaved, before choosing")
    retime: bool = Field(default=False, description="time cached variants again instead of reusing figures")
    choose: bool = Field(default=True, description="record the choice in the model's spec")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
            data = {**PRESETS[name], **{k: v for k, v in data.items() if v is not None}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> OptimizeConfig:
        if self.metric == "max-abs" and self.max_abs_error is None:
            raise ValueError("metric 'max-abs' needs max_abs_error (--max-abs-error)")
        if not self.engines:
            raise ValueError("engines is empty: name at least one of " + ", ".join(ENGINES))
        return self

    @classmethod
    def build(cls, config: OptimizeConfig | None = None, **overrides: Any) -> OptimizeConfig:
        """A config from an optional base plus keyword overrides; bad values raise :class:`SpecError`."""
        base = config.model_dump(exclude_unset=True) if config is not None else {}
        try:
            return cls.model_validate({**base, **overrides})
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(map(str, err["loc"])) or "config"
            raise SpecError(f"optimize option {loc}: {err['msg']}") from None

    def budget_text(self, metric: str) -> str:
        rule = {
            "top1": f"top-1 drop ≤ {self.max_drop:g}",
            "agreement": f"top-1 agreement with fp32 ≥ {1 - self.max_drop:g}",
            "cosine": f"mean cosine ≥ {1 - self.max_drop:g}",
            "map50": f"mAP@0.5 drop ≤ {self.max_drop:g}",
            "sqnr": f"SQNR ≥ {self.min_sqnr_db:g} dB",
            "max-abs": f"max abs error ≤ {self.max_abs_error:g}" if self.max_abs_error else "max abs error",
        }[metric]
        if self.max_abs_error is not None and metric != "max-abs":
            rule += f", max abs error ≤ {self.max_abs_error:g}"
        return rule


class PassStep(BaseModel):
    """One registered pass and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    """How one variant is built and run. ``options`` become the engine's run options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: EngineName
    precision: PrecisionName = "fp32"
    int8: Int8Kind | None = None
    passes: tuple[PassStep, ...] = ()
    options: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"  # where it was measured and runs by default ("cuda:0" …)

    @property
    def base_artifact(self) -> str:
        return "model.pt2" if self.engine == "torch" else "model.onnx"

    @property
    def is_reference(self) -> bool:
        """The engine's plain fp32 run of the imported model (OpenVINO's after conversion): what its
        int8 variants must beat."""
        return (
            self.int8 is None
            and self.precision == "fp32"
            and not self.options.get("compile")
            and all(p.name == "ov-convert" for p in self.passes)
        )

    def label(self) -> str:
        """A readable name: ``onnxruntime int8 static-entropy + onnxslim``."""
        parts: list[str] = [self.engine]
        if self.int8:
            kind = self.int8.split("-", 1)[-1] if self.int8 != "nncf" else "nncf"
            method = next((p.params.get("method") for p in self.passes if "method" in p.params), None)
            parts.append(f"int8 {kind}" + (f"-{method}" if method else ""))
            if self.precision != "fp32":
                parts.append(f"({self.precision} rest)")
        else:
            cast = self.options.get("cast")
            parts.append(
                self.precision + ("" if self.precision == "fp32" or cast is None else " cast" if cast else " autocast")
            )
        if self.options.get("compile"):
            parts.append(f"compile {self.options['compile']}" + (" +freezing" if self.options.get("freezing") else ""))
        graph = [p.name for p in self.passes if p.name in GRAPH_PASS_NAMES]
        if graph:
            parts.append("+ " + "+".join(graph))
        if self.engine == "openvino" and self.options.get("hint", "latency") != "latency":
            parts.append(f"[{self.options['hint']}]")
        if self.options.get("tensorrt"):
            parts.append("[tensorrt]")
        return " ".join(parts)

    def artifact_key(self, source_hash: str) -> str:
        """Identifies the built files: variants differing only in run options share them."""
        payload = {"source": source_hash, "base": self.base_artifact, "passes": [p.model_dump() for p in self.passes]}
        return _digest(payload)[:16]

    def variant_id(self, source_hash: str) -> str:
        # the default device stays out of the payload, so CPU variant ids read as they always have
        payload = {
            "source": source_hash,
            **self.model_dump(mode="json", exclude={"device"} if self.device == "cpu" else None),
        }
        slug = "-".join(w for w in self.label().replace("+", " ").replace("(", "").replace(")", "").split() if w)
        slug = slug.replace("onnxruntime", "ort").replace("openvino", "ov")[:48].strip("-")
        return f"{slug}-{_digest(payload)[:8]}"


GRAPH_PASS_NAMES = ("onnxslim", "ort-optimize", "fold-conv-bn")


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def resolve_data_path(data: str | None) -> str | None:
    """``~`` expanded; left as text because ``module:callable`` is not a path."""
    if data is None:
        return None
    return str(Path(data).expanduser()) if data.endswith(".npz") else data
