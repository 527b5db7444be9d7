"""Server settings: each declared once, as a `Settings` field, with its flag, variable, parser
and help derived from it; defaults < environment < flags."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest

from livemorph import cli, config
from livemorph.config import Settings, options

SECRETS = {
    "database_url",
    "admin_key",
    "enhancer_api_key",
    "metrics_token",
    "redis_url",
    "cluster_secret",
    "ice_servers",
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No `LIVEMORPH_*` setting from the machine running the tests leaks into them."""
    for option in options():
        monkeypatch.delenv(option.env, raising=False)


def serve_parser() -> argparse.ArgumentParser:
    commands = next(
        action
        for action in cli.build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return commands.choices["serve"]


def from_flags(*flags: str) -> Settings:
    return cli.settings_from_args(cli.build_parser().parse_args(["serve", *flags]))


# -- (a) one declaration, everything derived ------------------------------------------------


def test_every_field_has_a_flag_a_variable_and_help() -> None:
    actions = {action.dest: action for action in serve_parser()._actions}
    assert [option.name for option in options()] == [f.name for f in fields(Settings)]
    for option in options():
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "LIVEMORPH_" + option.name.upper()
        assert option.about.help, option.name
        assert option.env in option.help
        action = actions[option.name]
        assert option.flag in action.option_strings
        assert action.help == option.help
        assert action.default is None, "an unset flag must leave the environment alone"


def test_defaults_show_in_the_help() -> None:
    by_name = {option.name: option for option in options()}
    assert "default: 8000" in by_name["port"].help
    assert "default: 2)" in by_name["moderation_timeout"].help  # floats as %g
    assert "default: 32" in by_name["max_sessions"].help
    assert "default: the machine's cores" in by_name["engine_threads"].help  # a factory
    assert "LIVEMORPH_DEMO=0 turns it off" in by_name["demo"].help


def test_secrets_stay_out_of_repr_and_their_help_prefers_the_variable() -> None:
    assert {option.name for option in options() if option.secret} == SECRETS
    settings = Settings(
        database_url="postgresql://u:db-password@h/db",
        admin_key="admin-secret",
        enhancer_api_key="sk-secret",
    )
    for secret in ("db-password", "admin-secret", "sk-secret"):
        assert secret not in repr(settings)
    for option in options():
        assert ("better than the flag" in option.help) is option.secret


def test_a_field_without_a_declaration_is_caught() -> None:
    @dataclass
    class Bare:
        quiet: int = 1
        listed: list[str] = field(default_factory=list, metadata=config.about("a list"))

    bare, listed = fields(Bare)
    with pytest.raises(TypeError, match="says nothing about itself"):
        config._option(bare, int)
    with pytest.raises(TypeError, match="no way to read"):
        config._option(listed, list[str])


# -- (b) default < environment < flag -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "env", "from_env", "flags", "from_flag"),
    [
        ("host", "0.0.0.0", "0.0.0.0", ["--host", "::1"], "::1"),
        ("port", "9000", 9000, ["--port", "9100"], 9100),
        ("moderation_timeout", "1.5", 1.5, ["--moderation-timeout", "0.25"], 0.25),
        ("demo", "off", False, ["--demo"], True),
        ("fast_receive", "no", False, ["--fast-receive"], True),
        (
            "data_dir",
            "/from/env",
            Path("/from/env"),
            ["--data-dir", "/from/flag"],
            Path("/from/flag"),
        ),
        ("text_model", "/env/model", Path("/env/model"), ["--text-model", "/m"], Path("/m")),
        ("public_port", "443", 443, ["--public-port", "8443"], 8443),
        ("engine", "passthrough", "passthrough", ["--engine", "meter"], "meter"),
        ("max_sessions", "7", 7, ["--max-sessions", "0"], 0),
        ("message_rate", "12.5", 12.5, ["--message-rate", "3"], 3.0),
    ],
)
def test_the_environment_overrides_the_default_and_a_flag_the_environment(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    env: str,
    from_env: Any,
    flags: list[str],
    from_flag: Any,
) -> None:
    option = next(option for option in options() if option.name == name)
    default = getattr(Settings(), name)
    assert default != from_env
    assert getattr(from_flags(), name) == default
    monkeypatch.setenv(option.env, env)
    assert getattr(Settings.from_env(), name) == from_env
    assert getattr(from_flags(), name) == from_env, "no flag: the environment stands"
    assert getattr(from_flags(*flags), name) == from_flag


@pytest.mark.parametrize("word", ["0", "false", "no", "off", "OFF", " No "])
def test_a_switch_is_off_for_the_off_words(monkeypatch: pytest.MonkeyPatch, word: str) -> None:
    monkeypatch.setenv("LIVEMORPH_FAST_RECEIVE", word)
    assert Settings.from_env().fast_receive is False


@pytest.mark.parametrize("word", ["1", "true", "yes", "on", "anything"])
def test_a_switch_is_on_for_any_other_word(monkeypatch: pytest.MonkeyPatch, word: str) -> None:
    monkeypatch.setenv("LIVEMORPH_FAST_RECEIVE", word)
    assert Settings.from_env().fast_receive is True


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "ENGINE", "DATA_DIR", "MAX_SESSIONS", "DEMO", "ADMIN_KEY"):
        monkeypatch.setenv("LIVEMORPH_" + name, "")
    assert Settings.from_env() == Settings()


