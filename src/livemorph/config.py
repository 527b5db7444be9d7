"""Server settings: defaults, overridden by environment variables, overridden by flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from platformdirs import user_data_dir

from .protocol import MAX_MESSAGE_BYTES

ENV_PREFIX = "LIVEMORPH_"


def default_data_dir() -> Path:
    return Path(user_data_dir("livemorph", appauthor=False))


def _env(name: str) -> str | None:
    return os.environ.get(ENV_PREFIX + name)


def _env_flag(name: str, default: bool) -> bool:
    """Unset keeps `default`; 0, false, no or off turn it off, anything else on."""
    value = _env(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "no", "off")


@dataclass(slots=True)
class Settings:
    """Everything `livemorph serve` can be told; see `livemorph serve --help`."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    #: SQLAlchemy URL of the database (`postgresql://...`); default: SQLite in data_dir.
    database_url: str | None = field(default=None, repr=False)
    #: The secret that opens /v1/admin/*; without one those routes answer 404.
    admin_key: str | None = field(default=None, repr=False)
    #: The address clients use to reach this node (sent in `session_id`); default: the
    #: host and port the client itself connected to.
    public_host: str | None = None
    public_port: int | None = None
    #: Force one engine for every model (e.g. "passthrough"); default: per-model choice.
    engine: str | None = None
    #: Worker threads for engine inference; default: the machine's cores.
    engine_threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    log_level: str = "info"
    #: Release received video frames on the RTP marker bit (see media/jitter.py); turning it
    #: off restores aiortc's stock receive path, for comparison in bench/latency.py.
    fast_receive: bool = True
    #: The demo page at / and its token route (POST /demo/token); turn off for production.
    demo: bool = True
    #: A folder with the prompt encoder's weights (all-MiniLM-L6-v2's config.json,
    #: sentence_bert_config.json, tokenizer.json, model.safetensors); default: found or
    #: fetched once into the cache (engines/neural/weights.py).
    text_model: Path | None = None
    #: A word list added to the embedded prompt policy (format: policy/blocklist.txt).
    moderation_blocklist: Path | None = None
    #: A moderation webhook asked after the embedded policy; refuses when it cannot answer.
    moderation_url: str | None = None
    moderation_timeout: float = 2.0
    #: An OpenAI-compatible chat endpoint that expands prompts; default: the engine's own.
    enhancer_url: str | None = None
    enhancer_model: str | None = None
    enhancer_api_key: str | None = field(default=None, repr=False)
    enhancer_timeout: float = 3.0
    #: Limits (README, "Limits"): 0 switches one off. Sessions per node, and per key (a
    #: client token counts for the key that minted it).
    max_sessions: int = 32
    max_sessions_per_key: int = 16
    #: Token buckets per key: new sessions and client tokens a second, and the burst allowed.
    new_session_rate: float = 5.0
    new_session_burst: float = 50.0
    token_mint_rate: float = 10.0
    token_mint_burst: float = 100.0
    #: Messages a second one WebSocket may send (and its burst); the excess is dropped.
    message_rate: float = 50.0
    message_burst: float = 100.0
    #: The largest WebSocket message accepted; a larger one closes the socket with 1009.
    max_message_bytes: int = MAX_MESSAGE_BYTES

    @classmethod
    def from_env(cls) -> Settings:
        settings = cls()
        settings.host = _env("HOST") or settings.host
        settings.port = int(_env("PORT") or settings.port)
        if (data_dir := _env("DATA_DIR")) is not None:
            settings.data_dir = Path(data_dir)
        settings.database_url = _env("DATABASE_URL")
        settings.admin_key = _env("ADMIN_KEY") or None
        settings.public_host = _env("PUBLIC_HOST")
        if (public_port := _env("PUBLIC_PORT")) is not None:
            settings.public_port = int(public_port)
        settings.engine = _env("ENGINE")
        if (threads := _env("ENGINE_THREADS")) is not None:
            settings.engine_threads = max(1, int(threads))
        settings.log_level = _env("LOG_LEVEL") or settings.log_level
        settings.fast_receive = _env_flag("FAST_RECEIVE", settings.fast_receive)
        settings.demo = _env_flag("DEMO", settings.demo)
        if text_model := _env("TEXT_MODEL"):
            settings.text_model = Path(text_model)
        if (blocklist := _env("MODERATION_BLOCKLIST")) is not None:
            settings.moderation_blocklist = Path(blocklist)
        settings.moderation_url = _env("MODERATION_URL")
        if (timeout := _env("MODERATION_TIMEOUT")) is not None:
            settings.moderation_timeout = float(timeout)
        settings.enhancer_url = _env("ENHANCER_URL")
        settings.enhancer_model = _env("ENHANCER_MODEL")
        settings.enhancer_api_key = _env("ENHANCER_API_KEY")
        if (timeout := _env("ENHANCER_TIMEOUT")) is not None:
            settings.enhancer_timeout = float(timeout)
        for name, kind in LIMITS.items():
            if (value := _env(name.upper())) is not None:
                setattr(settings, name, limit_value(kind, value, ENV_PREFIX + name.upper()))
        return settings


#: The limit settings, each also the flag `--max-sessions` etc. and `LIVEMORPH_MAX_SESSIONS`.
LIMITS: dict[str, type[int] | type[float]] = {
    "max_sessions": int,
    "max_sessions_per_key": int,
    "new_session_rate": float,
    "new_session_burst": float,
    "token_mint_rate": float,
    "token_mint_burst": float,
    "message_rate": float,
    "message_burst": float,
    "max_message_bytes": int,
}


def limit_value(kind: type[int] | type[float], text: str, name: str) -> int | float:
    """A limit from its text form: a number, 0 or more."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise ValueError(f"{name} must be 0 (off) or more, not {text!r}")
    return value
