"""Behaviour prompts to expressions: semantic match against `expressions.toml`.

As the neural engine's style catalog does (styles.py), a prompt is embedded with the
MiniLM `TextEncoder` and compared with each entry's name, aliases and description. A
behaviour prompt often asks for several things at once ("Smile warmly and nod
occasionally"), so it is cut into parts at punctuation and at "and", "while", "but",
"then", "with"; each part is matched on its own (an exact name or alias wins outright, a
strong match is used as it is, a weak one blends the nearest few), scaled by intensity
words ("slightly", "very"), and the parts' differences from neutral are added up. A part
that says "not", "no", "don't", "never" or "without" is left out (unless it is an alias,
like "don't move"): "don't smile" should not make the avatar smile, and what the
opposite would be is a guess. Deterministic and cached per prompt.
"""

from __future__ import annotations

import logging
import re
import threading
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from typing import Protocol

import numpy as np

from ..neural.styles import normalise_prompt
from .animator import Expression

log = logging.getLogger(__name__)

#: A part's best similarity at or above this uses that entry alone.
STRONG_MATCH = 0.55
#: Below it, the nearest entries blend by softmax(similarity / BLEND_TEMPERATURE).
BLEND_TEMPERATURE = 0.05
BLEND_SIZE = 3
MIN_SHARE = 0.1
_SPLIT = re.compile(r"[,;.!?]+|\b(?:and|while|but|then|with|also|plus)\b")
_NEGATION = re.compile(r"\b(?:no|not|don't|dont|do not|never|without|stop|avoid)\b")


class Encoder(Protocol):
    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class Entry:
    """One expression from the catalog."""

    name: str
    aliases: tuple[str, ...]
    description: str
    expression: Expression

    def texts(self) -> list[str]:
        return [self.name, *self.aliases, f"{self.name}: {self.description}"]


@dataclass(frozen=True, slots=True)
class Behaviour:
    """What a prompt asks for: the expression, and the enhanced prompt that says so."""

    expression: Expression
    description: str


def entry_from_table(table: dict) -> Entry:
    """An `[[expression]]` table; unknown or out-of-range settings are refused."""
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("an expression needs a name")
    settings = {}
    for key, value in table.items():
        if key in ("name", "aliases", "description"):
            continue
        if key not in Expression.NAMES:
            raise ValueError(f"expression {name!r}: unknown setting {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expression {name!r}: {key} must be a number")
        low, high = Expression.LIMITS[key]
        if not low <= value <= high:
            raise ValueError(f"expression {name!r}: {key} must be in {low}..{high}")
        settings[key] = float(value)
    neutral = {"smile": 0.0, "nod": 0.0}
    return Entry(
        name=name,
        aliases=tuple(table.get("aliases", ())),
        description=str(table.get("description", name)),
        expression=Expression(**{**neutral, **settings}),
    )


