"""The SDK's one exception type, with the error codes the published SDKs use."""

from __future__ import annotations

from enum import StrEnum

from .protocol import is_permanent_error


class ErrorCode(StrEnum):
    INVALID_API_KEY = "INVALID_API_KEY"
    INVALID_BASE_URL = "INVALID_BASE_URL"
    WEB_RTC_ERROR = "WEB_RTC_ERROR"
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"
    INVALID_INPUT = "INVALID_INPUT"
    TOKEN_CREATE_ERROR = "TOKEN_CREATE_ERROR"
    SERVER_ERROR = "SERVER_ERROR"
    TIMEOUT = "TIMEOUT"


class LivemorphError(Exception):
    """Any failure the SDK reports; `code` says which kind."""

    def __init__(self, message: str, code: ErrorCode | str = ErrorCode.SERVER_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = ErrorCode(code)

    @property
    def permanent(self) -> bool:
        """True when retrying cannot help (bad key, not allowed, invalid session...)."""
        return self.code in (ErrorCode.INVALID_API_KEY, ErrorCode.MODEL_NOT_FOUND) or (
            is_permanent_error(self.message)
        )

    def __repr__(self) -> str:
        return f"LivemorphError({self.message!r}, code={self.code.value!r})"


def error_from_server_text(text: str) -> LivemorphError:
    """Classify an `error` message from the server into a coded SDK error."""
    lowered = text.lower()
    if "invalid api key" in lowered or "unauthorized" in lowered or "401" in lowered:
        return LivemorphError(text, ErrorCode.INVALID_API_KEY)
    if "model not found" in lowered or "model not available" in lowered:
        return LivemorphError(text, ErrorCode.MODEL_NOT_FOUND)
    return LivemorphError(text, ErrorCode.WEB_RTC_ERROR)
