"""What the torch engine applies to an exported program at load time: dynamic int8 quantization of
Linear layers, a bf16/fp16 cast, and ``torch.compile`` with a dynamic batch dimension.

These run at load because their results are not portable files: compiled code is tied to the
process, and dynamically quantized Linear layers hold packed weights that ``torch.export`` does not
save. The variant's recipe records them as run options, so a variant still loads the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from kiln.errors import UnsupportedError

CompileMode = Literal["default", "max-autotune", "reduce-overhead"]
COMPILE_MODES: tuple[str, ...] = ("default", "max-autotune", "reduce-overhead")


def linear_to_modules(gm: Any) -> int:
    """Turn ``aten.linear`` calls on parameters into ``nn.Linear`` submodules, in place.

    An exported program calls ``aten.linear`` on its weights; PyTorch's module-swapping quantizers
    (``quantize_dynamic``) look for ``nn.Linear`` modules. Returns how many were made.
    """
    import torch

    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        args = list(node.args) + [None] * (3 - len(node.args))
        x, w_node, b_node = args[:3]
        if getattr(w_node, "op", None) != "get_attr" or (b_node is not None and b_node.op != "get_attr"):
            continue
        weight = gm.get_parameter(w_node.target) if _is_param(gm, w_node.target) else _attr(gm, w_node.target)
        bias = None if b_node is None else _attr(gm, b_node.target)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
            if bias is not None:
                linear.bias = torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        name = f"kiln_linear_{count}"
        gm.add_submodule(name, linear)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return count


def _is_param(gm: Any, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False


def _attr(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def quantize_linear_dynamic(module: Any) -> tuple[Any, int]:
    """int8 dynamic quantization of every Linear layer (weights int8, activations quantized per batch)."""
    import warnings

    import torch

    made = linear_to_modules(module)
    if made == 0:
        raise UnsupportedError("torch dynamic int8 quantizes Linear layers, and this model has none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's quantize_dynamic warns that it is deprecated
        quantized = torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8)
    return quantized, made


def count_dynamic_quantized(module: Any) -> int:
    import torch

    qlinear = torch.ao.nn.quantized.dynamic.Linear
    return sum(isinstance(m, qlinear) for m in module.modules())


def compile_module(module: Any, mode: str, device: str) -> Any:
    """``torch.compile`` with the batch dimension dynamic (see :func:`compile_context`)."""
    import torch

    if mode not in COMPILE_MODES:
        raise UnsupportedError(f"torch.compile mode {mode!r} is unknown; use one of {list(COMPILE_MODES)}")
    if mode == "reduce-overhead" and not device.startswith("cuda"):
        raise UnsupportedError("torch.compile mode 'reduce-overhead' uses CUDA graphs and runs on CUDA only")
    return torch.compile(module, mode=mode, dynamic=None)


def configure_compile(freezing: bool) -> None:
    """Process-wide settings for compiled modules, set once at load (a per-call patch costs ~36 µs).

    ``backed_size_oblivious`` stops dynamo from specialising a batch of 1 separately from larger ones,
    so batch sizes 1…N share one graph (convolutions may still split where oneDNN picks another kernel
    by batch size, e.g. at 16). ``freezing`` lets inductor fold weights into constants (Conv+BN,
    layouts); it is only switched on, never off, so one engine cannot undo another's.
    """
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    fx_config.backed_size_oblivious = True
    if freezing:
        inductor_config.freezing = True


def mark_batch_dynamic(tensors: list[Any]) -> None:
    import torch

    for t in tensors:
        if t.dim() > 0:
            torch._dynamo.mark_dynamic(t, 0)
