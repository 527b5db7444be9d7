"""The realtime model catalog, shared by the server and the SDKs.

The names, frame rates and sizes are part of the wire contract: clients size their
cameras from them, and the server delivers output at exactly this size and rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

ModelName = Literal["mirage", "mirage_v2", "lucy_v2v_720p_rt", "lucy_2_rt", "live_avatar"]

RESTYLE = "restyle from prompt or reference image"
EDIT = "edit: prompt plus reference image of a character or object"
AVATAR = "portrait image plus audio in, talking video out"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """One realtime model: what a client needs to know to stream to it."""

    name: str
    fps: int
    width: int
    height: int
    kind: str
    url_path: str = "/v1/stream"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


CATALOG: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mirage", 25, 1280, 704, RESTYLE),
        ModelSpec("mirage_v2", 22, 1280, 704, RESTYLE),
        ModelSpec("lucy_v2v_720p_rt", 25, 1280, 704, RESTYLE),
        ModelSpec("lucy_2_rt", 20, 1280, 720, EDIT),
        ModelSpec("live_avatar", 25, 1280, 720, AVATAR),
    )
}


class UnknownModelError(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"model not found: {name!r}")
        self.name = name


class _Realtime:
    """`models.realtime("mirage_v2")`, plus one factory per model like the browser SDK."""

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
