from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import InputError, SpecError
from kiln.spec import ModelSpec, TensorSpec


def make_spec(**kw: object) -> ModelSpec:
    data: dict[str, object] = {
        "name": "m",
        "task": "classification",
        "inputs": [
            {"name": "image", "dtype": "float32", "shape": [-1, 3, 8, 8]},
            {"name": "ids", "dtype": "int64", "shape": [-1, -1]},
        ],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [-1, 10]}],
        "labels": [str(i) for i in range(10)],
    }
    data.update(kw)
    return ModelSpec.model_validate(data)


def good_inputs(batch: int = 2) -> dict[str, np.ndarray]:
    return {"image": np.zeros((batch, 3, 8, 8), np.float32), "ids": np.zeros((batch, 5), np.int64)}


def test_yaml_round_trip_keeps_every_field() -> None:
    spec = make_spec(preprocess=[{"op": "normalize", "args": {"mean": [0.5]}}])
    back = ModelSpec.from_yaml(spec.to_yaml())
    assert back == spec
    assert back.inputs[0].shape == (-1, 3, 8, 8)
    assert back.preprocess[0].args == {"mean": [0.5]}


def test_valid_inputs_pass() -> None:
    make_spec().validate_inputs(good_inputs())


@pytest.mark.parametrize(
    ("mutate", "tensor", "field", "received"),
    [
        (lambda d: d.update(extra=np.zeros(1)), "extra", "name", "'extra'"),
        (lambda d: d.pop("ids"), "ids", "presence", "missing"),
        (lambda d: d.update(image=d["image"].astype(np.float64)), "image", "dtype", "float64"),
        (lambda d: d.update(image=np.zeros((2, 3, 8), np.float32)), "image", "rank", "3 (shape [2, 3, 8])"),
        (lambda d: d.update(image=np.zeros((2, 1, 8, 8), np.float32)), "image", "dimension 1", None),
        (lambda d: d.update(ids=np.zeros((3, 5), np.int64)), "ids", "batch size", 3),
        (lambda d: d.update(ids=[[1, 2]]), "ids", "type", "list"),
    ],
)
def test_bad_inputs_name_tensor_field_and_values(mutate, tensor, field, received) -> None:  # type: ignore[no-untyped-def]
    inputs = good_inputs()
    mutate(inputs)
    with pytest.raises(InputError) as info:
        make_spec().validate_inputs(inputs)
    err = info.value
    assert (err.tensor, err.field) == (tensor, field)
    assert tensor in str(err)
    if received is not None:
        assert err.received == received


def test_dtype_error_says_expected_and_received() -> None:
    inputs = good_inputs()
    inputs["image"] = inputs["image"].astype(np.float16)
    with pytest.raises(InputError, match=r"input 'image': dtype must be float32, got float16"):
        make_spec().validate_inputs(inputs)


def test_max_batch_is_enforced_only_when_asked() -> None:
    spec = make_spec()
    spec.validate_inputs(good_inputs(batch=64))
    with pytest.raises(InputError, match="at most 32"):
        spec.validate_inputs(good_inputs(batch=64), max_batch=32)


def test_string_inputs_validate_as_string() -> None:
    spec = make_spec(inputs=[{"name": "text", "dtype": "string", "shape": [-1]}])
    spec.validate_inputs({"text": np.array(["a", "b"], dtype=object)})
    with pytest.raises(InputError, match="dtype must be string"):
        spec.validate_inputs({"text": np.array([1, 2])})


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("name: m\ninputs: []\noutputs: []\n", "inputs"),
        (
            "name: m\ninputs: [{name: x, dtype: float32, shape: [0, 3]}]\noutputs: [{name: y, dtype: float32, shape: [-1]}]\n",
            "dimension 0",
        ),
        (
            "name: m\ninputs: [{name: x, dtype: complex, shape: [-1]}]\noutputs: [{name: y, dtype: float32, shape: [-1]}]\n",
            "dtype",
        ),
        (
            "name: m\ninputs: [{name: x, dtype: float32, shape: [-1]}, {name: x, dtype: float32, shape: [-1]}]\noutputs: [{name: y, dtype: float32, shape: [-1]}]\n",
            "unique",
        ),
        (
            "name: m\ntask: ranking\ninputs: [{name: x, dtype: float32, shape: [-1]}]\noutputs: [{name: y, dtype: float32, shape: [-1]}]\n",
            "task",
        ),
        ("- just\n- a list\n", "mapping"),
        ("name: [unclosed\n", "YAML"),
    ],
)
def test_invalid_spec_raises_spec_error_naming_the_field(yaml_text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        ModelSpec.from_yaml(yaml_text)


def test_preferred_batch_sizes_must_fit_max_batch() -> None:
    with pytest.raises(ValueError, match="preferred_batch_sizes"):
        make_spec(serving={"max_batch_size": 8, "preferred_batch_sizes": [4, 16]})


def test_tensor_spec_v2_datatype() -> None:
    assert TensorSpec(name="t", dtype="string", shape=(-1,)).datatype == "BYTES"
    assert TensorSpec(name="t", dtype="float32", shape=(-1,)).datatype == "FP32"
