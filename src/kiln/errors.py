"""The exceptions kiln users see.

Every failure a user can cause or fix is a :class:`KilnError`. Its message states the value, the rule
and the fix; structured fields let callers react without parsing text. The CLI prints the message as
one line and exits 2; the server maps :attr:`KilnError.http_status` to the response.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kiln._pydantic import known_fields, location, pydantic_problem
from kiln._version import DISTRIBUTION

if TYPE_CHECKING:
    from pydantic import ValidationError


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's first line (its type's name when it has no text), cut at ``limit`` characters: what a
    one-line error shows of a library's exception, whose later lines are traces."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def pip_install(package: str, extra: str | None = None) -> str:
    """The command that installs ``package``: kiln's extra when one carries it, else the package itself."""
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {package}"


def spec_error(
    exc: ValidationError, what: str, *, empty: str = "", flag: bool = False, fix: str = "",
    options: dict[str, str] | None = None,
) -> SpecFieldError:  # fmt: skip
    """The :class:`SpecFieldError` for pydantic's first problem, in kiln's words: ``field`` is its location
    (``inputs[0].dtype``), ``empty`` for the whole object, or with ``flag`` the option (``--max-memory``;
    ``options`` names those whose flag is not the field's name, ``{"request_timeout_s": "--timeout"}``)."""
    err = exc.errors()[0]
    loc = err["loc"]
    option = (options or {}).get(str(loc[0])) if loc else None
    field = (option or "--" + str(loc[0]).replace("_", "-")) if flag and loc else location(loc) or empty
    known = known_fields(exc, loc[:-1]) if err["type"] == "extra_forbidden" else []
    return SpecFieldError(what, field, pydantic_problem(err, known), fix)


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


class ExampleShapeError(KilnError):
    """A model that ran at none of the sizes kiln tried for its dynamic ``dims`` besides batch."""

    def __init__(self, source: str, dims: list[str], problem: str) -> None:
        super().__init__(f"{source}: {problem}")
        self.source = source
        self.dims = dims


class ExportError(KilnError):
    """The framework could not convert the model (for example to ONNX)."""

    http_status = 422


class SpecError(KilnError):
    """A model spec that is invalid, or that does not match the model or an existing version."""

    http_status = 422


class SpecFieldError(SpecError):
    """One field of a spec, of a set of options or of an op's arguments, refused by its validator; read
    ``{what} {field}: {problem}[; {fix}]``, built by :func:`spec_error` from pydantic's error."""

    def __init__(self, what: str, field: str, problem: str, fix: str = "") -> None:
        msg = f"{' '.join(p for p in (what, field) if p)}: {problem}"
        super().__init__(f"{msg}; {fix}" if fix else msg)
        self.what = what
        self.field = field
        self.problem = problem


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
    """A model, version, variant or registered name that does not exist; ``available`` lists those that do.

    With ``owner`` (``"model 'm'"``): "{owner} has no {kind} {name!r}; available {kind}s: [...]" (or, with no
    name, "{owner} has no {kind}s in {where}"); with only ``where``: "{kind} {name!r} is not in {where}; it
    holds [...]"; with neither, a registry's "unknown {kind} {name!r}; known {kind}s: [...]". Then "; {fix}".
    """

    http_status = 404

    def __init__(
        self,
        kind: str,
        name: object,
        available: Sequence[object] = (),
        *,
        owner: str = "",
        where: str = "",
        fix: str = "",
    ) -> None:
        self.kind, self.name, self.available, self.owner, self.where = kind, name, list(available), owner, where
        kinds = kind + ("es" if kind.endswith("s") else "s")
        if owner and name is None:
            msg = f"{owner} has no {kinds}" + (f" in {where}" if where else "")
        elif owner:
            msg = f"{owner} has no {kind} {name!r}; available {kinds}: {self.available}"
        elif where:
            msg = f"{kind} {name!r} is not in {where}; it holds {self.available or f'no {kinds}'}"
        else:
            msg = f"unknown {kind} {name!r}; known {kinds}: {self.available}"
        super().__init__(f"{msg}; {fix}" if fix else msg)


class VersionNotServedError(NotFoundError):
    """A version the repository holds but the model's version policy does not serve."""

    def __init__(self, model: str, version: int, policy: str, served: Sequence[int]) -> None:
        KilnError.__init__(
            self,
            f"model {model!r} version {version} is not served: its version policy ({policy}) serves {list(served)}",
        )
        self.kind, self.name, self.available, self.where = "version", version, list(served), ""
        self.owner = f"model {model!r}"
        self.model = model
        self.policy = policy


class EngineUnavailableError(KilnError):
    """An engine that is unknown, not installed, or cannot run this model on this machine."""

    http_status = 422


