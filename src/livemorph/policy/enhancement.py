"""Prompt enhancement: a short prompt expanded into a fuller description of a look.

By default the engine expands a prompt itself as it applies it (the neural engine names
the styles, strength and grade it chose: see engines/neural/styles.py). `ChatEnhancer`
asks an OpenAI-compatible chat-completions endpoint instead; the engine then maps the
expansion to a look (its own reading of it changes only its description, never the
picture), and a slow or broken endpoint costs at most its timeout: the plain prompt is
used.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import httpx

from .moderation import PromptPolicy

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3.0
DEFAULT_MODEL = "gpt-4o-mini"
#: Longest expansion passed on (the server's own prompt limit).
MAX_EXPANSION_CHARS = 2000

SYSTEM_PROMPT = (
    "You write prompts for a live video style filter. Expand the user's short prompt into a "
    "vivid, one-paragraph description of the visual style only: medium, brushwork or "
    "texture, colour palette, lighting and mood. Do not add people, objects or a story. "
    "At most 80 words. Answer with the description alone."
)


@dataclass(frozen=True, slots=True)
class Expansion:
    """What the engine is given for a prompt, and the expansion to report in the ack."""

    #: The text the engine maps to a look: the expansion, or the prompt itself.
    prompt: str
    #: The expansion, when an enhancer made one; None: the engine's own reading, if any.
    enhanced: str | None = None


class Enhancer(ABC):
    """Turns a short prompt into a fuller one before the engine maps it to a look."""

    @abstractmethod
    async def enhance(self, prompt: str) -> str:
        """The expanded prompt; the prompt itself when there is nothing better."""

    async def expand(self, prompt: str, enhance: bool) -> Expansion:
        """What to hand the engine for `prompt`, honouring the client's enhance flag."""
        if not enhance:
            return Expansion(prompt)
        text = await self.enhance(prompt)
        return Expansion(text, enhanced=None if text == prompt else text)

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class EngineEnhancer(Enhancer):
    """The default: the engine expands the prompt itself when it applies it."""

    async def enhance(self, prompt: str) -> str:
        return prompt

    async def expand(self, prompt: str, enhance: bool) -> Expansion:
        return Expansion(prompt)


class ChatEnhancer(Enhancer):
    """Expands prompts with an OpenAI-compatible `POST {url}/chat/completions`.

    Falls back to the plain prompt on a timeout, an HTTP error, an answer of the wrong
    shape, or an expansion the embedded policy (`screen`) refuses: a model asked to be
    vivid must not smuggle in what the prompt itself could not say.
    """

    def __init__(
        self,
        url: str,
        model: str = DEFAULT_MODEL,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        screen: PromptPolicy | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        base = url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.screen = screen
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = client or httpx.AsyncClient()

    async def enhance(self, prompt: str) -> str:
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": prompt},
            ],
            "max_tokens": 200,
            "temperature": 0.7,
        }
        try:
            async with asyncio.timeout(self.timeout):  # the whole exchange, not each read
                response = await self._client.post(self.url, json=body, headers=self._headers)
            response.raise_for_status()
            text = _content(response.json())
        except TimeoutError:
            logger.warning("enhancer timed out after %gs: using the plain prompt", self.timeout)
            return prompt
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("enhancer failed (%s): using the plain prompt", exc)
            return prompt
        if text is None:
            logger.warning("enhancer answered without a message: using the plain prompt")
            return prompt
        if (
            self.screen is not None
            and not (await asyncio.to_thread(self.screen.check, text)).allowed
        ):
            logger.warning("enhancer's expansion refused by the policy: using the plain prompt")
            return prompt
        logger.info("prompt %r enhanced to %r", prompt, text)
        return text

    async def aclose(self) -> None:
        await self._client.aclose()


def _content(answer: Any) -> str | None:
    """`choices[0].message.content`, whitespace-collapsed and capped; None if absent."""
    try:
        content = answer["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(content, str):
        return None
    text = " ".join(content.split())
    return text[:MAX_EXPANSION_CHARS] or None


def build_enhancer(
    url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    screen: PromptPolicy | None = None,
) -> Enhancer:
    """The engine's own expansion, or a chat endpoint when `url` is set."""
    if not url:
        return EngineEnhancer()
    return ChatEnhancer(url, model or DEFAULT_MODEL, api_key, timeout, screen)
