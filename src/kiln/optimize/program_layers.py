"""An exported program (``model.pt2``) as a module the compression passes can train and prune.

A model imported from a ``.pt2`` file, a TorchScript archive, a Keras model on the torch backend or an
``nn.Module`` in memory has no factory to rebuild it from: what kiln keeps is its ``torch.export`` program.
``ep.module()`` runs that program, but as ATen calls on attributes: Torch-Pruning finds no layers to
resize, and some importers (TorchScript through ``TS2EPConverter``, Keras) leave the weights as buffers or
constants that an optimizer does not see. :func:`program_module` rewrites the graph so that:

- each ``conv``/``convolution``, ``linear``, ``batch_norm`` and ``layer_norm`` call whose weights belong to one
  submodule and to no other call becomes a call of a real ``nn.Conv*d``/``nn.Linear``/``nn.BatchNorm``/
  ``nn.LayerNorm`` holding those tensors under the same names (so the program's ``state_dict`` keys stay);
- every other floating-point tensor the graph reads as a weight (through casts, transposes and reshapes
  into a matmul, a conv, or an add/mul with another tensor) becomes an ``nn.Parameter``; statistics
  (a BatchNorm's mean and variance, anything reached through ``sub``, ``rsqrt``, an add of a constant) stay
  fixed;
- the module is a plain ``torch.fx.GraphModule`` in eval mode (``ep.module()`` refuses ``train()``), without
  the program's input guards (a batch range would refuse the training batches).

:func:`fixed_width_layers` names the layers whose output width the graph spells out as a literal shape
(``view(x, [b, s, 12, 32])`` after a query projection): pruning those would break the graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

# Ops that change a weight's dtype or layout only: folded into the weight when a layer is lifted.
_FOLDABLE = {"to", "_to_copy", "permute", "contiguous", "t", "transpose", "clone", "detach", "alias", "lift_fresh_copy"}
# Ops a weight passes through unchanged on its way to where it is used: those, and views.
_PASS_THROUGH = _FOLDABLE | {"reshape", "view", "unsqueeze", "squeeze", "expand", "type_as", "_unsafe_view", "numpy_T"}
_CHECKS = {"_assert_tensor_metadata", "sym_size", "sym_constrain_range_for_size"}
_WEIGHT_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "matmul", "mm", "bmm", "addmm", "einsum",
               "embedding", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}  # fmt: skip
_AFFINE_OPS = {"add", "add_", "mul", "mul_"}  # a weight when both operands are tensors (a scale, a bias)
_NORM_WEIGHT_ARGS = {"batch_norm": (1, 2), "layer_norm": (2, 3), "group_norm": (2, 3)}
# Ops whose list arguments fix a tensor's sizes: a literal there pins the width of what flows in.
_SHAPE_OPS = {"view", "reshape", "_unsafe_view", "expand", "split_with_sizes", "unflatten", "new_zeros",
              "new_ones", "new_full", "new_empty"}  # fmt: skip


def _op_name(node: Any) -> str:
    """``aten.conv2d.default`` -> ``conv2d``; '' for anything that is not an ATen call."""
    target = getattr(node, "target", None)
    name = getattr(target, "__name__", "")
    packet = getattr(target, "_overloadpacket", None)
    if packet is not None:
        return str(getattr(packet, "__name__", name)).split(".")[-1]
    return name


def program_module(program: Any) -> Any:
    """The exported ``program`` as a trainable ``torch.fx.GraphModule`` with real layers, in eval mode."""
    import torch

    gm = program.module()
    graph = gm.graph
    aliases = _aliases()
    for node in list(graph.nodes):
        if node.op == "call_function":
            node.target = aliases.get(node.target, node.target)
            if not _lift(gm, graph, node):
                _lift_folded(gm, graph, node)
    for node in list(graph.nodes):
        # the program's input guards (a batch range it was exported for) would refuse the training batches;
        # the module is exported again, at the spec's dims, after a pass changes it
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    _promote_weights(gm, graph)
    graph.lint()
    module = torch.fx.GraphModule(gm, graph)
    return module.eval()


def _aliases() -> dict[Any, Any]:
    """ATen's alias ops (Keras calls ``subtract``) as their canonical ops, which OpenVINO's converter knows."""
    import torch

    aten = torch.ops.aten
    pairs = [("subtract", "sub"), ("multiply", "mul"), ("divide", "div"), ("true_divide", "div")]
    table = {}
    for alias, canonical in pairs:
        for overload in ("Tensor", "Scalar"):
            src, dst = getattr(getattr(aten, alias), overload, None), getattr(getattr(aten, canonical), overload, None)
            if src is not None and dst is not None:
                table[src] = dst
    return table


def _owner(root: Any, target: str) -> tuple[Any, str]:
    """The submodule holding attribute ``target`` (``a.b.weight``) and the attribute's own name."""
    owner_name, _, name = target.rpartition(".")
    return (root.get_submodule(owner_name) if owner_name else root), name


