"""Keys, credits and usage end to end: the CLI, the admin REST API, `GET /v1/usage`, and
real WebRTC sessions that spend credits, on a real `livemorph serve` over SQLite and over
PostgreSQL; and a server that crashes and restarts keeps all of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from livemorph import ErrorCode, GenerationEnded, LivemorphError, RetryPolicy, create_client
from livemorph.cli import main as cli_main
from livemorph.protocol import is_permanent_error
from livemorph.testing import LiveServer, serve
from tests.media import SceneTrack
from tests.support import eventually

pytestmark = pytest.mark.slow

ADMIN_KEY = "admin-" + secrets.token_urlsafe(24)

#: Retries that would blow the test's own timeout: a retried permanent error shows as a hang.
PATIENT = RetryPolicy(attempts=5, base_delay=30.0, max_delay=30.0)


@dataclass(frozen=True)
class Accounts:
    """A live server with an admin key, and the environment its CLI needs."""

    server: LiveServer
    env: dict[str, str]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "livemorph.cli", *args, "--data-dir", str(self.server.data_dir)],
            capture_output=True,
            text=True,
            env={**os.environ, **self.env},
        )

    def stream_url(self, key: str, model: str = "mirage") -> str:
        return f"{self.server.ws_url}/v1/stream?api_key={key}&model={model}"


def backend_env(backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    env = {"LIVEMORPH_ADMIN_KEY": ADMIN_KEY}
    if backend == "postgresql":
        env["LIVEMORPH_DATABASE_URL"] = request.getfixturevalue("postgres").new_database()
    return env


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def accounts(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Accounts]:
    env = backend_env(request.param, request)
    with serve(tmp_path_factory.mktemp("accounts"), "--engine", "passthrough", env=env) as live:
        yield Accounts(live, env)


@pytest.fixture
async def admin(accounts: Accounts) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=accounts.server.base_url, headers={"X-ADMIN-KEY": ADMIN_KEY}
    ) as client:
        yield client


def unique(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


async def new_key(admin: httpx.AsyncClient, credits: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"name": unique("user")}
    if credits is not None:
        body["credits"] = credits
    response = await admin.post("/v1/admin/keys", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def usage(accounts: Accounts, key: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=accounts.server.base_url) as http:
        return await http.get("/v1/usage", headers={"X-API-KEY": key})


async def raw_session(url: str, messages: list[dict[str, Any]]) -> int | None:
    """Publish a camera over real WebRTC, speaking docs/protocol.md raw. Every message received
    goes into `messages`; returns the close code once the server closes the socket."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(SceneTrack(320, 176, fps=15))
    try:
        async with connect(url) as ws:
            try:
                async for raw in ws:
                    message = json.loads(raw)
                    messages.append(message)
                    if message["type"] == "session_id":
                        await pc.setLocalDescription(await pc.createOffer())
                        offer = {"type": "offer", "sdp": pc.localDescription.sdp}
                        await ws.send(json.dumps(offer))
                    elif message["type"] == "answer":
                        answer = RTCSessionDescription(sdp=message["sdp"], type="answer")
                        await pc.setRemoteDescription(answer)
            except ConnectionClosed:
                pass
            return ws.close_code
    finally:
        await pc.close()


def of_type(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == kind]


def ticks(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seconds"] for m in of_type(messages, "generation_tick")]


async def expect_refused(url: str, words: str) -> str:
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(15):
        code = await raw_session(url, messages)
    assert code == 1008
    assert [m["type"] for m in messages] == ["error"], messages
    text = messages[0]["error"]
    assert words in text.lower() and is_permanent_error(text)
    return text


# -- the CLI ------------------------------------------------------------------------------


async def test_cli_creates_lists_grants_and_revokes(accounts: Accounts) -> None:
    name = unique("cli")
    created = accounts.cli("keys", "create", "--name", name)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("lm_")

    listing = accounts.cli("keys", "list")
    (line,) = [row for row in listing.stdout.splitlines() if f" {name} " in row]
    key_id = line.split()[0]
    assert "active" in line and "unlimited" in line and secret not in listing.stdout

    granted = accounts.cli("credits", "grant", name, "30")
    assert granted.returncode == 0 and "30s left" in granted.stdout
    report = (await usage(accounts, secret)).json()
    assert report == {"keyId": key_id, "credits": 30, "totalSeconds": 0, "days": []}
    assert "credits 30s" in accounts.cli("credits", "show", key_id).stdout

    revoked = accounts.cli("keys", "revoke", key_id)
    assert revoked.returncode == 0 and "running sessions go on" in revoked.stdout
    assert (await usage(accounts, secret)).status_code == 401
    await expect_refused(accounts.stream_url(secret), "invalid api key")
    assert "revoked" in next(
        r for r in accounts.cli("keys", "list").stdout.splitlines() if name in r
    )


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("credits", "grant", "no-such-key", "5"), 1, "no api key"),
        (("keys", "revoke", "no-such-key"), 1, "no api key"),
        (("credits", "show", "no-such-key"), 1, "no api key"),
        (("credits", "grant", "x", "abc"), 2, "whole number"),
        (("credits", "grant", "x", "0"), 2, "more than zero"),
        (("credits", "grant", "x", "-4"), 2, "more than zero"),
        (("keys", "create", "--credits", "-4"), 2, "more than zero"),
    ],
)
def test_cli_refuses_bad_input(
    accounts: Accounts,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    code: int,
    words: str,
) -> None:
    """In-process (the same `main` the command runs), against the live server's database."""
    for name, value in accounts.env.items():
        monkeypatch.setenv(name, value)
    try:
        status = cli_main([*args, "--data-dir", str(accounts.server.data_dir)])
    except SystemExit as exit_:
        status = exit_.code  # argparse's refusal
    assert status == code
    assert words in capsys.readouterr().err.lower()


