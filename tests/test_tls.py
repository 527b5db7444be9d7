"""Serving beyond localhost: HTTPS and WSS with a self-signed certificate (Python SDK and
Chromium), the certificate kept and reused, bad TLS settings refused in one line, and the
demo's token route closed on a non-loopback address unless asked for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from livemorph import LivemorphError, RetryPolicy, create_client, models
from livemorph.server.tls import fingerprint, self_signed_paths
from livemorph.testing import LiveServer, serve
from tests.browser import camera_file, chromium, read_video
from tests.media import FrameSink, SceneTrack, mean_abs_diff

PATIENT = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server on `--tls self-signed`, its certificate trusted by the tests alone."""
    data_dir = tmp_path_factory.mktemp("tls")
    cert, _ = self_signed_paths(data_dir)
    with serve(data_dir, "--engine", "grade", "--tls", "self-signed", https=cert) as live:
        yield live


def test_the_certificate_is_made_once_and_its_fingerprint_told(
    secure: LiveServer, tmp_path: Path
) -> None:
    cert, key = self_signed_paths(secure.data_dir)
    told = fingerprint(cert)
    assert f"made a self-signed certificate {cert}, SHA-256 fingerprint {told}" in secure.log
    assert len(told.split(":")) == 32
    assert key.stat().st_mode & 0o077 == 0, "the key is its owner's alone"
    assert secure.base_url.startswith("https://")
    assert httpx.get(f"{secure.base_url}/healthz", verify=secure.ssl).status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{secure.base_url}/healthz")  # the system does not trust it

    # a second server on the same data folder serves the same certificate
    again = tmp_path / "again"
    again.mkdir()
    for path in self_signed_paths(secure.data_dir):
        target = self_signed_paths(again)[0].parent / path.name
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
    with serve(again, "--engine", "passthrough", "--tls", "self-signed", https=cert) as live:
        assert f"serving HTTPS with {self_signed_paths(again)[0]}" in live.log
        assert told in live.log
        assert fingerprint(self_signed_paths(again)[0]) == told


@pytest.mark.slow
async def test_a_session_over_wss_and_dtls_from_the_python_sdk(secure: LiveServer) -> None:
    async with create_client(
        api_key=secure.api_key, base_url=secure.base_url, ssl=secure.ssl
    ) as client:
        model = models.realtime("mirage")
        source = SceneTrack(model.width, model.height)
        rt = await client.realtime.connect(
            source, model=model, initial_state={"prompt": "noir"}, retry=PATIENT
        )
        output = FrameSink(rt.video_track)
        try:
            frame = await output.fresh()
            assert frame.shape == (model.height, model.width, 3)
            assert mean_abs_diff(frame, source.last_rgb) > 3, "the grade engine changed it"
            assert rt.get_connection_state() == "generating"
        finally:
            await output.close()
            await rt.disconnect()


async def test_the_sdk_without_the_certificate_fails_plainly(secure: LiveServer) -> None:
    async with create_client(api_key=secure.api_key, base_url=secure.base_url) as client:
        with pytest.raises(LivemorphError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)


@pytest.mark.browser
def test_the_demo_over_https_in_chromium(secure: LiveServer, tmp_path: Path) -> None:
    """The page, its WSS signaling and the DTLS media, with the certificate trusted by the
    browser context (`ignore_https_errors=True`), as a person who accepted the warning."""
    model = models.realtime("mirage")
    camera = camera_file(tmp_path, model.width, model.height, model.fps)
    with chromium(camera) as browser:
        context = browser.new_context(ignore_https_errors=True)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(f"{secure.base_url}/")
        assert page.evaluate("() => window.isSecureContext") is True
        if page.text_content("#start") == "Start":
            page.click("#start")
        page.wait_for_function(
            "() => document.querySelector('#state').textContent === 'generating'",
            timeout=60_000,
        )
        deadline = time.monotonic() + 30
        found: Any = None
        while time.monotonic() < deadline:
            found = read_video(page, "#output")
            if found is not None and found[2] > 0.5:
                break
            time.sleep(0.2)
        assert found is not None and found[2] > 0.5, "the output never played"
        assert found[1] == (model.width, model.height)
        context.close()
    assert not errors, errors


# -- settings that cannot be served ----------------------------------------------------


def serve_fails(tmp_path: Path, *flags: str) -> str:
    """`livemorph serve FLAGS`, expected to refuse at once with exit status 2: the line
    that says why (after argparse's usage, for a flag argparse refuses)."""
    result = subprocess.run(
        [sys.executable, "-m", "livemorph.cli", "serve", "--data-dir", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("LIVEMORPH_")},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 or lines[0].startswith("usage:"), result.stderr
    return lines[-1]


def test_bad_tls_settings_are_refused_in_one_line(tmp_path: Path) -> None:
    made = self_signed_paths(tmp_path / "made")
    from livemorph.server.tls import ensure_self_signed

    ensure_self_signed(tmp_path / "made", "127.0.0.1")
    other = self_signed_paths(tmp_path / "other")
    ensure_self_signed(tmp_path / "other", "127.0.0.1")
    text = tmp_path / "not-a-cert.pem"
    text.write_text("hello\n")

    assert "give both" in serve_fails(tmp_path, "--tls-cert", str(made[0]))
    assert "do not go together" in serve_fails(
        tmp_path, "--tls", "self-signed", "--tls-cert", str(made[0]), "--tls-key", str(made[1])
    )
    assert "must be self-signed" in serve_fails(tmp_path, "--tls", "lets-encrypt")
    missing = serve_fails(tmp_path, "--tls-cert", str(tmp_path / "x.pem"), "--tls-key", "k")
    assert "no such file" in missing
    mismatched = serve_fails(tmp_path, "--tls-cert", str(made[0]), "--tls-key", str(other[1]))
    assert "are not a certificate and its key" in mismatched
    assert "not a certificate" in serve_fails(
        tmp_path, "--tls-cert", str(text), "--tls-key", str(made[1])
    )
    assert not (tmp_path / "livemorph.db").exists(), "nothing was made before the refusal"


# -- the demo beyond loopback ----------------------------------------------------------


def test_the_demo_is_closed_on_a_non_loopback_address(tmp_path: Path) -> None:
    with serve(tmp_path / "closed", "--engine", "passthrough", "--host", "0.0.0.0") as live:
        assert httpx.post(f"{live.base_url}/demo/token").status_code == 404
        assert httpx.get(f"{live.base_url}/").status_code == 404
        assert httpx.get(f"{live.base_url}/sdk/livemorph.js").status_code == 200
        assert "the demo page is off: 0.0.0.0 is not a loopback address" in live.log


def test_an_explicit_demo_opens_it_with_a_warning(tmp_path: Path) -> None:
    flags = ("--engine", "passthrough", "--host", "0.0.0.0", "--demo")
    with serve(tmp_path / "open", *flags) as live:
        assert httpx.post(f"{live.base_url}/demo/token").status_code == 200
        assert "WARNING" in live.log and "not a loopback address: POST /demo/token" in live.log
