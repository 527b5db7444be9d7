"""The webhook moderator and the chat enhancer against real local HTTP services, directly
and through a real server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from websockets.asyncio.client import connect

from livemorph.policy import (
    ChainModerator,
    ChatEnhancer,
    EngineEnhancer,
    Expansion,
    PolicyModerator,
    PromptPolicy,
    Verdict,
    WebhookModerator,
)
from livemorph.testing import LiveServer, free_port, serve
from tests.fake_services import SLOW_S, FakeService, chat_service, moderation_service
from tests.test_signaling import recv_type

SECRET = "sk-test-0123456789abcdef"


def png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def moderation() -> Iterator[FakeService]:
    with moderation_service() as service:
        yield service


@pytest.fixture(scope="module")
def chat() -> Iterator[FakeService]:
    with chat_service() as service:
        yield service


# --- the webhook moderator -----------------------------------------------------------------


async def test_webhook_verdicts(moderation: FakeService) -> None:
    webhook = WebhookModerator(moderation.url, timeout=2.0)
    try:
        assert await webhook.check_prompt("a calm lake") == Verdict(True)
        assert moderation.requests[-1] == {"type": "prompt", "prompt": "a calm lake"}

        refused = await webhook.check_prompt("forbidden fruit")
        assert not refused.allowed
        assert refused.reason == "not allowed (house rules forbid that word)"

        assert await webhook.check_image(png((20, 40, 220))) == Verdict(True)
        sent = moderation.requests[-1]
        assert sent["type"] == "image" and sent["size"] == len(png((20, 40, 220)))
        assert base64.b64decode(sent["image_data"]) == png((20, 40, 220))
        red = await webhook.check_image(png((230, 10, 10)))
        assert red.reason == "not allowed (red pictures are off limits)"
    finally:
        await webhook.aclose()


@pytest.mark.parametrize("prompt", ["slow cats", "broken pipe", "garbage in", "shapeless"])
async def test_webhook_fails_closed(moderation: FakeService, prompt: str) -> None:
    """A slow, failing or nonsensical service refuses: nothing unjudged gets through."""
    webhook = WebhookModerator(moderation.url, timeout=0.5)
    try:
        started = time.monotonic()
        verdict = await webhook.check_prompt(prompt)
        assert time.monotonic() - started < SLOW_S, "the timeout cut the slow service short"
    finally:
        await webhook.aclose()
    assert not verdict.allowed
    assert "moderation service is unavailable" in verdict.reason
    assert "not allowed" not in verdict.reason  # transient: a client may retry


async def test_webhook_down_fails_closed() -> None:
    webhook = WebhookModerator(f"http://127.0.0.1:{free_port()}/moderate", timeout=2.0)
    try:
        verdict = await webhook.check_prompt("a calm lake")
        assert "unavailable" in verdict.reason
        assert "unavailable" in (await webhook.check_image(png((1, 2, 3)))).reason
    finally:
        await webhook.aclose()


async def test_webhook_does_not_block_the_event_loop(moderation: FakeService) -> None:
    webhook = WebhookModerator(moderation.url, timeout=1.0)
    ticks = 0

    async def count() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    counter = asyncio.create_task(count())
    try:
        await webhook.check_prompt("slow")
    finally:
        counter.cancel()
        await webhook.aclose()
    assert ticks > 10, "other tasks ran while the moderator waited"


async def test_policy_runs_before_the_webhook(moderation: FakeService) -> None:
    chain = ChainModerator([PolicyModerator(), WebhookModerator(moderation.url)])
    try:
        before = len(moderation.requests)
        assert not (await chain.check_prompt("p0rn")).allowed
        assert not (await chain.check_image(b"GIF89a not really")).allowed
        assert len(moderation.requests) == before, "refused locally, the service is not asked"
        assert (await chain.check_prompt("a calm lake")).allowed
        assert len(moderation.requests) == before + 1
    finally:
        await chain.aclose()


# --- the chat enhancer ---------------------------------------------------------------------


async def test_chat_enhancer_expands(chat: FakeService) -> None:
    enhancer = ChatEnhancer(chat.url, model="tiny", api_key=SECRET, timeout=2.0)
    try:
        text = await enhancer.enhance("anime")
        assert text == "A vivid painting of anime: bold strokes, neon glow."
        body = chat.requests[-1]
        assert body["model"] == "tiny"
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert "visual style" in body["messages"][0]["content"]
        assert body["messages"][1]["content"] == "anime"
        assert chat.headers[-1]["authorization"] == f"Bearer {SECRET}"

        expansion = await enhancer.expand("anime", enhance=True)
        assert expansion == Expansion(text, enhanced=text)
        before = len(chat.requests)
        assert await enhancer.expand("anime", enhance=False) == Expansion("anime")
        assert len(chat.requests) == before, "enhance=false asks nobody"
    finally:
        await enhancer.aclose()


@pytest.mark.parametrize("prompt", ["sleepy waves", "broken glass", "garbage art", "empty room"])
async def test_chat_enhancer_falls_back_to_the_plain_prompt(chat: FakeService, prompt) -> None:
    enhancer = ChatEnhancer(chat.url, timeout=0.5)
    try:
        started = time.monotonic()
        assert await enhancer.enhance(prompt) == prompt
        assert time.monotonic() - started < SLOW_S
        assert await enhancer.expand(prompt, enhance=True) == Expansion(prompt)
    finally:
        await enhancer.aclose()


async def test_chat_enhancer_down_or_refused_falls_back(chat: FakeService) -> None:
    down = ChatEnhancer(f"http://127.0.0.1:{free_port()}/v1", timeout=2.0)
    screened = ChatEnhancer(chat.url, timeout=2.0, screen=PromptPolicy.load())
    try:
        assert await down.enhance("lego") == "lego"
        # the model's expansion itself is screened by the embedded policy
        assert await screened.enhance("sneaky watercolour") == "sneaky watercolour"
    finally:
        await down.aclose()
        await screened.aclose()


async def test_engine_enhancer_leaves_expansion_to_the_engine() -> None:
    enhancer = EngineEnhancer()
    assert await enhancer.expand("anime", True) == Expansion("anime")
    assert await enhancer.expand("anime", False) == Expansion("anime")


# --- through a real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hooked(
    moderation: FakeService, chat: FakeService, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """A server with both services configured: flags for some, environment for others."""
    data_dir: Path = tmp_path_factory.mktemp("hooked")
    env = {"LIVEMORPH_ENHANCER_URL": chat.url, "LIVEMORPH_ENHANCER_API_KEY": SECRET}
    flags = ("--engine", "passthrough", "--moderation-url", moderation.url)
    with serve(data_dir, *flags, "--moderation-timeout", "1", env=env) as live:
        yield live


async def exchange(live: LiveServer, *messages: dict) -> list[dict]:
    """Send each message on a fresh publishing session; the ack each one gets."""
    url = f"{live.ws_url}/v1/stream?api_key={live.api_key}&model=mirage"
    acks = []
    async with connect(url) as ws:
        await recv_type(ws, "session_id")
        for message in messages:
            await ws.send(json.dumps(message))
            kind = "prompt_ack" if message["type"] == "prompt" else "set_image_ack"
            acks.append(await recv_type(ws, kind))
    return acks


async def test_server_moderates_through_the_webhook(hooked: LiveServer, moderation) -> None:
    blue = base64.b64encode(png((20, 40, 220))).decode()
    red = base64.b64encode(png((230, 10, 10))).decode()
    fine, forbidden, slow, local, blue_ack, red_ack = await exchange(
        hooked,
        {"type": "prompt", "prompt": "a calm lake", "enhance_prompt": False},
        {"type": "prompt", "prompt": "forbidden fruit"},
        {"type": "prompt", "prompt": "slow boat"},
        {"type": "prompt", "prompt": "n.u.d.e"},
        {"type": "set_image", "image_data": blue},
        {"type": "set_image", "image_data": red, "prompt": "a calm lake"},
    )
    assert fine == {"type": "prompt_ack", "prompt": "a calm lake", "success": True}
    assert forbidden["success"] is False
    assert forbidden["error"] == (
        "prompt refused by moderation: not allowed (house rules forbid that word)"
    )
    assert slow["success"] is False and "unavailable" in slow["error"]
    assert local["success"] is False and "content policy" in local["error"]
    assert blue_ack["success"] is True
    assert red_ack["success"] is False and "red pictures" in red_ack["error"]
    prompts = [r.get("prompt") for r in moderation.requests if r["type"] == "prompt"]
    assert "n.u.d.e" not in prompts, "the embedded policy refused it first"


async def test_server_enhances_through_the_chat_endpoint(hooked: LiveServer, chat) -> None:
    before = len(chat.requests)
    enhanced, plain, slow, with_image = await exchange(
        hooked,
        {"type": "prompt", "prompt": "anime"},
        {"type": "prompt", "prompt": "exact words", "enhance_prompt": False},
        {"type": "prompt", "prompt": "sleepy jazz"},
        {"type": "set_image", "image_data": None, "prompt": "lego"},
    )
    assert enhanced["success"] is True
    assert enhanced["prompt"] == "anime", "acks carry the client's prompt, not the expansion"
    assert enhanced["enhanced_prompt"] == "A vivid painting of anime: bold strokes, neon glow."
    assert "enhanced_prompt" not in plain
    assert slow["success"] is True and "enhanced_prompt" not in slow  # fell back in time
    assert with_image["enhanced_prompt"].startswith("A vivid painting of lego")
    asked = [body["messages"][-1]["content"] for body in chat.requests[before:]]
    assert asked == ["anime", "sleepy jazz", "lego"]
    assert chat.headers[-1]["authorization"] == f"Bearer {SECRET}"
    log = hooked.log
    assert "enhanced to 'A vivid painting of anime" in log
    assert SECRET not in log
