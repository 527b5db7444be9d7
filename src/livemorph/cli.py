"""The `livemorph` command: `serve` runs the server, `keys create` mints an API key."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import replace
from pathlib import Path

from .config import Settings
from .logs import install_redaction
from .protocol import MAX_MESSAGE_BYTES
from .storage import Store

DEV_KEY_NAME = "development"


def _store_for(settings: Settings) -> Store:
    if settings.database_url:
        return Store(settings.database_url)
    return Store.in_data_dir(settings.data_dir)


async def _create_key(settings: Settings, name: str) -> str:
    store = _store_for(settings)
    try:
        await store.open()
        secret, _ = await store.create_api_key(name)
        return secret
    finally:
        await store.close()


async def _ensure_first_key(settings: Settings) -> str | None:
    """On first start (no keys at all), mint a development key; its plaintext, once."""
    store = _store_for(settings)
    try:
        await store.open()
        if await store.count_api_keys():
            return None
        secret, _ = await store.create_api_key(DEV_KEY_NAME)
        return secret
    finally:
        await store.close()


def _cmd_serve(settings: Settings) -> int:
    import uvicorn

    from .server import GracefulServer, create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ws_max_size=MAX_MESSAGE_BYTES,
    )
    install_redaction()  # after uvicorn has set up its loggers and handlers
    GracefulServer(config, app.state.livemorph).run()
    return 0


def _cmd_keys_create(settings: Settings, name: str) -> int:
    secret = asyncio.run(_create_key(settings, name))
    print(f"Created API key {name!r} (stored hashed; copy it now, it is not shown again):")
    print(secret)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livemorph", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def storage_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", type=Path, help="state directory (env LIVEMORPH_DATA_DIR)")
        p.add_argument("--database-url", help="SQLAlchemy URL (env LIVEMORPH_DATABASE_URL)")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="bind address (env LIVEMORPH_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (env LIVEMORPH_PORT, default 8000)")
    storage_flags(serve)
    serve.add_argument("--engine", help="force one engine for all models (env LIVEMORPH_ENGINE)")
    serve.add_argument("--public-host", help="address clients reach this node at")
    serve.add_argument("--log-level", help="debug, info, warning (env LIVEMORPH_LOG_LEVEL)")

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="mint a permanent API key")
    storage_flags(create)
    create.add_argument("--name", default="default", help="a label for the key")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    overrides = {
        key: value
        for key in (
            "host",
            "port",
            "data_dir",
            "database_url",
            "engine",
            "public_host",
            "log_level",
        )
        if (value := getattr(args, key, None)) is not None
    }
    return replace(settings, **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if args.command == "serve":
        return _cmd_serve(settings)
    if args.command == "keys" and args.keys_command == "create":
        return _cmd_keys_create(settings, args.name)
    return 2


if __name__ == "__main__":
    sys.exit(main())
