"""Server settings: defaults, overridden by environment variables, overridden by flags.

Each setting is declared once, as a field of `Settings`: its type, its default, whether it is
a secret (`repr=False`) and, in its metadata (`about`), its help text. Its flag
(`--max-sessions`), its variable (`LIVEMORPH_MAX_SESSIONS`), how its text is read and the
line `livemorph serve --help` shows are all derived from that field (`options`), so a new
setting cannot miss one of them nor have them disagree."""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from types import NoneType
from typing import Any
from urllib.parse import urlsplit

from platformdirs import user_data_dir

from .models import CATALOG
from .protocol import MAX_MESSAGE_BYTES, IceServer, MessageError, ice_servers_from_json

ENV_PREFIX = "LIVEMORPH_"
#: What turns a boolean setting off in the environment; any other text turns it on.
OFF_WORDS = frozenset({"0", "false", "no", "off"})
POLICY_GROUP = "moderation and prompt enhancement"
LIMITS_GROUP = "limits (0 switches one off)"
CLUSTER_GROUP = "cluster (several nodes as one service)"
JOBS_GROUP = "batch jobs (POST /v1/jobs, /v1/generate)"

#: Reads one setting from text: (the field's type, the text, the flag or variable it came
#: from). Raises ValueError naming that flag or variable, so the user knows what to fix.
Parse = Callable[[type[Any], str, str], Any]


def default_data_dir() -> Path:
    return Path(user_data_dir("livemorph", appauthor=False))


def plain_value(kind: type[Any], text: str, name: str) -> Any:
    """`kind` from its text; a number that is not one is refused by name."""
    if kind is int or kind is float:
        try:
            return kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise ValueError(f"{name} must be {what}, not {text!r}") from None
    return kind(text)


def at_least_one(kind: type[Any], text: str, name: str) -> Any:
    """A count of workers: 0 or less still means one, as the variable always did."""
    return max(1, plain_value(kind, text, name))


def is_loopback(host: str) -> bool:
    """Whether `host` (an address to listen on) is reachable from this machine only.

    A name other than localhost is taken as reachable from elsewhere: what it resolves to
    may change, and the safe mistake is to ask for an explicit --demo."""
    if host.strip().lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def one_of(*words: str) -> Parse:
    """A parser that takes one of `words` (any case) and refuses the rest by name."""

    def parse(kind: type[Any], text: str, name: str) -> str:
        word = text.strip().lower()
        if word not in words:
            raise ValueError(f"{name} must be {' or '.join(words)}, not {text!r}")
        return word

    return parse


def limit_value(kind: type[int] | type[float], text: str, name: str) -> int | float:
    """A limit from its text form: a number, 0 or more."""
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise ValueError(f"{name} must be 0 (off) or more, not {text!r}")
    return value


#: `--capacity`'s word for "estimate every model" and for "no admission by capacity".
CAPACITY_AUTO = "auto"
CAPACITY_OFF = "off"


def capacity_counts(text: str, name: str = "--capacity") -> dict[str, int] | None:
    """`--capacity`'s text read: sessions per model (`mirage=2,live_avatar=4`; models not
    named are estimated), {} for `auto` (all estimated), None for `off`. ValueError names
    `name` and says what is wrong."""
    words = text.strip().lower()
    if words == CAPACITY_OFF:
        return None
    if words in ("", CAPACITY_AUTO):
        return {}
    counts: dict[str, int] = {}
    for item in words.split(","):
        model, equals, count = (part.strip() for part in item.partition("="))
        if model not in CATALOG:
            known = ", ".join(CATALOG)
            raise ValueError(f"{name}: {model!r} is not a model ({known}), in {text!r}")
        if not equals or not count.isdigit() or int(count) < 1:
            raise ValueError(
                f"{name}: {model} needs a whole number of sessions, 1 or more "
                f"({model}=2), in {text!r}"
            )
        if model in counts:
            raise ValueError(f"{name}: {model} is named twice, in {text!r}")
        counts[model] = int(count)
    return counts


