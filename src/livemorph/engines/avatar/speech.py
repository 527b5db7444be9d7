"""What the voice says to the mouth: loudness and spectral shape, every 10 ms.

Each 10 ms hop looks at the last 25 ms of audio (Hann window, 512-point FFT on
pre-emphasised samples, so the voice's spectral tilt does not hide the formants):

- loudness: RMS in dBFS against a noise floor that follows the quietest hops (down at
  once, up by 1.5 dB a second) and a peak that follows the loudest (up at once, down by
  4 dB a second). Below the floor plus `GATE_DB`, or more than `MAX_RANGE_DB` under the
  peak, the mouth is shut; from there to the peak it opens in proportion, so a quiet
  microphone and a loud one both move it, and consonants close it between syllables;
- shape, from where the formants are (`Hop`): an open vowel (a) has a high first formant
  and opens the jaw fully, close ones (i, u) about half as far at the same loudness
  (first-formant centroid, measured on voice.py's vowels: a 750 Hz, o 650, e 520, u 400,
  i 280). A hop brighter than this voice's running average (more of its energy above
  1.5 kHz: the strong second formant of i and e) widens the lips; one darker than it
  (energy under about 700 Hz, as o and u keep it) rounds them. The average is the
  voice's own, learnt over a few seconds, because voices and microphones differ in
  brightness far more than vowels do (espeak-ng's voice puts a median -3 dB above
  1.5 kHz, voice.py's -12 dB). A hop whose energy is mostly above 3.5 kHz (a fricative,
  "s") narrows the opening and widens the lips.

The openness is then smoothed with a fast attack and a slower release (`ATTACK`,
`RELEASE`), as a jaw moves: it opens on a syllable within a frame or two and closes over
about three, so speech reads as speech, not as a level meter. Width and rounding settle
over `SHAPE_TIME`. Nothing here depends on the video frame rate: `advance(t)` runs every
hop heard up to `t`, and a gap in the audio (a muted microphone) counts as silence.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..base import AUDIO_RATE

HOP = AUDIO_RATE // 100
WINDOW = AUDIO_RATE * 25 // 1000
FFT = 512
#: The openness's attack and release time constants (seconds).
ATTACK, RELEASE = 0.035, 0.10
#: How fast width and rounding follow the spectrum (seconds).
SHAPE_TIME = 0.06
#: Speaking activity (head motion grows with it): attack and release (seconds).
ACTIVITY_ATTACK, ACTIVITY_RELEASE = 0.25, 1.2
#: The mouth opens from this far above the noise floor (dB); never below `ABSOLUTE_GATE`.
GATE_DB = 9.0
ABSOLUTE_GATE = -60.0
#: The loudness range that opens the mouth, from shut to fully open, is at least
#: `MIN_RANGE_DB` wide and at most `MAX_RANGE_DB`, below the recent peak: syllables sit
#: 5 to 25 dB under a voice's peak (espeak-ng's voice: quartiles -18, -11, -7 dB), and a
#: range wider than that would keep the mouth half open through every consonant.
MIN_RANGE_DB, MAX_RANGE_DB = 18.0, 28.0
#: The noise floor never goes below this (digital silence is -inf dB).
LOWEST_FLOOR = -90.0
#: How fast the voice's own average spectral shape is learnt (seconds), and its prior.
SHAPE_MEMORY = 3.0
PRIOR_FRONT_DB, PRIOR_FRONT_SPREAD = -6.0, 4.0
PRIOR_LOW_HZ, PRIOR_LOW_SPREAD = 900.0, 300.0
FLOOR_RISE, PEAK_FALL = 1.5, 4.0
#: Audio this much older than a frame (no new audio since) counts as silence.
STALE = 0.12
#: The raw audio kept for `recent` (seconds).
KEEP = 0.5

_FREQS = np.fft.rfftfreq(FFT, 1.0 / AUDIO_RATE)
_F1 = (_FREQS >= 200) & (_FREQS < 1000)
_LOW = (_FREQS >= 200) & (_FREQS < 2000)
_SPEECH = (_FREQS >= 200) & (_FREQS < 3500)
_FRONT = (_FREQS >= 1500) & (_FREQS < 3500)
_HIGH = _FREQS >= 3500
_ALL = _FREQS >= 100
_HANN = np.hanning(WINDOW).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Mouth:
    """The mouth the voice asks for at one moment; every value is 0..1."""

    open: float = 0.0
    wide: float = 0.0
    round: float = 0.0
    #: The unsmoothed loudness above the gate (for emphasis).
    level: float = 0.0
    #: How much the person has been speaking over the last second or so.
    activity: float = 0.0


def _approach(current: float, target: float, dt: float, rise: float, fall: float) -> float:
    tau = rise if target > current else fall
    return current + (target - current) * (1.0 - math.exp(-dt / tau))


def _ramp(x: float, lo: float, hi: float) -> float:
    return min(1.0, max(0.0, (x - lo) / (hi - lo)))


@dataclass(frozen=True, slots=True)
class Hop:
    """One window's analysis: loudness (dBFS); the centroids (Hz) of 200 Hz..1 kHz (where
    the first formant is: high for open vowels) and of 200 Hz..2 kHz (low for rounded
    vowels); the share of 200 Hz..3.5 kHz that lies above 1.5 kHz, in dB (a high second
    formant: spread vowels); and the share of everything above 3.5 kHz (a fricative)."""

    db: float
    f1: float
    low: float
    front_db: float
    high: float

    @property
    def jaw(self) -> float:
        """How far this sound opens the jaw, 0.55 (i, u) to 1 (a), at full loudness."""
        return 0.55 + 0.45 * _ramp(self.f1, 300.0, 700.0)

    @property
    def fricative(self) -> float:
        return _ramp(self.high, 0.45, 0.75)


def _centroid(power: np.ndarray, band: np.ndarray) -> float:
    part = power[band]
    return float((part * _FREQS[band]).sum() / (part.sum() + 1e-20))


def analyse(window: np.ndarray) -> Hop:
    """The features of one window of samples (`WINDOW` long)."""
    rms = float(np.sqrt(np.mean(np.square(window, dtype=np.float64))))
    emphasised = np.empty_like(window)
    emphasised[0] = window[0]
    np.subtract(window[1:], 0.95 * window[:-1], out=emphasised[1:])
    power = np.abs(np.fft.rfft(emphasised * _HANN, FFT)) ** 2
    speech = float(power[_SPEECH].sum()) + 1e-20
    return Hop(
        db=20.0 * math.log10(rms + 1e-9),
        f1=_centroid(power, _F1),
        low=_centroid(power, _LOW),
        front_db=10.0 * math.log10(float(power[_FRONT].sum()) / speech + 1e-6),
        high=float(power[_HIGH].sum()) / (float(power[_ALL].sum()) + 1e-20),
    )


class SpeechTracker:
    """The client's audio in (`push`, any thread), the mouth at a moment out (`advance`).

    `push` only queues the samples under a lock, so the event loop spends no time here;
    `advance` (the render thread) analyses every hop heard up to the moment asked for.
    """

    def __init__(self, rate: int = AUDIO_RATE) -> None:
        if rate != AUDIO_RATE:
            raise ValueError(f"the speech tracker takes {AUDIO_RATE} Hz audio, not {rate}")
        self._lock = threading.Lock()
        self._queue: deque[tuple[np.ndarray, float]] = deque()
        #: Samples (a window of history, then those not yet analysed), when the last of
        #: them was heard, and the moment the state below has been brought up to.
        self._buffer = np.zeros(WINDOW, np.float32)
        self._buffer_end: float | None = None
        self._clock: float | None = None
        self._recent = np.zeros(int(KEEP * AUDIO_RATE), np.float32)
        self.floor = -70.0
        self.peak = -30.0
        self.open = 0.0
        self.wide = 0.0
        self.round = 0.0
        self.level = 0.0
        self.activity = 0.0
        #: the voice's own spectral shape: running mean and spread of the share above
        #: 1.5 kHz (dB) and of the 200 Hz..2 kHz centroid (Hz), over voiced hops
        self.front = (PRIOR_FRONT_DB, PRIOR_FRONT_SPREAD)
        self.low = (PRIOR_LOW_HZ, PRIOR_LOW_SPREAD)

    def push(self, samples: np.ndarray, until: float) -> None:
        """Mono float samples at `AUDIO_RATE`, the last heard at `until` (seconds)."""
        chunk = np.asarray(samples, np.float32).ravel()
        if chunk.size:
            with self._lock:
                self._queue.append((chunk.copy(), float(until)))

    def recent(self) -> np.ndarray:
        """The last `KEEP` seconds of audio analysed (for animators that want the samples)."""
        return self._recent.copy()

    def advance(self, now: float) -> Mouth:
        """The mouth at `now`: every hop heard by then analysed, then silence for a gap."""
        with self._lock:
            chunks = list(self._queue)
            self._queue.clear()
        for chunk, until in chunks:
            self._take(chunk, until)
        if self._clock is None:
            self._clock = now
        if self._buffer_end is None or now - self._buffer_end > STALE:
            self._silence(now - self._clock)
        self._clock = max(self._clock, now)
        return Mouth(self.open, self.wide, self.round, self.level, self.activity)

    def _take(self, chunk: np.ndarray, until: float) -> None:
        """Append a chunk and analyse each whole hop now in the buffer. The buffer keeps
        one window of analysed history before the samples not yet analysed."""
        start = until - len(chunk) / AUDIO_RATE  # when the chunk's first sample was heard
        gap = None if self._buffer_end is None else start - self._buffer_end
        if gap is not None and gap > STALE and self._clock is not None:
            # the microphone was off in between
            self._silence(start - self._clock)
            self._clock = max(self._clock, start)
        buffer = np.concatenate([self._buffer, chunk])
        hops = (len(buffer) - WINDOW) // HOP
        for index in range(hops):
            end = WINDOW + (index + 1) * HOP
            self._step(analyse(buffer[end - WINDOW : end]), HOP / AUDIO_RATE)
            hop_time = until - (len(buffer) - end) / AUDIO_RATE
            self._clock = hop_time if self._clock is None else max(self._clock, hop_time)
        self._buffer = buffer[hops * HOP :]
        self._recent = np.concatenate([self._recent, chunk])[-len(self._recent) :]
        self._buffer_end = until

    def _silence(self, seconds: float) -> None:
        """No audio for `seconds`: the mouth closes as it would in silence."""
        if seconds <= 0:
            return
        self.level = 0.0
        self.open = _approach(self.open, 0.0, seconds, ATTACK, RELEASE)
        self.wide = _approach(self.wide, 0.0, seconds, SHAPE_TIME, SHAPE_TIME * 2)
        self.round = _approach(self.round, 0.0, seconds, SHAPE_TIME, SHAPE_TIME * 2)
        self.activity = _approach(self.activity, 0.0, seconds, ACTIVITY_ATTACK, ACTIVITY_RELEASE)

    def _step(self, hop: Hop, dt: float) -> None:
        db = max(hop.db, LOWEST_FLOOR)
        self.floor = db if db < self.floor else min(db, self.floor + FLOOR_RISE * dt)
        gate = max(self.floor + GATE_DB, ABSOLUTE_GATE)
        self.peak = max(db, self.peak - PEAK_FALL * dt, gate + MIN_RANGE_DB)
        level = _ramp(db, max(gate, self.peak - MAX_RANGE_DB), self.peak) ** 1.2
        self.level = level
        fricative = hop.fricative
        target = level * hop.jaw * (1.0 - 0.6 * fricative)
        self.open = _approach(self.open, target, dt, ATTACK, RELEASE)
        wide = rounded = 0.0
        if level > 0.15 and fricative < 0.5:
            # spread and rounded, against this voice's own average (voices and
            # microphones differ far more in brightness than vowels do)
            keep = math.exp(-dt / SHAPE_MEMORY)
            front = (hop.front_db - self.front[0]) / self.front[1]
            low = (hop.low - self.low[0]) / self.low[1]
            self.front = _learn(self.front, hop.front_db, keep, 1.5)
            self.low = _learn(self.low, hop.low, keep, 100.0)
            wide = _ramp(front, 0.3, 1.4)
            rounded = _ramp(-0.5 * (front + low), 0.3, 1.4)
        wide = max(wide, 0.8 * fricative)
        self.wide = _approach(self.wide, wide, dt, SHAPE_TIME, SHAPE_TIME * 2)
        self.round = _approach(self.round, rounded, dt, SHAPE_TIME, SHAPE_TIME * 2)
        self.activity = _approach(
            self.activity, min(1.0, 2.0 * level), dt, ACTIVITY_ATTACK, ACTIVITY_RELEASE
        )


def _learn(
    stats: tuple[float, float], value: float, keep: float, least: float
) -> tuple[float, float]:
    """Running mean and mean absolute deviation (at least `least`), forgetting by `keep`."""
    mean, spread = stats
    mean = keep * mean + (1.0 - keep) * value
    spread = keep * spread + (1.0 - keep) * abs(value - mean)
    return mean, max(spread, least)
