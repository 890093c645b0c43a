"""Structured JSON logs, one object a line, carrying the request id of the request being served."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import sys
import time
import uuid
from typing import Any, Literal

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


def log_level_name(value: Any) -> Any:
    """A log level in any case and spacing (`` debug`` is ``DEBUG``), for a pydantic ``mode="before"`` check."""
    return value.strip().upper() if isinstance(value, str) else value


request_id: contextvars.ContextVar[str] = contextvars.ContextVar("kiln_request_id", default="")

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "color_message"}


_PREFIX = uuid.uuid4().hex[:12]
_counter = itertools.count(1)


def new_request_id() -> str:
    """Unique per process start and request; cheaper than a uuid4 per request."""
    return f"{_PREFIX}-{next(_counter)}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid:
            doc["request_id"] = rid
        for k, v in record.__dict__.items():
            if k not in _RESERVED and k != "request_id" and not k.startswith("_"):
                doc[k] = v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(fmt: str = "json", level: str = "INFO") -> None:
    """Send kiln's (and uvicorn's) logs to stderr, as JSON lines or plain text."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)  # a library's warning is one log line in the same format, not raw stderr text
    for name in ("kiln", "uvicorn", "uvicorn.error", "py.warnings"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
