"""Image edits: `POST /v1/generate/{model}` on a real server, as Decart's clients call it."""

from __future__ import annotations

import io
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from livemorph.models import IMAGE_MODELS
from livemorph.protocol import MAX_IMAGE_BYTES
from livemorph.server.generate import IMAGE_EDIT_SECONDS
from tests.media import mean_abs_diff, photo

REFUSED_PROMPT = "cyberpunk neon city, p0rn"


def encode(rgb: np.ndarray, format: str = "PNG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format=format)
    return out.getvalue()


def declared_png(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` and that holds one tiny IDAT: cheap
    to send, and a decompression bomb to anything that believed the header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return photo(320, 240)


def edit(http, key: str, model: str = "lucy-image-2", **fields) -> httpx.Response:
    files = {k: v for k, v in fields.items() if isinstance(v, bytes)}
    data = {k: v for k, v in fields.items() if not isinstance(v, bytes)}
    return http.post(
        f"/v1/generate/{model}",
        headers={"X-API-KEY": key},
        files={k: (f"{k}.bin", v) for k, v in files.items()},
        data=data,
    )


def still_serves(http, server, astronaut) -> None:
    small = encode(astronaut[:64, :64])
    response = edit(http, server.api_key, prompt="anime", data=small, enhance_prompt="False")
    assert response.status_code == 200, response.text


def test_an_edited_photo_comes_back_its_size_and_edited(http, server, astronaut) -> None:
    response = edit(http, server.api_key, prompt="anime", data=encode(astronaut))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    edited = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert edited.shape == astronaut.shape
    assert mean_abs_diff(edited, astronaut) > 10, "the picture is not visibly edited"


def test_every_image_model_and_jpeg_in_jpeg_out(http, server, astronaut) -> None:
    for model in IMAGE_MODELS:
        response = edit(
            http, server.api_key, model, prompt="oil painting", data=encode(astronaut, "JPEG")
        )
        assert response.status_code == 200, (model, response.text)
        assert response.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(response.content)) as image:
            assert (image.format, image.size) == ("JPEG", (320, 240))


def test_an_odd_sized_picture_keeps_its_size(http, server, astronaut) -> None:
    response = edit(http, server.api_key, prompt="sketch", data=encode(astronaut[:101, :77]))
    assert response.status_code == 200, response.text
    assert Image.open(io.BytesIO(response.content)).size == (77, 101)


def test_a_reference_image_guides_the_edit(http, server, astronaut) -> None:
    reference = np.zeros((64, 64, 3), np.uint8)
    reference[..., 2] = 220
    response = edit(
        http,
        server.api_key,
        prompt="watercolour",
        data=encode(astronaut),
        reference_image=encode(reference),
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"prompt": "anime"}, 400, "data (the image to edit) is required"),
        ({"data": "PNG"}, 400, "prompt is required"),
        ({"prompt": "anime", "data": b"GIF89a not really"}, 415, "invalid image"),
        ({"prompt": "anime", "data": b"hello, not an image"}, 415, "invalid image"),
        ({"prompt": "anime", "data": declared_png(40_000, 40_000)}, 413, "image too large"),
        ({"prompt": "anime", "data": b"\0" * (MAX_IMAGE_BYTES + 1)}, 413, "image too large"),
        ({"prompt": "anime", "data": declared_png(8, 8)}, 415, "invalid image"),
        ({"prompt": "", "data": "PNG"}, 400, "prompt must be a non-empty string"),
        ({"prompt": "x" * 3000, "data": "PNG"}, 400, "prompt too long"),
        ({"prompt": "anime", "data": "PNG", "enhance_prompt": "maybe"}, 400, "enhance_prompt"),
        ({"prompt": "anime", "data": "PNG", "seed": "abc"}, 400, "seed must be an integer"),
        ({"prompt": "anime", "data": "PNG", "reference_image": b"nope"}, 415, "reference_image"),
        ({"prompt": REFUSED_PROMPT, "data": "PNG"}, 400, "refused by moderation"),
    ],
)
def test_bad_input_is_answered_in_words(http, server, astronaut, fields, status, words) -> None:
    png = encode(astronaut)
    fields = {k: png if v == "PNG" else v for k, v in fields.items()}
    response = edit(http, server.api_key, **fields)
    assert response.status_code == status, response.text
    assert words in response.json()["error"]
    still_serves(http, server, astronaut)


def test_a_truncated_png_is_refused(http, server, astronaut) -> None:
    png = encode(astronaut)
    response = edit(http, server.api_key, prompt="anime", data=png[: len(png) // 2])
    assert response.status_code == 415, response.text
    assert "invalid image" in response.json()["error"]
    still_serves(http, server, astronaut)


def test_data_as_text_and_a_body_that_is_no_form(http, server, astronaut) -> None:
    response = http.post(
        "/v1/generate/lucy-image-2",
        headers={"X-API-KEY": server.api_key},
        data={"prompt": "anime", "data": "not a file"},
    )
    assert response.status_code == 415, response.text
    response = http.post(
        "/v1/generate/lucy-image-2",
        headers={"X-API-KEY": server.api_key, "content-type": "multipart/form-data; boundary=x"},
        content=b"--x\r\nbroken",
    )
    assert response.status_code == 400, response.text
    # a body declared far over the limit is refused before it is read
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(
            b"POST /v1/generate/lucy-image-2 HTTP/1.1\r\nHost: x\r\n"
            + f"X-API-KEY: {server.api_key}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=x\r\n"
            + f"Content-Length: {64 * 2**20}\r\n\r\n".encode()
        )
        assert raw.recv(1024).startswith(b"HTTP/1.1 413 ")
    still_serves(http, server, astronaut)


def test_keys_models_and_tokens(http, server, astronaut) -> None:
    png = encode(astronaut)
    response = edit(http, "no-such-key", prompt="anime", data=png)
    assert (response.status_code, response.json()) == (401, {"error": "invalid api key"})
    response = edit(http, server.api_key, "lucy-image-9", prompt="anime", data=png)
    assert response.status_code == 404
    assert "model not found: 'lucy-image-9' is not allowed" in response.json()["error"]
    response = edit(http, server.api_key, "mirage_v2", prompt="anime", data=png)
    assert response.status_code == 404, "a realtime model edits no images"
    minted = http.post(
        "/v1/client/tokens",
        headers={"X-API-KEY": server.api_key},
        json={"allowedModels": ["mirage_v2"]},
    )
    assert minted.status_code == 200, minted.text
    response = edit(http, minted.json()["apiKey"], prompt="anime", data=png)
    assert response.status_code == 403
    assert (
        response.json()["error"] == "permission denied: this token may not use model lucy-image-2"
    )
    unrestricted = http.post("/v1/client/tokens", headers={"X-API-KEY": server.api_key})
    response = edit(http, unrestricted.json()["apiKey"], prompt="anime", data=png)
    assert response.status_code == 200, response.text
    # a token may be limited to the image models themselves
    images_only = http.post(
        "/v1/client/tokens",
        headers={"X-API-KEY": server.api_key},
        json={"allowedModels": ["lucy-image-2"]},
    )
    assert images_only.status_code == 200, images_only.text
    response = edit(http, images_only.json()["apiKey"], prompt="anime", data=png)
    assert response.status_code == 200, response.text
    still_serves(http, server, astronaut)


async def test_credits_are_charged_per_image_and_refused_at_zero(tmp_path) -> None:
    from livemorph.config import Settings
    from tests.inprocess import serve_in_process

    png = encode(photo(64, 48))
    settings = Settings(data_dir=tmp_path, engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        store = server.state.store
        key, record = await store.create_api_key("metered")
        await store.grant_credits(record.id, IMAGE_EDIT_SECONDS)

        async def post() -> httpx.Response:
            return await client.post(
                f"{server.base_url}/v1/generate/lucy-image-2",
                headers={"X-API-KEY": key},
                files={"data": ("in.png", png)},
                data={"prompt": "anime"},
            )

        assert (await post()).status_code == 200
        assert await store.credits_left(record.id) == 0
        refused = await post()
        assert refused.status_code == 402
        assert "insufficient credits" in refused.json()["error"]


async def test_an_edit_over_its_time_is_answered_504_and_the_server_goes_on(
    tmp_path, monkeypatch
) -> None:
    from livemorph.config import Settings
    from livemorph.server import generate
    from tests.inprocess import serve_in_process

    monkeypatch.setattr(generate, "EDIT_TIMEOUT", 0.5)
    png = encode(photo(64, 48))
    settings = Settings(data_dir=tmp_path, engine="sleep:400")  # three frames: 1.2 s
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:

        async def post() -> httpx.Response:
            return await client.post(
                f"{server.base_url}/v1/generate/lucy-image-2",
                headers={"X-API-KEY": server.api_key},
                files={"data": ("in.png", png)},
                data={"prompt": "anime"},
            )

        late = await post()
        assert late.status_code == 504, late.text
        assert late.json()["error"].startswith("timed out: the edit took over 0.5 s")
        monkeypatch.setattr(generate, "EDIT_TIMEOUT", 30.0)
        assert (await post()).status_code == 200
