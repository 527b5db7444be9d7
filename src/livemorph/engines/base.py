"""The engine seam: what the session pipeline asks of a model.

An `Engine` is loaded once per process (weights, runtimes). Each streaming session gets
its own `EngineSession` holding that session's controls (prompt, reference image). The
pipeline calls `configure` and `transform` from worker threads, never concurrently for
one session, so an engine session needs no locking of its own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from av import VideoFrame

from ..models import ModelSpec


@dataclass(frozen=True, slots=True)
class Controls:
    """What a client has asked for. No prompt and no image means passthrough."""

    prompt: str | None = None
    enhance: bool = True
    image: np.ndarray | None = None

    @property
    def passthrough(self) -> bool:
        return self.prompt is None and self.image is None


class EngineUnavailable(RuntimeError):
    """The engine cannot apply an input because something it needs is missing on this
    server (weights it could not fetch, say). `str()` is the whole story, for the log;
    `public` says it in words fit for the client, without the server's paths."""

    def __init__(self, message: str, public: str) -> None:
        super().__init__(message)
        self.public = public


#: The rate of the audio an engine hears (`EngineSession.hear`): mono float32 samples.
AUDIO_RATE = 16_000


class EngineRefused(ValueError):
    """The engine cannot work with this input (no portrait, no face in it): `str()` says why
    in words fit for the client, and the client gets it in the input's ack."""


class EngineSession(ABC):
    """Per-session engine state; lives as long as one streaming session."""

    #: True for an engine that makes its picture from the client's audio (an avatar) rather
    #: than from a camera: the session then drives `transform` from a clock at the model's
    #: frame rate (each frame blank, its `time` the moment it is due, in the session's
    #: monotonic seconds) and passes the client's audio to `hear` as it arrives.
    listens: ClassVar[bool] = False
    #: For an engine that listens: how long after it was heard the client's audio should
    #: be sent back, so the voice and the frames its mouth was drawn from leave together.
    audio_delay: float = 0.0

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec

    @abstractmethod
    def configure(self, controls: Controls) -> None:
        """Apply new controls; may be slow (embedding an image). Runs off the event loop."""

    @abstractmethod
    def transform(self, frame: VideoFrame) -> VideoFrame:
        """One camera frame in, one output frame at the model's size out."""

    def hear(self, samples: np.ndarray, until: float) -> None:  # noqa: B027 - optional hook
        """Audio from the client: mono float32 samples at `AUDIO_RATE`, the last of them
        heard at `until` (the same clock as the frames' `time`). Called on the event loop
        while `transform` may run on a worker thread: keep it quick, and lock what both
        touch. Only called when `listens` is true."""

    @property
    def description(self) -> str | None:
        """What the engine is rendering, in words: the enhanced prompt, if it makes one."""
        return None

    @property
    def network_size(self) -> tuple[int, int] | None:
        """The size (width, height) its network runs at now, for an engine that scales it
        to the machine (the neural engine); None for the rest. Read by the server's metrics
        from the event loop, so it must be a plain read of something already kept."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release per-session resources."""


class Engine(ABC):
    """A loaded model; one instance per process, shared by its sessions."""

    name: ClassVar[str]

    @abstractmethod
    def open_session(self, spec: ModelSpec) -> EngineSession: ...

    def full(self) -> bool:
        """True while the engine has as many sessions as it can serve (a GPU engine's batch
        limit, say): the server then refuses new ones with the at-capacity error. Called on
        the event loop just before `open_session`; an engine without a limit of its own
        leaves this to the server's admission by capacity."""
        return False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release process-wide resources (runtimes, thread pools)."""
