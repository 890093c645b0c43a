"""How a failed request is answered, over either protocol: one decision, two encodings.

:func:`error_answer` decides once what an exception means for the client: the HTTP status (a
:class:`KilnError` carries its own, anything else is 500), the message (with no server path in it) and,
for an overload, ``Retry-After``. HTTP answers it as ``{"error": message}`` (``app.py``); gRPC as the
status code :data:`GRPC_CODES` gives that HTTP status, with the message as details (``grpc_service.py``).
Errors kiln did not raise on purpose are logged with their traceback and answered with a generic message.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import grpc

from kiln.errors import KilnError
from kiln.repository import Repository

log = logging.getLogger("kiln.serving")

# The gRPC status for each HTTP status an error carries; any other is INTERNAL.
GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def grpc_code(http_status: int) -> grpc.StatusCode:
    return GRPC_CODES.get(http_status, grpc.StatusCode.INTERNAL)


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """What the client is told of a failed request, whichever protocol carries it."""

    status: int  # the HTTP status
    message: str
    retry_after: str | None = None  # HTTP's Retry-After header (whole seconds) for an overload answer

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return grpc_code(self.status)


def error_answer(exc: BaseException, repository: Repository) -> ErrorAnswer:
    """The answer to a request that raised ``exc``: known errors say what is wrong, with files named relative
    to ``repository`` (no answer carries a server path); others are logged, answered 500."""
    if isinstance(exc, KilnError):
        message = _ABSOLUTE_PATH.sub("<path>", repository.relative(str(exc)))
        return ErrorAnswer(exc.http_status, message, retry_after(exc))
    log.error("unexpected error while serving a request", exc_info=exc)
    return ErrorAnswer(500, "internal server error; the server log has the details")


def retry_after(exc: BaseException) -> str | None:
    """``Retry-After`` (whole seconds, at least 1) for an overload answer; None for other errors."""
    wait = getattr(exc, "retry_after_s", None)
    if wait is None:
        return None
    return str(max(1, math.ceil(wait)))


# An absolute path under a top-level directory of this machine (/home/..., /tmp/...): the net under
# ``Repository.relative`` that keeps every other server path out of answers. URL paths (/v2/...) stay.
_ABSOLUTE_PATH = re.compile(
    r"(?<![\w.:/-])/(?:"
    + "|".join(sorted(re.escape(p.name) for p in Path("/").iterdir() if p.is_dir()))
    + r")(?![\w.-])(?:/[^\s'\",;:)\]]*)?"
)
