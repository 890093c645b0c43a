"""Why a PyTorch model refused what the import gave it, in one line: weights whose keys or shapes do not fit,
and the layer that refused the example input, with what that layer takes (a Linear's features, a conv's
channels, an embedding's integer ids)."""

from __future__ import annotations

from typing import Any

from kiln.errors import first_line


def _some(keys: list[str], shown: int = 3) -> str:
    head = ", ".join(keys[:shown])
    return f"{head} and {len(keys) - shown} more" if len(keys) > shown else head


def state_dict_mismatch(module: Any, state: dict[str, Any]) -> str:
    """What keeps ``state`` from loading into ``module``, in one line (the first few keys of each kind, with
    the count): keys the model has and the file lacks, keys the file has and the model lacks, and shapes
    that differ; empty when it fits."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} (the model's is {list(own[k].shape)})"
        for k in own
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) ({_some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({_some(shapes, 2)})")
    return "; ".join(parts)


def core_line(exc: BaseException) -> str:
    """The line of a framework's error that says what went wrong: the first, or for TorchScript's
    interpreter (a trace first) the last."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and "TorchScript" in lines[0]:
        return first_line(RuntimeError(lines[-1]))
    return first_line(exc)


def expectation(mod: Any) -> str:
    """What a standard layer takes, in words ("takes 4 features in the last dim"); empty for others."""
    import torch.nn as nn

    if isinstance(mod, nn.Linear):
        return f"takes {mod.in_features} features in the last dim"
    if isinstance(mod, nn.modules.conv._ConvNd):
        n = len(mod.kernel_size)
        spatial = ", ".join("HWD"[i] if n > 1 else "L" for i in range(n))
        return f"takes [N, {mod.in_channels}, {spatial}] ({mod.in_channels} channels at dim 1)"
    if isinstance(mod, nn.modules.batchnorm._BatchNorm):
        return f"takes {mod.num_features} channels at dim 1"
    if isinstance(mod, nn.LayerNorm):
        return f"takes inputs whose last dims are {list(mod.normalized_shape)}"
    if isinstance(mod, nn.Embedding):
        return f"takes integer ids below {mod.num_embeddings} (--input-dtype int64)"
    if isinstance(mod, nn.RNNBase):
        return f"takes {mod.input_size} features in the last dim"
    return ""


def fixed_shape(mod: Any, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """``shape`` with the dim a Linear or conv layer names set as it expects it (when that is the model's first
    layer, this is the fix)."""
    import torch.nn as nn

    if isinstance(mod, (nn.Linear, nn.RNNBase)) and shape:
        size = mod.in_features if isinstance(mod, nn.Linear) else mod.input_size
        return (*shape[:-1], size)
    if isinstance(mod, nn.modules.conv._ConvNd) and len(shape) == len(mod.kernel_size) + 2:
        return (shape[0], mod.in_channels, *shape[2:])
    return None
