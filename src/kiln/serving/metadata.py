"""What the server says about itself and its models, in the shapes Triton's tools read.

Server metadata (``GET /v2``), model metadata (``GET /v2/models/{m}``) and Triton's model configuration
(``GET …/config``), rendered as JSON-ready dicts from a model's spec and engine; gRPC converts the same
dicts to its messages. tritonclient and perf_analyzer only display the platform and backend names (of
Triton's, perf_analyzer looks for "ensemble" alone); an engine declares them (``Engine.triton_platform``,
``Engine.triton_backend``), and one that declares none, or cannot be found here, is shown by its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kiln._version import __version__
from kiln.engines.base import get_engine
from kiln.serving.raw import PREDICTIONS, RAW_INPUT, wire_spec
from kiln.spec import EXAMPLE_SHAPE_PARAMETER, ModelSpec, TensorSpec

EXTENSIONS = [
    "binary_tensor_data", "model_configuration", "model_repository", "statistics", "system_shared_memory",
]  # fmt: skip


def server_metadata() -> dict[str, Any]:
    return {"name": "kiln", "version": __version__, "extensions": EXTENSIONS}


def model_metadata(model: str, versions: Sequence[int], spec: ModelSpec, engine: str) -> dict[str, Any]:
    """The V2 model metadata of ``model`` (served ``versions``) run by ``engine``."""
    spec = wire_spec(spec) or spec  # a model with pre-processing lists its raw input too (raw.py)
    return {
        "name": model,
        "versions": [str(v) for v in versions],
        "platform": triton_platform(engine),
        "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in spec.inputs],
        "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in spec.outputs],
    }


def model_config(model: str, spec: ModelSpec, engine: str, default_timeout_s: float) -> dict[str, Any]:
    """Triton's model configuration (as JSON), so Triton's tools (perf_analyzer …) can drive kiln;
    ``default_timeout_s`` is the server's request timeout, for a model that sets none of its own."""
    wire = wire_spec(spec)
    s = spec.serving
    batched = s.max_batch_size > 0
    if wire is None:
        inputs = [_config_tensor(t, batched, False) for t in spec.inputs]
    else:  # raw or tensors, not both
        inputs = [{**_config_tensor(t, batched, True), "optional": True} for t in wire.inputs]
    config: dict[str, Any] = {
        "name": model,
        "platform": triton_platform(engine),
        "backend": triton_backend(engine),
        "version_policy": _version_policy(spec),
        "max_batch_size": s.max_batch_size,
        "input": inputs,
        "output": [_config_tensor(t, batched, wire is not None) for t in (wire or spec).outputs],
        "instance_group": [{"name": f"{model}_0", "count": s.instances, "kind": "KIND_CPU"}],
        "response_cache": {"enable": s.response_cache},
    }
    examples = example_parameters(spec.inputs if wire is None else ())
    if examples:
        config["parameters"] = examples
    if batched:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(s.preferred_batch_sizes),
            "max_queue_delay_microseconds": s.max_queue_delay_us,
            "default_queue_policy": {
                "max_queue_size": s.max_queue_size,
                "default_timeout_microseconds": int((s.timeout_ms * 1000) if s.timeout_ms else default_timeout_s * 1e6),
            },
        }
    return config


def example_parameters(inputs: Sequence[TensorSpec]) -> dict[str, dict[str, str]]:
    """Triton model-config ``parameters`` carrying each input's example shape (``"1,3,224,224"``), so a
    remote client (``kiln bench --url``) sizes dynamic dims the way the model was checked to run."""
    return {f"{EXAMPLE_SHAPE_PARAMETER}{t.name}": {"string_value": ",".join(map(str, t.example_shape))}
            for t in inputs if t.example_shape is not None}  # fmt: skip


def _config_tensor(t: TensorSpec, batched: bool, takes_raw: bool) -> dict[str, Any]:
    dims = list(t.shape[1:] if batched else t.shape)
    out: dict[str, Any] = {"name": t.name, "data_type": triton_type(t.datatype), "dims": dims}
    if takes_raw and t.name in (RAW_INPUT, PREDICTIONS):  # one element per instance
        out.update(dims=[1], reshape={"shape": []})
    return out


def _version_policy(spec: ModelSpec) -> dict[str, Any]:
    s = spec.serving
    if s.version_policy == "latest":
        return {"latest": {"num_versions": s.num_versions}}
    if s.version_policy == "all":
        return {"all": {}}
    return {"specific": {"versions": list(s.versions)}}


def triton_platform(engine: str) -> str:
    """Triton's platform name for models ``engine`` runs (``engine`` itself when it declares none)."""
    return _triton_names(engine)[0]


def triton_backend(engine: str) -> str:
    """Triton's backend name for ``engine`` (``engine`` itself when it declares none)."""
    return _triton_names(engine)[1]


def _triton_names(engine: str) -> tuple[str, str]:
    try:
        cls = get_engine(engine)
    except Exception:  # not installed, unknown, or failing to import: a display name must not fail the answer
        return engine, engine
    return cls.triton_platform or engine, cls.triton_backend or engine


def triton_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
