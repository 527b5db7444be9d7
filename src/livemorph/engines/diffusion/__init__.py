"""The diffusion engine: streaming img2img with a Stable Diffusion pipeline the user brings.

This package imports nothing heavy: `options` parses the engine's spec and `require_runtime`
says what to install when the `diffusion` extra is missing. The engine itself, in `engine`,
imports torch, diffusers and transformers, and is imported only when asked for.
"""

from __future__ import annotations

import importlib.util

from .options import DiffusionOptions

__all__ = ["DiffusionLoadError", "DiffusionOptions", "require_runtime"]

#: What the engine needs beyond livemorph's own dependencies: the `diffusion` extra.
RUNTIME = ("torch", "diffusers", "transformers", "accelerate")


class DiffusionLoadError(RuntimeError):
    """The engine cannot start: the extra is missing, or the model folder is missing or
    broken. `str()` says what is wrong and what to do, for the operator at server start."""


def require_runtime() -> None:
    """Raise `DiffusionLoadError` naming the missing packages and the install command."""
    missing = [name for name in RUNTIME if importlib.util.find_spec(name) is None]
    if missing:
        raise DiffusionLoadError(
            f"the diffusion engine needs {', '.join(missing)}, which are not installed: "
            "pip install 'livemorph[diffusion]' (on a GPU, install the torch build made for "
            "your CUDA version first)"
        )
