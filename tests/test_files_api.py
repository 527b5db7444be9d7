"""Uploaded files: `POST /v1/files`, `GET|DELETE /v1/files/{id}` on a served app, as
`@decartai/sdk@0.1.20`'s `client.files` calls them (multipart `file`, `ttl_seconds`)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from livemorph.config import Settings
from livemorph.server.files import DEFAULT_TTL, sweep_expired
from livemorph.storage.files import FileStore
from tests.inprocess import serve_in_process

PICTURE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


async def upload(
    client: httpx.AsyncClient,
    base: str,
    key: str,
    content: bytes = PICTURE,
    mime: str = "image/png",
    **data: str,
) -> httpx.Response:
    return await client.post(
        f"{base}/v1/files",
        headers={"X-API-KEY": key},
        files={"file": ("portrait.png", content, mime)},
        data=data,
    )


async def test_a_file_is_uploaded_described_deleted_and_only_its_key_sees_it(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        base, key = server.base_url, server.api_key
        other, _ = await server.state.store.create_api_key("other")
        response = await upload(client, base, key)
        assert response.status_code == 200, response.text
        ref = response.json()
        assert set(ref) == {"id", "filename", "mime_type", "size_bytes", "created_at", "expires_at"}
        assert ref["id"].startswith("file_")
        assert ref["filename"] == "portrait.png" and ref["mime_type"] == "image/png"
        assert ref["size_bytes"] == len(PICTURE)
        assert ref["created_at"].endswith("Z") and ref["expires_at"].endswith("Z")
        # the bytes are on disk, whole, under the jobs directory
        assert server.state.job_worker is not None
        files = server.state.job_worker.files
        stored = await FileStore(server.state.store).get(
            ref["id"],
            (await server.state.store.authenticate(key)).key_id,  # type: ignore[union-attr]
        )
        assert stored is not None and files.path(stored.path).read_bytes() == PICTURE
        assert stored.expires_at is not None
        assert stored.expires_at - stored.created_at == DEFAULT_TTL

        got = await client.get(f"{base}/v1/files/{ref['id']}", headers={"X-API-KEY": key})
        assert got.status_code == 200 and got.json() == ref
        # another key sees none, and cannot delete it
        for method in ("GET", "DELETE"):
            theirs = await client.request(
                method, f"{base}/v1/files/{ref['id']}", headers={"X-API-KEY": other}
            )
            assert theirs.status_code == 404, theirs.text
        bad = await client.get(f"{base}/v1/files/{ref['id']}", headers={"X-API-KEY": "nope"})
        assert bad.status_code == 401

        deleted = await client.delete(f"{base}/v1/files/{ref['id']}", headers={"X-API-KEY": key})
        assert deleted.status_code == 204
        assert not files.path(stored.path).exists()
        for method in ("GET", "DELETE"):
            gone = await client.request(
                method, f"{base}/v1/files/{ref['id']}", headers={"X-API-KEY": key}
            )
            assert gone.status_code == 404 and "file not found" in gone.json()["error"]
        missing = await client.delete(f"{base}/v1/files/file_nothing", headers={"X-API-KEY": key})
        assert missing.status_code == 404

        # persistent and a chosen ttl
        kept = await upload(client, base, key, ttl_seconds="persistent")
        assert kept.status_code == 200 and kept.json()["expires_at"] is None
        for wrong in ("59", "abc", str(720 * 3600 + 1)):
            refused = await upload(client, base, key, ttl_seconds=wrong)
            assert refused.status_code == 400 and "ttl_seconds" in refused.json()["error"]


async def test_files_expire_and_are_swept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        base, key = server.base_url, server.api_key
        short = (await upload(client, base, key, ttl_seconds="60")).json()
        day = (await upload(client, base, key)).json()
        kept = (await upload(client, base, key, ttl_seconds="persistent")).json()
        store = FileStore(server.state.store)
        assert server.state.job_worker is not None
        files = server.state.job_worker.files
        assert await store.bytes_in_use() == 3 * len(PICTURE)
        server.clock.advance(61)
        expired = await client.get(f"{base}/v1/files/{short['id']}", headers={"X-API-KEY": key})
        assert expired.status_code == 410 and "expired" in expired.json()["error"]
        alive = await client.get(f"{base}/v1/files/{day['id']}", headers={"X-API-KEY": key})
        assert alive.status_code == 200
        assert await sweep_expired(store, files) == 1
        assert not (files.root / short["id"]).exists() and (files.root / day["id"]).exists()
        gone = await client.get(f"{base}/v1/files/{short['id']}", headers={"X-API-KEY": key})
        assert gone.status_code == 404
        server.clock.advance(24 * 3600)
        assert await sweep_expired(store, files) == 1
        assert not (files.root / day["id"]).exists()
        still = await client.get(f"{base}/v1/files/{kept['id']}", headers={"X-API-KEY": key})
        assert still.status_code == 200
        assert await store.bytes_in_use() == len(PICTURE)


async def test_uploads_refused_missing_empty_too_large_over_budget(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", engine="grade", jobs_disk_budget=1)
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        base, key = server.base_url, server.api_key
        assert server.state.job_worker is not None
        root = server.state.job_worker.files.root
        none = await client.post(
            f"{base}/v1/files", headers={"X-API-KEY": key}, data={"ttl_seconds": "60"}
        )
        assert none.status_code == 400 and "file is required" in none.json()["error"]
        text = await client.post(f"{base}/v1/files", headers={"X-API-KEY": key}, data={"file": "x"})
        assert text.status_code == 400
        empty = await upload(client, base, key, content=b"")
        assert empty.status_code == 400 and "empty" in empty.json()["error"]
        # an image over the protocol's MAX_IMAGE_BYTES (10 MB)
        big = await upload(client, base, key, content=b"\0" * (10 * 1024 * 1024 + 1))
        assert big.status_code == 413 and "file too large" in big.json()["error"]
        # the budget is 1 MB: a 2 MB video fits its size limit but not the budget
        full = await upload(client, base, key, content=b"\0" * (2 << 20), mime="video/mp4")
        assert full.status_code == 507 and "disk budget" in full.json()["error"]
        # 600 KB fits once; a second does not, the first counting toward the budget
        first = await upload(client, base, key, content=b"\1" * (600 << 10))
        assert first.status_code == 200, first.text
        second = await upload(client, base, key, content=b"\1" * (600 << 10))
        assert second.status_code == 507
        # nothing refused left a file or a folder behind
        assert [p.name for p in root.iterdir()] == [first.json()["id"]]
        unauthorised = await upload(client, base, "nope")
        assert unauthorised.status_code == 401


def png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


async def ack_of(ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    await ws.send(json.dumps(message))
    async with asyncio.timeout(10):
        while True:
            reply = json.loads(await ws.recv())
            if reply["type"] == "set_image_ack":
                return reply


async def test_set_image_takes_an_uploaded_file_by_its_id_as_the_sdk_sends_it(
    tmp_path: Path,
) -> None:
    """@decartai/sdk 0.1.20 sends `{"type": "set_image", "image_ref": "file_..."}` for a
    string that starts `file_` (realtime/signaling-channel.js); the server reads the file."""
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        base, key = server.base_url, server.api_key
        other, _ = await server.state.store.create_api_key("other")
        blue = (await upload(client, base, key, content=png((10, 20, 230)))).json()["id"]
        not_image = (await upload(client, base, key, content=b"hello")).json()["id"]
        short = (await upload(client, base, key, content=png((1, 2, 3)), ttl_seconds="60")).json()
        video = (
            await upload(client, base, key, content=b"\0" * (11 << 20), mime="video/mp4")
        ).json()["id"]
        theirs = (await upload(client, base, other, content=png((9, 9, 9)))).json()["id"]
        url = f"{server.ws_url}/v1/stream?api_key={key}&model=mirage"
        async with connect(url) as ws:
            ack = await ack_of(ws, {"type": "set_image", "image_ref": blue, "prompt": "ink"})
            assert ack["success"] is True, ack
            (session,) = server.state.sessions.all()
            image = session.controls.image
            assert image is not None and image.shape == (64, 64, 3)
            assert tuple(int(v) for v in image[32, 32]) == (10, 20, 230)
            assert session.controls.prompt is not None

            for ref, words in (
                (not_image, "invalid image"),
                (theirs, "file not found"),
                ("file_missing", "file not found"),
                (video, "image too large"),
            ):
                ack = await ack_of(ws, {"type": "set_image", "image_ref": ref})
                assert ack["success"] is False and words in ack["error"], (ref, ack)
            ack = await ack_of(ws, {"type": "set_image", "image_ref": "not-a-file-id"})
            assert ack["success"] is False and "image_ref must be a file id" in ack["error"]
            server.clock.advance(61)
            ack = await ack_of(ws, {"type": "set_image", "image_ref": short["id"]})
            assert ack["success"] is False and "file expired" in ack["error"]
            # the refusals left the first image in place
            assert tuple(int(v) for v in session.controls.image[32, 32]) == (10, 20, 230)