def capacity_value(kind: type[Any], text: str, name: str) -> str:
    """`--capacity` checked when it is given, so a typo stops `serve` at once, by name."""
    capacity_counts(text, name)
    return text.strip()


def ice_servers(text: str | None, name: str = "--ice-servers") -> tuple[IceServer, ...]:
    """`--ice-servers` read: WebRTC's `iceServers` as JSON (a list of `{"urls", "username",
    "credential"}`, or one such object), the path of a file holding that JSON, or STUN URLs
    separated by commas (TURN needs credentials, so JSON). None or blank: none. ValueError
    names `name` and says what is wrong; a credential is never in it."""
    text = (text or "").strip()
    if not text:
        return ()
    if text[0] in "[{":
        where = ""
    elif text.startswith(("stun:", "stuns:", "turn:", "turns:")):
        urls = [url.strip() for url in text.split(",") if url.strip()]
        if any(url.startswith("turn") for url in urls):
            raise ValueError(
                f"{name}: a TURN server needs a username and a credential: give JSON, "
                '[{"urls": "turn:host:3478", "username": "u", "credential": "p"}]'
            )
        return _ice_servers([{"urls": urls}], "", name)
    else:
        where = f" in {text}"
        try:
            text = Path(text).expanduser().read_text()
        except OSError as exc:
            raise ValueError(
                f"{name}: neither JSON, STUN URLs nor a readable file ({exc.strerror}: {text})"
            ) from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{name}: not valid JSON{where} ({exc})") from None
    return _ice_servers(data, where, name)


def _ice_servers(data: object, where: str, name: str) -> tuple[IceServer, ...]:
    try:
        return ice_servers_from_json(data, MessageError)
    except MessageError as exc:
        raise ValueError(f"{name}: {exc}{where}") from None


def ice_servers_value(kind: type[Any], text: str, name: str) -> str:
    """`--ice-servers` checked when it is given, so a mistake stops `serve` at once, by name."""
    ice_servers(text, name)
    return text.strip()


#: `--cors-origins`' word for every origin; it stands alone.
ANY_ORIGIN = "*"
_ORIGIN_FORM = "scheme://host[:port], as a browser sends it, e.g. 'https://app.example.com'"


def cors_origins(text: str | None, name: str = "--cors-origins") -> tuple[str, ...]:
    """`--cors-origins` read: the origins whose pages may call the REST API from a browser
    (server/app.py), in the form browsers send in `Origin` (host lowercased, a default port
    left out), each once; `("*",)` for `*`, any origin. None or blank: none. ValueError names
    `name` and says what is wrong.

    An origin is matched exactly, so what could never match one is refused rather than kept:
    a path (even a final `/`, which browsers never send), a scheme other than http(s), a
    wildcard inside a name (`https://*.example.com`), `null` (sandboxed and file:// pages,
    any of which would pass)."""
    text = (text or "").strip()
    if not text:
        return ()
    items = [item.strip() for item in text.split(",")]
    if ANY_ORIGIN in items:
        if len(items) > 1:
            raise ValueError(f"{name}: * means any origin and stands alone, in {text!r}")
        return (ANY_ORIGIN,)
    origins: list[str] = []
    for item in items:
        origin = _origin(item, name)
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


def _origin(item: str, name: str) -> str:
    """One origin of `--cors-origins`, in the form browsers send it."""
    if not item:
        raise ValueError(f"{name}: an empty origin (two commas, or one at an end)")
    parts = urlsplit(item)
    if parts.scheme not in ("http", "https") or not item.lower().startswith(parts.scheme + "://"):
        raise ValueError(f"{name}: {item!r} is not an http:// or https:// origin: {_ORIGIN_FORM}")
    if "*" in item:
        raise ValueError(f"{name}: {item!r}: name each origin; * alone means any origin")
    if parts.path or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(
            f"{name}: {item!r} is more than an origin (it has no path, not even a final /, "
            f"and no user): {_ORIGIN_FORM}"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{name}: {item!r} has no valid port: {_ORIGIN_FORM}") from None
    if not parts.hostname:
        raise ValueError(f"{name}: {item!r} names no host: {_ORIGIN_FORM}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default_port = 443 if parts.scheme == "https" else 80
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default_port) else "")


