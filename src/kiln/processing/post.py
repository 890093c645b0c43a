"""Post-processing of classification and embedding outputs: softmax, top-k with labels, mean pooling
and L2 normalization."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from kiln.errors import ProcessingError
from kiln.processing.registry import Batch, OpArgs, PostOp, register_op


def _output(value: Any, name: str | None, op: str) -> tuple[str, np.ndarray]:
    if not isinstance(value, dict):
        raise ProcessingError(op, f"needs the model outputs, got {type(value).__name__}; put it earlier")
    if name is None:
        name = next(iter(value))
    if name not in value:
        raise ProcessingError(op, f"the model has no output {name!r}; outputs: {sorted(value)}")
    return name, np.asarray(value[name])


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(axis=axis, keepdims=True))


class SoftmaxArgs(OpArgs):
    output: str | None = Field(default=None, description="default: the first output")
    axis: int = -1


@register_op
class Softmax(PostOp):
    """Replace an output of logits with probabilities."""

    name = "softmax"
    Args = SoftmaxArgs
    args: SoftmaxArgs

    def __call__(self, value: Any, batch: Batch) -> Any:
        name, arr = _output(value, self.args.output, self.name)
        return {**value, name: softmax(arr.astype(np.float32), self.args.axis)}


class TopKArgs(OpArgs):
    output: str | None = None
    k: int = Field(default=5, ge=1)


@register_op
class TopK(PostOp):
    """The ``k`` best classes per instance: ``[{"index", "label", "score"}, …]`` (labels from the spec)."""

    name = "top_k"
    Args = TopKArgs
    args: TopKArgs

    def __call__(self, value: Any, batch: Batch) -> Any:
        _, scores = _output(value, self.args.output, self.name)
        if scores.ndim != 2:
            raise ProcessingError(self.name, f"needs [batch, classes] scores, got shape {list(scores.shape)}")
        k = min(self.args.k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        labels = self.context.spec.labels if self.context.spec else None
        out = []
        for row, idx in zip(scores, top, strict=True):
            out.append([
                {"index": int(j), **({"label": labels[j]} if labels and j < len(labels) else {}), "score": float(row[j])}
                for j in idx
            ])  # fmt: skip
        return out


class MeanPoolArgs(OpArgs):
    output: str | None = Field(default=None, description="token embeddings [batch, tokens, dim]")
    mask: str = Field(default="attention_mask", description="the input that marks real tokens")
    normalize: bool = Field(default=True, description="L2-normalize the pooled vectors")


@register_op
class MeanPool(PostOp):
    """Average token embeddings over the real (unmasked) tokens, as sentence-transformers does."""

    name = "mean_pool"
    Args = MeanPoolArgs
    args: MeanPoolArgs

    def __call__(self, value: Any, batch: Batch) -> Any:
        name, tokens = _output(value, self.args.output, self.name)
        if tokens.ndim != 3:
            raise ProcessingError(self.name, f"needs [batch, tokens, dim] output, got shape {list(tokens.shape)}")
        if self.args.mask in batch.inputs:
            mask = batch.inputs[self.args.mask].astype(np.float32)[..., None]
        else:
            mask = np.ones((*tokens.shape[:2], 1), np.float32)
        pooled = (tokens.astype(np.float32) * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        if self.args.normalize:
            pooled = l2_normalize(pooled)
        return {**value, name: pooled}


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return np.asarray(x / np.clip(norm, 1e-12, None))


class L2Args(OpArgs):
    output: str | None = None


@register_op
class L2Normalize(PostOp):
    """Scale each vector of an output to unit length."""

    name = "l2_normalize"
    Args = L2Args
    args: L2Args

    def __call__(self, value: Any, batch: Batch) -> Any:
        name, arr = _output(value, self.args.output, self.name)
        return {**value, name: l2_normalize(arr.astype(np.float32))}
