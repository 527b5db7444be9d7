"""CORS (`--cors-origins`): pages on the origins named may call the REST API with fetch, the
key in `x-api-key`; every other origin, and every origin by default, sees no CORS at all.

Against real servers: the headers a browser's preflight and its requests get, that no answer
ever allows credentials, that WebSockets and the paths outside the API are untouched, that a
bad value stops `livemorph serve` by name; and in Chromium, a page on another origin calling
the API as Decart's JS SDK does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect
from websockets.typing import Origin

from livemorph import cli, config
from livemorph.server.app import CORS_MAX_AGE
from livemorph.testing import LiveServer, serve
from tests.browser import chromium
from tests.decart_js import published_sdk

#: The origin of an app's dev server (Vite's), and the app's deployed origin.
DEV_ORIGIN = "http://localhost:5173"
APP_ORIGIN = "https://app.example.com"
OTHER_ORIGIN = "https://elsewhere.example"

#: What Decart's JS SDK (0.1.20) calls, and what its fetch sends beyond the safelisted
#: headers: `X-API-KEY` and `User-Agent` always (Firefox sends the latter; Chromium drops
#: it), `content-type: application/json` to mint tokens and to watch a stream.
SDK_CALLS = [
    ("POST", "/v1/client/tokens", "content-type,user-agent,x-api-key"),
    ("POST", "/watch-stream/room-1", "content-type,x-api-key"),
    ("POST", "/v1/generate/lucy-pro-i2i", "user-agent,x-api-key"),
    ("POST", "/v1/jobs/lucy-pro-v2v", "user-agent,x-api-key"),
    ("GET", "/v1/jobs/job-1/content", "user-agent,x-api-key"),
    ("POST", "/v1/files", "user-agent,x-api-key"),
    ("DELETE", "/v1/files/file-1", "user-agent,x-api-key"),
    ("GET", "/v1/models", "x-api-key"),
]


def preflight(
    server: LiveServer, path: str, origin: str, method: str = "POST", headers: str | None = None
) -> httpx.Response:
    """The OPTIONS request a browser sends before a cross-origin fetch that is not simple."""
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        asked["Access-Control-Request-Headers"] = headers
    return httpx.options(f"{server.base_url}{path}", headers=asked)


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {
        name: value
        for name, value in response.headers.items()
        if name.lower().startswith("access-control-")
    }


def listed(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Two origins named, one of them as an operator might type it (case, default port)."""
    origins = f"{DEV_ORIGIN}, https://App.Example.com:443"
    with serve(
        tmp_path_factory.mktemp("cors"), "--engine", "passthrough", "--cors-origins", origins
    ) as live:
        yield live


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """No setting: the default."""
    with serve(tmp_path_factory.mktemp("no-cors"), "--engine", "passthrough") as live:
        yield live


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """`*`, given in the environment: any origin."""
    with serve(
        tmp_path_factory.mktemp("any-origin"),
        "--engine",
        "passthrough",
        env={"LIVEMORPH_CORS_ORIGINS": "*"},
    ) as live:
        yield live


# -- a named origin ---------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "headers"), SDK_CALLS)
@pytest.mark.parametrize("origin", [DEV_ORIGIN, APP_ORIGIN])
def test_a_named_origins_preflight_is_allowed(
    cors_server: LiveServer, origin: str, method: str, path: str, headers: str
) -> None:
    response = preflight(cors_server, path, origin, method, headers)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == origin
    assert method.lower() in listed(response.headers["access-control-allow-methods"])
    assert listed(headers) <= listed(response.headers["access-control-allow-headers"])
    assert response.headers["access-control-max-age"] == str(CORS_MAX_AGE)
    assert "access-control-allow-credentials" not in response.headers
    assert "origin" in listed(response.headers["vary"])


