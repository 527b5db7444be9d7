"""The avatar engine: a portrait that talks with the client's voice, on a CPU, in real time.

`live_avatar` sessions give it a portrait (`set_image`) and their microphone; it has no
camera. Per portrait, once (`configure`, about 0.1-0.3 s):

1. the face and its landmarks (landmarks.py: OpenCV's Haar cascades, a template fitted
   to the eyes and moved by the picture's own evidence: lips by colour, brows and chin
   by shading);
2. the portrait fitted to the output frame, face large and high, the rest of the frame
   filled with the same photo blurred (portrait.py);
3. the animator's rig (animator.py: the portrait's planes and the warp's grid).

Per frame (a clock drives `transform` at 25 fps): the voice heard up to the frame's time
(speech.py: loudness and formants every 10 ms, smoothed like a jaw), the expression the
behaviour prompt asked for (expressions.py, eased in over a third of a second), a blink
and the head's drift and nods (motion.py) make a `Drive`, and the animator draws it.

Options (`--engine avatar:seed=7,motion=0.5`): `seed` fixes every session's blink and
head-motion seed (by default each session draws its own), `motion` scales head motion
(0 keeps the head still), `model=DIR` is reserved for a learned lip-sync model and is
refused for now.

Errors: an input without a portrait, or a portrait without a face the detector finds,
is refused with `EngineRefused` (the client gets its message in the input's ack); the
prompt encoder's missing weights raise `weights.WeightsUnavailable` as in the neural
engine.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
from av import VideoFrame

from ...models import ModelSpec
from ..base import Controls, Engine, EngineRefused, EngineSession
from .animator import Animator, Drive, Expression, Portrait, WarpAnimator
from .expressions import Behaviour, ExpressionCatalog
from .landmarks import NoFaceFound, as_rgb, find_landmarks
from .motion import Blinker, ExpressionEase, HeadMotion
from .portrait import compose, placement
from .speech import SpeechTracker

logger = logging.getLogger(__name__)

OPTIONS = ("seed", "motion", "model")
#: The refusals say "not allowed", as the transport's do, so that the published clients
#: do not retry: only another picture helps.
NO_PORTRAIT = (
    "live_avatar needs a portrait: a session without one is not allowed;"
    " send set_image with image_data before the offer"
)
NO_FACE = (
    "no face found in the portrait image: a portrait without a face is not allowed;"
    " live_avatar needs a photo of one face, seen from the front, at least 1/12 of the"
    " picture's width"
)
NO_MODEL = (
    "the avatar engine's model option is reserved for a learned lip-sync model, which is "
    "not supported yet: leave it out to use the built-in warp animator (no model is ever "
    "downloaded)"
)
#: How long after it was heard the voice should go back to the client: not at all. The
#: mouth follows a sound within a frame or two (the analysis window, the 35 ms attack,
#: the next 40 ms tick), but the voice's own way back (the client's audio jitter buffer)
#: is longer than the frames': measured end to end (bench/avatar.py --parts session,
#: espeak-ng syllables), holding it back 80 ms put the mouth 110-125 ms ahead of the
#: voice at our SDK; with no hold it is 35-41 ms ahead there, and 1-21 ms behind at
#: `decart==0.0.30` (which shows each frame one interval late).
AUDIO_DELAY = 0.0


def parse_options(text: str) -> dict[str, str]:
    """`seed=7,motion=0.5` -> {"seed": "7", "motion": "0.5"}."""
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in OPTIONS:
            raise ValueError(f"bad avatar engine option {part!r} (known: {', '.join(OPTIONS)})")
        options[key] = value
    return options


class ExpressionSource(Protocol):
    """What turns a behaviour prompt into a `Behaviour`: `ExpressionCatalog`, or a
    stand-in in tests."""

    def behaviour(self, prompt: str, enhance: bool = True) -> Behaviour: ...


class AvatarEngine(Engine):
    """The built-in warp animator behind `live_avatar`. The behaviour catalog (and with it
    the prompt encoder) loads on the first prompt, once per process."""

    name = "avatar"

    def __init__(
        self,
        options: str = "",
        expressions: ExpressionSource | None = None,
        animator: Callable[[], Animator] = WarpAnimator,
    ) -> None:
        parsed = parse_options(options)
        if "model" in parsed:
            raise ValueError(NO_MODEL)
        self.seed = int(parsed["seed"]) if "seed" in parsed else None
        self.motion = float(parsed.get("motion", "1"))
        if not 0.0 <= self.motion <= 3.0:
            raise ValueError("motion must be between 0 and 3")
        self._animator = animator
        self._expressions = expressions
        self._lock = threading.Lock()

    def behaviour(self, prompt: str, enhance: bool) -> Behaviour:
        with self._lock:
            if self._expressions is None:
                self._expressions = ExpressionCatalog.load()
            catalog: ExpressionSource = self._expressions
        return catalog.behaviour(prompt, enhance)

    def open_session(self, spec: ModelSpec) -> AvatarSession:
        seed = self.seed if self.seed is not None else secrets.randbits(32)
        return AvatarSession(spec, self, seed, self._animator())


class AvatarSession(EngineSession):
    """One client's portrait, voice and behaviour."""

    listens = True
    audio_delay = AUDIO_DELAY

    def __init__(self, spec: ModelSpec, engine: AvatarEngine, seed: int, animator: Animator):
        super().__init__(spec)
        self.engine = engine
        self.seed = seed
        self.animator = animator
        self.speech = SpeechTracker()
        self._lock = threading.Lock()
        self._image: np.ndarray | None = None
        self._behaviour: Behaviour | None = None
        self._target = Expression()
        self._ease = ExpressionEase()
        self._blinker: Blinker | None = None
        self._head: HeadMotion | None = None
        self._frames = 0
        #: The portrait as fitted to the frame, and the last drive drawn (for tests, tools).
        self.portrait: Portrait | None = None
        self.last_drive: Drive | None = None

    @property
    def description(self) -> str | None:
        return None if self._behaviour is None else self._behaviour.description

    def configure(self, controls: Controls) -> None:
        if controls.image is None:
            raise EngineRefused(NO_PORTRAIT)
        portrait = None
        if controls.image is not self._image:  # a prompt change keeps the same array
            portrait = self._fit(controls.image)
        behaviour = (
            self.engine.behaviour(controls.prompt, controls.enhance)
            if controls.prompt is not None
            else None
        )
        with self._lock:
            if portrait is not None:
                try:
                    self.animator.load(portrait)
                except ValueError as exc:
                    raise EngineRefused(f"the portrait cannot be animated: {exc}") from None
                self.portrait = portrait
                self._image = controls.image
            self._behaviour = behaviour
            self._target = behaviour.expression if behaviour is not None else Expression()

    def _fit(self, image: np.ndarray) -> Portrait:
        try:
            rgb = as_rgb(image)
        except ValueError as exc:
            raise EngineRefused(f"the portrait image cannot be used: {exc}") from None
        try:
            marks = find_landmarks(rgb)
        except NoFaceFound:
            raise EngineRefused(NO_FACE) from None
        width, height = self.spec.width, self.spec.height
        matrix = placement((rgb.shape[1], rgb.shape[0]), marks, width, height)
        portrait = Portrait(compose(rgb, matrix, width, height), marks.transformed(matrix))
        logger.info(
            "portrait %dx%d: face found, eye distance %.0f px in the frame, lips %s",
            rgb.shape[1],
            rgb.shape[0],
            portrait.landmarks.scale,
            "seen" if marks.lips_found else "templated",
        )
        return portrait

    def hear(self, samples: np.ndarray, until: float) -> None:
        self.speech.push(samples, until)

    def transform(self, frame: VideoFrame) -> VideoFrame:
        now = frame.time if frame.time is not None else self._frames / self.spec.fps
        self._frames += 1
        with self._lock:
            if self.portrait is None:
                return _blank(self.spec.width, self.spec.height)
            if self._blinker is None or self._head is None:
                self._blinker = Blinker(self.seed, now)
                self._head = HeadMotion(self.seed, now)
            mouth = self.speech.advance(now)
            expression = self._ease.at(now, self._target)
            drive = Drive(
                time=now,
                mouth=mouth,
                expression=expression,
                blink=self._blinker.at(now),
                pose=self._head.at(now, mouth, expression, self.engine.motion),
                audio=self.speech.recent(),
            )
            self.last_drive = drive
            return self.animator.render(drive)


def _blank(width: int, height: int) -> VideoFrame:
    """A black frame, for the moments before a portrait is set."""
    frame = VideoFrame(width, height, "yuv420p")
    for index, value in ((0, 16), (1, 128), (2, 128)):
        plane = frame.planes[index]
        np.frombuffer(memoryview(plane), np.uint8)[:] = value
    return frame
