"""The realtime model catalog against the current published clients, and the `resolution`
and `speed` options of `/v1/stream`.

The expected values below are copied by hand from the clients' own model tables: they are
the contract (each client sizes its camera, and the Python one checks its output, by them).
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from livemorph import create_client, models
from livemorph.engines.registry import DEFAULT_ENGINES, EngineRegistry, parse_model_engines
from livemorph.models import (
    ALIASES,
    AVATAR,
    CATALOG,
    EDIT,
    RESTYLE,
    TRY_ON,
    UnknownModelError,
    canonical_name,
    stream_options_refusal,
)
from livemorph.protocol import is_permanent_error
from livemorph.testing import LiveServer
from tests.media import FrameSink, SceneTrack

CLOSE_POLICY_VIOLATION = 1008

#: decart==0.2.4, `decart/models.py`, `_MODELS["realtime"]`: fps, width, height and
#: `supported_speeds`, every one on `url_path="/v1/stream"`.
PYTHON_CLIENT: dict[str, tuple[int, int, int, tuple[str, ...]]] = {
    "lucy-2.1": (30, 1280, 720, ()),
    "lucy-2.5": (30, 1280, 720, ("fast",)),
    "lucy-2.6": (30, 1280, 720, ("fast",)),
    "lucy-restyle-2": (30, 1280, 704, ()),
    "lucy-latest": (30, 1280, 720, ("fast",)),
    "lucy-vton-latest": (30, 1280, 720, ("fast",)),
    "lucy-vton-3.5": (30, 1280, 720, ("fast",)),
    "lucy-vton-3.6": (30, 1280, 720, ("fast",)),
    "lucy-restyle-latest": (30, 1280, 704, ()),
}
#: @decartai/sdk@0.1.20, `dist/shared/model.js`, `_models.realtime`: fps (`{ideal: 30,
#: max: 30}` for all), width, height, every one on `urlPath: "/v1/stream"`.
JS_CLIENT: dict[str, tuple[int, int, int]] = {
    "lucy-2.1": (30, 1088, 624),
    "lucy-2.5": (30, 1280, 720),
    "lucy-vton-2": (30, 1088, 624),
    "lucy-vton-3": (30, 1088, 624),
    "lucy-vton-3.5": (30, 1280, 720),
    "lucy-restyle-2": (30, 1280, 704),
    "lucy-latest": (30, 1088, 624),
    "lucy-vton-latest": (30, 1280, 720),
    "lucy-restyle-latest": (30, 1280, 704),
    "lucy-2.1-vton-2": (30, 1088, 624),
}
#: Where the two clients disagree, the Python client's (newer) table wins.
CLIENTS_DISAGREE = {"lucy-2.1", "lucy-latest"}
#: Names the clients list, but only as batch (`/v1/jobs`) or image models: not realtime.
NOT_REALTIME = [
    "lucy-restyle-v2v",
    "lucy-clip",
    "lucy-pro-v2v",
    "lucy-clip-latest",
    "lucy-image-2",
    "lucy-image-latest",
    "lucy-pro-i2i",
]
#: The first-generation catalog, unchanged.
LEGACY = {
    "mirage": (25, 1280, 704, RESTYLE),
    "mirage_v2": (22, 1280, 704, RESTYLE),
    "lucy_v2v_720p_rt": (25, 1280, 704, RESTYLE),
    "lucy_2_rt": (20, 1280, 720, EDIT),
    "live_avatar": (25, 1280, 720, AVATAR),
}
NEW_NAMES = sorted(set(PYTHON_CLIENT) | set(JS_CLIENT))


# -- the catalog ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PYTHON_CLIENT))
def test_every_python_client_name_has_its_size_rate_and_speeds(name: str) -> None:
    spec = models.realtime(name)
    assert spec.name == name
    assert (spec.fps, spec.width, spec.height, spec.speeds) == PYTHON_CLIENT[name]
    assert spec.url_path == "/v1/stream"


@pytest.mark.parametrize("name", sorted(JS_CLIENT))
def test_every_browser_client_name_is_served_at_its_size_where_the_clients_agree(
    name: str,
) -> None:
    spec = models.realtime(name)
    assert spec.url_path == "/v1/stream"
    if name in CLIENTS_DISAGREE:
        assert (spec.fps, spec.width, spec.height) == PYTHON_CLIENT[name][:3]
    else:
        assert (spec.fps, spec.width, spec.height) == JS_CLIENT[name]


def test_the_clients_disagree_only_where_the_catalog_says() -> None:
    both = set(PYTHON_CLIENT) & set(JS_CLIENT)
    differ = {name for name in both if PYTHON_CLIENT[name][:3] != JS_CLIENT[name]}
    assert differ == CLIENTS_DISAGREE


def test_the_first_generation_models_are_unchanged() -> None:
    for name, (fps, width, height, kind) in LEGACY.items():
        spec = models.realtime(name)
        assert (spec.fps, spec.width, spec.height, spec.kind) == (fps, width, height, kind)
        assert spec.url_path == "/v1/stream" and spec.speeds == () and spec.alias_of is None
    assert models.realtime.mirage_v2() is CATALOG["mirage_v2"]
    assert set(CATALOG) == set(LEGACY) | set(NEW_NAMES)


def test_each_model_says_what_it_is() -> None:
    for name in NEW_NAMES:
        kind = CATALOG[name].kind
        if name.startswith("lucy-vton") or name == "lucy-2.1-vton-2":
            assert kind == TRY_ON, name
        elif name.startswith("lucy-restyle"):
            assert kind == RESTYLE, name
        else:
            assert kind == EDIT, name


def test_try_on_says_it_is_not_done_here() -> None:
    for name in NEW_NAMES:
        spec = CATALOG[name]
        if spec.kind == TRY_ON:
            assert spec.limitations is not None
            assert "try-on is not implemented" in spec.limitations
            assert "style guide only" in spec.limitations
    assert CATALOG["lucy-restyle-2"].limitations is None
    assert CATALOG["lucy-2.5"].limitations is not None, "edits cannot insert the object either"
    assert CATALOG["lucy-vton-3.5"].to_dict()["limitations"] == CATALOG["lucy-vton-3.5"].limitations


@pytest.mark.parametrize(
    ("alias", "target"),
    [
        ("lucy-latest", "lucy-2.5"),
        ("lucy-restyle-latest", "lucy-restyle-2"),
        ("lucy-vton-latest", "lucy-vton-3.6"),
        ("lucy-2.1-vton-2", "lucy-vton-2"),
    ],
)
def test_aliases_resolve_to_their_target(alias: str, target: str) -> None:
    assert ALIASES[alias] == target
    assert canonical_name(alias) == target
    assert canonical_name(target) == target
    spec, aimed = models.realtime(alias), models.realtime(target)
    assert spec.name == alias and spec.alias_of == target and aimed.alias_of is None
    same = ("fps", "width", "height", "kind", "speeds", "resolutions", "url_path")
    assert all(getattr(spec, field) == getattr(aimed, field) for field in same)


@pytest.mark.parametrize("name", NOT_REALTIME)
def test_batch_and_image_names_are_not_realtime_models(name: str) -> None:
    with pytest.raises(UnknownModelError, match="model not found"):
        models.realtime(name)
    with pytest.raises(UnknownModelError):
        canonical_name(name)


# -- engines ----------------------------------------------------------------------------


def test_every_new_name_is_served_by_the_neural_engine_by_default() -> None:
    registry = EngineRegistry()
    for name in NEW_NAMES:
        assert DEFAULT_ENGINES[name] == "neural"
        assert registry.engine_name(name) == "neural", name
    assert set(registry.engine_names()) == set(CATALOG)


def test_a_new_name_can_be_given_its_own_engine() -> None:
    registry = EngineRegistry(None, parse_model_engines("lucy-2.6=grade"))
    assert registry.engine_name("lucy-2.6") == "grade"
    assert registry.engine_name("lucy-2.5") == "neural"
    assert registry.resolve("lucy-2.6")[1].name == "grade"
    assert registry.resolve("lucy-2.6")[0] is CATALOG["lucy-2.6"]


def test_an_alias_follows_its_targets_engine_unless_given_its_own() -> None:
    follows = EngineRegistry(None, parse_model_engines("lucy-2.5=grade"))
    assert follows.engine_name("lucy-latest") == "grade"
    assert follows.resolve("lucy-latest")[1] is follows.resolve("lucy-2.5")[1]
    assert follows.resolve("lucy-latest")[0].name == "lucy-latest"
    own = EngineRegistry(None, parse_model_engines("lucy-2.5=grade;lucy-latest=passthrough"))
    assert own.engine_name("lucy-latest") == "passthrough"
    assert own.engine_name("lucy-2.5") == "grade"
    forced = EngineRegistry("passthrough")
    assert forced.engine_name("lucy-vton-latest") == "passthrough"
    assert forced.engine_name("live_avatar") == "avatar"


def test_model_engines_refuses_bad_new_entries() -> None:
    with pytest.raises(ValueError, match="no model 'lucy-3'"):
        parse_model_engines("lucy-3=grade")
    with pytest.raises(ValueError, match=re.escape("lucy-vton-3.5 cannot use meter")):
        EngineRegistry(None, {"lucy-vton-3.5": "meter"})


# -- resolution and speed ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("lucy-2.5", {}),
        ("lucy-2.5", {"resolution": "720p"}),
        ("lucy-2.5", {"resolution": "720P"}),
        ("lucy-2.5", {"resolution": ""}),
        ("lucy-2.5", {"speed": "fast"}),
        ("lucy-2.5", {"resolution": "720p", "speed": "fast"}),
        ("lucy-latest", {"speed": "fast"}),
        ("lucy-vton-3", {"resolution": "720p"}),
        ("mirage", {"resolution": "720p"}),
        # decart==0.2.4 sends `fast` to models without the tier and says the server ignores it
        ("lucy-2.1", {"speed": "fast"}),
        ("lucy-restyle-2", {"speed": "fast"}),
        ("mirage_v2", {"speed": "fast"}),
    ],
)
def test_options_that_mean_something_are_accepted(name: str, params: dict[str, str]) -> None:
    assert stream_options_refusal(CATALOG[name], params) is None


@pytest.mark.parametrize(
    ("name", "params", "said"),
    [
        ("lucy-2.5", {"resolution": "1080p"}, "invalid resolution: '1080p' is not allowed"),
        ("lucy-2.5", {"resolution": "480p"}, "lucy-2.5, which streams 1280x720 only"),
        ("lucy-vton-2", {"resolution": "1080p"}, "which streams 1088x624 only"),
        ("lucy-2.5", {"speed": "turbo"}, "invalid speed: 'turbo' is not allowed"),
        ("lucy-2.5", {"speed": "slow", "resolution": "720p"}, "speed may be fast or left out"),
        ("mirage", {"resolution": "x" * 5000}, "'" + "x" * 40 + "...'"),
    ],
)
def test_other_options_are_refused_with_a_permanent_text(
    name: str, params: dict[str, str], said: str
) -> None:
    text = stream_options_refusal(CATALOG[name], params)
    assert text is not None and said in text
    assert is_permanent_error(text), "retrying the same URL cannot help"
    assert len(text) < 300


# -- against a real server --------------------------------------------------------------


def test_the_server_lists_every_name_with_its_options_and_limits(server: LiveServer) -> None:
    listed = {m["name"]: m for m in httpx.get(f"{server.base_url}/v1/models", timeout=10).json()}
    assert set(listed) == set(CATALOG)
    for name in NEW_NAMES:
        spec, entry = CATALOG[name], listed[name]
        assert (entry["fps"], entry["width"], entry["height"]) == (
            spec.fps,
            spec.width,
            spec.height,
        )
        assert entry["kind"] == spec.kind and entry["available"] is True
        assert entry["engine"] == "neural"
        assert entry["alias_of"] == spec.alias_of
        assert entry["speeds"] == list(spec.speeds)
        assert entry["resolutions"] == ["720p"]
    vton = listed["lucy-vton-3.5"]
    assert vton["kind"] == TRY_ON
    assert "try-on is not implemented" in vton["limitations"]
    assert "style guide only" in vton["limitations"]
    assert listed["lucy-latest"]["alias_of"] == "lucy-2.5"
    assert listed["lucy-restyle-2"]["limitations"] is None


async def first_message(url: str) -> tuple[dict[str, object], int | None]:
    """The first message a `/v1/stream` socket gets; the close code when the server then
    closes it (None when it stays open and the client leaves)."""
    async with connect(url) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] != "error":
            return message, None
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    return message, closed.value.rcvd.code if closed.value.rcvd else None


def stream_url(server: LiveServer, query: str) -> str:
    return f"{server.ws_url}/v1/stream?api_key={server.api_key}&{query}"


@pytest.mark.parametrize(
    "query",
    [
        "model=lucy-2.5&resolution=720p&speed=fast",
        "model=lucy-latest&speed=fast",
        "model=lucy-vton-3.6&resolution=720p",
        "model=lucy-restyle-latest",
        "model=lucy-2.1&speed=fast&livekit_early_room_info=true",
    ],
)
async def test_the_server_opens_sessions_for_accepted_options(
    server: LiveServer, query: str
) -> None:
    message, _ = await first_message(stream_url(server, query))
    assert message["type"] != "error", message  # session_id (or the LiveKit room's info)
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0


@pytest.mark.parametrize(
    ("query", "said"),
    [
        (
            "model=lucy-2.5&resolution=1080p",
            "invalid resolution: '1080p' is not allowed for lucy-2.5, which streams 1280x720",
        ),
        ("model=lucy-vton-3.5&speed=turbo", "invalid speed: 'turbo' is not allowed"),
        ("model=lucy-restyle-2&resolution=%00%ff%22", "invalid resolution: "),
        ("model=lucy-restyle-v2v", "model not found: 'lucy-restyle-v2v'"),
    ],
)
async def test_the_server_refuses_other_options_and_goes_on(
    server: LiveServer, query: str, said: str
) -> None:
    before = len(server.log)  # the server is shared: only what this test caused counts
    message, code = await first_message(stream_url(server, query))
    assert message["type"] == "error" and said in str(message["error"]), message
    assert code == CLOSE_POLICY_VIOLATION
    # the server goes on: a good session opens right after
    message, _ = await first_message(stream_url(server, "model=lucy-2.5&resolution=720p"))
    assert message["type"] == "session_id", message
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0
    assert "Traceback" not in server.log[before:]


@pytest.mark.slow
async def test_a_try_on_model_streams_a_restyle_at_its_own_size(server: LiveServer) -> None:
    """The oldest try-on size (1088x624), through the SDK and the neural engine."""
    model = models.realtime("lucy-2.1-vton-2")
    source = SceneTrack(model.width, model.height, fps=model.fps)
    async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
        rt = await client.realtime.connect(
            source, model=model, initial_state={"prompt": {"text": "anime", "enhance": True}}
        )
        output = FrameSink(rt.video_track)
        try:
            frame = await output.fresh()
            assert frame.shape == (624, 1088, 3)
        finally:
            await output.close()
            await rt.disconnect()
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0