def test_the_methods_and_headers_allowed(cors_server: LiveServer) -> None:
    response = preflight(cors_server, "/v1/client/tokens", APP_ORIGIN, "POST", "authorization")
    assert response.status_code == 200
    assert listed(response.headers["access-control-allow-methods"]) == {
        "get",
        "post",
        "delete",
        "options",
    }
    assert {"x-api-key", "authorization", "content-type", "user-agent"} <= listed(
        response.headers["access-control-allow-headers"]
    )
    # a method or a header not allowed: the preflight fails, the origin is not echoed as if
    # the request might go ahead
    for method, headers in [("PUT", None), ("POST", "x-api-key,cookie")]:
        refused = preflight(cors_server, "/v1/client/tokens", APP_ORIGIN, method, headers)
        assert refused.status_code == 400
        assert "access-control-allow-credentials" not in refused.headers


def test_a_named_origin_reads_the_answers(cors_server: LiveServer) -> None:
    models = httpx.get(
        f"{cors_server.base_url}/v1/models",
        headers={"Origin": DEV_ORIGIN, "x-api-key": cors_server.api_key},
    )
    assert models.status_code == 200
    assert models.headers["access-control-allow-origin"] == DEV_ORIGIN
    assert "origin" in listed(models.headers["vary"])
    assert "access-control-allow-credentials" not in models.headers

    minted = httpx.post(
        f"{cors_server.base_url}/v1/client/tokens",
        headers={"Origin": APP_ORIGIN, "x-api-key": cors_server.api_key},
        json={"expiresIn": 60},
    )
    assert minted.status_code == 200, minted.text
    assert minted.json()["apiKey"]
    assert minted.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "access-control-allow-credentials" not in minted.headers

    # an error is readable too: the page can show why
    refused = httpx.post(
        f"{cors_server.base_url}/v1/client/tokens",
        headers={"Origin": APP_ORIGIN, "x-api-key": "not-a-key"},
    )
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == APP_ORIGIN


@pytest.mark.parametrize(
    ("path", "status"), [("/rtc/v1/validate", 404), ("/rtc/validate?access_token=x", 401)]
)
def test_livekit_clients_read_why_a_room_join_failed(
    cors_server: LiveServer, path: str, status: int
) -> None:
    """livekit-client fetches these after a failed join: the 404 of the first sends it to
    `/rtc`, so a page on another origin that cannot read it never joins its room."""
    answer = httpx.get(f"{cors_server.base_url}{path}", headers={"Origin": DEV_ORIGIN})
    assert answer.status_code == status
    assert answer.headers["access-control-allow-origin"] == DEV_ORIGIN
    other = httpx.get(f"{cors_server.base_url}{path}", headers={"Origin": OTHER_ORIGIN})
    assert "access-control-allow-origin" not in other.headers


# -- any other origin, any path outside the API, the default ----------------------------------


@pytest.mark.parametrize("origin", [OTHER_ORIGIN, "http://localhost:5174", "null"])
def test_another_origin_gets_no_cors_headers(cors_server: LiveServer, origin: str) -> None:
    response = preflight(cors_server, "/v1/client/tokens", origin, "POST", "content-type,x-api-key")
    assert cors_headers(response) == {}
    assert response.status_code == 405  # as with no setting: the route allows no OPTIONS

    models = httpx.get(f"{cors_server.base_url}/v1/models", headers={"Origin": origin})
    assert models.status_code == 200
    assert cors_headers(models) == {}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/demo/token"), ("GET", "/metrics"), ("GET", "/healthz"), ("GET", "/watch")],
)
def test_paths_outside_the_api_are_untouched(
    cors_server: LiveServer, open_server: LiveServer, method: str, path: str
) -> None:
    """/demo/token mints tokens for whoever reaches the server: no page elsewhere reads one."""
    for server in (cors_server, open_server):
        response = preflight(server, path, APP_ORIGIN, method, "content-type")
        assert cors_headers(response) == {}
        answer = httpx.request(method, f"{server.base_url}{path}", headers={"Origin": APP_ORIGIN})
        assert answer.status_code in (200, 404), answer.text
        assert cors_headers(answer) == {}


@pytest.mark.parametrize(("method", "path", "headers"), SDK_CALLS)
def test_by_default_no_origin_gets_cors_headers(
    plain_server: LiveServer, method: str, path: str, headers: str
) -> None:
    for origin in (DEV_ORIGIN, APP_ORIGIN, OTHER_ORIGIN):
        response = preflight(plain_server, path, origin, method, headers)
        assert cors_headers(response) == {}
        assert response.status_code in (404, 405)
    answer = httpx.get(f"{plain_server.base_url}/v1/models", headers={"Origin": DEV_ORIGIN})
    assert answer.status_code == 200
    assert cors_headers(answer) == {}


