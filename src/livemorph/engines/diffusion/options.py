"""The diffusion engine's spec: `diffusion:model=DIR[,key=value...]`, parsed without torch.

    --engine diffusion:model=/srv/weights/sd-turbo,vae=/srv/weights/taesd,steps=1,strength=0.5

Paths are the server's own folders; nothing is ever fetched from a hub. A path may not
contain a comma (the separator).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

CFG_MODES = ("none", "self", "full")
STREAM_MODES = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float16", "bfloat16", "float32")
COMPILE_MODES = ("off", "on", "graphs")


@dataclass(frozen=True, slots=True)
class DiffusionOptions:
    """What `--engine diffusion:...` can set; every field but `model` has a default."""

    #: A diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, ...).
    model: Path
    #: A tiny autoencoder folder (TAESD as diffusers' AutoencoderTiny) to use instead of the
    #: pipeline's VAE: StreamDiffusion measured the VAE as the costliest part of a 1-step frame.
    vae: Path | None = None
    #: An IP-Adapter weights file (.safetensors or .bin) for reference images, and the CLIP
    #: image encoder folder it was trained with. Without them, image prompts are refused.
    ip_adapter: Path | None = None
    image_encoder: Path | None = None
    #: Denoising steps per frame (1 for SD-Turbo/SDXS, 2-4 for an LCM).
    steps: int = 2
    #: The working size (pixels) the model sees; None: the model's native area at the output's
    #: aspect, rounded to what the UNet divides evenly.
    size: tuple[int, int] | None = None
    #: How far each frame is noised before denoising: 0 keeps the camera, 1 ignores it.
    strength: float = 0.5
    #: Classifier-free guidance scale; 1 or less means none (SD-Turbo and SDXS want none).
    guidance: float = 1.0
    #: How guidance gets its unconditional prediction: "self" (residual CFG: the noise the
    #: frame was noised with stands in for it, no extra UNet work), "full" (a second UNet
    #: pass on the negative prompt), "none".
    cfg: str = "self"
    negative: str = ""
    #: The similarity filter: a frame whose cosine similarity to the last one processed is
    #: above this is skipped with a probability rising to 1 at identical frames; 0 disables.
    similarity: float = 0.98
    #: At most this many frames skipped in a row (a still camera still gets fresh frames).
    max_skip: int = 10
    #: Temporal blending: the weight of the previous output latent when the camera is still
    #: (fading to 0 as the frames differ more), against flicker from camera noise.
    blend: float = 0.5
    #: Stream batch: the frames in flight at different timesteps denoised in one UNet batch.
    #: "auto": on for CUDA (one batch of N costs less than N calls there), off on the CPU.
    stream: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    compile: str = "off"
    #: At most this many sessions' frames in one UNet batch.
    batch: int = 4
    #: At most this many sessions at once; past it new ones get the at-capacity error.
    #: None: `batch`, so every session's frames fit in one UNet call.
    sessions: int | None = None
    #: CPU threads torch may use (None: torch's default).
    threads: int | None = None
    seed: int = 0
    #: The weights' variant, e.g. "fp16" for a folder with *.fp16.safetensors files only.
    variant: str | None = None

    @classmethod
    def parse(cls, spec: str) -> DiffusionOptions:
        """Options from `model=DIR,steps=2,...`; raises ValueError saying what is wrong."""
        known = {field.name for field in fields(cls)}
        values: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or not value.strip():
                raise ValueError(f"diffusion engine option {item!r} is not key=value")
            if key not in known:
                raise ValueError(
                    f"unknown diffusion engine option {key!r} (known: {', '.join(sorted(known))})"
                )
            values[key] = value.strip()
        if "model" not in values:
            raise ValueError(
                "the diffusion engine needs a model folder: --engine diffusion:model=DIR "
                "(a diffusers Stable Diffusion pipeline saved with save_pretrained)"
            )
        return cls(
            model=Path(values["model"]).expanduser(),
            vae=_path(values.get("vae")),
            ip_adapter=_path(values.get("ip_adapter")),
            image_encoder=_path(values.get("image_encoder")),
            steps=_int(values, "steps", 2, 1, 8),
            size=_size(values.get("size")),
            strength=_float(values, "strength", 0.5, 0.01, 1.0),
            guidance=_float(values, "guidance", 1.0, 0.0, 20.0),
            cfg=_choice(values, "cfg", "self", CFG_MODES),
            negative=values.get("negative", ""),
            similarity=_float(values, "similarity", 0.98, 0.0, 1.0),
            max_skip=_int(values, "max_skip", 10, 0, 1000),
            blend=_float(values, "blend", 0.5, 0.0, 0.95),
            stream=_choice(values, "stream", "auto", STREAM_MODES),
            device=_choice(values, "device", "auto", DEVICES),
            dtype=_choice(values, "dtype", "auto", DTYPES),
            compile=_choice(values, "compile", "off", COMPILE_MODES),
            batch=_int(values, "batch", 4, 1, 64),
            sessions=_int(values, "sessions", 0, 1, 1024) if "sessions" in values else None,
            threads=_int(values, "threads", 0, 1, 256) if "threads" in values else None,
            seed=_int(values, "seed", 0, 0, 2**31 - 1),
            variant=values.get("variant"),
        )


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value).expanduser()


def _int(values: dict[str, str], key: str, default: int, low: int, high: int) -> int:
    if key not in values:
        return default
    try:
        number = int(values[key])
    except ValueError:
        raise ValueError(f"diffusion engine option {key} takes a whole number") from None
    if not low <= number <= high:
        raise ValueError(f"diffusion engine option {key} takes {low} to {high}")
    return number


def _float(values: dict[str, str], key: str, default: float, low: float, high: float) -> float:
    if key not in values:
        return default
    try:
        number = float(values[key])
    except ValueError:
        raise ValueError(f"diffusion engine option {key} takes a number") from None
    if not low <= number <= high:
        raise ValueError(f"diffusion engine option {key} takes {low} to {high}")
    return number


def _choice(values: dict[str, str], key: str, default: str, choices: tuple[str, ...]) -> str:
    value = values.get(key, default)
    if value not in choices:
        raise ValueError(f"diffusion engine option {key} takes one of {', '.join(choices)}")
    return value


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    width, sep, height = value.lower().partition("x")
    try:
        size = int(width), int(height)
    except ValueError:
        size = (0, 0)
    if not sep or not all(32 <= side <= 4096 for side in size):
        raise ValueError("diffusion engine option size takes WIDTHxHEIGHT, 32 to 4096 each")
    return size
