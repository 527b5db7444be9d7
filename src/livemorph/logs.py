"""Logging setup, and the filter that keeps secrets out of every log line.

Clients put their key in the WebSocket URL (`?api_key=...`), and servers log URLs.
The filter rewrites any `api_key=`, `token=`, `X-API-KEY`, `admin_key`/`X-ADMIN-KEY` or
`Bearer` value, and anything shaped like a livemorph key, before it is written.
"""

from __future__ import annotations

import logging
import re

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
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


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