def test_any_origin_with_a_star(open_server: LiveServer) -> None:
    response = preflight(open_server, "/v1/client/tokens", OTHER_ORIGIN, "POST", "x-api-key")
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in response.headers
    models = httpx.get(f"{open_server.base_url}/v1/models", headers={"Origin": OTHER_ORIGIN})
    assert models.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in models.headers
    # a cookie sent anyway changes nothing: never credentials, never the origin echoed
    with_cookie = httpx.get(
        f"{open_server.base_url}/v1/models", headers={"Origin": OTHER_ORIGIN, "Cookie": "a=b"}
    )
    assert with_cookie.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in with_cookie.headers


def test_a_private_network_preflight_from_a_named_origin(cors_server: LiveServer) -> None:
    """Chromium asks before a public page reaches a server on a private network or loopback."""
    asked = {
        "Origin": APP_ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Private-Network": "true",
    }
    response = httpx.options(f"{cors_server.base_url}/v1/models", headers=asked)
    assert response.status_code == 200
    assert response.headers["access-control-allow-private-network"] == "true"
    elsewhere = httpx.options(
        f"{cors_server.base_url}/v1/models", headers={**asked, "Origin": OTHER_ORIGIN}
    )
    assert cors_headers(elsewhere) == {}


def test_websockets_are_untouched(cors_server: LiveServer) -> None:
    """Browsers apply no CORS to WebSockets: a session opens from any origin, as before.
    (Synchronous: this module's browser tests hold Playwright's event loop in this thread.)"""
    url = f"{cors_server.ws_url}/v1/stream?api_key={cors_server.api_key}&model=mirage"
    for origin in (APP_ORIGIN, OTHER_ORIGIN):
        with connect(url, origin=Origin(origin), open_timeout=10) as ws:
            message = json.loads(ws.recv(timeout=10))
            assert message["type"] == "session_id"


# -- the setting ------------------------------------------------------------------------------


def test_origins_are_kept_as_browsers_send_them() -> None:
    read = config.cors_origins
    assert read(None) == read("  ") == ()
    assert read(" * ") == ("*",)
    assert read("https://App.Example.com:443, http://localhost:5173,http://a.example:80") == (
        "https://app.example.com",
        "http://localhost:5173",
        "http://a.example",
    )
    assert read("http://[::1]:8080,http://127.0.0.1:3000") == (
        "http://[::1]:8080",
        "http://127.0.0.1:3000",
    )
    assert read("https://a.example,https://A.example") == ("https://a.example",)


BAD_ORIGINS = [
    ("https://app.example.com/", "is more than an origin (it has no path, not even a final /"),
    ("https://app.example.com/api", "is more than an origin"),
    ("https://user@app.example.com", "is more than an origin"),
    ("app.example.com", "is not an http:// or https:// origin"),
    ("localhost:5173", "is not an http:// or https:// origin"),
    ("null", "is not an http:// or https:// origin"),
    ("file:///tmp/page.html", "is not an http:// or https:// origin"),
    ("https://*.example.com", "name each origin; * alone means any origin"),
    ("*,https://app.example.com", "* means any origin and stands alone"),
    ("https://app.example.com:99999", "has no valid port"),
    ("https://", "names no host"),
    ("https://a.example,,https://b.example", "an empty origin"),
]


@pytest.mark.parametrize(("value", "error"), BAD_ORIGINS)
def test_a_bad_value_stops_serve_by_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, error: str
) -> None:
    for option in config.options():
        monkeypatch.delenv(option.env, raising=False)
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--cors-origins", value])
    assert exited.value.code == 2
    said = capsys.readouterr().err
    assert "livemorph serve: error: argument --cors-origins: --cors-origins: " in said
    assert error in said

    monkeypatch.setenv("LIVEMORPH_CORS_ORIGINS", value)
    assert cli.main(["serve"]) == 2
    said = capsys.readouterr().err
    assert said.startswith("livemorph: LIVEMORPH_CORS_ORIGINS: ")
    assert error in said
    assert said.count("\n") == 1


