"""Prompts to looks: semantic match against a catalog of named recipes, plus modifier words.

The catalog (`catalog.toml`) describes the 26 built-in styles as they actually render and
the looks users ask for (anime, watercolor, cyberpunk ...) as blends of them with a colour
grade, and image effects (effects.py: line art, cel shading, materials ...) for what no
style paints. A prompt is embedded with `TextEncoder` and compared with every recipe's
name, aliases and description, and with the description of each built-in style (so visual
words like "red and yellow stripes" find the style that looks like that). A strong match
uses the recipe; a weak one blends the nearest few, so that any text gives its own look.
Colour and intensity words ("blue", "subtle") then adjust the grade and strength. They are
left in the text that is matched: on 180 test prompts stripping them first lost 2 matches
("black and white film" became "film"), keeping them lost none. Everything is
deterministic and cached per prompt.
"""

from __future__ import annotations

import logging
import re
import threading
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources

import numpy as np

from .effects import Effects, blend_effects, describe_effects, effects_from_table
from .look import NUM_STYLES, Grade, Look
from .text import TextEncoder

log = logging.getLogger(__name__)

#: Rec. 601 luma weights: saturation mixes towards this grey, tints are normalised by it.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: A best cosine similarity at or above this uses that recipe as it is. Synonyms of a recipe
#: score 0.6 to 0.95 against it; unrelated everyday text ("my cat sleeping") under 0.5.
STRONG_MATCH = 0.55
#: A built-in style used on its own (matched by its description) shows this much.
STYLE_STRENGTH = 0.9
#: Subtracted from a built-in style's score so a curated recipe wins a near tie
#: ("swirly starry night sky painting": style 19 at 0.745, the van gogh recipe at 0.744).
STYLE_HANDICAP = 0.02
#: Below it, blend the nearest recipes by softmax(similarity / BLEND_TEMPERATURE).
BLEND_TEMPERATURE = 0.05
BLEND_SIZE = 3
#: Blend shares under this are dropped (and the rest renormalised).
MIN_SHARE = 0.1

_NEGATIONS = ("no", "not", "without", "non")


@dataclass(frozen=True, slots=True)
class StyleInfo:
    """One of the network's 26 built-in styles, described from renders."""

    index: int
    name: str
    description: str


@dataclass(frozen=True, slots=True)
class Recipe:
    """A named look: a blend of built-in styles, a strength, a colour grade and effects."""

    name: str
    aliases: tuple[str, ...]
    description: str
    weights: np.ndarray
    strength: float
    grade: Grade
    effects: Effects = field(default_factory=Effects)
    #: True for one of the 26 built-in styles standing in as a candidate.
    builtin: bool = False

    def texts(self) -> list[str]:
        """What the prompt is compared with: the name, each alias, and name plus description."""
        return [self.name, *self.aliases, f"{self.name}: {self.description}"]

    @classmethod
    def from_style(cls, style: StyleInfo) -> Recipe:
        """A single built-in style as a candidate; only its description is matched."""
        weights = np.zeros(NUM_STYLES, dtype=np.float32)
        weights[style.index] = 1.0
        weights.flags.writeable = False
        return cls(
            name=f"style {style.index} ({style.name})",
            aliases=(),
            description=style.description,
            weights=weights,
            strength=STYLE_STRENGTH,
            grade=Grade(),
            builtin=True,
        )


@dataclass(frozen=True, slots=True)
class Modifier:
    """Words that adjust any look: tint, saturation, contrast multiply; the rest adds."""

    label: str
    words: tuple[str, ...]
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    saturation: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    strength: float = 0.0


@dataclass(frozen=True, slots=True)
class Match:
    """A candidate (a recipe, or a built-in style standing in as one) and its similarity."""

    recipe: Recipe
    score: float


