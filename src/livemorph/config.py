"""Server settings: defaults, overridden by environment variables, overridden by flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from platformdirs import user_data_dir

ENV_PREFIX = "LIVEMORPH_"


def default_data_dir() -> Path:
    return Path(user_data_dir("livemorph", appauthor=False))


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


@dataclass(slots=True)
class Settings:
    """Everything `livemorph serve` can be told; see `livemorph serve --help`."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None
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

    @classmethod
    def from_env(cls) -> Settings:
        settings = cls()
        settings.host = _env("HOST", settings.host) or settings.host
        settings.port = int(_env("PORT", str(settings.port)) or settings.port)
        if (data_dir := _env("DATA_DIR")) is not None:
            settings.data_dir = Path(data_dir)
        settings.database_url = _env("DATABASE_URL")
        settings.public_host = _env("PUBLIC_HOST")
        if (public_port := _env("PUBLIC_PORT")) is not None:
            settings.public_port = int(public_port)
        settings.engine = _env("ENGINE")
        if (threads := _env("ENGINE_THREADS")) is not None:
            settings.engine_threads = max(1, int(threads))
        settings.log_level = _env("LOG_LEVEL", settings.log_level) or settings.log_level
        if (fast := _env("FAST_RECEIVE")) is not None:
            settings.fast_receive = fast.strip().lower() not in ("0", "false", "no", "off")
        return settings
