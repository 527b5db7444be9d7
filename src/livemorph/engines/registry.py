"""Which engine serves which model, loaded once per process."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ..models import ALIASES, AVATAR, CATALOG, ModelSpec, UnknownModelError
from .base import Engine
from .grade import GradeEngine
from .meter import MeterEngine
from .passthrough import PassthroughEngine, SleepEngine

logger = logging.getLogger(__name__)


def _avatar(options: str = "") -> Engine:
    """The avatar engine (a portrait animated by the voice), imported only when asked for."""
    from .avatar.engine import AvatarEngine

    return AvatarEngine(options)


def _neural(options: str = "") -> Engine:
    """The neural engine, imported only when asked for: it pulls in ONNX Runtime."""
    from .neural.engine import NeuralEngine

    return NeuralEngine(options)


def _diffusion(options: str = "") -> Engine:
    """Streaming img2img on a local diffusers pipeline, imported only when asked for: it
    pulls in torch, diffusers and transformers (the `diffusion` extra)."""
    from .diffusion import require_runtime

    require_runtime()  # says what to install, rather than an ImportError from deep inside
    from .diffusion.engine import DiffusionEngine

    return DiffusionEngine(options)


#: Engine factories by name. Engines import heavy runtimes lazily inside their factory.
#: An engine spec may carry one argument after a colon: `sleep:120` calls `SleepEngine("120")`.
ENGINE_FACTORIES: dict[str, Callable[..., Engine]] = {
    "passthrough": PassthroughEngine,
    "grade": GradeEngine,
    "sleep": SleepEngine,
    "neural": _neural,
    "avatar": _avatar,
    "meter": MeterEngine,
    "diffusion": _diffusion,
}
#: Engines that make their picture from the client's audio (`EngineSession.listens`): they
#: serve the avatar models, the others the camera models, and `--engine` forces one of a
#: kind only on models of that kind.
LISTENING_ENGINES = frozenset({"avatar", "meter"})

#: The engine each model uses unless configured otherwise; None: not served here yet. An
#: alias (`lucy-latest`) takes its target's engine, its target's `--model-engines` choice
#: included, unless it is given one of its own.
#:
#: The try-on models (`lucy-vton-*`) are served by the neural engine as restyles: no engine
#: here does try-on, and `GET /v1/models` says so in their `limitations`. Serving them so
#: keeps an app written for them running (its prompts, reference images and sessions all
#: work, the garment guides the look of the whole scene), as `lucy_2_rt`'s reference image
#: does; refusing them would only break that app, and would hide nothing the catalog does
#: not already say.
DEFAULT_ENGINES: dict[str, str | None] = {
    "mirage": "neural",
    "mirage_v2": "neural",
    "lucy_v2v_720p_rt": "neural",
    "lucy_2_rt": "neural",
    "live_avatar": "avatar",
    "lucy-2.1": "neural",
    "lucy-2.5": "neural",
    "lucy-2.6": "neural",
    "lucy-restyle-2": "neural",
    "lucy-vton-2": "neural",
    "lucy-vton-3": "neural",
    "lucy-vton-3.5": "neural",
    "lucy-vton-3.6": "neural",
}
DEFAULT_ENGINES.update({alias: DEFAULT_ENGINES[target] for alias, target in ALIASES.items()})


class EngineLoadError(RuntimeError):
    """An engine chosen on the command line failed to load; `str()` says which and why."""


class ModelNotAvailable(LookupError):
    """The model exists in the catalog but this server has no engine for it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"model not available on this server: {name}")


def parse_model_engines(text: str | None) -> dict[str, str]:
    """`--model-engines` read: `MODEL=SPEC` entries separated by `;` (a spec may hold `,`,
    `:` and `=` of its own: `mirage=diffusion:model=DIR,steps=2`). ValueError names what is
    wrong: an entry without `=`, a model not in the catalog, a model named twice."""
    chosen: dict[str, str] = {}
    for entry in (text or "").split(";"):
        if not entry.strip():
            continue
        model, sep, spec = entry.strip().partition("=")
        model, spec = model.strip(), spec.strip()
        if not sep or not spec:
            raise ValueError(f"--model-engines: {entry.strip()!r} is not MODEL=ENGINE")
        if model not in CATALOG:
            raise ValueError(f"--model-engines: no model {model!r} (models: {', '.join(CATALOG)})")
        if model in chosen:
            raise ValueError(f"--model-engines: {model} is named twice")
        chosen[model] = spec
    return chosen


