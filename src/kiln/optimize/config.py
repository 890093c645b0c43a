"""What to search and what to keep: :class:`OptimizeConfig` and its presets. (The recipe of a variant,
what the engines offer and the repository stores, is :mod:`kiln.recipe`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.errors import spec_error
from kiln.recipe import Int8Kind, PrecisionName

CalibrationMethod = Literal["minmax", "entropy", "percentile"]
CompileModeName = Literal["default", "max-autotune", "reduce-overhead"]
Objective = Literal["latency", "throughput"]
Metric = Literal["auto", "top1", "agreement", "cosine", "map50", "sqnr", "max-abs"]
Hint = Literal["latency", "throughput"]

ENGINES = ("torch", "onnxruntime", "openvino")  # kiln's own, in the order the search tries them
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
    # Compression too: channels pruned by half then distilled, and quantization-aware training.
    "compress": {"prune": [0.5], "qat": True},
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

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # nan passes every bound

    preset: str | None = Field(default=None, description=f"defaults from a table: {sorted(PRESETS)}")
    objective: Objective = "latency"
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N")
    # ---- accuracy budget ---------------------------------------------------------------------------
    metric: Metric = Field(
        default="auto",
        description="auto: top1 with labels, map50 for detection with boxes, cosine for embeddings, else sqnr",
    )
    max_drop: float = Field(default=0.01, ge=0, le=1, description="allowed drop of top1/agreement/cosine/map50")
    min_sqnr_db: float = Field(default=30.0, ge=0, description="the bound when the metric is sqnr")
    max_abs_error: float | None = Field(default=None, gt=0, description="also bound the max abs error")
    # ---- what to build -----------------------------------------------------------------------------
    engines: list[str] = Field(default_factory=lambda: _default_engines(), description="registered engine names")
    precisions: list[PrecisionName] = Field(default_factory=lambda: list(PRECISIONS))
    int8: list[Int8Kind] = Field(default_factory=lambda: list(INT8_KINDS))
    calibration_methods: list[CalibrationMethod] = Field(default_factory=lambda: list(CALIBRATION_METHODS))
    per_channel: bool = True
    graph_passes: bool = True
    compile_modes: list[CompileModeName] = Field(default_factory=lambda: list(DEFAULT_COMPILE))
    compile_fp32: bool = Field(default=False, description="also compile in fp32 (bf16 + freezing is tried first)")
    openvino_hints: list[Hint] = Field(default_factory=lambda: list(DEFAULT_HINTS))
    prune: list[float] = Field(
        default_factory=list, description="structured pruning ratios, each followed by distillation"
    )
    prune_keep: list[str] = Field(default_factory=list, description="modules (by name) pruning leaves as they are")
    qat: bool = Field(default=False, description="also quantization-aware training (NNCF, run on OpenVINO)")
    include: list[str] = Field(default_factory=list, description="keep only variants whose label has one of these")
    exclude: list[str] = Field(default_factory=list, description="drop variants whose label has one of these")
    # ---- data --------------------------------------------------------------------------------------
    data: str | None = Field(default=None, description="a .npz file or 'module:callable'; default: the zoo's split")
    train_data: str | None = Field(default=None, description="data to fine-tune on (.npz or 'module:callable')")
    train_budget_s: float = Field(default=120.0, gt=0, description="seconds each fine-tuning pass may take")
    calibration_samples: int = Field(default=128, ge=1)
    validation_samples: int = Field(default=512, ge=1)
    # ---- timing ------------------------------------------------------------------------------------
    batch_size: int = Field(default=16, ge=1, description="batch for throughput and for the accuracy run")
    threads: int | None = Field(default=None, ge=1, description="intra-op threads (default: physical cores)")
    min_time_s: float = Field(default=0.5, gt=0, description="minimum timed seconds per variant and batch size")
    warmup: int = Field(default=10, ge=1)
    finalists: int = Field(default=3, ge=0, description="fastest variants timed again, interleaved, before choosing")
    retime: bool = Field(default=False, description="time cached variants again instead of reusing figures")
    replace: bool = Field(
        default=False, description="record this run's choice even over a faster earlier one it did not measure"
    )
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

    @field_validator("engines")
    @classmethod
    def _known_engines(cls, engines: list[str]) -> list[str]:
        from kiln.engines.base import available_engines

        known = available_engines()
        for name in engines:
            if name not in known:
                raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(known)}")
        return engines

    @field_validator("prune")
    @classmethod
    def _ratios(cls, ratios: list[float]) -> list[float]:
        for r in ratios:
            if not 0 < r < 1:
                raise ValueError(f"pruning ratio {r:g} is not between 0 and 1 (0.5 removes half the channels)")
        return sorted(set(ratios))

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
            raise spec_error(exc, "optimize option", empty="config") from None

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


def _default_engines() -> list[str]:
    """kiln's engines, then any registered by a plug-in."""
    from kiln.engines.base import available_engines

    return [*ENGINES, *(e for e in available_engines() if e not in ENGINES)]


def resolve_data_path(data: str | None) -> str | None:
    """``~`` expanded; left as text because ``module:callable`` is not a path."""
    if data is None:
        return None
    return str(Path(data).expanduser()) if data.endswith(".npz") else data