def cors_origins_value(kind: type[Any], text: str, name: str) -> str:
    """`--cors-origins` checked when it is given, so a typo stops `serve` at once, by name."""
    cors_origins(text, name)
    return text.strip()


@dataclass(frozen=True, slots=True)
class About:
    """What a `Settings` field says of itself beyond its type, default and secrecy."""

    help: str
    parse: Parse = plain_value
    metavar: str | None = None
    #: The flag's heading in --help; None: the command's own options.
    group: str | None = None
    #: Said in --help in place of the default value: for a factory, or what None means.
    shown: str | None = None


_ABOUT = "livemorph"


def about(
    help: str,
    *,
    parse: Parse = plain_value,
    metavar: str | None = None,
    group: str | None = None,
    shown: str | None = None,
) -> dict[str, About]:
    """The `metadata` of a `Settings` field: its help text and what else `About` says."""
    return {_ABOUT: About(help, parse, metavar, group, shown)}


def policy(help: str, *, metavar: str | None = None, shown: str | None = None) -> dict[str, About]:
    return about(help, metavar=metavar, group=POLICY_GROUP, shown=shown)


def limit(help: str) -> dict[str, About]:
    """A limit (README, "Limits"): a number, 0 or more, where 0 switches it off."""
    return about(help, parse=limit_value, metavar="N", group=LIMITS_GROUP)


