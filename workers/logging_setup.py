"""Structured JSON logs (one object per line) carrying a request id that follows a job from the API to the worker.

The API binds the id when a request arrives (`bind_request_id`, from `X-Request-Id` or a fresh one), puts it on the
job it enqueues, and the worker binds the same id while it runs that job, so `grep <id>` over both services' logs
shows the whole path. The id lives in a ContextVar, so concurrent asyncio requests and worker threads never mix ids.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from contextvars import ContextVar, Token
from datetime import datetime, timezone

request_id_var: ContextVar[str | None] = ContextVar("kvc_request_id", default=None)

# Attributes every LogRecord has; anything else was passed through `extra=` and is emitted as a field.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def new_request_id() -> str:
    """A fresh request id: 32 hex characters, like the ids OpenAI-style servers put in `X-Request-Id`."""
    return uuid.uuid4().hex


def bind_request_id(request_id: str | None = None) -> Token[str | None]:
    """Make `request_id` (or a new one) current for this context; pass the token to `request_id_var.reset`."""
    return request_id_var.set(request_id or new_request_id())


class JsonFormatter(logging.Formatter):
    """Render a record as a JSON line: ts, level, service, logger, message, request_id, then any extras."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id_var.get(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k not in entry})
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str | None = None) -> None:
    """Send every logger's records to stderr as JSON lines; the level comes from `level`, else `KVC_LOG_LEVEL`.

    Uvicorn's own loggers are routed through the root handler too, so the whole process speaks one format.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("KVC_LOG_LEVEL", "INFO")).upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