class MissingExtraError(EngineUnavailableError):
    """An optional dependency that is not installed; ``extra`` is kiln's extra that carries ``package``
    (``"interop"``, ``"zoo"``), None for a dependency of kiln itself (a broken install)."""

    def __init__(self, extra: str | None, package: str, feature: str) -> None:
        self.install = pip_install(package, extra)
        super().__init__(f"{feature} needs {package}: {self.install}")
        self.extra = extra
        self.package = package
        self.feature = feature


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


class DataError(KilnError):
    """Data (validation, calibration, or files to predict on) that cannot be read or does not fit the model."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"data {source!r}: {reason}")
        self.source = source
        self.reason = reason


class OutputFileError(KilnError):
    """A file kiln was asked to write its results to (``kiln predict --output``) that it cannot write, or
    that would overwrite one of its inputs; nothing was written to it."""

    def __init__(self, path: str, problem: str, fix: str = "", flag: str = "--output") -> None:
        msg = f"{flag} {path}: {problem}"
        super().__init__(f"{msg}; {fix}" if fix else msg)
        self.path = path
        self.problem = problem
        self.flag = flag


class SettingError(KilnError):
    """An environment variable (``KILN_NUM_THREADS``) whose value kiln cannot use."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"environment variable {variable}: {problem}; fix its value or unset it")
        self.variable = variable
        self.problem = problem


class AccuracyBudgetError(AccuracyError):
    """An optimized variant whose task metric or output drift is outside the accuracy budget."""

    def __init__(self, variant: str, metric: str, value: float, bound: float, rule: str) -> None:
        super().__init__(
            f"variant {variant!r}: {metric} {value:.6g} is outside the budget ({rule} {bound:.6g}); "
            "loosen the budget (--max-drop, --min-sqnr-db) or exclude this kind of variant"
        )
        self.variant = variant
        self.metric = metric
        self.value = value
        self.bound = bound
        self.rule = rule


class NoVariantWithinBudgetError(AccuracyError):
    """Not one variant, not even the fp32 reference, stayed inside the accuracy budget."""

    def __init__(self, model: str, tried: int, budget: str) -> None:
        super().__init__(
            f"none of the {tried} variants of {model!r} stayed within the budget ({budget}), not even fp32; "
            "check that the validation data and labels match the model, or loosen the budget"
            if tried
            else f"no variant of {model!r} was measured: each was skipped or left out; see the table above, "
            "and widen --include / --exclude, --engine or --precision"
        )
        self.model = model
        self.tried = tried
        self.budget = budget


class NoVariantBuiltError(KilnError):
    """Every variant the search tried failed to build or run, so none could be checked against the budget."""

    http_status = 422

    def __init__(self, model: str, failed: int, first: str) -> None:
        super().__init__(
            f"none of the {failed} variants of {model!r} could be built and run, so none was checked; the first "
            f"failure: {first}"
        )
        self.model = model
        self.failed = failed
        self.first = first


class PassNotApplicable(KilnError):
    """A pass that has nothing to do on this model (no Conv+BN pairs, no Linear layers): the search skips the
    variant and records why, instead of failing it."""


# ---- bench ---------------------------------------------------------------------------------------------
class CompareError(KilnError):
    """Two bench JSON files that cannot be compared, or one that is not a bench JSON file."""


class LoadTargetError(KilnError):
    """A load-generator target that is not allowed or not reachable."""


# ---- serving -------------------------------------------------------------------------------------------
class ProtocolError(KilnError):
    """A request that does not follow the inference protocol: malformed JSON, a missing or bad field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class InvalidNameError(ProtocolError):
    """A model name or version that breaks the grammar, or that would resolve outside the repository."""

    def __init__(self, field: str, value: str, rule: str) -> None:
        shown = value if len(value) <= 64 else value[:61] + "..."
        super().__init__(field, f"{shown!r} {rule}")
        self.value = value
        self.rule = rule


class UnsupportedEncodingError(ProtocolError):
    """A request body in a content coding the server cannot decode (415)."""

    http_status = 415


class PayloadTooLargeError(KilnError):
    """A request body over the server's limit."""

    http_status = 413

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"request body of {size} bytes exceeds the limit of {limit} bytes; send smaller batches "
            "or raise --max-body-bytes"
        )
        self.size = size
        self.limit = limit


class DecompressedTooLargeError(PayloadTooLargeError):
    """A compressed request body whose decompressed size passes the body limit (a zip bomb, or a big batch)."""

    def __init__(self, size: int, limit: int, coding: str) -> None:
        KilnError.__init__(
            self,
            f"request body decompresses ({coding}) to more than {limit} bytes (read {size} so far), past the "
            "limit; send smaller batches or raise --max-body-bytes",
        )
        self.size = size
        self.limit = limit
        self.coding = coding


class UnauthorizedError(KilnError):
    """A management request without the bearer token the server was started with."""

    http_status = 401


class ModelNotReadyError(KilnError):
    """A model that is known but not loaded (or still loading, or draining)."""

    http_status = 503


