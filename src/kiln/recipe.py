"""The recipe of a variant, shared by the engines that offer them, the optimizer that builds them and the
repository that stores them.

A :class:`Recipe` says how a variant is built (passes over the imported artifact) and how it runs
(engine, precision, run options). Its id derives from the recipe and the version's source hash, so
the same recipe on the same model is never built twice. Engines describe their own run options in
:meth:`Recipe.label`; nothing here knows one engine from another.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from kiln.hardware import Device

PrecisionName = Literal["fp32", "bf16", "fp16"]
Int8Kind = Literal["ort-dynamic", "ort-static", "nncf", "torch-dynamic", "nncf-qat"]
GRAPH_PASS_NAMES = ("onnxslim", "ort-optimize", "fold-conv-bn")
# Passes that change the model itself on the torch side and write both model.pt2 and model.onnx, so any
# engine's usual passes can follow them; the search builds such a prefix once and reuses it.
COMPRESSION_PASSES = ("prune-structured", "distill")
NO_CALIBRATION = "static int8 needs calibration data (--data, or a zoo model's own split); none was given"
NO_TRAINING = "needs training data (--train-data, or a zoo model's training split); never fine-tuned on random noise"
# What one quantization-aware fine-tune writes: an OpenVINO IR with FakeQuantize ops and an ONNX graph with
# QuantizeLinear/DequantizeLinear pairs, so the OpenVINO and ONNX Runtime variants share one training run.
QAT_EXPORTS = ("openvino-ir", "onnx-qdq")


class PassStep(BaseModel):
    """One registered pass and its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


def step(name: str, **params: Any) -> PassStep:
    return PassStep(name=name, params=params)


@dataclass(frozen=True)
class Skipped:
    """A variant (or a family of them) not built, and why."""

    label: str
    reason: str


@dataclass(frozen=True)
class PlanContext:
    """What an engine's candidates depend on: the device's facts, what the user asked the search to try,
    the files the version holds and the calibration data's fingerprint (None without any)."""

    device: Device
    precisions: frozenset[str]
    int8: frozenset[str]  # the int8 kinds asked for that the device can run
    graph_passes: bool
    calibration: str | None
    artifacts: frozenset[str]  # file names in the version directory
    calibration_methods: tuple[str, ...] = ()
    per_channel: bool = True
    compile_modes: tuple[str, ...] = ()
    compile_fp32: bool = False
    openvino_hints: tuple[str, ...] = ("latency",)
    train: str | None = None  # the training data's fingerprint; None: nothing to fine-tune on
    train_budget_s: float = 120.0
    qat: bool = False  # quantization-aware training asked for
    settings: Mapping[str, Any] = field(default_factory=dict)  # anything else of the config, by field name

    def qat_step(self, label: str) -> tuple[PassStep | None, list[Skipped]]:
        """The quantization-aware training step (None where QAT was not asked for or there is nothing to
        train on) and why it is left out. Every engine offers the same step, so the search fine-tunes once
        and the variants share its files (one artifact key)."""
        if not self.qat or self.train is None:
            return None, []
        if self.calibration is None:
            return None, [Skipped(f"{label} int8 qat", NO_CALIBRATION)]
        qat = step("qat-int8", budget_s=self.train_budget_s, calibration=self.calibration, train=self.train,
                   exports=list(QAT_EXPORTS))  # fmt: skip
        return qat, []

    def plain(self, engine: str) -> Recipe:
        """The engine's plain fp32 run of the imported artifact."""
        return Recipe(engine=engine)

    @property
    def bf16(self) -> bool:
        return "bf16" in self.precisions and self.device.bf16.supported

    @property
    def fp16(self) -> bool:
        return "fp16" in self.precisions and self.device.fp16.supported


class Recipe(BaseModel):
    """How one variant is built and run. ``options`` become the engine's run options (the engine's typed
    options model checks them when it loads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: str
    precision: PrecisionName = "fp32"
    int8: Int8Kind | None = None
    passes: tuple[PassStep, ...] = ()
    options: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"  # where it was measured and runs by default ("cuda:0" …)

    @property
    def base_artifact(self) -> str:
        """The imported file the passes start from (the engine's source artifact)."""
        from kiln.engines.base import get_engine

        return get_engine(self.engine).source_artifact()

    @property
    def is_reference(self) -> bool:
        """The engine's plain fp32 run of the imported model (after a format conversion, if the engine
        needs one): what its int8 variants must beat."""
        from kiln.engines.base import get_engine

        cls = get_engine(self.engine)
        return (
            self.int8 is None
            and self.precision == "fp32"
            and cls.is_plain(self.options)
            and all(p.name in cls.conversion_passes for p in self.passes)
        )

    def label(self) -> str:
        """A readable name: ``onnxruntime int8 static-entropy + onnxslim``."""
        from kiln.engines.base import get_engine

        extra = get_engine(self.engine).describe(self.options)
        parts: list[str] = [self.engine]
        if self.int8:
            kind = self.int8.split("-", 1)[-1] if self.int8 != "nncf" else "nncf"
            method = next((p.params.get("method") for p in self.passes if "method" in p.params), None)
            parts.append(f"int8 {kind}" + (f"-{method}" if method else ""))
            if self.precision != "fp32":
                parts.append(f"({self.precision} rest)")
        else:
            parts.append(self.precision + ("" if self.precision == "fp32" else extra.precision_suffix))
        parts += extra.middle
        graph = [_word(p) for p in self.passes if p.name in (*COMPRESSION_PASSES, *GRAPH_PASS_NAMES)]
        if graph:
            parts.append("+ " + "+".join(graph))
        parts += extra.tail
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


def compression_prefix(passes: tuple[PassStep, ...]) -> tuple[PassStep, ...]:
    """The leading passes that compress the model on the torch side (what the search caches as a stage)."""
    n = 0
    while n < len(passes) and passes[n].name in COMPRESSION_PASSES:
        n += 1
    return passes[:n]


def stage_key(source_hash: str, passes: tuple[PassStep, ...]) -> str:
    """Identifies what a compression prefix builds from this source: its files serve any engine."""
    return _digest({"source": source_hash, "passes": [p.model_dump() for p in passes]})[:16]


def _word(p: PassStep) -> str:
    if p.name == "prune-structured":
        return f"prune{round(float(p.params.get('ratio', 0)) * 100)}"
    return p.name


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
