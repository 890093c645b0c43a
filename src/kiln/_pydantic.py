"""pydantic's validation errors in kiln's words: where (``inputs[0].dtype``), what was expected and what
came, and for a name the model does not take, the names it does; :func:`kiln.errors.spec_error` uses them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


def location(loc: Sequence[Any]) -> str:
    """``('inputs', 0, 'dtype')`` -> ``inputs[0].dtype``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def pydantic_problem(err: Any, known: Sequence[str] = ()) -> str:
    """One pydantic error in kiln's words: what was expected and what came (``must be 'a' or 'b', not 'c'``);
    for a name the model does not take, the names it does (``known``)."""
    kind, ctx, got = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return "is not accepted" + (f"; the valid ones are {', '.join(known)}" if known else "")
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}, not {_shown(got)}"
    if kind in _BOUNDS and ctx:
        return f"must be {_BOUNDS[kind]} {next(iter(ctx.values()))}, not {_shown(got)}"
    if kind == "string_pattern_mismatch":
        return f"{_shown(got)} does not match the pattern {ctx.get('pattern')}"
    msg = str(err["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    for subject in ("Input", "String", "List", "Tuple", "Dictionary", "Value"):
        if msg.startswith(f"{subject} should "):
            shown = "" if isinstance(got, (dict, list)) else f", not {_shown(got)}"
            return "must " + msg.removeprefix(f"{subject} should ") + shown
    return msg


def known_fields(exc: ValidationError, parents: Sequence[Any]) -> list[str]:
    """The fields of the model that refused an unknown one, found from the validation call in the traceback
    (pydantic's error names the model only by its title) and then down ``parents`` for a nested model."""
    from pydantic import BaseModel

    model: Any = None
    tb = exc.__traceback__
    while tb is not None:
        for name in ("cls", "self", "__pydantic_self__"):
            value = tb.tb_frame.f_locals.get(name)
            cand = value if isinstance(value, type) else type(value)
            if isinstance(cand, type) and issubclass(cand, BaseModel) and cand.__name__ == exc.title:
                model = cand
        tb = tb.tb_next
    for part in parents:
        if model is None or isinstance(part, int):
            continue
        info = model.model_fields.get(str(part))
        model = None if info is None else _model_in(info.annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation (``Sub``, ``Sub | None``, ``list[Sub]``), or None."""
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)
