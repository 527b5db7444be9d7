"""REST: the model catalog, client-token minting and its validation, OpenAPI docs."""

from __future__ import annotations

import httpx
import pytest

from livemorph.models import CATALOG


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        yield client


def test_models_lists_the_catalog(http) -> None:
    models = {m["name"]: m for m in http.get("/v1/models").json()}
    assert set(models) == set(CATALOG)
    assert models["mirage_v2"] | {"available": True} == {
        "name": "mirage_v2",
        "fps": 22,
        "width": 1280,
        "height": 704,
        "kind": CATALOG["mirage_v2"].kind,
        "available": True,
        "engine": "neural",
        "alias_of": None,
        "speeds": [],
        "resolutions": ["720p"],
        "limitations": None,
    }
    assert models["live_avatar"]["available"] is True
    assert models["live_avatar"]["engine"] == "avatar"


def test_token_with_no_body_and_no_content_type(http, server) -> None:
    response = http.post("/v1/client/tokens", headers={"X-API-KEY": server.api_key})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["apiKey"].startswith("ek_")
    assert body["token"] == body["apiKey"], "decart>=0.2 requires the field"
    assert body["expiresAt"].endswith("Z")
    assert "permissions" not in body and "constraints" not in body


def test_token_with_every_option(http, server) -> None:
    response = http.post(
        "/v1/client/tokens",
        headers={"X-API-KEY": server.api_key},
        json={
            "expiresIn": 120,
            "allowedModels": ["lucy_2_rt"],
            "constraints": {"realtime": {"maxSessionDuration": 300}},
            "metadata": {"user": "u-1"},
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["permissions"] == {"models": ["lucy_2_rt"]}
    assert body["constraints"] == {"realtime": {"maxSessionDuration": 300}}


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"expiresIn": 0}',
        b'{"expiresIn": 3601}',
        b'{"expiresIn": "60"}',
        b'{"allowedModels": "mirage"}',
        b'{"allowedModels": ["no_such_model"]}',
        b'{"allowedModels": [' + b",".join([b'"mirage"'] * 21) + b"]}",
        b'{"constraints": {"realtime": {"maxSessionDuration": -5}}}',
        b'{"metadata": "not an object"}',
        b"[" * 100_000,  # json.loads raised RecursionError: a 500
    ],
)
def test_malformed_token_requests_are_400(http, server, body: bytes) -> None:
    response = http.post(
        "/v1/client/tokens",
        headers={"X-API-KEY": server.api_key, "Content-Type": "application/json"},
        content=body,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith("invalid request body")


def test_missing_or_wrong_key_is_401(http) -> None:
    assert http.post("/v1/client/tokens").status_code == 401
    response = http.post("/v1/client/tokens", headers={"X-API-KEY": "lm_wrong"})
    assert response.status_code == 401
    assert response.json() == {"error": "invalid api key"}


def test_client_token_cannot_mint(http, server) -> None:
    token = http.post("/v1/client/tokens", headers={"X-API-KEY": server.api_key}).json()
    response = http.post("/v1/client/tokens", headers={"X-API-KEY": token["apiKey"]})
    assert response.status_code == 403
    assert "permission denied" in response.json()["error"]


def test_openapi_documents_the_rest_api(http) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/models", "/v1/client/tokens", "/healthz"} <= set(paths)
    assert "requestBody" in paths["/v1/client/tokens"]["post"]


def test_keys_never_reach_the_log(server) -> None:
    log = (server.data_dir / "server.log").read_text()
    assert server.api_key not in log
