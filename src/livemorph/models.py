"""The realtime model catalog, shared by the server and the SDKs.

The names, frame rates and sizes are part of the wire contract: clients size their
cameras from them, and the server delivers output at exactly this size and rate.

Two generations of names live here. The first five (`mirage` ... `live_avatar`) are the
ones `decart==0.0.30` and `@decartai/sdk@0.0.46` use. The `lucy-*` names are those of the
current published clients, `decart==0.2.4` (Python) and `@decartai/sdk@0.1.20` (browser),
with the sizes and rates their realtime definitions carry. Where the two clients disagree
the newer catalog wins: the Python client's, which already knows `lucy-2.6` and
`lucy-vton-3.6` (the browser client sizes its camera 1088x624 for `lucy-2.1` and
`lucy-latest`; the server fits any camera to the model's size, so it streams all the same).
Only realtime names are here: the clients' batch (`/v1/jobs/...`) and image names, and the
deprecated `lucy-restyle-v2v`, which both clients list as a batch name only, are not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal

ModelName = Literal[
    "mirage",
    "mirage_v2",
    "lucy_v2v_720p_rt",
    "lucy_2_rt",
    "live_avatar",
    "lucy-2.1",
    "lucy-2.5",
    "lucy-2.6",
    "lucy-restyle-2",
    "lucy-vton-2",
    "lucy-vton-3",
    "lucy-vton-3.5",
    "lucy-vton-3.6",
    "lucy-latest",
    "lucy-restyle-latest",
    "lucy-vton-latest",
    "lucy-2.1-vton-2",
]

RESTYLE = "restyle from prompt or reference image"
EDIT = "edit: prompt plus reference image of a character or object"
AVATAR = "portrait image plus audio in, talking video out"
TRY_ON = "try-on: a garment from a reference image, worn by the person on camera"

#: The speed tier the clients may ask for (`speed=fast`); leaving it out is the standard tier.
FAST = "fast"
#: The `resolution` every model here takes: its own size (width x height), a 720p picture.
#: The clients may also ask for `1080p`, which no model here streams.
RESOLUTION_720P = "720p"

#: What each kind of model cannot do on this server, said plainly in `GET /v1/models`.
LIMITATIONS: dict[str, str] = {
    EDIT: (
        "no engine of this server brings the character or object of the reference image "
        "into the scene; the reference image restyles the whole scene instead (on the "
        "neural CPU engine: its style and palette)"
    ),
    TRY_ON: (
        "virtual try-on is not implemented: no engine of this server, the neural CPU engine "
        "included, puts the reference image's garment on the person; the model is served as "
        "a restyle, the reference image used as a style guide only (its style and palette "
        "restyle the whole scene)"
    ),
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One realtime model: what a client needs to know to stream to it.

    `speeds`: the speed tiers the published clients advertise for the model (`fast` on
    some `lucy-*` models). `alias_of`: for a name the clients treat as an alias (the
    server-side `*-latest` names, the deprecated `lucy-2.1-vton-2`), the model it stands
    for; an alias has its target's size, rate and kind and is served by its target's engine.
    """

    name: str
    fps: int
    width: int
    height: int
    kind: str
    url_path: str = "/v1/stream"
    speeds: tuple[str, ...] = ()
    resolutions: tuple[str, ...] = (RESOLUTION_720P,)
    alias_of: str | None = None

    @property
    def limitations(self) -> str | None:
        """What this server cannot do of what the model is meant to do; None: nothing."""
        return LIMITATIONS.get(self.kind)

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"limitations": self.limitations}


def _alias(name: str, target: ModelSpec) -> ModelSpec:
    return dataclasses.replace(target, name=name, alias_of=target.name)


_FAST = (FAST,)
_LEGACY = (
    ModelSpec("mirage", 25, 1280, 704, RESTYLE),
    ModelSpec("mirage_v2", 22, 1280, 704, RESTYLE),
    ModelSpec("lucy_v2v_720p_rt", 25, 1280, 704, RESTYLE),
    ModelSpec("lucy_2_rt", 20, 1280, 720, EDIT),
    ModelSpec("live_avatar", 25, 1280, 720, AVATAR),
)
# decart==0.2.4 `models._MODELS["realtime"]` and @decartai/sdk@0.1.20 `_models.realtime`:
# every one at 30 fps (the browser client: `{ideal: 30, max: 30}`) on `/v1/stream`.
_LUCY = (
    ModelSpec("lucy-2.1", 30, 1280, 720, EDIT),
    ModelSpec("lucy-2.5", 30, 1280, 720, EDIT, speeds=_FAST),
    ModelSpec("lucy-2.6", 30, 1280, 720, EDIT, speeds=_FAST),
    ModelSpec("lucy-restyle-2", 30, 1280, 704, RESTYLE),
    ModelSpec("lucy-vton-2", 30, 1088, 624, TRY_ON),
    ModelSpec("lucy-vton-3", 30, 1088, 624, TRY_ON),
    ModelSpec("lucy-vton-3.5", 30, 1280, 720, TRY_ON, speeds=_FAST),
    ModelSpec("lucy-vton-3.6", 30, 1280, 720, TRY_ON, speeds=_FAST),
)
#: Alias -> the model it stands for. The `*-latest` names are moving targets the service
#: resolves; here they stand for what decart==0.2.4 says they resolve to ("lucy-2.5 /
#: lucy-latest", "lucy-vton-3.6 / lucy-vton-latest"). `lucy-2.1-vton-2` is the browser
#: client's deprecated name for `lucy-vton-2`.
ALIASES: dict[str, str] = {
    "lucy-latest": "lucy-2.5",
    "lucy-restyle-latest": "lucy-restyle-2",
    "lucy-vton-latest": "lucy-vton-3.6",
    "lucy-2.1-vton-2": "lucy-vton-2",
}
_TARGETS = {spec.name: spec for spec in _LUCY}

CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        *_LEGACY,
        *_LUCY,
        *(_alias(name, _TARGETS[target]) for name, target in ALIASES.items()),
    )
}


#: The image-edit models of decart==0.2.4 and @decartai/sdk@0.1.20 (`POST /v1/generate/
#: {model}`: one picture in, the edited picture out; `lucy-pro-i2i` is their deprecated name)
#: and, for each, the realtime model whose engine edits here: a still picture goes through
#: that model's engine as a one-frame session would. They are not realtime models, so they
#: are not in `CATALOG` (nor `GET /v1/models`); `server/generate.py` serves them.
IMAGE_MODELS: dict[str, str] = {
    "lucy-image-2": "lucy-restyle-2",
    "lucy-image-latest": "lucy-restyle-2",
    "lucy-pro-i2i": "lucy-restyle-2",
}


#: The video models of decart==0.2.4's queue (`POST /v1/jobs/{model}`: a video file in, the
#: restyled video out, later) and, for each, the realtime model whose engine runs the job the
#: way `livemorph transform` runs one over a file (`server/jobs.py`; `lucy-restyle-v2v` is the
#: clients' deprecated name). Every realtime model that transforms a camera takes jobs too,
#: under its own name (`mirage`, `mirage_v2`, ...), as `livemorph transform` takes them.
VIDEO_MODELS: dict[str, str] = {
    **{name: name for name, spec in CATALOG.items() if spec.kind != AVATAR},
    **{
        name: name
        for name in (
            "lucy-2.1",
            "lucy-2.5",
            "lucy-2.6",
            "lucy-vton-3.5",
            "lucy-vton-3.6",
            "lucy-restyle-2",
            "lucy-latest",
            "lucy-vton-latest",
            "lucy-restyle-latest",
        )
    },
    "lucy-restyle-v2v": "lucy-restyle-2",
}


class UnknownModelError(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model not found: {name!r}")
        self.name = name


def canonical_name(name: str) -> str:
    """The model a name stands for: an alias's target, any other catalog name itself."""
    try:
        spec = CATALOG[name]
    except KeyError:
        raise UnknownModelError(name) from None
    return spec.alias_of or spec.name


def _quoted(value: str) -> str:
    """A client's value, quoted and cut short for an error text."""
    return repr(value if len(value) <= 40 else value[:40] + "...")


def stream_options_refusal(spec: ModelSpec, params: Mapping[str, str]) -> str | None:
    """Why `/v1/stream`'s `resolution` and `speed` query parameters cannot be served for
    `spec`, as the `error` text the socket then closes with; None when they can.

    `resolution` (both clients: `720p` or `1080p`): `720p` asks for the model's own size
    and is accepted; every model here streams 720p-class video only (1280x704, 1280x720,
    or 1088x624 for the oldest try-on models), so `1080p`, or any other value, is refused
    rather than upscaled into a picture that only pretends to be 1080p.

    `speed` (decart==0.2.4: `fast`): accepted on every model. decart==0.2.4 documents that
    a model without the fast tier ignores it (the client warns and sends it anyway), so
    refusing it there would break sessions that client expects to run. This server has a
    single tier, so `fast` changes nothing. Any other value is refused.

    Missing or empty parameters ask for nothing and are accepted. The texts carry `not
    allowed`, a permanent marker: retrying the same URL cannot help.
    """
    resolution = (params.get("resolution") or "").strip()
    if resolution and resolution.lower() not in spec.resolutions:
        accepted = ", ".join(spec.resolutions)
        return (
            f"invalid resolution: {_quoted(resolution)} is not allowed for {spec.name}, "
            f"which streams {spec.width}x{spec.height} only; resolution may be {accepted} "
            "or left out, see GET /v1/models"
        )
    speed = (params.get("speed") or "").strip()
    if speed and speed.lower() != FAST:
        return (
            f"invalid speed: {_quoted(speed)} is not allowed; speed may be {FAST} or left "
            "out, see GET /v1/models"
        )
    return None


class _Realtime:
    """`models.realtime("mirage_v2")`, plus one factory per model like the browser SDK.

    Every catalog name works with the call, the `lucy-*` ones included (they have no
    factory: their names are not identifiers, and the published clients have none)."""

    def __call__(self, name: str) -> ModelSpec:
        try:
            return CATALOG[name]
        except KeyError:
            raise UnknownModelError(name) from None

    def mirage(self) -> ModelSpec:
        return CATALOG["mirage"]

    def mirage_v2(self) -> ModelSpec:
        return CATALOG["mirage_v2"]

    def lucy_v2v_720p_rt(self) -> ModelSpec:
        return CATALOG["lucy_v2v_720p_rt"]

    def lucy_2_rt(self) -> ModelSpec:
        return CATALOG["lucy_2_rt"]

    def live_avatar(self) -> ModelSpec:
        return CATALOG["live_avatar"]


class _Models:
    realtime = _Realtime()


models = _Models()