def test_engine_threads_is_at_least_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEMORPH_ENGINE_THREADS", "0")
    assert Settings.from_env().engine_threads == 1
    assert from_flags("--engine-threads", "-3").engine_threads == 1
    assert from_flags("--engine-threads", "6").engine_threads == 6


def test_account_commands_take_only_the_storage_flags(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["keys", "list", "--data-dir", str(tmp_path)])
    assert cli.settings_from_args(args).data_dir == tmp_path
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["keys", "list", "--port", "1"])


# -- (c) a value that cannot be read is refused by name ------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("port", "eighty", "must be a whole number, not 'eighty'"),
        ("moderation_timeout", "soon", "must be a number, not 'soon'"),
        ("max_sessions", "lots", "must be a number, not 'lots'"),
        ("message_burst", "-1", "must be 0 (off) or more, not '-1'"),
        ("token_mint_rate", "nan", "must be 0 (off) or more, not 'nan'"),
    ],
)
def test_a_bad_value_is_refused_by_its_name(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    error: str,
) -> None:
    option = next(option for option in options() if option.name == name)
    with pytest.raises(SystemExit) as exited:
        from_flags(option.flag, value)
    assert exited.value.code == 2
    assert f"{option.flag} {error}" in capsys.readouterr().err

    monkeypatch.setenv(option.env, value)
    with pytest.raises(ValueError, match="^" + re.escape(f"{option.env} {error}")):
        Settings.from_env()
    # The command says so in one line, before it starts anything, rather than a traceback.
    assert cli.main(["serve"]) == 2
    assert capsys.readouterr().err == f"livemorph: {option.env} {error}\n"


# -- (d) --help lists them ------------------------------------------------------------------


def test_serve_help_lists_every_flag_with_its_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # one line a flag: nothing wrapped mid-name
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for option in options():
        assert option.flag in out
        assert option.env in out
        assert option.about.help in out
    assert "--no-demo" in out and "--no-fast-receive" in out
    assert "moderation and prompt enhancement:" in out
    assert "limits (0 switches one off):" in out


# -- --ice-servers ----------------------------------------------------------------------------

TURN_JSON = (
    '[{"urls": ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org"], '
    '"username": "node", "credential": "hunter2"}]'
)


def test_ice_servers_are_json_a_json_file_or_stun_urls(tmp_path: Path) -> None:
    turn = config.ice_servers(TURN_JSON)
    assert [(s.urls, s.username, s.credential) for s in turn] == [
        (("turn:turn.example.org:3478?transport=udp", "turns:turn.example.org"), "node", "hunter2")
    ]
    one = config.ice_servers('{"urls": "stun:127.0.0.1:9"}')  # one object: a list of one
    assert [s.urls for s in one] == [("stun:127.0.0.1:9",)]
    listed = config.ice_servers(" stun:a.example:3478, stun:b.example ")
    assert [s.urls for s in listed] == [("stun:a.example:3478", "stun:b.example")]
    stored = tmp_path / "ice.json"
    stored.write_text(TURN_JSON)
    assert config.ice_servers(str(stored)) == turn
    assert config.ice_servers(None) == config.ice_servers(" ") == ()
    assert from_flags("--ice-servers", TURN_JSON).ice_servers == TURN_JSON
    assert "hunter2" not in repr(from_flags("--ice-servers", TURN_JSON))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("turn:turn.example.org", "a TURN server needs a username and a credential: give JSON"),
        ('[{"urls": "turn:h", "username": "u"}]', "a TURN server needs a username and a"),
        ('[{"urls": "http://h"}]', "not a STUN or TURN URL: 'http://h'"),
        ('[{"urls": "stun:h?transport=tcp"}]', "a STUN URL takes no transport"),
        ('[{"urls": "stun:h:70000"}]', "not a port: 'stun:h:70000'"),
        ('[{"url": "stun:h"}]', "an ICE server has urls, username and credential, not 'url'"),
        ('[{"urls": []}]', "an ICE server needs 'urls'"),
        ('["stun:h"]', "an ICE server must be an object"),
        ("[{", "not valid JSON"),
        ("/no/such/ice.json", "neither JSON, STUN URLs nor a readable file"),
    ],
)
def test_a_bad_ice_servers_value_stops_serve_by_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str, error: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        from_flags("--ice-servers", value)
    assert exited.value.code == 2
    assert f"--ice-servers: {error}" in capsys.readouterr().err

    monkeypatch.setenv("LIVEMORPH_ICE_SERVERS", value)
    assert cli.main(["serve"]) == 2
    said = capsys.readouterr().err
    assert said.startswith(f"livemorph: LIVEMORPH_ICE_SERVERS: {error}")
    assert said.count("\n") == 1


def test_an_ice_servers_error_never_shows_the_credential() -> None:
    bad = '[{"urls": "turn:h", "username": "u", "credential": "hunter2", "extra": 1}]'
    with pytest.raises(ValueError) as refused:
        config.ice_servers(bad)
    assert "hunter2" not in str(refused.value)