def _attr(node: Any) -> bool:
    import torch

    return isinstance(node, torch.fx.Node) and node.op == "get_attr"


def _lift(root: Any, graph: Any, node: Any) -> bool:
    """Replace one conv/linear/norm call by a call of a layer built around its weights, when they are a
    submodule's own and nothing else reads them."""
    import torch

    op = _op_name(node)
    args = list(node.args)
    if op in ("conv1d", "conv2d", "conv3d", "convolution", "linear"):
        if len(args) < 2:
            return False
        tensors = {"weight": args[1], "bias": args[2] if len(args) > 2 else None}
    elif op == "batch_norm":
        if len(args) < 8 or args[5]:  # training=True: batch statistics, not a frozen layer
            return False
        tensors = {"weight": args[1], "bias": args[2], "running_mean": args[3], "running_var": args[4]}
    elif op == "layer_norm":
        tensors = {"weight": args[2] if len(args) > 2 else None, "bias": args[3] if len(args) > 3 else None}
    else:
        return False
    used = {k: v for k, v in tensors.items() if v is not None}
    if "weight" not in used and op != "layer_norm":
        return False
    if not all(_attr(v) and len(v.users) == 1 for v in used.values()):
        return False
    owners = {v.target.rpartition(".")[0] for v in used.values()}
    if len(owners) != 1 or not (owner_name := owners.pop()):
        return False
    if any(v.target.rpartition(".")[2] != k for k, v in used.items()):
        return False
    owner = root.get_submodule(owner_name)
    own = {**dict(owner.named_parameters(recurse=False)), **dict(owner.named_buffers(recurse=False))}
    if list(owner.children()) or set(own) - set(used) - {"num_batches_tracked"} or set(used) - set(own):
        return False
    if any(n is not node and n.op == "call_module" and n.target == owner_name for n in graph.nodes):
        return False
    layer = _layer(op, args, own)
    if layer is None:
        return False
    for name, tensor in own.items():
        if name in ("weight", "bias"):
            param = tensor if isinstance(tensor, torch.nn.Parameter) else torch.nn.Parameter(tensor.detach())
            setattr(layer, name, param)
        else:
            layer.register_buffer(name, tensor)
    if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm) and "num_batches_tracked" not in own:
        layer.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
    parent, _, leaf = owner_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, layer)
    with graph.inserting_before(node):
        call = graph.call_module(owner_name, (args[0],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    return True


LIFTED = "lifted"  # the submodule holding layers built around weights the program stored in another layout


def _weight_chain(value: Any) -> tuple[Any, list[Any]] | None:
    """The attribute behind ``value`` and the layout ops between them (Keras transposes its kernels to
    torch's layout at every call), when nothing else reads either."""
    chain: list[Any] = []
    while _op_name(value) in _FOLDABLE and value.op == "call_function" and len(_real_users(value)) == 1:
        chain.append(value)
        value = value.args[0]
    if not _attr(value) or len(_real_users(value)) != 1:
        return None
    if sum(1 for n in value.graph.nodes if n.op == "get_attr" and n.target == value.target) != 1:
        return None
    return value, chain


def _real_users(node: Any) -> list[Any]:
    """The users of ``node`` other than metadata checks (``_assert_tensor_metadata``)."""
    return [u for u in node.users if _op_name(u) not in _CHECKS]


def _fold(root: Any, attr: Any, chain: list[Any]) -> Any:
    """The attribute's tensor with ``chain``'s ops applied: the weight as the consuming op sees it."""
    import torch

    tensor = getattr(*_owner(root, attr.target))
    with torch.no_grad():
        for op in reversed(chain):
            tensor = op.target(tensor, *op.args[1:], **op.kwargs)
    return tensor.detach().clone()


def _lift_folded(root: Any, graph: Any, node: Any) -> None:
    """A conv/linear call (or a matmul by a 2-D weight, which is a linear by its transpose) whose weight the
    program keeps in another layout, as a layer under ``lifted.<node>`` holding the weight in torch's layout."""
    import torch

    op = _op_name(node)
    args = list(node.args)
    if op in ("matmul", "mm") and len(args) == 2:
        weight = _weight_chain(args[1])
        if weight is None:
            return
        tensors = {"weight": _fold(root, *weight)}
        if tensors["weight"].dim() != 2:
            return
        tensors["weight"] = tensors["weight"].t().contiguous()
        op, found = "linear", [weight]
    elif op in ("conv1d", "conv2d", "conv3d", "convolution", "linear") and len(args) >= 2:
        weight = _weight_chain(args[1])
        bias = _weight_chain(args[2]) if len(args) > 2 and args[2] is not None else None
        if weight is None or (len(args) > 2 and args[2] is not None and bias is None):
            return
        found = [weight] + ([bias] if bias is not None else [])
        tensors = {"weight": _fold(root, *weight)}
        if bias is not None:
            tensors["bias"] = _fold(root, *bias)
    else:
        return
    if not all(t.is_floating_point() for t in tensors.values()):
        return
    layer = _layer(op, args, tensors)
    if layer is None:
        return
    for name, tensor in tensors.items():
        setattr(layer, name, torch.nn.Parameter(tensor))
    if not hasattr(root, LIFTED):
        root.add_module(LIFTED, torch.nn.Module())
    getattr(root, LIFTED).add_module(node.name, layer)
    with graph.inserting_before(node):
        call = graph.call_module(f"{LIFTED}.{node.name}", (args[0],))
    call.meta = dict(node.meta)
    node.replace_all_uses_with(call)
    graph.erase_node(node)
    for attr, chain in found:
        for n in [*chain, attr]:
            for check in [u for u in n.users if _op_name(u) in _CHECKS]:
                graph.erase_node(check)
        for n in chain:
            graph.erase_node(n)
        owner, name = _owner(root, attr.target)
        graph.erase_node(attr)
        for table in (owner._parameters, owner._buffers, owner.__dict__):
            table.pop(name, None)


@functools.cache
def _any_rank_batch_norm() -> Any:
    """A BatchNorm of any rank: the graph does not say which ``BatchNormNd`` it was."""
    from torch import nn

    class BatchNorm(nn.modules.batchnorm._BatchNorm):
        def _check_input_dim(self, input: Any) -> None:
            return None

    return BatchNorm


def _layer(op: str, args: list[Any], own: dict[str, Any]) -> Any:
    """The ``nn`` layer computing ``op`` with ``args`` (on the meta device; the real tensors go in after)."""
    import torch
    from torch import nn

    weight: Any = own.get("weight")
    bias = own.get("bias") is not None
    if op == "linear":
        return nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device="meta", dtype=weight.dtype)
    if op == "batch_norm":
        mean = own["running_mean"]
        return _any_rank_batch_norm()(mean.shape[0], eps=float(args[7]), momentum=float(args[6]), affine=weight is not None,
                                track_running_stats=True, device="meta", dtype=mean.dtype)  # fmt: skip
    if op == "layer_norm":
        eps = float(args[4]) if len(args) > 4 else 1e-5
        return nn.LayerNorm(list(args[1]), eps=eps, elementwise_affine=weight is not None, bias=bias, device="meta",
                            dtype=(weight if weight is not None else own.get("bias", torch.empty(0))).dtype)  # fmt: skip
    rank = weight.dim() - 2
    if rank not in (1, 2, 3):
        return None
    if op == "convolution":  # input, weight, bias, stride, padding, dilation, transposed, output_padding, groups
        if len(args) < 9 or args[6]:
            return None
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:  # conv{1,2,3}d: input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1
        rest = [*args[3:], None, None, None, None][:4]
        stride, padding, dilation, groups = (r if r is not None else d for r, d in zip(rest, (1, 0, 1, 1), strict=True))
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
    kernel: Any = tuple(weight.shape[2:])
    return cls(weight.shape[1] * int(groups), weight.shape[0], kernel, stride=stride,
               padding=padding, dilation=dilation, groups=int(groups), bias=bias, device="meta", dtype=weight.dtype)  # fmt: skip


def _promote_weights(root: Any, graph: Any) -> None:
    """Make every floating tensor the graph reads as a weight an ``nn.Parameter`` of its submodule."""
    import torch

    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner, name = _owner(root, node.target)
        tensor = getattr(owner, name, None)
        if not isinstance(tensor, torch.Tensor) or isinstance(tensor, torch.nn.Parameter):
            continue
        if not tensor.is_floating_point() or not _used_as_weight(node):
            continue
        if name in owner._buffers:
            del owner._buffers[name]
        elif name in owner.__dict__:
            del owner.__dict__[name]
        owner.register_parameter(name, torch.nn.Parameter(tensor.detach().clone()))


def _uses(node: Any) -> Iterator[tuple[Any, Any]]:
    """(consumer, the value it reads) for every use of ``node``, through the ops a weight passes unchanged."""
    seen, todo = set(), [node]
    while todo:
        value = todo.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            op = _op_name(user)
            if op in _CHECKS:
                continue
            if op in _PASS_THROUGH:
                todo.append(user)
            else:
                yield user, value


def _used_as_weight(node: Any) -> bool:
    """Whether every use of ``node`` is a weight's: a conv/matmul operand, a norm's weight or bias, an add
    or mul with another tensor. One use as a statistic (``sub``, ``rsqrt``, plus a constant) keeps it fixed."""
    import torch

    uses = list(_uses(node))
    if not uses:
        return False
    for user, value in uses:
        op = _op_name(user)
        if op in _WEIGHT_OPS:
            continue
        if op in _NORM_WEIGHT_ARGS and any(i < len(user.args) and user.args[i] is value for i in _NORM_WEIGHT_ARGS[op]):
            continue
        if op in _AFFINE_OPS and all(isinstance(a, torch.fx.Node) for a in user.args[:2]):
            continue
        return False
    return True


def fixed_width_layers(module: Any) -> list[Any]:
    """The conv/linear layers of a :func:`program_module` whose output width reaches a literal size in a
    shape argument (``view``, ``reshape``, ``expand``...) before the next layer: [] for any other module."""
    import torch

    if not isinstance(module, torch.fx.GraphModule):
        return []
    layer_types = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    layers = {n: module.get_submodule(n.target) for n in module.graph.nodes if n.op == "call_module"}
    widths = {n: m for n, m in layers.items() if isinstance(m, layer_types)}
    return [m for n, m in widths.items() if _reaches_literal_shape(n, lambda u: u in widths)]


def _reaches_literal_shape(start: Any, stops: Callable[[Any], bool]) -> bool:
    seen, todo = {start}, [start]
    while todo:
        for user in todo.pop().users:
            if user in seen or stops(user):
                continue
            seen.add(user)
            if _op_name(user) in _SHAPE_OPS and any(_literal_sizes(a) for a in user.args[1:]):
                return True
            if user.op != "output":
                todo.append(user)
    return False


def _literal_sizes(arg: Any) -> bool:
    """A list of sizes holding a literal other than -1 and 1 (which any width fits)."""
    if isinstance(arg, (list, tuple)):
        return any(isinstance(a, int) and not isinstance(a, bool) and a not in (-1, 1) for a in arg)
    return False
