"""Durable state: API keys and client tokens (and later usage and credits)."""

from .store import ApiKey, ClientToken, Principal, Store

__all__ = ["ApiKey", "ClientToken", "Principal", "Store"]
