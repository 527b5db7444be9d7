"""`--log-format json`: one JSON object a line, with the session's id, key id and model on
what concerns a session (worker threads included), and no secret in any of it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from av import VideoFrame

from livemorph import create_client
from livemorph.engines.base import Controls, EngineSession
from livemorph.logs import (
    JsonFormatter,
    RedactSecrets,
    SessionContext,
    bind_session,
    unbind_session,
)
from livemorph.models import CATALOG
from livemorph.sessions.pipeline import Pipeline
from livemorph.testing import serve
from tests.media import FrameSink, SceneTrack

KEY = "lm_" + "k" * 40


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own writing JSON lines into a buffer, as `--log-format json` does."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SessionContext())
    handler.addFilter(RedactSecrets())
    logger = logging.getLogger("livemorph.tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)


def parsed(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_a_line_has_time_level_logger_message_and_the_bound_session(lines) -> None:
    logger, buffer = lines
    logger.info("before any session")
    token = bind_session("s1", "key-id-1", "mirage")
    try:
        logger.warning("in %s", "a session")
        logger.info("told apart", extra={"session_id": "s2", "model": "lucy_v2v_720p_rt"})
    finally:
        unbind_session(token)
    logger.info("after it")
    first, inside, told, after = parsed(buffer)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["logger"] == "livemorph.tests.logs"
    assert str(first["time"]).endswith("+00:00")
    assert inside == {
        "time": inside["time"],
        "level": "warning",
        "logger": "livemorph.tests.logs",
        "message": "in a session",
        "session_id": "s1",
        "key_id": "key-id-1",
        "model": "mirage",
    }
    # extra= wins over what is bound; what it leaves out comes from the binding
    assert (told["session_id"], told["model"], told["key_id"]) == (
        "s2",
        "lucy_v2v_720p_rt",
        "key-id-1",
    )
    assert "session_id" not in after


def test_secrets_are_redacted_in_messages_and_tracebacks(lines) -> None:
    logger, buffer = lines
    logger.info("GET /v1/stream?api_key=%s&model=mirage", KEY)
    try:
        raise RuntimeError(f"failed with {KEY}")
    except RuntimeError:
        logger.exception("Authorization: Bearer %s", "admin-secret")
    text = buffer.getvalue()
    assert KEY not in text and "admin-secret" not in text
    request, failure = parsed(buffer)
    assert request["message"] == "GET /v1/stream?api_key=[redacted]&model=mirage"
    assert "RuntimeError: failed with lm_[redacted]" in str(failure["exception"])


class LoggingEngine(EngineSession):
    """Logs from the worker thread it runs on."""

    def configure(self, controls: Controls) -> None:
        logging.getLogger("livemorph.tests.logs").info("configured")

    def transform(self, frame: VideoFrame) -> VideoFrame:
        logging.getLogger("livemorph.tests.logs").info("transformed")
        return frame


async def test_the_engines_worker_threads_log_with_the_session(lines) -> None:
    _, buffer = lines
    token = bind_session("s-worker", "key-id", "mirage")
    try:
        with ThreadPoolExecutor(1) as pool:
            pipeline = Pipeline(LoggingEngine(CATALOG["mirage"]), pool, on_first_frame=lambda: None)
            try:
                await pipeline.apply(Controls(prompt="anime"))
                pipeline.feed(VideoFrame(64, 64, "rgb24"))
                async with asyncio.timeout(10):
                    await pipeline.track.recv()
            finally:
                await pipeline.close()
    finally:
        unbind_session(token)
    records = parsed(buffer)
    assert [r["message"] for r in records] == ["configured", "transformed"]
    assert all(r["session_id"] == "s-worker" and r["model"] == "mirage" for r in records)


@pytest.mark.slow
async def test_a_servers_json_log_names_the_session_and_holds_no_key(tmp_path: Path) -> None:
    with serve(tmp_path, "--engine", "passthrough", "--log-format", "json") as live:
        async with create_client(api_key=live.api_key, base_url=live.base_url) as client:
            rt = await client.realtime.connect(
                SceneTrack(320, 176), model="mirage", initial_state={"prompt": "anime"}
            )
            output = FrameSink(rt.video_track)
            try:
                await output.fresh()
                session_id = rt.session_id
            finally:
                await output.close()
                await rt.disconnect()
        await asyncio.to_thread(live.wait_sessions, 0)
        log = live.log
    records = [json.loads(line) for line in log.splitlines()]  # every line is JSON
    assert live.api_key not in log
    assert any(r["logger"] == "uvicorn.error" for r in records), "uvicorn's lines too"
    mine = [r for r in records if r.get("session_id") == session_id]
    started = next(r for r in mine if "started" in str(r["message"]))
    assert started["model"] == "mirage" and started["level"] == "info"
    assert started["key_id"] and started["key_id"] not in live.api_key
    assert any("ended" in str(r["message"]) for r in mine)
    opened = [r for r in records if "/v1/stream" in str(r["message"])]
    assert opened and all("api_key=[redacted]" in str(r["message"]) for r in opened)


def test_uvicorn_access_lines_keep_their_arguments_when_redacted() -> None:
    """uvicorn's access formatter unpacks the record's arguments: redaction keeps them."""
    from uvicorn.logging import AccessFormatter

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/rtc/validate?access_token=eyJhbGc.x.y", "1.1", 401),
        None,
    )
    assert RedactSecrets().filter(record)
    line = AccessFormatter("%(client_addr)s %(request_line)s %(status_code)s").format(record)
    assert "eyJhbGc" not in line
    assert "GET /rtc/validate?access_token=[redacted] HTTP/1.1" in line
