"""What a session may be told, and how a prompt is read: moderation and prompt enhancement."""

from __future__ import annotations

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
    "PolicyModerator",
    "PromptPolicy",
    "Verdict",
    "WebhookModerator",
    "build_enhancer",
    "build_moderator",
    "policy_from_settings",
    "refusal",
]


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
