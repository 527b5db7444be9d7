"""What a session may be told, and how a prompt is read: moderation and prompt enhancement."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Settings
from .enhancement import ChatEnhancer, EngineEnhancer, Enhancer, Expansion, build_enhancer
from .moderation import (
    ChainModerator,
    ImagePolicy,
    Moderator,
    PolicyModerator,
    PromptPolicy,
    Verdict,
    WebhookModerator,
    build_moderator,
    refusal,
)

__all__ = [
    "ChainModerator",
    "ChatEnhancer",
    "EngineEnhancer",
    "Enhancer",
    "Expansion",
    "ImagePolicy",
    "Moderator",
    "Policy",
    "PolicyModerator",
    "PromptPolicy",
    "Verdict",
    "WebhookModerator",
    "build_enhancer",
    "build_moderator",
    "policy_from_settings",
    "refusal",
]


@dataclass(frozen=True, slots=True)
class Policy:
    """What a session may be told, and how its prompts are read: the one place a session
    asks, moderation first, then enhancement of what passed."""

    moderator: Moderator
    enhancer: Enhancer

    async def refusal(self, prompt: str | None = None, image: bytes | None = None) -> str | None:
        """The ack text refusing `prompt` or `image` (given together, judged together), or
        None when what was given passes."""
        return await refusal(self.moderator, prompt, image)

    async def expand(self, prompt: str, enhance: bool) -> Expansion:
        """What the engine is handed for an admitted `prompt`."""
        return await self.enhancer.expand(prompt, enhance)


def policy_from_settings(settings: Settings) -> tuple[Moderator, Enhancer]:
    """The server's moderator and enhancer; one word list screens prompts and expansions."""
    prompts = PromptPolicy.load(
        *([settings.moderation_blocklist] if settings.moderation_blocklist else [])
    )
    moderator = build_moderator(prompts, settings.moderation_url, settings.moderation_timeout)
    enhancer = build_enhancer(
        settings.enhancer_url,
        settings.enhancer_model,
        settings.enhancer_api_key,
        settings.enhancer_timeout,
        screen=prompts,
    )
    return moderator, enhancer
