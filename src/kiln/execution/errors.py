"""The failures of running a model (:mod:`kiln.execution`): back-pressure, deadlines, an engine that
raises, runs out of memory or hangs, a process instance that exits, a batcher that is closing. Both bench
and serving see them; the server maps each one's :attr:`~kiln.errors.KilnError.http_status` to its answer."""

from __future__ import annotations

from kiln.errors import KilnError


class QueueFullError(KilnError):
    """Back-pressure: the model's queue holds as many requests as it may; retry later."""

    http_status = 503

    def __init__(self, model: str, queued: int, limit: int) -> None:
        super().__init__(
            f"model {model!r} is overloaded: {queued} requests queued, the limit is {limit}; retry later "
            "or raise serving.max_queue_size / serving.instances"
        )
        self.model = model
        self.queued = queued
        self.limit = limit


class OverloadedError(KilnError):
    """Deadline-aware admission: the work queued ahead would not finish within the request's budget."""

    http_status = 503

    def __init__(self, model: str, wait_s: float, budget_s: float, client_deadline: bool) -> None:
        where = "its timeout" if client_deadline else "the model's queue budget (serving.queue_budget_ms)"
        super().__init__(
            f"model {model!r} is overloaded: the estimated wait of {wait_s * 1e3:.3g} ms exceeds {where} of "
            f"{budget_s * 1e3:.3g} ms; retry later, or raise serving.instances"
        )
        self.model = model
        self.wait_s = wait_s
        self.budget_s = budget_s
        self.client_deadline = client_deadline

    @property
    def retry_after_s(self) -> float:
        return self.wait_s


class EngineFailedError(KilnError):
    """The engine raised while running a batch: the requests of that batch fail, the others go on."""

    http_status = 500

    def __init__(self, model: str, kind: str, reason: str) -> None:
        super().__init__(f"model {model!r} failed to run this batch ({kind}); {reason}")
        self.model = model
        self.kind = kind
        self.reason = reason


class EngineInputError(KilnError):
    """The engine refused a request's inputs that passed the spec's checks (it still runs others)."""

    http_status = 400

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(
            f"model {model!r} could not run this request's inputs (its other requests run): {reason}; "
            f"check the shapes against GET /v2/models/{model}"
        )
        self.model = model
        self.reason = reason


class EngineOutOfMemoryError(EngineFailedError):
    """The engine could not allocate memory for a batch; smaller batches or fewer models may fit."""

    http_status = 503


class InstanceExitedError(EngineFailedError):
    """A process instance died while it ran a batch; the run fails at once and the next one restarts it."""

    http_status = 503

    def __init__(self, model: str, exit_code: int | None) -> None:
        super().__init__(model, "exit", f"its instance process exited (code {exit_code}) and is restarting; retry")
        self.exit_code = exit_code


class ComputeTimeoutError(EngineFailedError):
    """A batch that ran past ``serving.compute_timeout_ms``: its requests are answered; the instance is
    stopped (a process) or abandoned (a thread), and the model reloads."""

    http_status = 503


class RequestTimeoutError(KilnError):
    """A request that did not finish within its timeout."""

    http_status = 504

    def __init__(self, model: str, timeout_s: float) -> None:
        super().__init__(f"request to model {model!r} did not finish within {timeout_s:g} s")
        self.model = model
        self.timeout_s = timeout_s


class ShuttingDownError(KilnError):
    """The server is draining and takes no new work."""

    http_status = 503


class BatcherClosedError(ShuttingDownError):
    """The batcher of a version being retired (reload or unload); the caller may retry on the new one."""

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is unloading; retry to reach its new version")
        self.model = model
