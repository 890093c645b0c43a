"""Which variants this machine can run: backend × precision × int8 kind × graph passes × compile,
pruned to those that can win, with a reason for everything left out."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.hardware import Device, machine_fingerprint
from kiln.optimize.config import OptimizeConfig, PassStep, PrecisionName, Recipe
from kiln.optimize.passes.quantize import NO_CALIBRATION


@dataclass(frozen=True)
class Skipped:
    """A variant (or a family of them) not built, and why."""

    label: str
    reason: str


def _step(name: str, **params: Any) -> PassStep:
    return PassStep(name=name, params=params)


def enumerate_variants(
    config: OptimizeConfig, version_dir: Path, device: Device, calibration: str | None
) -> tuple[list[Recipe], list[Skipped]]:
    """The recipes to build on ``device`` and the families left out, with why. ``calibration`` is the
    calibration data's fingerprint (None without any): it is a parameter of every calibrated pass, so
    new calibration data gives new variants instead of reusing ranges taken from the old."""
    has_calibration = calibration is not None
    recipes: list[Recipe] = []
    skipped: list[Skipped] = []
    precisions = set(config.precisions)
    bf16 = "bf16" in precisions and device.bf16.supported
    fp16 = "fp16" in precisions and device.fp16.supported
    if "bf16" in precisions and not device.bf16.supported:
        skipped.append(Skipped("bf16 variants", device.bf16.reason))
    if "fp16" in precisions and not device.fp16.supported and device.kind == "cpu":
        skipped.append(Skipped("fp16 variants", device.fp16.reason))
    int8 = set(config.int8) if device.int8.supported else set()
    if config.int8 and not device.int8.supported:
        skipped.append(Skipped("int8 variants", device.int8.reason))
    slim = [_step("onnxslim")] if config.graph_passes else []
    has_pt2 = (version_dir / "model.pt2").is_file()
    has_onnx = (version_dir / "model.onnx").is_file()

    if "torch" in config.engines and not has_pt2:
        skipped.append(Skipped("torch variants", "this version has no model.pt2 (imported from ONNX)"))
    elif "torch" in config.engines:
        recipes.append(Recipe(engine="torch"))
        reduced: tuple[tuple[PrecisionName, bool], ...] = (("bf16", bf16), ("fp16", fp16))
        for precision, ok in reduced:
            if ok:
                recipes.append(Recipe(engine="torch", precision=precision, options={"cast": False}))
                recipes.append(Recipe(engine="torch", precision=precision, options={"cast": True}))
        if config.graph_passes:
            recipes.append(Recipe(engine="torch", passes=(_step("fold-conv-bn"),)))
        if "torch-dynamic" in int8:
            if device.kind == "cpu":
                recipes.append(Recipe(engine="torch", int8="torch-dynamic", passes=(_step("torch-dynamic"),),
                                      options={"quantize": "dynamic-int8"}))  # fmt: skip
            else:
                skipped.append(Skipped("torch int8 dynamic", "torch dynamic quantization runs on the CPU only"))
        low: PrecisionName = "bf16" if bf16 else "fp32"
        for mode in config.compile_modes:
            if mode == "reduce-overhead" and device.kind == "cpu":
                skipped.append(Skipped("torch compile reduce-overhead", "uses CUDA graphs: CUDA only"))
                continue
            opts: dict[str, Any] = {"compile": mode, "freezing": True}
            recipes.append(
                Recipe(engine="torch", precision=low, options={**opts, "cast": True} if low != "fp32" else opts)
            )
            if config.compile_fp32 and low != "fp32":
                recipes.append(Recipe(engine="torch", options=opts))
        if "max-autotune" not in config.compile_modes and config.compile_modes:
            skipped.append(Skipped("torch compile max-autotune", "slow to build and rarely wins on CPU; preset 'thorough' or --compile max-autotune"))  # fmt: skip

    if not has_onnx:
        skipped.append(Skipped("onnxruntime and openvino variants", "this version has no model.onnx"))
        return _filter(config, recipes, skipped, device)

    if "onnxruntime" in config.engines:
        recipes.append(Recipe(engine="onnxruntime"))
        if config.graph_passes:
            # level "all" lays the graph out for this CPU and this ONNX Runtime: another machine builds its own
            tuned = _step("ort-optimize", level="all", machine=machine_fingerprint("onnxruntime"))
            recipes.append(Recipe(engine="onnxruntime", passes=(*slim, tuned)))
        if "fp16" in precisions:
            if device.kind == "cuda" and fp16:
                recipes.append(Recipe(engine="onnxruntime", precision="fp16", passes=(*slim, _step("ort-fp16"))))
            else:
                skipped.append(Skipped("onnxruntime fp16", "ONNX Runtime runs fp16 fast on CUDA only; on CPU it is slower than fp32"))  # fmt: skip
        if device.kind == "cuda":
            if _has_tensorrt():
                recipes.append(Recipe(engine="onnxruntime", passes=tuple(slim), options={"tensorrt": True}))
                if fp16:
                    recipes.append(Recipe(engine="onnxruntime", precision="fp16", passes=tuple(slim),
                                          options={"tensorrt": True}))  # fmt: skip
            else:
                skipped.append(Skipped("onnxruntime tensorrt", "this onnxruntime has no TensorrtExecutionProvider"))
        if "ort-dynamic" in int8:
            recipes.append(Recipe(engine="onnxruntime", int8="ort-dynamic", passes=(*slim, _step("ort-dynamic"))))
        if "ort-static" in int8:
            if not has_calibration:
                skipped.append(Skipped("onnxruntime int8 static", NO_CALIBRATION))
            for method in config.calibration_methods if has_calibration else ():
                step = _step("ort-static", method=method, per_channel=config.per_channel, calibration=calibration)
                recipes.append(Recipe(engine="onnxruntime", int8="ort-static", passes=(*slim, step)))

    if "openvino" in config.engines:
        if device.kind != "cpu":
            skipped.append(Skipped("openvino variants", "kiln runs OpenVINO on the CPU only"))
        elif importlib.util.find_spec("openvino") is None:
            skipped.append(Skipped("openvino variants", "openvino is not installed (pip install openvino nncf)"))
        else:
            convert = _step("ov-convert")
            for hint in config.openvino_hints:
                opts = {"hint": hint}
                recipes.append(Recipe(engine="openvino", passes=(convert,), options=opts))
                if bf16:
                    recipes.append(Recipe(engine="openvino", precision="bf16", passes=(convert,), options=opts))
                if "nncf" in int8 and has_calibration:
                    nncf = (convert, _step("nncf", calibration=calibration))
                    recipes.append(Recipe(engine="openvino", int8="nncf", passes=nncf, options=opts))
                    if bf16:
                        recipes.append(
                            Recipe(engine="openvino", precision="bf16", int8="nncf", passes=nncf, options=opts)
                        )
            if "nncf" in int8 and not has_calibration:
                skipped.append(Skipped("openvino int8 nncf", NO_CALIBRATION))
    return _filter(config, recipes, skipped, device)


def _has_tensorrt() -> bool:
    import onnxruntime as ort

    return "TensorrtExecutionProvider" in ort.get_available_providers()


def _filter(
    config: OptimizeConfig, recipes: list[Recipe], skipped: list[Skipped], device: Device
) -> tuple[list[Recipe], list[Skipped]]:
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
    return kept, skipped
