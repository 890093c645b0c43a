from __future__ import annotations

import pickle

import pytest

from kiln.errors import (
    CorruptModelError,
    EngineUnavailableError,
    InputError,
    InvalidSourceError,
    KilnError,
    NotFoundError,
    ParityError,
    SpecError,
)

CASES = [
    InvalidSourceError("pkg:fn", "module 'pkg' was not found"),
    CorruptModelError("/tmp/m.onnx", "truncated"),
    InputError("image", "dtype", "float32", "float64"),
    ParityError("logits", 4, 0.5, 1e-4, 1e-3),
    SpecError("bad spec"),
    NotFoundError("no model"),
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
    assert NotFoundError("x").http_status == 404
    assert InputError("a", "b", 1, 2).http_status == 400
