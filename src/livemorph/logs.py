"""Logging setup, and the filter that keeps secrets out of every log line.

Clients put their key in the WebSocket URL (`?api_key=...`), and servers log URLs.
The filter rewrites any `api_key=`, `token=`, `X-API-KEY`, `admin_key`/`X-ADMIN-KEY` or
`Bearer` value, and anything shaped like a livemorph key, before it is written.

`--log-format json` writes one JSON object a line: time, level, logger, message, and the
session's id, key id and model when the record concerns one. Those come from `extra=`
or, for everything logged while a session is being served, from a context variable the
WebSocket handler binds (`bind_session`): asyncio tasks inherit it, and the pipeline hands
it to its worker threads, so an engine's own log lines carry it without knowing of it.
"""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar, Token
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_SECRET = re.compile(
    r"((?:api_key|apiKey|token|x-api-key|admin_key|x-admin-key)[=:]\s*|\bbearer\s+)"
    r"([^&\s\"',;]+)",
    re.IGNORECASE,
)
_KEY_LIKE = re.compile(r"\b(lm|ek)_[A-Za-z0-9_\-]{20,}")

#: Loggers that write request lines: uvicorn's own, plus livemorph's.
REDACTED_LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn", "livemorph")


def redact(text: str) -> str:
    text = _SECRET.sub(r"\1[redacted]", text)
    return _KEY_LIKE.sub(r"\1_[redacted]", text)


class RedactSecrets(logging.Filter):
    """Redacts the message and each of its arguments in place, keeping their shape: a
    formatter may read the arguments themselves (uvicorn's access lines unpack theirs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: _redacted(value) for key, value in record.args.items()}
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:  # a secret in the format or in an argument that is not text
            record.msg, record.args = cleaned, None
        return True


def _redacted(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


def install_redaction() -> None:
    """Attach the filter to every logger that may see a URL, and to the root handlers."""
    secret_filter = RedactSecrets()
    for name in REDACTED_LOGGERS:
        logging.getLogger(name).addFilter(secret_filter)
    for handler in logging.getLogger().handlers:
        handler.addFilter(secret_filter)
    for name in ("uvicorn.access", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(secret_filter)


# -- session fields and JSON lines --------------------------------------------------------

#: The record attributes (and JSON keys) that name a session.
SESSION_FIELDS = ("session_id", "key_id", "model")
FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class SessionFields:
    session_id: str | None = None
    key_id: str | None = None
    model: str | None = None


_session: ContextVar[SessionFields | None] = ContextVar("livemorph_log_session", default=None)


def bind_session(
    session_id: str | None = None, key_id: str | None = None, model: str | None = None
) -> Token[SessionFields | None]:
    """Tag what this task (and the tasks and worker calls it starts from now on) logs
    with these fields; `unbind_session(token)` undoes it."""
    return _session.set(SessionFields(session_id, key_id, model))


def unbind_session(token: Token[SessionFields | None]) -> None:
    _session.reset(token)


def session_fields() -> SessionFields | None:
    return _session.get()


class SessionContext(logging.Filter):
    """Puts the bound session's fields on each record that has none of its own (`extra=`
    wins). On the handler: it must run where the record was made, which for a handler is
    the same thread and context as the logging call."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _session.get()
        if bound is not None:
            for name in SESSION_FIELDS:
                if getattr(record, name, None) is None and (value := getattr(bound, name)):
                    setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line; every text in it passes `redact`, the traceback included."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for name in SESSION_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = redact(str(value))
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: str = "info", format: str = "text") -> None:
    """The root logger's handler (stderr) in `format`, text or json, at `level`; once per
    process, before anything else has set logging up (as `logging.basicConfig`).

    In json, uvicorn must be given `log_config=None` so its loggers reach this handler
    instead of its own text ones (`cli._cmd_serve`)."""
    if format not in FORMATS:
        raise ValueError(f"log format must be text or json, not {format!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(SessionContext())
    logging.basicConfig(level=level.upper(), handlers=[handler])
