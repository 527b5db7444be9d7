"""Streaming sessions: one peer connection, one engine pipeline, any number of viewers."""

from .pipeline import FramePacer, Pipeline
from .registry import SessionRegistry
from .session import Session, SessionEnded

__all__ = ["FramePacer", "Pipeline", "Session", "SessionEnded", "SessionRegistry"]