@dataclass(slots=True)
class Settings:
    """Everything `livemorph serve` can be told; see `livemorph serve --help`.

    A secret is `repr=False`: out of the logs, and its help prefers the variable."""

    host: str = field(default="127.0.0.1", metadata=about("the address to listen on"))
    port: int = field(default=8000, metadata=about("the port to listen on"))
    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata=about("the state folder", metavar="DIR", shown="a per-user data folder"),
    )
    database_url: str | None = field(
        default=None,
        repr=False,  # it may hold a password
        metadata=about(
            "SQLAlchemy URL of the database, e.g. postgresql://user:pass@host/db",
            metavar="URL",
            shown="SQLite in the data folder",
        ),
    )
    admin_key: str | None = field(
        default=None,
        repr=False,
        metadata=about(
            "the secret that opens /v1/admin/*; without one those routes answer 404",
            metavar="KEY",
        ),
    )
    # Sent in `session_id`, for a node behind a proxy or a NAT.
    public_host: str | None = field(
        default=None,
        metadata=about(
            "the address clients reach this node at", shown="the host the client connected to"
        ),
    )
    public_port: int | None = field(
        default=None,
        metadata=about(
            "the port clients reach this node at", shown="the port the client connected to"
        ),
    )
    # cluster/: nodes sharing one Redis place and relay each other's sessions.
    redis_url: str | None = field(
        default=None,
        repr=False,  # it may hold a password
        metadata=about(
            "Redis URL that makes this node a cluster member, e.g. redis://host:6379/0 "
            "(needs --cluster-secret; with --database-url for shared accounts)",
            metavar="URL",
            group=CLUSTER_GROUP,
            shown="none: a single node",
        ),
    )
    cluster_secret: str | None = field(
        default=None,
        repr=False,
        metadata=about(
            "the secret the cluster's nodes sign their relays to each other with",
            metavar="SECRET",
            group=CLUSTER_GROUP,
        ),
    )
    node_name: str | None = field(
        default=None,
        metadata=about(
            "this node's name in the cluster (GET /v1/cluster, logs)",
            metavar="NAME",
            group=CLUSTER_GROUP,
            shown="the machine's name and a random suffix",
        ),
    )
    # sessions/session.py: the node's peer connections gather with them, and each client
    # is handed them (protocol.IceServers) for its own.
    ice_servers: str | None = field(
        default=None,
        repr=False,  # TURN credentials
        metadata=about(
            "STUN/TURN servers for nodes and clients behind NAT: JSON as WebRTC's "
            'iceServers, e.g. [{"urls": "turn:turn.example.org:3478", "username": "u", '
            '"credential": "p"}], a file holding it, or stun: URLs separated by commas',
            parse=ice_servers_value,
            metavar="JSON|FILE|URLS",
            group=CLUSTER_GROUP,
            shown="none: clients reach the node directly",
        ),
    )
    engine: str | None = field(
        default=None,
        metadata=about(
            "force one engine on the models of its kind, camera or avatar: "
            "passthrough, neural:size=320x176, meter, ...",
            metavar="NAME",
            shown="each model's own",
        ),
    )
    model_engines: str | None = field(
        default=None,
        metadata=about(
            "the engine of each model named, before --engine and the defaults: "
            "'mirage=diffusion:model=DIR;mirage_v2=diffusion:model=DIR' (a spec may hold "
            "commas; entries are separated by ';', and models given one spec share it)",
            metavar="MODEL=ENGINE;...",
            shown="none",
        ),
    )
    engine_threads: int = field(
        default_factory=lambda: os.cpu_count() or 2,
        metadata=about(
            "worker threads for engine inference",
            parse=at_least_one,
            metavar="N",
            shown="the machine's cores",
        ),
    )
    log_level: str = field(
        default="info", metadata=about("debug, info, warning or error", metavar="LEVEL")
    )
    log_format: str = field(
        default="text",
        metadata=about(
            "text, or json: one JSON object a line, with the session id, key id and model",
            parse=one_of("text", "json"),
            metavar="FORMAT",
        ),
    )
    # media/jitter.py; bench/latency.py compares the two paths.
    fast_receive: bool = field(
        default=True,
        metadata=about(
            "release received video frames on the RTP marker bit; "
            "--no-fast-receive restores aiortc's stock receive path"
        ),
    )
    # None: on only while the server listens on a loopback address (server/web.py), since
    # its token route mints tokens for anyone who can reach the server.
    demo: bool | None = field(
        default=None,
        metadata=about(
            "the demo page at / and its token route (POST /demo/token); --no-demo for production",
            shown="on while listening on a loopback address only",
        ),
    )
    # server/app.py. None, no cross-origin access, is the default: a page elsewhere reads
    # no answer of this server's unless the operator names its origin. Keys travel in
    # headers, so no cookie is at stake, but a server on loopback or a private network would
    # otherwise answer every site its users' browsers load. The server's own pages (the
    # demo at /, /watch) are same-origin and need none; local development needs none when
    # the app's dev server proxies the API (Vite's `server.proxy`), else one flag:
    # --cors-origins http://localhost:5173. Loopback origins are not guessed: they would
    # admit any other local page (a tool, a notebook) that runs in the same browser.
    cors_origins: str | None = field(
        default=None,
        metadata=about(
            "origins whose pages may call the REST API (/v1/*, /watch-stream/*) with fetch, "
            "separated by commas, e.g. https://app.example.com,http://localhost:5173; "
            "* for any origin",
            parse=cors_origins_value,
            metavar="ORIGINS",
            shown="none: only this server's own pages",
        ),
    )
    metrics: bool = field(
        default=True, metadata=about("Prometheus metrics at GET /metrics, on the same port")
    )
    metrics_token: str | None = field(
        default=None,
        repr=False,
        metadata=about(
            "a bearer token /metrics asks for", metavar="TOKEN", shown="none: open to all"
        ),
    )
    tls_cert: Path | None = field(
        default=None,
        metadata=about(
            "serve HTTPS and WSS with this certificate (PEM); needs --tls-key", metavar="FILE"
        ),
    )
    tls_key: Path | None = field(
        default=None, metadata=about("the private key of --tls-cert (PEM)", metavar="FILE")
    )
    tls: str | None = field(
        default=None,
        metadata=about(
            "self-signed: serve HTTPS with a certificate made once and kept in the data folder",
            parse=one_of("self-signed"),
            metavar="self-signed",
        ),
    )
    # The folder holds all-MiniLM-L6-v2's config.json, sentence_bert_config.json,
    # tokenizer.json and model.safetensors (engines/neural/weights.py).
    text_model: Path | None = field(
        default=None,
        metadata=about(
            "folder with the prompt encoder's weights, for offline machines",
            metavar="DIR",
            shown="fetched once into the cache",
        ),
    )
    moderation_blocklist: Path | None = field(
        default=None,
        metadata=policy(
            "a word list added to the embedded prompt policy, in policy/blocklist.txt's format",
            metavar="FILE",
        ),
    )
    moderation_url: str | None = field(
        default=None,
        metadata=policy(
            "a moderation webhook to POST to after the embedded policy; "
            "prompts are refused while it cannot answer",
            metavar="URL",
        ),
    )
    moderation_timeout: float = field(
        default=2.0, metadata=policy("seconds before the webhook counts as down", metavar="S")
    )
    enhancer_url: str | None = field(
        default=None,
        metadata=policy(
            "OpenAI-compatible API base that expands prompts",
            metavar="URL",
            shown="the engine's own",
        ),
    )
    enhancer_model: str | None = field(
        default=None, metadata=policy("the enhancer's model name", metavar="NAME")
    )
    enhancer_api_key: str | None = field(
        default=None, repr=False, metadata=policy("the enhancer's bearer key", metavar="KEY")
    )
    enhancer_timeout: float = field(
        default=3.0, metadata=policy("seconds before the plain prompt is used", metavar="S")
    )
    max_sessions: int = field(default=32, metadata=limit("sessions on this node"))
    # server/queue.py: LiveKit clients (livekit_join) wait for room rather than being refused.
    queue_size: int = field(
        default=16, metadata=limit("clients waiting in line for a session on a full node")
    )
    queue_wait: float = field(
        default=120.0, metadata=limit("seconds a client waits in line before it is refused")
    )
    # server/capacity.py: how the estimate is made, and why.
    capacity: str = field(
        default=CAPACITY_AUTO,
        metadata=about(
            "sessions of each model this node serves at the model's frame rate, e.g. "
            "mirage=2,live_avatar=4; models not named are estimated from what their "
            "sessions cost; off: only --max-sessions",
            parse=capacity_value,
            metavar="MODEL=N,...",
            group=LIMITS_GROUP,
        ),
    )
    max_sessions_per_key: int = field(
        default=16, metadata=limit("sessions of one key at once (its client tokens included)")
    )
    new_session_rate: float = field(
        default=5.0, metadata=limit("new sessions a second per key, sustained")
    )
    new_session_burst: float = field(
        default=50.0, metadata=limit("new sessions per key in a burst")
    )
    token_mint_rate: float = field(
        default=10.0, metadata=limit("client tokens minted a second per key, sustained")
    )
    token_mint_burst: float = field(
        default=100.0, metadata=limit("client tokens minted per key in a burst")
    )
    message_rate: float = field(
        default=50.0,
        metadata=limit("messages a second one WebSocket may send; the excess is dropped"),
    )
    message_burst: float = field(
        default=100.0, metadata=limit("messages one WebSocket may send in a burst")
    )
    max_message_bytes: int = field(
        default=MAX_MESSAGE_BYTES,
        metadata=limit("the largest WebSocket message; a larger one closes with 1009"),
    )

    # server/job_worker.py, storage/job_files.py: jobs' files, kept apart from the sessions'.
    jobs_dir: Path | None = field(
        default=None,
        metadata=about(
            "the folder for batch jobs' inputs and results; the nodes of a cluster must "
            "share one (a network file system), since any node may run any job",
            metavar="DIR",
            group=JOBS_GROUP,
            shown="jobs/ in the data folder",
        ),
    )
    job_workers: int = field(
        default=1,
        metadata=about(
            "batch jobs this node runs at once, on CPU its sessions leave; 0: none "
            "(the node still takes submissions, and other nodes run them)",
            parse=limit_value,
            metavar="N",
            group=JOBS_GROUP,
        ),
    )
    job_retention: float = field(
        default=24.0,
        metadata=about(
            "hours a finished job's result (or failure) is kept before it is deleted",
            parse=limit_value,
            metavar="HOURS",
            group=JOBS_GROUP,
        ),
    )
    jobs_disk_budget: int = field(
        default=0,
        metadata=about(
            "megabytes all jobs' files may take; a submission past it is refused with 507; "
            "0: only the disk's 1 GiB free-space margin",
            parse=limit_value,
            metavar="MB",
            group=JOBS_GROUP,
        ),
    )
    job_lease: float = field(
        default=60.0,
        metadata=about(
            "seconds a node holds a running job between renewals; a node that dies leaves "
            "its jobs to the others this long after its last renewal",
            parse=limit_value,
            metavar="S",
            group=JOBS_GROUP,
        ),
    )
    max_jobs_per_key: int = field(
        default=8,
        metadata=about(
            "jobs of one key waiting or running at once; more are refused with 429; 0: no cap",
            parse=limit_value,
            metavar="N",
            group=JOBS_GROUP,
        ),
    )

    @property
    def demo_on(self) -> bool:
        """Whether the demo is served: as set, else only while listening on loopback."""
        return self.demo if self.demo is not None else is_loopback(self.host)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """The defaults, overridden by each `LIVEMORPH_*` variable set to some text.

        An empty variable counts as unset, so `LIVEMORPH_ENGINE=` in a compose file means
        the default rather than an engine named "". One that cannot be read raises
        ValueError naming it."""
        environ = os.environ if environ is None else environ
        return cls(
            **{
                option.name: option.parse(text, option.env)
                for option in options()
                if (text := environ.get(option.env))
            }
        )


