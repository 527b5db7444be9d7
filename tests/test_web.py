"""The browser-facing routes: the SDK files, the demo pages and demo tokens, `--no-demo`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from livemorph.cli import build_parser, settings_from_args
from livemorph.config import Settings
from livemorph.testing import LiveServer, run_cli, serve


@pytest.fixture(scope="module")
def web_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("web"), "--engine", "passthrough") as live:
        yield live


def test_the_sdk_is_served_to_pages_of_any_origin(web_server: LiveServer) -> None:
    module = httpx.get(f"{web_server.base_url}/sdk/livemorph.js")
    assert module.status_code == 200
    assert "javascript" in module.headers["content-type"]
    assert module.headers["access-control-allow-origin"] == "*"
    assert module.headers["cache-control"] == "no-cache"
    assert "export function createClient" in module.text
    assert "export const createDecartClient" in module.text

    types = httpx.get(f"{web_server.base_url}/sdk/livemorph.d.ts")
    assert types.status_code == 200
    assert types.headers["content-type"].startswith("application/typescript")
    assert "export declare function createClient" in types.text

    assert httpx.get(f"{web_server.base_url}/sdk/missing.js").status_code == 404
    escape = httpx.get(f"{web_server.base_url}/sdk/%2e%2e/server/web.py")
    assert escape.status_code == 404


def test_the_demo_pages_carry_no_key(web_server: LiveServer) -> None:
    index = httpx.get(f"{web_server.base_url}/")
    assert index.status_code == 200
    assert '<script type="module" src="/app/app.js">' in index.text
    watch = httpx.get(f"{web_server.base_url}/watch?token=x")
    assert watch.status_code == 200
    assert '<script type="module" src="/app/watch.js">' in watch.text
    for asset in ("app.js", "watch.js", "shared.js", "app.css"):
        response = httpx.get(f"{web_server.base_url}/app/{asset}")
        assert response.status_code == 200, asset
        assert "lm_" not in response.text, asset  # no permanent key in anything served
    assert "lm_" not in index.text + watch.text
    paths = httpx.get(f"{web_server.base_url}/openapi.json").json()["paths"]
    assert "/demo/token" in paths
    assert "/" not in paths


def test_demo_tokens_are_client_tokens_of_the_servers_demo_key(web_server: LiveServer) -> None:
    first = httpx.post(f"{web_server.base_url}/demo/token")
    second = httpx.post(f"{web_server.base_url}/demo/token")
    assert first.status_code == second.status_code == 200
    assert first.headers["cache-control"] == "no-store"
    body = first.json()
    assert body["apiKey"].startswith("ek_")
    assert body["apiKey"] != second.json()["apiKey"]
    assert body["expiresAt"].endswith("Z")
    served = [m["name"] for m in httpx.get(f"{web_server.base_url}/v1/models").json()]
    available = [
        m["name"] for m in httpx.get(f"{web_server.base_url}/v1/models").json() if m["available"]
    ]
    assert body["permissions"]["models"] == available
    assert set(available) <= set(served)

    # A client token: it may open sessions, never mint more tokens.
    minted = httpx.post(
        f"{web_server.base_url}/v1/client/tokens", headers={"X-API-KEY": body["apiKey"]}
    )
    assert minted.status_code == 403
    # Minted from one key, made once and kept (hashed) like every key.
    assert web_server.log.count("created the API key 'demo'") == 1
    listing = run_cli("keys", "list", "--data-dir", str(web_server.data_dir))
    assert [line.split()[1] for line in listing.splitlines()[1:]].count("demo") == 1


def test_demo_tokens_are_rate_limited_per_client(tmp_path: Path) -> None:
    # A server of its own: the flood leaves this client refused for a while.
    with serve(tmp_path / "server", "--engine", "passthrough") as live:
        statuses = [httpx.post(f"{live.base_url}/demo/token").status_code for _ in range(12)]
        assert 200 in statuses
        assert statuses[-1] == 429
        refused = httpx.post(f"{live.base_url}/demo/token")
        assert refused.status_code == 429
        assert "too many demo tokens" in refused.json()["error"]
        assert int(refused.headers["retry-after"]) >= 1
        # Only the demo route is limited: the rest of the server answers as usual.
        assert httpx.get(f"{live.base_url}/healthz").status_code == 200
        assert httpx.get(f"{live.base_url}/").status_code == 200


def test_revoking_the_demo_key_stops_demo_tokens(tmp_path: Path) -> None:
    with serve(tmp_path / "server", "--engine", "passthrough") as live:
        token = httpx.post(f"{live.base_url}/demo/token").json()["apiKey"]
        run_cli("keys", "revoke", "demo", "--data-dir", str(live.data_dir))
        refused = httpx.post(f"{live.base_url}/demo/token")
        assert refused.status_code == 403
        assert "permission denied" in refused.json()["error"]
        # And what was minted from it opens nothing new either.
        assert (
            httpx.post(
                f"{live.base_url}/v1/client/tokens", headers={"X-API-KEY": token}
            ).status_code
            == 401
        )
        assert live.log.count("created the API key 'demo'") == 1  # not quietly replaced


def test_no_demo_leaves_only_the_sdk(tmp_path: Path) -> None:
    with serve(tmp_path / "server", "--engine", "passthrough", "--no-demo") as live:
        for path in ("/", "/watch", "/app/app.js"):
            assert httpx.get(f"{live.base_url}{path}").status_code == 404, path
        assert httpx.post(f"{live.base_url}/demo/token").status_code == 404
        assert httpx.get(f"{live.base_url}/sdk/livemorph.js").status_code == 200
        assert "demo" not in run_cli("keys", "list", "--data-dir", str(live.data_dir))


@pytest.mark.parametrize(
    ("env", "expected"), [(None, None), ("0", False), ("off", False), ("1", True), ("yes", True)]
)
def test_the_demo_switch_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: str | None, expected: bool
) -> None:
    if env is None:
        monkeypatch.delenv("LIVEMORPH_DEMO", raising=False)
    else:
        monkeypatch.setenv("LIVEMORPH_DEMO", env)
    assert Settings.from_env().demo is expected
    assert settings_from_args(build_parser().parse_args(["serve"])).demo is expected
    # unset: on while the server listens on loopback only (tests/test_tls.py serves 0.0.0.0)
    assert Settings.from_env().demo_on is (expected is not False)


@pytest.mark.parametrize("env", [None, "1"])
def test_the_no_demo_flag_wins(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is None:
        monkeypatch.delenv("LIVEMORPH_DEMO", raising=False)
    else:
        monkeypatch.setenv("LIVEMORPH_DEMO", env)
    assert settings_from_args(build_parser().parse_args(["serve", "--no-demo"])).demo is False
