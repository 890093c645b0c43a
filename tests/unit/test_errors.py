from __future__ import annotations

import pickle

import pytest
from pydantic import BaseModel, ValidationError, field_validator

from kiln.errors import (
    CorruptModelError,
    EngineUnavailableError,
    InputError,
    InvalidSourceError,
    KilnError,
    MissingExtraError,
    NotFoundError,
    ParityError,
    SpecError,
    SpecFieldError,
    VersionNotServedError,
    WarmupFailedError,
    first_line,
    spec_error,
)
from kiln.execution.errors import BatcherClosedError

CASES = [
    InvalidSourceError("pkg:fn", "module 'pkg' was not found"),
    CorruptModelError("/tmp/m.onnx", "truncated"),
    InputError("image", "dtype", "float32", "float64"),
    ParityError("logits", 4, 0.5, 1e-4, 1e-3),
    SpecError("bad spec"),
    NotFoundError("version", 7, [1, 2], owner="model 'm'"),
    VersionNotServedError("m", 1, "latest 1", [2]),
    MissingExtraError("interop", "skl2onnx", "importing scikit-learn models"),
    SpecFieldError("import option", "opset", "must be at least 13"),
    BatcherClosedError("m"),
    WarmupFailedError("m", 1, "boom"),
    EngineUnavailableError("no engine"),
]


@pytest.mark.parametrize("err", CASES, ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_fields(err: KilnError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err)
    assert str(back) == str(err)
    assert back.__dict__ == err.__dict__


def test_messages_name_the_thing_and_the_fix() -> None:
    assert str(InputError("image", "dtype", "float32", "float64", "convert")) == (
        "input 'image': dtype must be float32, got float64; convert"
    )
    parity = ParityError("logits", 4, 0.5, 1e-4, 1e-3)
    assert "'logits'" in str(parity) and "batch 4" in str(parity) and "--atol" in str(parity)
    assert NotFoundError("model", "x", [], where="repository r").http_status == 404
    assert InputError("a", "b", 1, 2).http_status == 400


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (
            NotFoundError("model", "x", ["m"], where="repository /r"),
            "model 'x' is not in repository /r; it holds ['m']",
        ),
        (
            NotFoundError("model", "x", [], where="repository /r"),
            "model 'x' is not in repository /r; it holds no models",
        ),
        (NotFoundError("version", 7, [1], owner="model 'm'"), "model 'm' has no version 7; available versions: [1]"),
        (
            NotFoundError("version", None, owner="model 'm'", where="repository /r", fix="import one"),
            "model 'm' has no versions in repository /r; import one",
        ),
        (NotFoundError("pass", "x", ["a", "b"]), "unknown pass 'x'; known passes: ['a', 'b']"),
        (
            VersionNotServedError("m", 1, "latest 1", [2]),
            "model 'm' version 1 is not served: its version policy (latest 1) serves [2]",
        ),
        (
            MissingExtraError("zoo", "transformers", "the MiniLM zoo model"),
            "the MiniLM zoo model needs transformers: pip install 'kiln-inference[zoo]'",
        ),
        (
            MissingExtraError(None, "openvino", "engine 'openvino'"),
            "engine 'openvino' needs openvino: pip install openvino",
        ),
    ],
)
def test_messages_are_built_from_the_fields(err: KilnError, message: str) -> None:
    assert str(err) == message


def test_not_found_fields_name_what_is_missing_and_what_exists() -> None:
    err = NotFoundError("version", 7, (1, 2), owner="model 'm'")
    assert (err.kind, err.name, err.available, err.owner) == ("version", 7, [1, 2], "model 'm'")
    assert isinstance(VersionNotServedError("m", 1, "latest 1", [2]), NotFoundError)
    missing = MissingExtraError("interop", "keras", "importing Keras models")
    assert isinstance(missing, EngineUnavailableError) and missing.install == "pip install 'kiln-inference[interop]'"


class _Options(BaseModel):
    max_memory: int = 0
    nested: dict[str, int] = {}

    @field_validator("max_memory")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value < 0:
            raise ValueError("must not be negative")
        return value


def _validation_error(**fields: object) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        _Options.model_validate(fields)
    return info.value


def test_spec_error_names_the_field_and_drops_pydantics_prefix() -> None:
    err = spec_error(_validation_error(max_memory=-1), "serve option")
    assert str(err) == "serve option max_memory: must not be negative"
    assert (err.field, err.problem) == ("max_memory", "must not be negative")
    assert str(spec_error(_validation_error(max_memory=-1), "", flag=True)) == "--max-memory: must not be negative"
    assert str(spec_error(_validation_error(nested={"a": "x"}), "option")).startswith("option nested.a: ")
    assert isinstance(err, SpecError)


def test_first_line_of_an_exception() -> None:
    assert first_line(RuntimeError("  first\nsecond")) == "first"
    assert first_line(RuntimeError("")) == "RuntimeError"
    assert first_line(RuntimeError("x" * 50), limit=10) == "xxxxxxx..."