class ExpressionCatalog:
    """The expressions of expressions.toml, embedded once, matched per prompt."""

    def __init__(
        self,
        entries: Sequence[Entry],
        intensities: Sequence[tuple[tuple[str, ...], float]],
        encoder: Encoder,
        cache_size: int = 256,
    ) -> None:
        self.entries = tuple(entries)
        by_name = {e.name: e for e in self.entries}
        if "neutral" not in by_name:
            raise ValueError("the expression catalog needs a 'neutral' entry")
        self.neutral = by_name["neutral"]
        self.encoder = encoder
        self._intensities = [
            (re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b"), scale)
            for words, scale in intensities
        ]
        self._exact: dict[str, Entry] = {}
        texts: list[str] = []
        owners: list[int] = []
        for index, entry in enumerate(self.entries):
            for text in (entry.name, *entry.aliases):
                self._exact.setdefault(normalise_prompt(text), entry)
            texts.extend(entry.texts())
            owners.extend([index] * len(entry.texts()))
        self._embeddings = encoder.encode(texts)
        self._owners = np.asarray(owners)
        self._cached: Callable[[str], Behaviour] = lru_cache(maxsize=cache_size)(self._resolve)

    @classmethod
    def load(cls, encoder: Encoder | None = None) -> ExpressionCatalog:
        """The packaged catalog, embedded with the process-wide text encoder (once)."""
        if encoder is not None:
            return cls.from_toml(_catalog_text(), encoder)
        global _loaded
        with _lock:
            if _loaded is None:
                from ..neural.text import TextEncoder

                _loaded = cls.from_toml(_catalog_text(), TextEncoder.load())
            return _loaded

    @classmethod
    def from_toml(cls, text: str, encoder: Encoder) -> ExpressionCatalog:
        data = tomllib.loads(text)
        entries = [entry_from_table(t) for t in data["expression"]]
        intensities = [
            (tuple(str(w).lower() for w in t["words"]), float(t["scale"]))
            for t in data.get("intensity", [])
        ]
        return cls(entries, intensities, encoder)

    def rank(self, text: str) -> list[tuple[Entry, float]]:
        """Entries by similarity to `text`, best first (an exact name or alias scores 1)."""
        text = normalise_prompt(text)
        sims = self._embeddings @ self.encoder.encode([text])[0]
        best = np.full(len(self.entries), -1.0, np.float32)
        np.maximum.at(best, self._owners, sims)
        if (exact := self._exact.get(text)) is not None:
            best[self.entries.index(exact)] = 1.0
        order = sorted(range(len(self.entries)), key=lambda i: (-float(best[i]), i))
        return [(self.entries[i], float(best[i])) for i in order]

    def behaviour(self, prompt: str, enhance: bool = True) -> Behaviour:
        """The behaviour a prompt asks for; with enhance=False the description is the
        prompt itself (the expression is the same)."""
        found = self._cached(normalise_prompt(prompt))
        return found if enhance else replace(found, description=prompt)

    def _resolve(self, text: str) -> Behaviour:
        neutral = self.neutral.expression.values()
        total = neutral.copy()
        said: list[str] = []
        parts = [text] if text in self._exact else _parts(text)
        for part in parts:
            if part not in self._exact and _NEGATION.search(part):
                said.append(f"left out {part!r}")
                continue
            scale = 1.0
            for pattern, factor in self._intensities:
                if pattern.search(part):
                    scale *= factor
            blend = self._blend(part)
            values = sum(share * e.expression.values() for e, share in blend)
            total += scale * (values - neutral)
            names = " + ".join(
                f"{e.name} {share:.0%}" if len(blend) > 1 else e.name for e, share in blend
            )
            said.append(names if scale == 1.0 else f"{names} x{scale:g}")
        expression = Expression.from_values(total)
        log.debug("behaviour %r -> %s", text, expression)
        return Behaviour(expression, f"{'; '.join(said) or 'neutral'} ({describe(expression)})")

    def _blend(self, part: str) -> list[tuple[Entry, float]]:
        ranked = self.rank(part)
        if ranked[0][1] >= STRONG_MATCH:
            return [(ranked[0][0], 1.0)]
        top = ranked[:BLEND_SIZE]
        logits = np.array([score for _, score in top]) / BLEND_TEMPERATURE
        shares = np.exp(logits - logits.max())
        shares /= shares.sum()
        kept = [(entry, float(s)) for (entry, _), s in zip(top, shares, strict=True)]
        kept = [(entry, s) for entry, s in kept if s >= MIN_SHARE]
        total = sum(s for _, s in kept)
        return [(entry, s / total) for entry, s in kept]


def describe(expression: Expression) -> str:
    """The settings in words: 'smile +0.70, brows +0.10, eyes +0.00, nods 0.20, ...'."""
    text = (
        f"smile {expression.smile:+.2f}, brows {expression.brow:+.2f}, "
        f"eyes {expression.eyes:+.2f}, nods {expression.nod:.2f}, energy {expression.energy:.2f}"
    )
    return text + (f", mouth open {expression.jaw:.2f}" if expression.jaw > 0 else "")


def _parts(text: str) -> list[str]:
    parts = [" ".join(p.split()) for p in _SPLIT.split(text)]
    return [p for p in parts if p] or [text]


_lock = threading.Lock()
_loaded: ExpressionCatalog | None = None


def _catalog_text() -> str:
    return resources.files(__package__).joinpath("expressions.toml").read_text(encoding="utf-8")