class RequestMemoryFullError(KilnError):
    """Back-pressure on memory: the requests in flight hold as many bytes as the server allows."""

    http_status = 503
    retry_after_s = 1.0

    def __init__(self, held: int, size: int, limit: int) -> None:
        super().__init__(
            f"the server is holding {held} bytes of requests in flight, and this one ({size} bytes so far) would "
            f"pass its budget of {limit} bytes (KILN_SERVE_MAX_INFLIGHT_BYTES); retry later"
        )
        self.held = held
        self.size = size
        self.limit = limit


class ClientClosedError(KilnError):
    """The client went away (or cancelled) while its request waited: it is dropped before it runs."""

    http_status = 499  # nginx's code for it; no answer reaches the client

    def __init__(self, model: str) -> None:
        super().__init__(f"the client closed the connection before model {model!r} answered")
        self.model = model


class MemoryBudgetError(KilnError):
    """A model that does not fit in the server's memory budget even after evicting the others."""

    http_status = 507

    def __init__(self, model: str, needed: int, budget: int) -> None:
        super().__init__(
            f"model {model!r} needs about {needed / 2**20:.1f} MiB, more than the memory budget of "
            f"{budget / 2**20:.1f} MiB; raise --max-memory"
        )
        self.model = model
        self.needed = needed
        self.budget = budget


class WarmupFailedError(KilnError):
    """A model version that loaded but failed its warm-up run, so it is not served."""

    def __init__(self, model: str, version: int, reason: str) -> None:
        super().__init__(f"model {model!r} version {version} failed its warm-up run: {reason}")
        self.model = model
        self.version = version
        self.reason = reason


class ProcessingError(KilnError):
    """A raw instance that pre- or post-processing cannot handle; ``index`` names the instance in its batch."""

    def __init__(self, op: str, reason: str, index: int | None = None) -> None:
        where = f"instance {index}: " if index is not None else ""
        super().__init__(f"{where}{op}: {reason}")
        self.op = op
        self.reason = reason
        self.index = index


class BindError(KilnError):
    """A port the server cannot listen on; ``flag`` is the option that chooses it."""

    def __init__(self, protocol: str, host: str, port: int, flag: str, problem: str, fix: str) -> None:
        super().__init__(f"{protocol} port {port} on {host} {problem}; {fix}")
        self.protocol = protocol
        self.host = host
        self.port = port
        self.flag = flag


class PortInUseError(BindError):
    """Another process (often another ``kiln serve``) already listens on the port."""

    def __init__(self, protocol: str, host: str, port: int, flag: str) -> None:
        super().__init__(
            protocol, host, port, flag, "is already in use (another kiln serve?)",
            f"stop that process or pass {flag} 0 to pick a free port",
        )  # fmt: skip


class RepositoryUnreadableError(KilnError):
    """A ``kiln serve`` repository that is missing, not a directory, or that this user may not read."""

    def __init__(self, path: str, problem: str, fix: str) -> None:
        super().__init__(f"repository {path} {problem}; {fix}")
        self.path = path
        self.problem = problem


class ModelLoadError(KilnError):
    """A model that failed to load when the server started (preload mode); ``version`` when it is known."""

    def __init__(self, model: str, version: int | None, reason: str, fix: str) -> None:
        which = f"model {model!r}" + (f" version {version}" if version is not None else "")
        super().__init__(f"{which} failed to load at start: {reason}; {fix}")
        self.model = model
        self.version = version
        self.reason = reason


class SharedMemoryError(ProtocolError):
    """A system shared memory region that cannot be registered as asked, or a tensor that does not fit the
    part of the region it names; nothing outside the region is read or written."""

    def __init__(self, region: str, problem: str) -> None:
        super().__init__(f"system shared memory region {region!r}", problem)
        self.region = region


class UnknownSharedMemoryRegionError(SharedMemoryError):
    """A region name that is not registered (Triton answers "Unable to find system shared memory region")."""

    def __init__(self, region: str, registered: list[str]) -> None:
        shown = registered[:10] + (["..."] if len(registered) > 10 else [])
        KilnError.__init__(
            self,
            f"Unable to find system shared memory region {region!r} (registered: {shown}); register it first "
            f"(POST /v2/systemsharedmemory/region/{region}/register or gRPC SystemSharedMemoryRegister)",
        )
        self.field = f"system shared memory region {region!r}"
        self.problem = "is not registered"
        self.region = region
        self.registered = registered


class SharedMemoryLimitError(KilnError):
    """Registering one more region would pass the server's cap on regions or on mapped bytes (507)."""

    http_status = 507

    def __init__(self, region: str, what: str, value: int, limit: int, fix: str) -> None:
        super().__init__(
            f"cannot register system shared memory region {region!r}: {what} would be {value}, past the limit of "
            f"{limit}; {fix}"
        )
        self.region = region
        self.what = what
        self.value = value
        self.limit = limit
