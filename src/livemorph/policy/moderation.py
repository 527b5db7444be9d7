"""Moderation: what a session may be told to render.

A `Moderator` judges a prompt or a reference image before anything of it is applied. The
embedded `PolicyModerator` needs no network: a word list for prompts (blocklist.txt, which
sees through the usual disguises) and structural checks for images. `WebhookModerator` asks
a service of your own and fails closed; `ChainModerator` runs several, first refusal wins.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import io
import itertools
import logging
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from ..protocol import MAX_IMAGE_BYTES

logger = logging.getLogger(__name__)

#: Largest reference image, in pixels; checked from the header, before anything is decoded.
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
DEFAULT_WEBHOOK_TIMEOUT = 2.0
#: Prompts up to this long are checked on the event loop (well under a millisecond).
SHORT_PROMPT_CHARS = 256


@dataclass(frozen=True, slots=True)
class Verdict:
    """A moderator's answer; `reason` says why when `allowed` is false."""

    allowed: bool
    reason: str = ""


ALLOWED = Verdict(True)
#: A refusal for when the moderator could not answer. It carries none of the protocol's
#: permanent-error words: clients may retry it.
UNAVAILABLE = Verdict(False, "the moderation service is unavailable, try again shortly")


class Moderator(ABC):
    """Judges prompts and reference images before a session applies them."""

    @abstractmethod
    async def check_prompt(self, text: str) -> Verdict: ...

    @abstractmethod
    async def check_image(self, data: bytes) -> Verdict:
        """`data` is the decoded image file (PNG, JPEG or WebP bytes), not base64."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


async def refusal(
    moderator: Moderator, prompt: str | None = None, image: bytes | None = None
) -> str | None:
    """The ack text refusing `prompt` or `image`, or None when both (those given) pass."""
    if prompt is not None:
        verdict = await moderator.check_prompt(prompt)
        if not verdict.allowed:
            return f"prompt refused by moderation: {verdict.reason}"
    if image is not None:
        verdict = await moderator.check_image(image)
        if not verdict.allowed:
            return f"image refused by moderation: {verdict.reason}"
    return None


# --- prompts -------------------------------------------------------------------------------

#: Letters from other scripts that look like Latin ones (after case folding).
_CONFUSABLES = str.maketrans(
    {
        "а": "a", "в": "b", "е": "e", "і": "i", "ј": "j", "к": "k", "м": "m",
        "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s",
        "α": "a", "β": "b", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
        "τ": "t", "υ": "u", "χ": "x",
    }
)  # fmt: skip
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
#: "1" stands for "i" or "l": both readings are checked.
_LEET_READINGS = tuple(str.maketrans({**_LEET, "1": one}) for one in ("i", "l"))
_WORD = re.compile(r"[a-z0-9]+")
_INNER_PUNCTUATION = re.compile(r"(?<=[a-z0-9])[^a-z0-9\s]+(?=[a-z0-9])")
_SIBILANT_ENDINGS = ("s", "x", "z", "ch", "sh")


def normalise(text: str) -> str:
    """Case-folded, accents and zero-width characters dropped, look-alike letters mapped."""
    kept = []
    for char in unicodedata.normalize("NFKD", text):
        if unicodedata.combining(char) or unicodedata.category(char) == "Cf":
            continue
        kept.append(char)
    return "".join(kept).casefold().translate(_CONFUSABLES)


def _readings(text: str) -> tuple[list[str], list[str]]:
    """The ways to read `text` as words: (word sequences, runs of spaced-out letters).

    Each leetspeak reading is split two ways: at every punctuation mark, and with
    punctuation inside a word dropped ("n.u.d.e" -> "nude"). Runs of single letters
    ("n u d e") are joined into one word and also returned alone, to be searched
    without word boundaries.
    """
    base = normalise(text)
    sequences: list[str] = []
    runs: list[str] = []
    for table in _LEET_READINGS:
        mapped = base.translate(table)
        for words in (_WORD.findall(mapped), _WORD.findall(_INNER_PUNCTUATION.sub("", mapped))):
            joined, spelled = _join_spelled(words)
            sequences.append(" ".join(joined))
            runs.extend(spelled)
    return sequences, runs


def _join_spelled(words: list[str]) -> tuple[list[str], list[str]]:
    out: list[str] = []
    runs: list[str] = []
    run: list[str] = []
    for word in [*words, ""]:
        if len(word) == 1:
            run.append(word)
            continue
        if len(run) >= 2:
            runs.append("".join(run))
            out.append(runs[-1])
        else:
            out.extend(run)
        run = []
        if word:
            out.append(word)
    return out, runs


def _entry_pattern(entry: str) -> str:
    """A regex for one list entry: its words in order, each letter possibly repeated."""
    wildcard = entry.endswith("*")
    words = _WORD.findall(normalise(entry.rstrip("*")).translate(_LEET_READINGS[0]))
    if not words:
        raise ValueError(f"entry {entry!r} has no letters")
    body = r"\s?".join(_letters(word) for word in words)
    if wildcard:
        return body + "[a-z0-9]*"
    return body + ("(?:es|s)?" if words[-1].endswith(_SIBILANT_ENDINGS) else "s?")


def _letters(word: str) -> str:
    """Each letter as often as the word has it, or more ("nuuude"); possessive, so a long
    run of one letter cannot make the regex backtrack."""
    return "".join(
        re.escape(char) + ("++" if (n := len(list(run))) == 1 else f"{{{n},}}+")
        for char, run in itertools.groupby(word)
    )


@dataclass(frozen=True, slots=True)
class _Category:
    name: str
    bounded: re.Pattern[str]  # whole words only: the Scunthorpe guard
    bare: re.Pattern[str]  # for runs of spelled-out letters


def _compile(patterns: Sequence[str]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    alternation = "|".join(f"(?:{p})" for p in patterns) or "(?!)"
    return (
        re.compile(rf"(?<![a-z0-9])(?:{alternation})(?![a-z0-9])"),
        re.compile(alternation),
    )


class PromptPolicy:
    """A word list with categories; see blocklist.txt for the format and what is matched."""

    def __init__(self, entries: dict[str, list[str]], exceptions: Iterable[str] = ()) -> None:
        self.entries = {name: list(words) for name, words in entries.items() if words}
        self._categories = [
            _Category(name, *_compile([_entry_pattern(w) for w in words]))
            for name, words in self.entries.items()
        ]
        self._exceptions = _compile([_entry_pattern(e) for e in exceptions])[0]

    @classmethod
    def load(cls, *extra: Path) -> PromptPolicy:
        """The embedded list plus each file in `extra` (same format)."""
        text = resources.files(__package__).joinpath("blocklist.txt").read_text("utf-8")
        entries: dict[str, list[str]] = {}
        exceptions: list[str] = []
        _parse(text, "blocklist.txt", entries, exceptions)
        for path in extra:
            _parse(Path(path).read_text("utf-8"), str(path), entries, exceptions)
        return cls(entries, exceptions)

    def check(self, text: str) -> Verdict:
        sequences, runs = _readings(text)
        sequences = [self._exceptions.sub(" ", s) for s in sequences]
        for category in self._categories:
            if any(category.bounded.search(s) for s in sequences) or any(
                category.bare.search(r) for r in runs
            ):
                return Verdict(False, f"not allowed by the content policy ({category.name})")
        return ALLOWED


def _parse(text: str, source: str, entries: dict[str, list[str]], exceptions: list[str]) -> None:
    category = "blocked words"
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            category = line[1:-1].strip() or category
            continue
        target = entries.setdefault(category, [])
        if line.startswith("!"):
            target, line = exceptions, line[1:].strip()
        if line.startswith("rot13:"):
            line = codecs.decode(line.removeprefix("rot13:").strip(), "rot13")
        try:
            _entry_pattern(line)
        except ValueError as exc:
            raise ValueError(f"{source}:{number}: {exc}") from None
        target.append(line)


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ImagePolicy:
    """Structural checks on a reference image, from its header: no pixel is decoded here.

    The size limit is checked first and the pixel count before any decoding, so a
    decompression bomb costs nothing. PNG files are also checked chunk by chunk
    (`verify`: CRCs, truncation); `media.frames.image_to_rgb` decodes afterwards.
    """

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS

    def check(self, data: bytes) -> Verdict:
        from PIL import Image, UnidentifiedImageError

        if len(data) > self.max_bytes:
            return Verdict(False, f"image too large: the limit is {_megabytes(self.max_bytes)}")
        try:
            with Image.open(io.BytesIO(data)) as image:
                kind, (width, height) = image.format, image.size
                if kind not in IMAGE_FORMATS:
                    return Verdict(
                        False, f"invalid image: {kind} is not accepted, send PNG, JPEG or WebP"
                    )
                if width * height > self.max_pixels:
                    return _too_many_pixels(width, height, self.max_pixels)
                image.verify()
        except Image.DecompressionBombError:
            return _too_many_pixels(None, None, self.max_pixels)
        except UnidentifiedImageError:
            return Verdict(False, "invalid image: not a PNG, JPEG or WebP file")
        except Exception:  # Pillow raises assorted errors on damaged files
            return Verdict(False, "invalid image: the file is damaged or truncated")
        return ALLOWED


def _megabytes(count: int) -> str:
    return f"{count / 2**20:g} MB"


def _too_many_pixels(width: int | None, height: int | None, limit: int) -> Verdict:
    size = f" ({width}x{height})" if width and height else ""
    return Verdict(
        False, f"image has too many pixels{size}: the limit is {limit / 1e6:g} megapixels"
    )


# --- moderators ----------------------------------------------------------------------------


class PolicyModerator(Moderator):
    """The embedded policy: the word list for prompts, structural checks for images."""

    def __init__(self, prompts: PromptPolicy | None = None, images: ImagePolicy | None = None):
        self.prompts = prompts or PromptPolicy.load()
        self.images = images or ImagePolicy()

    async def check_prompt(self, text: str) -> Verdict:
        if len(text) <= SHORT_PROMPT_CHARS:
            return self.prompts.check(text)
        return await asyncio.to_thread(self.prompts.check, text)  # a few ms: off the loop

    async def check_image(self, data: bytes) -> Verdict:
        return await asyncio.to_thread(self.images.check, data)


class WebhookModerator(Moderator):
    """Asks a moderation service of your own, over HTTP; fails closed.

    POSTs `{"type": "prompt", "prompt": ...}` or `{"type": "image", "image_data": base64,
    "size": bytes}` and expects `{"allowed": bool, "reason": str}`. A timeout, an HTTP
    error or any other answer refuses the input (UNAVAILABLE): nothing unjudged gets through.
    """

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_WEBHOOK_TIMEOUT,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self._client = client or httpx.AsyncClient()

    async def check_prompt(self, text: str) -> Verdict:
        return await self._ask({"type": "prompt", "prompt": text})

    async def check_image(self, data: bytes) -> Verdict:
        encoded = await asyncio.to_thread(base64.b64encode, data)
        return await self._ask({"type": "image", "image_data": encoded.decode(), "size": len(data)})

    async def _ask(self, payload: dict[str, Any]) -> Verdict:
        try:
            async with asyncio.timeout(self.timeout):  # the whole exchange, not each read
                response = await self._client.post(self.url, json=payload)
            response.raise_for_status()
            answer = response.json()
        except TimeoutError:
            logger.warning("moderation service timed out after %gs: refusing", self.timeout)
            return UNAVAILABLE
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("moderation service failed (%s): refusing", exc)
            return UNAVAILABLE
        allowed = answer.get("allowed") if isinstance(answer, dict) else None
        if not isinstance(allowed, bool):
            logger.warning("moderation service answered without a boolean 'allowed': refusing")
            return UNAVAILABLE
        if allowed:
            return ALLOWED
        reason = str(answer.get("reason") or "").strip()[:300] or "by the moderation service"
        logger.info("moderation service refused a %s: %s", payload["type"], reason)
        return Verdict(False, f"not allowed ({reason})")

    async def aclose(self) -> None:
        await self._client.aclose()


class ChainModerator(Moderator):
    """Several moderators in order; the first refusal wins, later ones are not asked."""

    def __init__(self, moderators: Sequence[Moderator]) -> None:
        self.moderators = list(moderators)

    async def check_prompt(self, text: str) -> Verdict:
        for moderator in self.moderators:
            if not (verdict := await moderator.check_prompt(text)).allowed:
                return verdict
        return ALLOWED

    async def check_image(self, data: bytes) -> Verdict:
        for moderator in self.moderators:
            if not (verdict := await moderator.check_image(data)).allowed:
                return verdict
        return ALLOWED

    async def aclose(self) -> None:
        for moderator in self.moderators:
            await moderator.aclose()


def build_moderator(
    prompts: PromptPolicy | None = None,
    url: str | None = None,
    timeout: float = DEFAULT_WEBHOOK_TIMEOUT,
) -> Moderator:
    """The embedded policy (`prompts`: its word list), then the webhook if one is set."""
    policy = PolicyModerator(prompts)
    if not url:
        return policy
    return ChainModerator([policy, WebhookModerator(url, timeout)])
