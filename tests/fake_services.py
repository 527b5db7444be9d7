"""Real little HTTP services for tests: a moderation webhook and a chat-completions endpoint.

Each runs on uvicorn in a thread of the test process, on a free port; what it was sent is
kept in `requests`. Its behaviour is steered by words in the prompt, so one server serves
every case: "forbidden" is refused, "slow" (the moderator) or "sleepy" (the chat model)
answers after `SLOW_S`, "broken" gets a 500, "garbage" gets a body that is not the expected
shape.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from livemorph.testing import free_port

SLOW_S = 5.0


@dataclass
class FakeService:
    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


def _steer(text: str) -> Response | None:
    if "broken" in text:
        return PlainTextResponse("upstream exploded", status_code=500)
    if "garbage" in text:
        return PlainTextResponse("<html>definitely not json</html>")
    return None


def moderation_app(service: FakeService) -> Starlette:
    """Refuses prompts with "forbidden" and images that are mostly red."""

    async def moderate(request: Request) -> Response:
        body = await request.json()
        service.requests.append(body)
        text = str(body.get("prompt") or "")
        if "slow" in text:
            await asyncio.sleep(SLOW_S)
        if (steered := _steer(text)) is not None:
            return steered
        if "shapeless" in text:
            return JSONResponse({"verdict": "fine"})
        if body.get("type") == "image":
            raw = base64.b64decode(body["image_data"])
            red, green, blue = (
                Image.open(io.BytesIO(raw)).convert("RGB").resize((1, 1)).getpixel((0, 0))
            )
            if red > 150 and green < 100 and blue < 100:
                return JSONResponse({"allowed": False, "reason": "red pictures are off limits"})
            return JSONResponse({"allowed": True})
        if "forbidden" in text:
            return JSONResponse({"allowed": False, "reason": "house rules forbid that word"})
        return JSONResponse({"allowed": True, "reason": ""})

    return Starlette(routes=[Route("/moderate", moderate, methods=["POST"])])


def chat_app(service: FakeService) -> Starlette:
    """An OpenAI-compatible chat-completions endpoint with a very predictable model."""

    async def complete(request: Request) -> Response:
        body = await request.json()
        service.requests.append(body)
        service.headers.append(dict(request.headers))
        prompt = body["messages"][-1]["content"]
        if "sleepy" in prompt:
            await asyncio.sleep(SLOW_S)
        if (steered := _steer(prompt)) is not None:
            return steered
        if "empty" in prompt:
            return JSONResponse({"choices": []})
        content = (
            "a graphic gore scene"
            if "sneaky" in prompt
            else f"  A vivid painting of {prompt}:\n bold strokes, neon glow.  "
        )
        return JSONResponse(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
            }
        )

    return Starlette(routes=[Route("/v1/chat/completions", complete, methods=["POST"])])


@contextmanager
def running(app: Starlette, service: FakeService, port: int) -> Iterator[FakeService]:
    """Serve `app` on 127.0.0.1:`port` in a thread until the block ends."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("fake service did not start")
        time.sleep(0.02)
    try:
        yield service
    finally:
        server.should_exit = True
        thread.join(timeout=SLOW_S + 5)


@contextmanager
def moderation_service() -> Iterator[FakeService]:
    port = free_port()
    service = FakeService(f"http://127.0.0.1:{port}/moderate")
    with running(moderation_app(service), service, port):
        yield service


@contextmanager
def chat_service() -> Iterator[FakeService]:
    port = free_port()
    service = FakeService(f"http://127.0.0.1:{port}/v1")
    with running(chat_app(service), service, port):
        yield service
