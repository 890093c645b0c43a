"""The exceptions kiln users see.

Every failure a user can cause or fix is a :class:`KilnError`. Its message states the value, the rule
and the fix; structured fields let callers react without parsing text. The CLI prints the message as
one line and exits 2; the server maps :attr:`KilnError.http_status` to the response.
"""

from __future__ import annotations

from typing import Any


class KilnError(Exception):
    """Root of every error kiln raises on purpose."""

    http_status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take structured fields, so rebuild from the instance dict, not from args.
        return (_rebuild, (type(self), self.message, self.__dict__))


def _rebuild(cls: type[KilnError], message: str, state: dict[str, Any]) -> KilnError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class InvalidSourceError(KilnError):
    """A model source that cannot be read: a missing file, a bad factory path, an unknown format."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot import {source!r}: {reason}")
        self.source = source
        self.reason = reason


class UntrustedSourceError(InvalidSourceError):
    """A source whose loading would run code from the file (a pickle) and that was not marked trusted."""

    def __init__(self, source: str, reason: str, flag: str = "--trust-pickle") -> None:
        super().__init__(source, reason)
        self.flag = flag


class CorruptModelError(KilnError):
    """A model file that exists but is not a valid model (truncated, wrong format, failing the checker)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} is not a valid model: {reason}")
        self.path = path
        self.reason = reason


class ExportError(KilnError):
    """The framework could not convert the model (for example to ONNX)."""

    http_status = 422


class SpecError(KilnError):
    """A model spec that is invalid, or that does not match the model or an existing version."""

    http_status = 422


class InputError(KilnError):
    """A request's tensors do not match the spec: a name, dtype, rank or dimension."""

    def __init__(self, tensor: str, field: str, expected: Any, received: Any, hint: str = "") -> None:
        msg = f"input {tensor!r}: {field} must be {expected}, got {received}"
        super().__init__(f"{msg}; {hint}" if hint else msg)
        self.tensor = tensor
        self.field = field
        self.expected = expected
        self.received = received


class NotFoundError(KilnError):
    """A model or version that the repository does not hold."""

    http_status = 404


class EngineUnavailableError(KilnError):
    """An engine that is unknown, not installed, or cannot run this model on this machine."""

    http_status = 422


class UnsupportedError(KilnError):
    """A request the hardware cannot honour, such as bf16 on a CPU without AVX512-BF16 or AMX."""

    http_status = 422


class AccuracyError(KilnError):
    """A converted or optimized model whose outputs drift beyond the allowed tolerance."""

    http_status = 422


class ParityError(AccuracyError):
    """An exported artifact whose outputs differ from the source framework's beyond the tolerance."""

    def __init__(self, output: str, batch: int, max_abs_error: float, atol: float, rtol: float) -> None:
        super().__init__(
            f"exported model disagrees with the source on output {output!r} at batch {batch}: "
            f"max abs error {max_abs_error:.3g} exceeds atol={atol:g} + rtol={rtol:g}*|reference|; "
            "check for ops the exporter does not support, or raise --atol/--rtol if the drift is expected"
        )
        self.output = output
        self.batch = batch
        self.max_abs_error = max_abs_error
        self.atol = atol
        self.rtol = rtol


class ProcessingError(KilnError):
    """A raw instance that pre- or post-processing cannot handle; ``index`` names the instance in its batch."""

    def __init__(self, op: str, reason: str, index: int | None = None) -> None:
        where = f"instance {index}: " if index is not None else ""
        super().__init__(f"{where}{op}: {reason}")
        self.op = op
        self.reason = reason
        self.index = index