@dataclass(frozen=True, slots=True)
class Option:
    """One setting as the outside sees it, derived from its `Settings` field by `options`."""

    name: str
    #: The field's type without its None: str, int, float, bool or Path.
    kind: type[Any]
    about: About
    #: Kept out of repr, so kept out of the logs: the help prefers the variable to the
    #: flag, which any user of the machine can read in `ps`.
    secret: bool
    #: The default value, or MISSING for one made by a factory.
    default: Any

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def switch(self) -> bool:
        """A boolean: on the command line `--demo`/`--no-demo`, in the environment a word."""
        return self.kind is bool

    def parse(self, text: str, name: str) -> Any:
        """The value `text` gives this setting, read from the flag or variable `name`."""
        if self.switch:
            return text.strip().lower() not in OFF_WORDS
        return self.about.parse(self.kind, text, name)

    @property
    def help(self) -> str:
        """The --help text: what it does, its variable and its default."""
        if self.switch:
            if self.default is None:  # decided at start (Settings says how)
                return (
                    f"{self.about.help} (env {self.env}=0 turns it off, =1 on; "
                    f"default: {self.about.shown})"
                )
            word, state = ("0", "off") if self.default else ("1", "on")
            return f"{self.about.help} (env {self.env}={word} turns it {state})"
        where = f"env {self.env}"
        if self.secret:
            where += ", better than the flag, which any user sees in ps"
        shown = self.about.shown
        if shown is None and self.default is not MISSING and self.default is not None:
            shown = f"{self.default:g}" if isinstance(self.default, float) else str(self.default)
        return f"{self.about.help} ({where}" + (f"; default: {shown})" if shown else ")")


def _option(setting: Field[Any], hint: Any) -> Option:
    """The option of one field; a field it cannot be derived from fails here, at import of
    the CLI and in tests/test_config.py, rather than when someone gives the flag."""
    if not isinstance(info := setting.metadata.get(_ABOUT), About):
        raise TypeError(f"Settings.{setting.name} says nothing about itself: give it about(...)")
    union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    kinds = [kind for kind in (typing.get_args(hint) if union else (hint,)) if kind is not NoneType]
    if len(kinds) != 1 or kinds[0] not in (str, int, float, bool, Path):
        raise TypeError(f"Settings.{setting.name}: no way to read a {hint} from text")
    return Option(setting.name, kinds[0], info, not setting.repr, setting.default)


@functools.cache
def options() -> tuple[Option, ...]:
    """Every setting, in the order `Settings` declares them."""
    hints = typing.get_type_hints(Settings)
    return tuple(_option(setting, hints[setting.name]) for setting in fields(Settings))