def test_cli_names_an_ambiguous_key(accounts: Accounts) -> None:
    name = unique("twin")
    for _ in range(2):
        assert accounts.cli("keys", "create", "--name", name).returncode == 0
    result = accounts.cli("credits", "grant", name, "5")
    assert result.returncode == 1 and "use the id" in result.stderr


# -- the admin REST API -------------------------------------------------------------------


async def test_admin_key_is_required_and_checked(accounts: Accounts) -> None:
    async with httpx.AsyncClient(base_url=accounts.server.base_url) as http:
        for headers in (
            {},
            {"X-ADMIN-KEY": ADMIN_KEY + "x"},
            {"X-ADMIN-KEY": ADMIN_KEY[:-1]},
            {"Authorization": "Basic " + ADMIN_KEY},
            {"X-API-KEY": accounts.server.api_key},
        ):
            response = await http.get("/v1/admin/keys", headers=headers)
            assert response.status_code == 401, headers
            assert response.json() == {"error": "invalid admin key"}
        bearer = await http.get("/v1/admin/keys", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert bearer.status_code == 200


async def test_admin_manages_keys_and_credits(accounts: Accounts, admin: httpx.AsyncClient):
    created = await new_key(admin, credits=5)
    key_id, secret = created["id"], created["apiKey"]
    assert created["credits"] == 5 and created["active"] and created["revokedAt"] is None

    listing = await admin.get("/v1/admin/keys")
    assert secret not in listing.text and "apiKey" not in listing.text
    assert any(k["id"] == key_id for k in listing.json())
    assert (await admin.get(f"/v1/admin/keys/{key_id}")).json()["credits"] == 5

    granted = await admin.post(f"/v1/admin/keys/{key_id}/credits", json={"seconds": 10})
    assert granted.json() == {"id": key_id, "credits": 15}
    assert (await usage(accounts, secret)).json()["credits"] == 15

    revoked = (await admin.delete(f"/v1/admin/keys/{key_id}")).json()
    assert not revoked["active"] and revoked["revokedAt"]
    again = (await admin.delete(f"/v1/admin/keys/{key_id}")).json()
    assert again["revokedAt"] == revoked["revokedAt"]
    assert (await usage(accounts, secret)).status_code == 401
    assert secret not in accounts.server.log and ADMIN_KEY not in accounts.server.log


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/admin/keys", {"name": ""}),
        ("/v1/admin/keys", {"name": "x" * 201}),
        ("/v1/admin/keys", {"credits": -1}),
        ("/v1/admin/keys", {"credits": 1.5}),
        ("/v1/admin/keys", {"credits": "10"}),
        ("/v1/admin/keys", {"surprise": 1}),
        ("/v1/admin/keys", "[1, 2"),
        ("credits", {"seconds": 0}),
        ("credits", {"seconds": -3}),
        ("credits", {"seconds": "10"}),
        ("credits", {"seconds": True}),
        ("credits", {}),
        ("credits", {"seconds": 5, "extra": 1}),
        ("credits", "not json"),
    ],
)
async def test_admin_refuses_bad_bodies(admin: httpx.AsyncClient, path: str, body: Any) -> None:
    if path == "credits":
        key = await new_key(admin)
        path = f"/v1/admin/keys/{key['id']}/credits"
    content = body if isinstance(body, str) else json.dumps(body)
    response = await admin.post(path, content=content)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("invalid request body")
    if "credits" in path:
        assert (await admin.get(path.removesuffix("/credits"))).json()["credits"] is None


