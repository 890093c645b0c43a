"""Tiny deterministic ONNX models for the serving tests, built with onnx.helper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def add_model(path: Path, const: float = 1.0, width: int = 4) -> Path:
    """y = x + const, x: float32 [N, width]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(np.full([width], const, np.float32), "c")],
    )
    return _save(graph, path)


def seq_model(path: Path) -> Path:
    """y = 2 * sum(x, axis 1), x: float32 [N, L] with a dynamic length L (as a text model's tokens)."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=1),
            helper.make_node("Mul", ["s", "two"], ["y"]),
        ],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes"), numpy_helper.from_array(np.float32(2.0), "two")],
    )
    return _save(graph, path)


def mixed_model(path: Path) -> Path:
    """text (string [N, 2]) passes through; ids_out = ids + 1 (int64 [N, 3]); z = x * 2 (float32 [N, 2])."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["text"], ["text_out"]),
            helper.make_node("Add", ["ids", "one"], ["ids_out"]),
            helper.make_node("Mul", ["x", "two"], ["z"]),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2]),
        ],
        [
            helper.make_tensor_value_info("text_out", TensorProto.STRING, ["N", 2]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["N", 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2]),
        ],
        [
            numpy_helper.from_array(np.array([1], np.int64), "one"),
            numpy_helper.from_array(np.array([2.0], np.float32), "two"),
        ],
    )
    return _save(graph, path)


def big_model(path: Path, megabytes: int = 96) -> Path:
    """y = w[int(x)]: a float32 weight of ``megabytes`` MiB that ONNX Runtime cannot fold away."""
    n = megabytes * 2**20 // 4
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["x"], ["i"], to=TensorProto.INT64),
            helper.make_node("Gather", ["w", "i"], ["g"], axis=0),
            helper.make_node("Squeeze", ["g", "axes"], ["y"]),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w.reshape(-1, 1), "w"), numpy_helper.from_array(np.array([2], np.int64), "axes")],
    )
    return _save(graph, path)


def slow_model(path: Path, layers: int = 40, width: int = 512) -> Path:
    """A chain of ``layers`` MatMuls with one shared [width, width] weight: slow enough to be in flight."""
    w = np.eye(width, dtype=np.float32)
    nodes = []
    prev = "x"
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, "w"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(w, "w")],
    )
    return _save(graph, path)