def normalise_prompt(prompt: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: the cache and matching key."""
    return " ".join(prompt.lower().split()).strip(" .,;:!?\"'")


def apply_grade(rgb: np.ndarray, grade: Grade, out: np.ndarray | None = None) -> np.ndarray:
    """Colour-grade a float32 HxWx3 image in 0..1; pass out=rgb to grade in place.

    Saturation (mix with luma), contrast around 0.5, brightness and tint gains are all
    linear, so they fold into one 3x3 matrix and an offset: a single matmul per frame
    (about 1 ms at 400x220 on one core). The result is clipped to 0..1.
    """
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {rgb.shape}")
    if out is None:
        out = np.empty(rgb.shape, dtype=np.float32)
    if grade == Grade():
        if out is not rgb:
            np.copyto(out, rgb)
        return out
    matrix, offset = grade_matrix(grade)
    flat_in = rgb.reshape(-1, 3)
    flat_out = out.reshape(-1, 3)
    np.matmul(flat_in, matrix.T, out=flat_out)
    flat_out += offset
    np.clip(out, 0.0, 1.0, out=out)
    return out


def grade_matrix(grade: Grade) -> tuple[np.ndarray, np.ndarray]:
    """The grade as out = matrix @ rgb + offset (saturation, then contrast, brightness, tint)."""
    s, c = np.float32(grade.saturation), np.float32(grade.contrast)
    gains = np.asarray(grade.tint, dtype=np.float32)
    saturate = s * np.eye(3, dtype=np.float32) + (1.0 - s) * np.outer(np.ones(3), LUMA)
    matrix = (c * gains[:, None] * saturate).astype(np.float32)
    offset = (gains * (0.5 * (1.0 - c) + grade.brightness)).astype(np.float32)
    return matrix, offset


def _normalised_tint(tint: np.ndarray) -> tuple[float, float, float]:
    """Scale gains so grey keeps its brightness: a tint shifts hue, brightness does the rest."""
    tint = tint / float(tint @ LUMA)
    return (round(float(tint[0]), 4), round(float(tint[1]), 4), round(float(tint[2]), 4))


def _phrase_pattern(words: Sequence[str]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    negation = "|".join(_NEGATIONS)
    return re.compile(rf"(?<![\w&])(?:(?P<neg>(?:{negation}) )?)(?:{alternatives})(?![\w&])")


class StyleCatalog:
    """The recipes and styles from catalog.toml, embedded once, matched per prompt."""

    def __init__(
        self,
        styles: Sequence[StyleInfo],
        recipes: Sequence[Recipe],
        modifiers: Sequence[Modifier],
        encoder: TextEncoder,
        cache_size: int = 512,
    ) -> None:
        self.styles = tuple(styles)
        self.recipes = tuple(recipes)
        self.modifiers = tuple(modifiers)
        self.encoder = encoder
        self._patterns = [_phrase_pattern(m.words) for m in self.modifiers]
        self._by_name = {r.name: r for r in self.recipes}
        self._exact: dict[str, Recipe] = {}
        for recipe in self.recipes:
            for text in (recipe.name, *recipe.aliases):
                self._exact.setdefault(normalise_prompt(text), recipe)
        self._candidates = self.recipes + tuple(Recipe.from_style(s) for s in self.styles)
        texts: list[str] = []
        owners: list[int] = []
        for i, candidate in enumerate(self._candidates):
            candidate_texts = [candidate.description] if candidate.builtin else candidate.texts()
            texts.extend(candidate_texts)
            owners.extend([i] * len(candidate_texts))
        self._embeddings = encoder.encode(texts)
        self._owners = np.asarray(owners)
        self._handicap = np.array(
            [STYLE_HANDICAP if c.builtin else 0.0 for c in self._candidates], dtype=np.float32
        )
        self._cached: Callable[[str], Look] = lru_cache(maxsize=cache_size)(self._resolve)

    @classmethod
    def load(cls, encoder: TextEncoder | None = None) -> StyleCatalog:
        """The packaged catalog, embedded with the process-wide encoder (one per process)."""
        if encoder is not None:
            return cls.from_toml(_catalog_text(), encoder)
        global _loaded
        with _lock:
            if _loaded is None:
                _loaded = cls.from_toml(_catalog_text(), TextEncoder.load())
            return _loaded

    @classmethod
    def from_toml(cls, text: str, encoder: TextEncoder) -> StyleCatalog:
        data = tomllib.loads(text)
        styles = [StyleInfo(int(s["index"]), s["name"], s["description"]) for s in data["style"]]
        recipes = [_recipe(entry) for entry in data["recipe"]]
        modifiers = [_modifier(entry) for entry in data.get("modifier", [])]
        catalog = cls(styles, recipes, modifiers, encoder)
        log.info("style catalog: %d styles, %d recipes", len(styles), len(recipes))
        return catalog

    def recipe(self, name: str) -> Recipe:
        return self._by_name[name]

    def rank(self, prompt: str) -> list[Match]:
        """Recipes and built-in styles by similarity to the prompt, best first."""
        return self._rank_text(normalise_prompt(prompt))

    def look_for(self, prompt: str, enhance: bool = True) -> Look:
        """The look for a prompt: equal prompts (after normalising) give identical looks.

        With enhance=False only the description changes (it is the prompt as given); the
        weights, strength and grade are the same as with enhance=True, so switching
        enhance never changes the picture. One cache entry serves both.
        """
        look = self._cached(normalise_prompt(prompt))
        return look if enhance else replace(look, description=prompt)

    # -- matching ---------------------------------------------------------------------

    def _rank_text(self, text: str) -> list[Match]:
        exact = self._exact.get(text)
        sims = self._embeddings @ self.encoder.encode([text])[0]
        best = np.full(len(self._candidates), -1.0, dtype=np.float32)
        np.maximum.at(best, self._owners, sims)
        best -= self._handicap
        if exact is not None:
            best[self.recipes.index(exact)] = 1.0
        order = sorted(range(len(self._candidates)), key=lambda i: (-float(best[i]), i))
        return [Match(self._candidates[i], round(float(best[i]), 6)) for i in order]

    def _found_modifiers(self, text: str) -> list[Modifier]:
        found = []
        for modifier, pattern in zip(self.modifiers, self._patterns, strict=True):
            if any(m.group("neg") is None for m in pattern.finditer(text)):
                found.append(modifier)
        return found

    def _resolve(self, text: str) -> Look:
        matches = self._rank_text(text)
        if matches[0].score >= STRONG_MATCH:
            blend = [(matches[0].recipe, 1.0)]
        else:
            top = matches[:BLEND_SIZE]
            logits = np.array([m.score for m in top]) / BLEND_TEMPERATURE
            shares = np.exp(logits - logits.max())
            shares /= shares.sum()
            kept = [(m.recipe, float(s)) for m, s in zip(top, shares, strict=True)]
            kept = [(r, s) for r, s in kept if s >= MIN_SHARE]
            total = sum(s for _, s in kept)
            blend = [(r, s / total) for r, s in kept]
        modifiers = self._found_modifiers(text)
        weights, strength, grade, effects = _combine(blend, modifiers)
        name = " + ".join(r.name for r, _ in blend)
        description = _describe(text, blend, modifiers, weights, strength, effects, self.styles)
        log.debug("prompt %r -> %s (best %.3f)", text, name, matches[0].score)
        return Look(
            weights,
            strength=strength,
            grade=grade,
            effects=effects,
            name=name,
            description=description,
        )


_lock = threading.Lock()
_loaded: StyleCatalog | None = None


def _catalog_text() -> str:
    return resources.files(__package__).joinpath("catalog.toml").read_text(encoding="utf-8")


def _grade(entry: dict) -> Grade:
    tint = tuple(float(v) for v in entry.get("tint", (1.0, 1.0, 1.0)))
    if len(tint) != 3 or min(tint) <= 0:
        raise ValueError(f"a tint needs three positive gains, got {tint}")
    return Grade(
        saturation=float(entry.get("saturation", 1.0)),
        contrast=float(entry.get("contrast", 1.0)),
        brightness=float(entry.get("brightness", 0.0)),
        tint=tint,
    )


def _recipe(entry: dict) -> Recipe:
    weights = np.zeros(NUM_STYLES, dtype=np.float32)
    for index, weight in entry["styles"].items():
        i = int(index)
        if not 0 <= i < NUM_STYLES or float(weight) < 0:
            raise ValueError(f"recipe {entry['name']!r}: bad style {index} = {weight}")
        weights[i] += float(weight)
    if weights.sum() <= 0:
        raise ValueError(f"recipe {entry['name']!r} has no style weights")
    weights /= weights.sum()
    weights.flags.writeable = False
    strength = float(entry.get("strength", 1.0))
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"recipe {entry['name']!r}: strength must be in (0, 1]")
    table = entry.get("effects", {})
    if not isinstance(table, dict):
        raise ValueError(f"recipe {entry['name']!r}: effects must be a table")
    return Recipe(
        name=entry["name"],
        aliases=tuple(entry.get("aliases", ())),
        description=entry["description"],
        weights=weights,
        strength=strength,
        grade=_grade(entry.get("grade", {})),
        effects=effects_from_table(table, where=f"recipe {entry['name']!r} effects"),
    )


def _modifier(entry: dict) -> Modifier:
    return Modifier(
        label=entry["label"],
        words=tuple(w.lower() for w in entry["words"]),
        tint=tuple(float(v) for v in entry.get("tint", (1.0, 1.0, 1.0))),  # type: ignore[arg-type]
        saturation=float(entry.get("saturation", 1.0)),
        contrast=float(entry.get("contrast", 1.0)),
        brightness=float(entry.get("brightness", 0.0)),
        strength=float(entry.get("strength", 0.0)),
    )


def _combine(
    blend: Sequence[tuple[Recipe, float]], modifiers: Sequence[Modifier]
) -> tuple[np.ndarray, float, Grade, Effects]:
    """Share-weighted average of the recipes, then the modifiers on top (which leave the
    effects alone); effects blend as `blend_effects` says."""
    weights = np.zeros(NUM_STYLES, dtype=np.float32)
    tint = np.zeros(3, dtype=np.float32)
    strength = saturation = contrast = brightness = 0.0
    for recipe, share in blend:
        weights += share * recipe.weights
        tint += share * np.asarray(recipe.grade.tint, dtype=np.float32)
        strength += share * recipe.strength
        saturation += share * recipe.grade.saturation
        contrast += share * recipe.grade.contrast
        brightness += share * recipe.grade.brightness
    for modifier in modifiers:
        tint *= np.asarray(modifier.tint, dtype=np.float32)
        saturation *= modifier.saturation
        contrast *= modifier.contrast
        brightness += modifier.brightness
        strength += modifier.strength
    weights = weights / weights.sum()
    weights.flags.writeable = False
    grade = Grade(
        saturation=round(min(max(saturation, 0.0), 2.0), 4),
        contrast=round(min(max(contrast, 0.5), 1.8), 4),
        brightness=round(min(max(brightness, -0.3), 0.3), 4),
        tint=_normalised_tint(tint),
    )
    effects = blend_effects([(recipe.effects, share) for recipe, share in blend])
    return weights, round(min(max(strength, 0.15), 1.0), 4), grade, effects


def _describe(
    text: str,
    blend: Sequence[tuple[Recipe, float]],
    modifiers: Sequence[Modifier],
    weights: np.ndarray,
    strength: float,
    effects: Effects,
    styles: Sequence[StyleInfo],
) -> str:
    """The enhanced prompt: what the engine will paint, in one sentence."""
    if len(blend) == 1:
        recipe = blend[0][0]
        head = f"{recipe.name}: {recipe.description}"
    else:
        parts = "; ".join(f"{r.name} {s:.0%} ({r.description})" for r, s in blend)
        head = f"nearest looks to {text!r}, blended: {parts}"
    if modifiers:
        head += "; " + ", ".join(m.label for m in modifiers)
    order = [int(i) for i in np.argsort(-weights, kind="stable") if weights[i] >= 0.005]
    names = {s.index: s.name for s in styles}
    mix = ", ".join(f"{i} {names[i]} at {weights[i]:.0%}" for i in order)
    extras = describe_effects(effects)
    return f"{head} (styles: {mix}; strength {strength:.2f}{'; ' + extras if extras else ''})"
