"""The trainable PyTorch module behind a model version, for the passes that change or fine-tune it
(``prune-structured``, ``distill``, ``qat-int8``).

Compression needs the model as a ``torch.nn.Module`` with layers, not an ONNX graph: Torch-Pruning follows
the module's layers and NNCF hooks into them. A model imported from a factory (the manifest's
``module:callable`` source) is rebuilt from that code with the weights of the imported ``model.pt2``. Any
other PyTorch import (a ``.pt2`` file, TorchScript, Keras on the torch backend, an ``nn.Module`` object)
is rebuilt from its ``model.pt2`` program, its calls lifted into layers
(:func:`~kiln.optimize.program_layers.program_module`). An ONNX-only import has neither and says so.

A pass that changes the module saves it with :func:`save_module`: its weights (``module.safetensors``,
whose tensor shapes also record the pruned widths) and the artifacts every later pass and engine reads,
``model.pt2`` and ``model.onnx``, exported and checked against the module as at import. The next pass
rebuilds it with :func:`load_module`: the same architecture, resized to the saved widths. Nothing is
unpickled: weights are safetensors, programs ``torch.export`` archives.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

from kiln.errors import InvalidSourceError, PassNotApplicable
from kiln.optimize.data import Samples
from kiln.repository import MODULE_WEIGHTS_FILE, ONNX_FILE, PT2_FILE
from kiln.spec import ModelSpec

_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def is_factory(source: str) -> bool:
    """Whether ``source`` names a factory ``module:callable`` (the model's code) rather than a file."""
    return bool(_FACTORY.fullmatch(source))


def check_trainable(source: str, version_dir: Path | None) -> None:
    """:class:`PassNotApplicable` saying why this version has no PyTorch module to fine-tune: neither a
    factory to rebuild it from nor a ``model.pt2`` program (an ONNX or scikit-learn import)."""
    if is_factory(source) or (version_dir is not None and (version_dir / PT2_FILE).is_file()):
        return
    what = f"an object in memory ({source.strip('<>')})" if source.startswith("<") else repr(source)
    raise PassNotApplicable(
        f"fine-tuning needs the model's PyTorch code or program: this version was imported from {what}, which "
        f"left no {PT2_FILE} (import the PyTorch model: a factory 'package.module:build', a .pt2, TorchScript, "
        "or Keras on the torch backend)"
    )


def load_module(source: str, version_dir: Path, work: Path | None = None) -> Any:
    """The model as an ``nn.Module`` in eval mode: the factory's architecture (or the program's, lifted into
    layers) with the imported weights, or, when ``work`` holds a module a pass saved there, that module
    (its layers resized to the saved widths)."""
    check_trainable(source, version_dir)
    module = _from_factory(source) if is_factory(source) else _from_program(version_dir)
    saved = work / MODULE_WEIGHTS_FILE if work is not None else None
    if saved is not None and saved.is_file():
        from safetensors.torch import load_file

        state = load_file(str(saved))
        _resize(module, state)
    elif is_factory(source):
        state = _imported_weights(module, version_dir)
    else:  # the program holds its own weights
        return module.eval()
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PassNotApplicable(
            f"the weights do not fit the model of {source!r}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    return module.eval()


def _from_factory(factory: str) -> Any:
    import torch

    from kiln.convert.factory import resolve

    try:
        module = resolve(factory)()
    except InvalidSourceError as exc:
        raise PassNotApplicable(f"cannot rebuild the model from {factory!r}: {exc.reason}") from None
    if not isinstance(module, torch.nn.Module):
        raise PassNotApplicable(f"{factory!r} returned {type(module).__name__}, not a torch.nn.Module")
    return module


def _imported_weights(module: Any, version_dir: Path) -> dict[str, Any]:
    """The weights of the imported ``model.pt2``, named as ``module`` names them."""
    import torch

    if not (version_dir / PT2_FILE).is_file():
        raise PassNotApplicable(f"this version has no {PT2_FILE} to take the weights from")
    state = dict(torch.export.load(str(version_dir / PT2_FILE)).state_dict)
    # a model returning a dict was exported inside from_pytorch's FlatOutputs wrapper: its weights sit under "inner."
    if state and all(k.startswith("inner.") for k in state) and not hasattr(module, "inner"):
        state = {k.removeprefix("inner."): v for k, v in state.items()}
    return state


def _from_program(version_dir: Path) -> Any:
    """The version's ``model.pt2`` as a module with layers (and the program's weights)."""
    import torch

    from kiln.optimize.program_layers import program_module

    try:
        return program_module(torch.export.load(str(version_dir / PT2_FILE)))
    except Exception as exc:
        raise PassNotApplicable(
            f"cannot rebuild a trainable module from {PT2_FILE} ({type(exc).__name__}: {exc})"
        ) from None


def save_module(module: Any, spec: ModelSpec, work: Path, source: str) -> None:
    """Write ``module`` into ``work`` as the artifacts of a variant: ``module.safetensors``, and ``model.pt2``
    plus ``model.onnx`` exported (and parity-checked) as at import, replacing what was there."""
    from safetensors.torch import save_file

    from kiln.convert.from_pytorch import TorchExport
    from kiln.convert.importer import ImportConfig

    module = module.eval()
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(work / MODULE_WEIGHTS_FILE))
    names = [t.name for t in spec.inputs]
    shapes = [tuple(2 if i == 0 else (d if d > 0 else 8) for i, d in enumerate(t.shape)) for t in spec.inputs]
    config = ImportConfig(output_names=[t.name for t in spec.outputs], dynamic_batch=spec.serving.max_batch_size != 0)
    dims = {t.name: {i: f"{t.name}_{i}" for i, d in enumerate(t.shape) if i > 0 and d < 0} for t in spec.inputs}
    export = TorchExport.from_config(
        module, source, config, names, shapes, auto_dims=dims, dtypes=[t.dtype for t in spec.inputs]
    )
    for stale in work.glob(ONNX_FILE + "*"):
        stale.unlink()
    with contextlib.suppress(FileNotFoundError):
        (work / PT2_FILE).unlink()
    export.stage(work)


def _resize(module: Any, state: dict[str, Any]) -> None:
    """Give ``module``'s parameters and buffers the shapes in ``state`` (a pruned module's weights), and its
    layers the matching widths, so ``load_state_dict`` fits: Conv, Linear, BatchNorm, LayerNorm."""
    import torch

    for name, tensor in state.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor) or current.shape == tensor.shape:
            continue
        if isinstance(current, torch.nn.Parameter):
            setattr(owner, attr, torch.nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad))
        else:
            owner.register_buffer(attr, torch.empty_like(tensor))
    for layer in module.modules():
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            continue
        if isinstance(layer, torch.nn.modules.conv._ConvNd):
            transposed = layer.transposed
            out_dim, in_dim = (1, 0) if transposed else (0, 1)
            layer.out_channels = weight.shape[out_dim] * (layer.groups if transposed else 1)
            layer.in_channels = weight.shape[in_dim] * (1 if transposed else layer.groups)
        elif isinstance(layer, torch.nn.Linear):
            layer.out_features, layer.in_features = weight.shape
        elif isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.num_features = weight.shape[0]
        elif isinstance(layer, torch.nn.LayerNorm):
            layer.normalized_shape = tuple(weight.shape)


HELD_OUT = 0.1  # share of the training samples kept for early stopping when no validation data is given


def held_out_split(train: Samples, validation: Samples | None) -> tuple[Samples, Samples]:
    """The samples to train on and to stop early on: ``validation`` when given, else a held-out tenth of the
    training data (at most 512 samples; the rest trains). The search gives none, so that fine-tuning never
    stops on the very samples its result is judged on."""
    if validation is not None and len(validation):
        return train, validation
    n = len(train)
    held = max(1, min(512, int(n * HELD_OUT))) if n > 1 else 0
    if held == 0:
        return train, train
    return train.take(0, n - held), train.take(n - held, n)
