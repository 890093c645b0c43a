"""Which variants this machine can run: what each registered engine offers for this device and this
version (backend × precision × int8 kind × graph passes × compile), pruned to those asked for, with a
reason for everything left out. The planner knows no engine by name: engines declare their candidates."""

from __future__ import annotations

from pathlib import Path

from kiln.engines.base import get_engine
from kiln.errors import EngineUnavailableError
from kiln.hardware import Device
from kiln.optimize.config import OptimizeConfig
from kiln.recipe import COMPRESSION_PASSES, NO_TRAINING, PlanContext, Recipe, Skipped, step
from kiln.repository import ONNX_FILE, PT2_FILE

COMPRESSED = (ONNX_FILE, PT2_FILE)  # what a compression prefix writes: engines starting from these follow it


def plan_context(
    config: OptimizeConfig, version_dir: Path, device: Device, calibration: str | None, train: str | None = None
) -> PlanContext:
    """``calibration`` is the calibration data's fingerprint (None without any): it is a parameter of every
    calibrated pass, so new calibration data gives new variants instead of reusing ranges taken from the old."""
    return PlanContext(
        device=device,
        precisions=frozenset(config.precisions),
        int8=frozenset(config.int8) if device.int8.supported else frozenset(),
        graph_passes=config.graph_passes,
        calibration=calibration,
        artifacts=frozenset(p.name for p in version_dir.iterdir() if p.is_file()),
        calibration_methods=tuple(config.calibration_methods),
        per_channel=config.per_channel,
        compile_modes=tuple(config.compile_modes),
        compile_fp32=config.compile_fp32,
        openvino_hints=tuple(config.openvino_hints),
        train=train,
        train_budget_s=config.train_budget_s,
        qat=config.qat,
        settings=config.model_dump(),
    )


def enumerate_variants(
    config: OptimizeConfig,
    version_dir: Path,
    device: Device,
    calibration: str | None,
    train: str | None = None,
    untrainable: str | None = None,
) -> tuple[list[Recipe], list[Skipped]]:
    """The recipes to build on ``device`` and the families left out, with why. ``train`` is the training
    data's fingerprint (None without any); ``untrainable`` why this version cannot be fine-tuned at all."""
    trainable = untrainable is None and train is not None
    ctx = plan_context(config, version_dir, device, calibration, train if trainable else None)
    recipes: list[Recipe] = []
    skipped: list[Skipped] = []
    if "bf16" in ctx.precisions and not device.bf16.supported:
        skipped.append(Skipped("bf16 variants", device.bf16.reason))
    if "fp16" in ctx.precisions and not device.fp16.supported and device.kind == "cpu":
        skipped.append(Skipped("fp16 variants", device.fp16.reason))
    if config.int8 and not device.int8.supported:
        skipped.append(Skipped("int8 variants", device.int8.reason))
    for name in config.engines:
        try:
            engine = get_engine(name)
        except EngineUnavailableError as exc:
            skipped.append(Skipped(f"{name} variants", str(exc)))
            continue
        source = engine.source_artifact()
        why = engine.available()
        if why is None and source not in ctx.artifacts:
            why = f"this version has no {source}"
        if why is not None:
            skipped.append(Skipped(f"{name} variants", why))
            continue
        offered, left_out = engine.candidates(ctx)
        recipes += offered
        skipped += left_out
    if config.prune or config.qat:
        why = untrainable or (None if trainable else NO_TRAINING)
        if why is not None:
            asked = " and ".join(w for w, on in (("pruned", config.prune), ("QAT", config.qat)) if on)
            skipped.append(Skipped(f"{asked} variants", why))
        recipes += compressed(config, recipes, train if trainable else None)
    return _filter(config, recipes, device), skipped


def compressed(config: OptimizeConfig, recipes: list[Recipe], train: str | None) -> list[Recipe]:
    """Every recipe again after each pruning ratio and its distillation (prune → distill → the engine's own
    passes, int8 included), for the engines whose variants start from what compression writes."""
    if train is None:
        return []
    out = []
    for ratio in config.prune:
        prefix = (
            step(
                "prune-structured",
                ratio=ratio,
                round_to=8,
                **({"keep": config.prune_keep} if config.prune_keep else {}),
            ),
            step("distill", budget_s=config.train_budget_s, train=train),
        )
        for r in recipes:
            if any(p.name in COMPRESSION_PASSES for p in r.passes):
                continue
            if get_engine(r.engine).source_artifact() in COMPRESSED:
                out.append(r.model_copy(update={"passes": (*prefix, *r.passes)}))
    return out


def _filter(config: OptimizeConfig, recipes: list[Recipe], device: Device) -> list[Recipe]:
    if device.kind != "cpu":
        recipes = [r.model_copy(update={"device": device.id}) for r in recipes]
    kept = []
    for r in recipes:
        label = r.label()
        if r.is_reference:
            kept.append(r)  # each engine's fp32 reference stays: int8 is judged against it
        elif (config.include and not any(p in label for p in config.include)) or any(
            p in label for p in config.exclude
        ):
            continue
        else:
            kept.append(r)
    return kept
