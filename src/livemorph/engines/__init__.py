"""Engines turn camera frames into model output. See `base.Engine` for the seam."""

from .base import Controls, Engine, EngineSession
from .registry import EngineRegistry, ModelNotAvailable

__all__ = ["Controls", "Engine", "EngineRegistry", "EngineSession", "ModelNotAvailable"]
