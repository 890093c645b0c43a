"""Pre- and post-processing declared in a model spec: ops registered by name, a :class:`Pipeline`
that turns raw instances (image bytes, sentences) into input arrays and outputs into JSON-able
results, and an overlapped runner that keeps the engine busy while the next batch is decoded."""

from kiln.processing.pipeline import Pipeline, Prepared
from kiln.processing.registry import Batch, OpArgs, OpContext, check_steps, known_ops, register_op

__all__ = ["Batch", "OpArgs", "OpContext", "Pipeline", "Prepared", "check_steps", "known_ops", "register_op"]