async def test_admin_answers_404_for_a_missing_key(admin: httpx.AsyncClient) -> None:
    assert (await admin.get("/v1/admin/keys/nope")).status_code == 404
    assert (await admin.delete("/v1/admin/keys/nope")).status_code == 404
    response = await admin.post("/v1/admin/keys/nope/credits", json={"seconds": 5})
    assert response.status_code == 404 and "no API key" in response.json()["error"]
    assert (await admin.get("/v1/admin/keys/nope/usage")).status_code == 404


async def test_admin_routes_are_absent_without_an_admin_key(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        for method, path in [
            ("GET", "/v1/admin/keys"),
            ("POST", "/v1/admin/keys"),
            ("DELETE", "/v1/admin/keys/x"),
            ("POST", "/v1/admin/keys/x/credits"),
        ]:
            for headers in ({}, {"X-ADMIN-KEY": ""}, {"X-ADMIN-KEY": "anything"}):
                response = await http.request(method, path, headers=headers, json={})
                assert response.status_code == 404, (method, path, headers)


async def test_admin_and_usage_are_documented(accounts: Accounts) -> None:
    async with httpx.AsyncClient(base_url=accounts.server.base_url) as http:
        spec = (await http.get("/openapi.json")).json()
    for path in ("/v1/usage", "/v1/admin/keys", "/v1/admin/keys/{key_id}/credits"):
        assert path in spec["paths"]
    usage_ok = spec["paths"]["/v1/usage"]["get"]["responses"]["200"]
    assert usage_ok["content"]["application/json"]["schema"]["$ref"].endswith("UsageReport")
    assert {"UsageReport", "UsageDayInfo", "KeyInfo", "CreatedKey"} <= set(
        spec["components"]["schemas"]
    )


# -- GET /v1/usage ------------------------------------------------------------------------


async def test_usage_needs_a_permanent_key(accounts: Accounts, admin: httpx.AsyncClient):
    secret = (await new_key(admin))["apiKey"]
    async with httpx.AsyncClient(base_url=accounts.server.base_url) as http:
        token = (await http.post("/v1/client/tokens", headers={"X-API-KEY": secret})).json()
        as_token = await http.get("/v1/usage", headers={"X-API-KEY": token["apiKey"]})
        assert as_token.status_code == 403 and "permission denied" in as_token.json()["error"]
        for headers in ({}, {"X-API-KEY": "lm_wrong"}, {"X-API-KEY": ""}):
            response = await http.get("/v1/usage", headers=headers)
            assert response.status_code == 401 and response.json() == {"error": "invalid api key"}
        bad_day = await http.get("/v1/usage?since=yesterday", headers={"X-API-KEY": secret})
        assert bad_day.status_code == 400 and "since" in bad_day.json()["error"]


# -- sessions that spend credits ----------------------------------------------------------


async def test_credits_running_out_end_the_session(accounts: Accounts, admin: httpx.AsyncClient):
    key = await new_key(admin, credits=2)
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(30):
        code = await raw_session(accounts.stream_url(key["apiKey"]), messages)

    assert ticks(messages) == [1, 2]
    kinds = [m["type"] for m in messages]
    assert kinds[-2:] == ["generation_ended", "error"], kinds
    assert messages[-2] == {
        "type": "generation_ended",
        "seconds": 2,
        "reason": "insufficient_credits",
    }
    assert "insufficient credits" in messages[-1]["error"]
    assert is_permanent_error(messages[-1]["error"]), "out of credits is not worth retrying"
    assert code == 1008
    assert await asyncio.to_thread(accounts.server.wait_sessions, 0) == 0

    report = (await usage(accounts, key["apiKey"])).json()
    assert report["credits"] == 0 and report["totalSeconds"] == 2
    assert [(d["model"], d["seconds"]) for d in report["days"]] == [("mirage", 2)]

    await expect_refused(accounts.stream_url(key["apiKey"]), "insufficient credits")
    async with create_client(api_key=key["apiKey"], base_url=accounts.server.base_url) as sdk:
        with pytest.raises(LivemorphError) as refused:
            async with asyncio.timeout(15):  # the SDK gives up at once: no retries
                await sdk.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)
        assert refused.value.permanent and "insufficient credits" in refused.value.message

        await admin.post(f"/v1/admin/keys/{key['id']}/credits", json={"seconds": 1})
        ended: list[GenerationEnded] = []
        rt = await sdk.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)
        rt.on("generation_ended", ended.append)
        try:
            await eventually(lambda: rt.get_connection_state() == "disconnected", within=15)
            assert [(e.seconds, e.reason) for e in ended] == [(1, "insufficient_credits")]
        finally:
            await rt.disconnect()

    detail = (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json()
    assert detail["totalSeconds"] == 3 and detail["credits"] == 0
    assert [(s["seconds"], s["endReason"]) for s in detail["sessions"]] == [
        (1, "insufficient_credits"),
        (2, "insufficient_credits"),
    ]


async def test_a_tokens_usage_is_kept_with_its_metadata(
    accounts: Accounts, admin: httpx.AsyncClient
) -> None:
    key = await new_key(admin)
    metadata = {"user": "u-42", "room": "lobby"}
    async with create_client(api_key=key["apiKey"], base_url=accounts.server.base_url) as owner:
        token = await owner.tokens.create(
            metadata=metadata, constraints={"realtime": {"maxSessionDuration": 2}}
        )
    async with create_client(api_key=token.api_key, base_url=accounts.server.base_url) as browser:
        ended: list[GenerationEnded] = []
        rt = await browser.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)
        rt.on("generation_ended", ended.append)
        try:
            await eventually(lambda: rt.get_connection_state() == "disconnected", within=15)
        finally:
            await rt.disconnect()
    assert [(e.seconds, e.reason) for e in ended] == [(2, "max_duration")]

    detail = (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json()
    (session,) = detail["sessions"]
    assert session["tokenMetadata"] == metadata and session["tokenId"]
    assert (session["seconds"], session["endReason"]) == (2, "max_duration")
    assert session["endedAt"] and session["model"] == "mirage"
    report = (await usage(accounts, key["apiKey"])).json()
    assert report["totalSeconds"] == 2 and report["credits"] is None


async def test_revoking_ends_nothing_running_but_opens_nothing_new(
    accounts: Accounts, admin: httpx.AsyncClient
) -> None:
    key = await new_key(admin)
    async with create_client(api_key=key["apiKey"], base_url=accounts.server.base_url) as sdk:
        token = await sdk.tokens.create(expires_in=600)
        seen: list[int] = []
        rt = await sdk.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)
        rt.on("generation_tick", lambda tick: seen.append(tick.seconds))
        try:
            await eventually(lambda: len(seen) >= 1, within=10)
            assert (await admin.delete(f"/v1/admin/keys/{key['id']}")).status_code == 200
            at_revoke = len(seen)
            await eventually(lambda: len(seen) >= at_revoke + 2, within=10)
            assert rt.get_connection_state() == "generating"

            with pytest.raises(LivemorphError) as refused:
                async with asyncio.timeout(15):
                    await sdk.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)
            assert refused.value.code is ErrorCode.INVALID_API_KEY
            await expect_refused(accounts.stream_url(token.api_key), "invalid api key")
        finally:
            await rt.disconnect()
    detail = (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json()
    assert detail["totalSeconds"] >= at_revoke + 2, "the running session was still counted"


# -- restart ------------------------------------------------------------------------------


async def test_a_crashed_and_restarted_server_keeps_keys_credits_and_usage(
    database_url: str, tmp_path: Path
) -> None:
    env = {"LIVEMORPH_ADMIN_KEY": ADMIN_KEY}
    if database_url.startswith("postgresql"):
        env["LIVEMORPH_DATABASE_URL"] = database_url
    flags = ("--engine", "passthrough")
    with serve(tmp_path, *flags, env=env) as first:
        live = Accounts(first, env)
        created = live.cli("keys", "create", "--name", "durable", "--credits", "60")
        secret = created.stdout.strip().splitlines()[-1]
        messages: list[dict[str, Any]] = []
        publisher = asyncio.create_task(raw_session(live.stream_url(secret), messages))
        try:
            await eventually(lambda: len(ticks(messages)) >= 3, within=20)
            first.process.kill()  # a crash: no shutdown, no goodbye
            await asyncio.to_thread(first.process.wait)
            async with asyncio.timeout(10):
                await publisher
        finally:
            publisher.cancel()
        seen = max(ticks(messages))
        assert not of_type(messages, "generation_ended")

    with serve(tmp_path, *flags, env=env) as second:
        live = Accounts(second, env)
        assert "durable" in live.cli("keys", "list").stdout
        report = (await usage(live, secret)).json()
        # Every second is written before it is announced, so none the client saw is lost.
        assert seen <= report["totalSeconds"] <= seen + 1
        assert report["credits"] == 60 - report["totalSeconds"]
        messages = []
        async with asyncio.timeout(20):
            task = asyncio.create_task(raw_session(live.stream_url(secret), messages))
            await eventually(lambda: len(ticks(messages)) >= 1, within=15)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(second.wait_sessions, 0)
        after = (await usage(live, secret)).json()
        assert after["totalSeconds"] > report["totalSeconds"], "the restarted server meters too"
        assert secret not in second.log and ADMIN_KEY not in second.log
