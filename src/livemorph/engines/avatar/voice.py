"""A synthetic voice for tests, benchmarks and the docs' strip: no recording needed.

Formant synthesis: a glottal pulse train (about 120 Hz, with a little drift) shaped by a
vowel's first three formants, in consonant-vowel syllables at about four a second with
an "s" now and then, each syllable rising in 30 ms and falling away like speech. The
spectrum and rhythm are close enough to a voice to exercise `speech.SpeechTracker` the
way speech does; it is not meant to be listened to.
"""

from __future__ import annotations

import numpy as np

from ..base import AUDIO_RATE

#: Formant frequencies (Hz) of a few vowels (Peterson and Barney's averages).
VOWELS: dict[str, tuple[float, float, float]] = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (270.0, 2290.0, 3010.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (300.0, 870.0, 2240.0),
}
BANDWIDTHS = (80.0, 100.0, 120.0)


def _formant_gain(freqs: np.ndarray, formants: tuple[float, float, float]) -> np.ndarray:
    """The magnitude response of three resonators in cascade, 1 at 0 Hz."""
    gain = np.ones_like(freqs)
    for centre, width in zip(formants, BANDWIDTHS, strict=True):
        gain *= centre**2 / np.sqrt((centre**2 - freqs**2) ** 2 + (width * freqs) ** 2 + 1e-9)
    return gain


def vowel(name: str, seconds: float, pitch: float = 120.0, seed: int = 0) -> np.ndarray:
    """A steady vowel, peak-normalised to 0.5 (float32 at `AUDIO_RATE`)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * AUDIO_RATE)
    t = np.arange(n) / AUDIO_RATE
    f0 = pitch * (1.0 + 0.03 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6.3)))
    phase = np.cumsum(f0) / AUDIO_RATE
    pulses = np.diff(np.floor(phase), prepend=0.0)
    spectrum = np.fft.rfft(pulses)
    freqs = np.fft.rfftfreq(n, 1.0 / AUDIO_RATE)
    # the glottal source falls 12 dB an octave, radiation from the lips lifts it 6 dB
    tilt = 1.0 / np.sqrt(1.0 + (freqs / 150.0) ** 2)
    signal = np.fft.irfft(spectrum * tilt * _formant_gain(freqs, VOWELS[name]), n)
    signal *= 0.5 / (np.abs(signal).max() + 1e-12)
    signal += 0.0005 * rng.standard_normal(n)  # breath, 60 dB down
    return signal.astype(np.float32)


def hiss(seconds: float, seed: int = 0) -> np.ndarray:
    """An "s": noise above about 4 kHz, peak about 0.15."""
    rng = np.random.default_rng(seed)
    n = int(seconds * AUDIO_RATE)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / AUDIO_RATE)
    spectrum *= 1.0 / (1.0 + (4500.0 / np.maximum(freqs, 1.0)) ** 4)
    signal = np.fft.irfft(spectrum, n)
    return (0.15 * signal / (np.abs(signal).max() + 1e-9)).astype(np.float32)


def speech(seconds: float, seed: int = 0, rate: float = 4.0, loudness: float = 1.0) -> np.ndarray:
    """Syllables at about `rate` a second for `seconds`, float32 at `AUDIO_RATE`."""
    rng = np.random.default_rng(seed)
    out = np.zeros(int(seconds * AUDIO_RATE), np.float32)
    at = 0.05
    names = list(VOWELS)
    while at < seconds:
        length = rng.uniform(0.6, 1.0) / rate
        if rng.uniform() < 0.2:  # a sibilant before the vowel
            s = hiss(0.08, seed=int(rng.integers(1 << 30)))
            s *= np.hanning(len(s)).astype(np.float32)
            _add(out, s * loudness, at)
            at += 0.08
        sound = vowel(
            names[int(rng.integers(len(names)))],
            length,
            pitch=rng.uniform(105.0, 135.0),
            seed=int(rng.integers(1 << 30)),
        )
        tt = np.arange(len(sound)) / AUDIO_RATE
        envelope = np.minimum(1.0, tt / 0.03) * np.exp(-2.5 * tt / length)
        envelope *= np.minimum(1.0, (length - tt) / 0.02).clip(0.0, 1.0)
        _add(out, sound * envelope.astype(np.float32) * loudness * rng.uniform(0.6, 1.0), at)
        at += length + rng.uniform(0.03, 0.12) / rate * 4
        if rng.uniform() < 0.12:  # a pause between phrases
            at += rng.uniform(0.25, 0.5)
    return out


def _add(out: np.ndarray, sound: np.ndarray, at: float) -> None:
    start = int(at * AUDIO_RATE)
    end = min(len(out), start + len(sound))
    if end > start:
        out[start:end] += sound[: end - start]