def _check_spec(spec: str) -> str:
    if spec.partition(":")[0] not in ENGINE_FACTORIES:
        known = ", ".join(sorted(ENGINE_FACTORIES))
        raise ValueError(f"unknown engine {spec!r} (known: {known})")
    return spec


class EngineRegistry:
    """Maps model names to loaded engines: a model's own engine (`per_model`, from
    `--model-engines`) first, then `override` (`--engine`) on the models of its kind, then
    the model's default. Models given the same spec share one loaded engine."""

    def __init__(
        self, override: str | None = None, per_model: Mapping[str, str] | None = None
    ) -> None:
        self._override = None if override is None else _check_spec(override)
        self._per_model = {model: _check_spec(spec) for model, spec in (per_model or {}).items()}
        for model, spec in self._per_model.items():
            listening = spec.partition(":")[0] in LISTENING_ENGINES
            if listening != (CATALOG[model].kind == AVATAR):
                kind = "listens to audio" if listening else "transforms a camera"
                raise ValueError(f"--model-engines: {model} cannot use {spec}: it {kind}")
        self._loaded: dict[str, Engine] = {}

    def engine_name(self, model: str) -> str | None:
        """The engine serving `model` here, as clients may see it: its name without its
        arguments (which may hold the server's paths: `diffusion:model=DIR`)."""
        spec = self.engine_spec(model)
        return None if spec is None else spec.partition(":")[0]

    def engine_spec(self, model: str) -> str | None:
        """The engine spec serving `model` here, arguments and all (for the server's own use:
        they may hold its paths); None when no engine serves it."""
        if model not in CATALOG:
            raise UnknownModelError(model)
        target = CATALOG[model].alias_of or model
        for name in (model, target):  # an alias's own choice, then its target's
            if name in self._per_model:
                return self._per_model[name]
        default = DEFAULT_ENGINES.get(target)
        if default is None:
            return None
        if self._override is None:
            return default
        listening = self._override.partition(":")[0] in LISTENING_ENGINES
        return self._override if listening == (CATALOG[model].kind == AVATAR) else default

    def resolve(self, model: str) -> tuple[ModelSpec, Engine]:
        """The model's spec and its loaded engine; raises UnknownModelError/ModelNotAvailable."""
        name = self.engine_spec(model)
        if name is None:
            raise ModelNotAvailable(model)
        engine = self._loaded.get(name)
        if engine is None:
            logger.info("loading engine %s", name)
            factory, _, argument = name.partition(":")
            engine = ENGINE_FACTORIES[factory](*([argument] if argument else []))
            self._loaded[name] = engine
        return CATALOG[model], engine

    def engine_names(self) -> dict[str, str]:
        """Each model served here and its engine's name (as `engine_name` gives it)."""
        return {
            model: engine for model in CATALOG if (engine := self.engine_name(model)) is not None
        }

    def loaded(self, model: str) -> Engine | None:
        """The engine serving `model` if it is loaded already; never loads one."""
        name = self.engine_spec(model)
        return None if name is None else self._loaded.get(name)

    def preload(self) -> None:
        """Load the engines chosen on the command line (`override`, `per_model`) now, so that
        a missing extra or a broken model folder stops the server at start with the engine's
        own message, instead of failing its first session. Defaults load on first use."""
        chosen = {*self._per_model.values(), *([self._override] if self._override else [])}
        for spec in sorted(chosen):
            model = next((name for name in CATALOG if self.engine_spec(name) == spec), None)
            if model is None:
                continue
            try:
                self.resolve(model)
            except Exception as exc:
                name = spec.partition(":")[0]  # its arguments may hold the server's paths
                raise EngineLoadError(f"the engine {name} cannot start: {exc}") from exc

    def close(self) -> None:
        for engine in self._loaded.values():
            engine.close()
        self._loaded.clear()