BAD_FLAG = ("--cors-origins", "https://app.example.com/")


def test_livemorph_serve_exits_2_on_a_bad_value(tmp_path: Path) -> None:
    """The command itself, as an operator runs it: one line saying what to fix, status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "livemorph.cli", "serve", "--data-dir", str(tmp_path), *BAD_FLAG],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--cors-origins: 'https://app.example.com/' is more than an origin" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # stopped before it made anything


# -- in Chromium ------------------------------------------------------------------------------

#: What Decart's JS SDK 0.1.20 sends to mint a client token (tokens/client.js), then a list
#: of the models with that token; what the page can read of it, or why it cannot.
CALL_API = """
async ([base, key]) => {
  try {
    const minted = await fetch(`${base}/v1/client/tokens`, {
      method: "POST",
      headers: {
        "User-Agent": "decart-js-sdk/0.1.20 lang/js runtime/browser",
        "X-API-KEY": key,
        "content-type": "application/json",
      },
      body: JSON.stringify({}),
    });
    const token = (await minted.json()).apiKey;
    const models = await fetch(`${base}/v1/models`, { headers: { "x-api-key": token } });
    return { ok: minted.ok && models.ok, token: !!token, models: (await models.json()).length };
  } catch (error) {
    return { error: `${error.name}: ${error.message}` };
  }
}
"""

#: The published SDK's own `client.tokens.create()`, pointed at a server by `baseUrl`.
SDK_TOKEN = """
async ([base, key]) => {
  const { createDecartClient } = await import("/decart-sdk.js");
  try {
    const client = createDecartClient({ apiKey: key, baseUrl: base });
    const token = await client.tokens.create();
    return { token: typeof token.apiKey === "string" && token.apiKey.length > 0 };
  } catch (error) {
    return { error: String(error.message) };
  }
}
"""

FAILED = {"error": "TypeError: Failed to fetch"}


def open_page(browser: Any, origin: str, sdk: str | None = None) -> Any:
    """A blank page at `origin`, where no server listens (Playwright answers for it), with
    `sdk` at `/decart-sdk.js` when given."""
    page = browser.new_context(permissions=["local-network-access"]).new_page()
    page.route(
        f"{origin}/app",
        lambda route: route.fulfill(
            body="<!doctype html><title>app</title>", content_type="text/html"
        ),
    )
    if sdk is not None:
        page.route(
            f"{origin}/decart-sdk.js",
            lambda route: route.fulfill(body=sdk, content_type="text/javascript"),
        )
    page.goto(f"{origin}/app")
    return page


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.mark.browser
def test_a_page_on_a_named_origin_calls_the_api_and_others_cannot(
    browser: Any, cors_server: LiveServer, plain_server: LiveServer
) -> None:
    allowed = open_page(browser, DEV_ORIGIN)
    answer = allowed.evaluate(CALL_API, [cors_server.base_url, cors_server.api_key])
    assert answer.get("ok") is True and answer["token"] and answer["models"] > 0, answer
    # the same page against a server with no setting, and a page on an origin not named:
    # the browser lets neither read an answer
    assert allowed.evaluate(CALL_API, [plain_server.base_url, plain_server.api_key]) == FAILED
    other = open_page(browser, "http://localhost:5174")
    assert other.evaluate(CALL_API, [cors_server.base_url, cors_server.api_key]) == FAILED


@pytest.mark.browser
def test_the_published_sdk_mints_a_token_from_a_named_origin(
    browser: Any, cors_server: LiveServer
) -> None:
    # @decartai/sdk@0.0.46: its tokens client sends X-API-KEY and User-Agent, and no body
    sdk = published_sdk(cors_server.ws_url)
    allowed = open_page(browser, DEV_ORIGIN, sdk)
    assert allowed.evaluate(SDK_TOKEN, [cors_server.base_url, cors_server.api_key]) == {
        "token": True
    }
    other = open_page(browser, "http://localhost:5174", sdk)
    refused = other.evaluate(SDK_TOKEN, [cors_server.base_url, cors_server.api_key])
    assert refused == {"error": "Failed to fetch"}
