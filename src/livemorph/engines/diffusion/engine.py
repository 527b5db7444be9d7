"""Streaming img2img on a Stable Diffusion pipeline the user brings (SD-Turbo, SDXS, SD 1.5
with an LCM LoRA fused, ...), with what makes StreamDiffusion (arXiv 2312.12491) fast:

- **Stream batch.** With N denoising steps, N frames are in flight at once, each at its own
  timestep, and one UNet call advances all of them: the newest frame takes its first step
  while the oldest takes its last and leaves. On a GPU a batch of N costs far less than N
  calls (the paper: 1.5x faster than sequential steps at N=4 on an RTX 4090); on the CPU it
  saves nothing, so `stream=auto` turns it on for CUDA only. The first frame of a session and
  the first after a prompt change are denoised through all N steps at once, so the picture
  is complete from the first frame and a new prompt governs the very next one.
- **Residual CFG** (`cfg=self`): guidance without a second UNet pass, the noise each frame
  was noised with standing in for the unconditional prediction.
- **A stochastic similarity filter**: a frame nearly identical to the last one processed is
  skipped (its output repeated) with a probability rising to 1 at identical frames.
- **A tiny autoencoder** (TAESD as diffusers' `AutoencoderTiny`) when given by path.
- **fp16 and channels-last on CUDA**, optional `torch.compile` (`compile=graphs` adds CUDA
  graphs through its reduce-overhead mode).

Temporal consistency: each session noises its frames with fixed noise (one draw per step,
seeded), so img2img is a deterministic function of the camera frame and a still camera gives
a still picture; and the latent of each output is blended with the previous one in
proportion to how still the camera is, which damps flicker from sensor and codec noise
without ghosting motion.

Sessions sharing the engine are batched: their UNet calls that arrive while one is running
go together in the next call (`batch=N` at most), without any added wait.

Threading contract: the pipeline calls a session's `configure` and `transform` on worker
threads, never concurrently for one session; different sessions run concurrently. The
weights are shared and only read (inference mode); the prompt-embedding cache and the UNet
batcher take locks.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from av import VideoFrame

from ...media.frames import OUTPUT_FORMAT, center_crop, fit_frame, frame_from_yuv, yuv_planes
from ...models import CATALOG, RESTYLE, ModelSpec
from ..base import Controls, Engine, EngineRefused, EngineSession
from . import DiffusionLoadError, require_runtime
from .options import DiffusionOptions

logger = logging.getLogger(__name__)

#: Prompts whose embeddings are kept (a 77x1024 fp16 embedding is 160 KB).
EMBEDDING_CACHE = 32
#: Input similarity at and above which blending starts; full weight at identical frames.
STILL_FROM = 0.95

IMAGE_REFUSED = (
    "image prompts are not allowed on this server's diffusion model: it has no IP-Adapter "
    "weights; send a text prompt instead"
)


def _device_and_dtype(options: DiffusionOptions) -> tuple[torch.device, torch.dtype]:
    if options.device == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    else:
        name = options.device
    if name == "cuda" and not torch.cuda.is_available():
        raise DiffusionLoadError(
            f"device=cuda was asked for, but this torch ({torch.__version__}) sees no CUDA "
            "device; install a CUDA build of torch or use device=cpu"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise DiffusionLoadError("device=mps was asked for, but torch sees no MPS device")
    if options.dtype == "auto":
        dtype = torch.float32 if name == "cpu" else torch.float16
    else:
        dtype = getattr(torch, options.dtype)
    if name == "cpu" and dtype == torch.float16:
        raise DiffusionLoadError("dtype=float16 is not supported on the CPU: use float32")
    return torch.device(name), dtype


def _dtype_keyword(package: str) -> str:
    """`from_pretrained`'s load-time dtype keyword: `dtype` in transformers 5 and in the
    diffusers releases that deprecate `torch_dtype`, `torch_dtype` before them."""
    if package == "transformers":
        import transformers

        return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _check_folder(options: DiffusionOptions) -> None:
    """Clear errors for the usual mistakes, before diffusers gives a less clear one."""
    folder = options.model
    if not folder.is_dir():
        raise DiffusionLoadError(
            f"diffusion model folder {folder} does not exist: give model=DIR, a diffusers "
            "pipeline folder on this machine (weights are never downloaded at run time)"
        )
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise DiffusionLoadError(
            f"{folder} is not a diffusers pipeline folder: it has no model_index.json (save "
            "one with save_pretrained, or get the model in the diffusers layout)"
        )
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as exc:
        raise DiffusionLoadError(f"{index_file} is not readable JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise DiffusionLoadError(f"{index_file} is not a diffusers model index")
    if "text_encoder_2" in index:
        raise DiffusionLoadError(
            f"{folder} is an SDXL pipeline (two text encoders), which this engine does not "
            "run yet: use an SD 1.x/2.x model such as SD-Turbo, SDXS or SD 1.5 + LCM LoRA"
        )
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer") if part not in index]
    if missing:
        raise DiffusionLoadError(
            f"{folder} is not a Stable Diffusion pipeline: model_index.json lists no "
            f"{', '.join(missing)}"
        )
    absent = [
        part
        for part in ("unet", "vae", "text_encoder", "tokenizer")
        if not (folder / part).is_dir()
    ]
    if absent:
        raise DiffusionLoadError(
            f"{folder} is incomplete: model_index.json lists {', '.join(absent)}, but the "
            f"folder{'s are' if len(absent) > 1 else ' is'} missing"
        )
    for path, what in ((options.vae, "vae"), (options.image_encoder, "image_encoder")):
        if path is not None and not path.is_dir():
            raise DiffusionLoadError(f"diffusion engine option {what}: {path} is not a folder")
    if options.ip_adapter is not None and not options.ip_adapter.is_file():
        raise DiffusionLoadError(
            f"diffusion engine option ip_adapter: {options.ip_adapter} is not a file"
        )
    if options.ip_adapter is not None and options.image_encoder is None:
        raise DiffusionLoadError(
            "diffusion engine option ip_adapter needs image_encoder=DIR too: the CLIP image "
            "encoder folder the adapter was trained with"
        )


class Model:
    """The loaded weights and the arithmetic around them; shared by all sessions.

    Every method is a pure function of its arguments (inference only), safe to call from
    several threads at once.
    """

    def __init__(self, options: DiffusionOptions) -> None:
        require_runtime()
        _check_folder(options)
        self.device, self.dtype = _device_and_dtype(options)
        if options.threads is not None:
            torch.set_num_threads(options.threads)

        from diffusers import AutoencoderTiny, LCMScheduler, StableDiffusionImg2ImgPipeline
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        dtype: dict[str, Any] = {_dtype_keyword("diffusers"): self.dtype}
        try:
            pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
                str(options.model),
                local_files_only=True,
                variant=options.variant,
                **dtype,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        except Exception as exc:
            raise DiffusionLoadError(
                f"could not load the diffusers pipeline in {options.model}: {exc}"
            ) from exc
        tiny = None
        if options.vae is not None:
            try:
                tiny = AutoencoderTiny.from_pretrained(
                    str(options.vae), local_files_only=True, **dtype
                )
            except Exception as exc:
                raise DiffusionLoadError(
                    f"could not load a tiny autoencoder (AutoencoderTiny) from {options.vae}: {exc}"
                ) from exc
        self.pipe = pipe
        self.ip_adapter = False
        if options.ip_adapter is not None:
            self._load_ip_adapter(options)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder, tiny, pipe.image_encoder):
            if module is not None:
                if module.device != self.device:
                    module.to(self.device)
                module.eval()
        self.unet: Any = pipe.unet
        self.vae: Any = tiny if tiny is not None else pipe.vae
        self.tiny_vae = tiny is not None
        self.text_encoder: Any = pipe.text_encoder
        self.tokenizer: Any = pipe.tokenizer
        if self.device.type == "cuda":
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if options.compile != "off":
            mode = "reduce-overhead" if options.compile == "graphs" else None
            self.unet = torch.compile(self.unet, mode=mode)
            self.vae.decoder = torch.compile(self.vae.decoder, mode=mode)

        scheduler: Any = pipe.scheduler
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise DiffusionLoadError(
                f"the scheduler in {options.model}/scheduler ({type(scheduler).__name__}) "
                "has no alphas_cumprod: use a DDPM-family scheduler config (LCM, DDIM, Euler)"
            )
        self.alphas = torch.as_tensor(alphas, dtype=torch.float32).to(self.device)
        self.train_steps = len(self.alphas)
        config = dict(scheduler.config)
        self.prediction = config.get("prediction_type", "epsilon")
        if self.prediction not in ("epsilon", "v_prediction"):
            raise DiffusionLoadError(
                f"prediction_type {self.prediction!r} is not supported (epsilon, v_prediction)"
            )
        #: LCM's boundary condition (c_skip, c_out) when the folder's scheduler is an LCM.
        self.lcm_scaling: float | None = (
            float(config.get("timestep_scaling", 10.0))
            if isinstance(scheduler, LCMScheduler)
            else None
        )
        vae_config = pipe.vae.config
        self.vae_scale = 2 ** (len(vae_config.block_out_channels) - 1)
        self.scaling = float(self.vae.config.get("scaling_factor", 1.0) or 1.0)
        self.shift = float(self.vae.config.get("shift_factor", 0.0) or 0.0)
        self.latent_channels = int(pipe.unet.config.in_channels)
        self.native = int(pipe.unet.config.sample_size) * self.vae_scale
        #: Working sizes are multiples of this: the UNet halves the latents once per block.
        self.unit = self.vae_scale * 2 ** (len(pipe.unet.config.block_out_channels) - 1)

    def _load_ip_adapter(self, options: DiffusionOptions) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        assert options.ip_adapter is not None and options.image_encoder is not None
        try:
            encoder = CLIPVisionModelWithProjection.from_pretrained(
                str(options.image_encoder),
                local_files_only=True,
                **cast(dict[str, Any], {_dtype_keyword("transformers"): self.dtype}),
            )
            # The encoder folder's own preprocessor config if it has one, else CLIP's
            # (224 px), which the published IP-Adapters' ViT-H and ViT-bigG encoders use.
            has_config = (options.image_encoder / "preprocessor_config.json").is_file()
            processor = (
                CLIPImageProcessor.from_pretrained(str(options.image_encoder))
                if has_config
                else CLIPImageProcessor()
            )
            self.pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
            self.pipe.load_ip_adapter(
                str(options.ip_adapter.parent),
                subfolder="",
                weight_name=options.ip_adapter.name,
                image_encoder_folder=None,
                local_files_only=True,
            )
        except Exception as exc:
            raise DiffusionLoadError(
                f"could not load the IP-Adapter {options.ip_adapter} with the image encoder "
                f"in {options.image_encoder}: {exc}"
            ) from exc
        self.ip_adapter = True

    def describe(self) -> str:
        unet = type(self.pipe.unet).__name__
        vae = "tiny autoencoder" if self.tiny_vae else "full VAE"
        return (
            f"{unet} on {self.device.type} ({str(self.dtype).removeprefix('torch.')}), {vae}, "
            f"native {self.native}px, {self.prediction} prediction, torch {torch.__version__}"
        )

    # -- the arithmetic ---------------------------------------------------------------

    def embed(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        embeds: torch.Tensor = self.text_encoder(ids)[0]
        return embeds.to(self.dtype)

    def image_embeds(self, rgb: np.ndarray | None) -> torch.Tensor:
        """IP-Adapter image embeddings of a reference picture; zeros (its unconditional
        input) for none."""
        from PIL import Image

        if rgb is None:
            size = int(self.pipe.image_encoder.config.projection_dim)
            return torch.zeros((1, 1, size), device=self.device, dtype=self.dtype)
        embeds, _ = self.pipe.encode_image(Image.fromarray(rgb), self.device, 1)
        result: torch.Tensor = embeds.to(self.dtype)
        return result if result.dim() == 3 else result[:, None]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] to scaled latents (the mean, not a sample: no extra noise)."""
        encoded = self.vae.encode(images)
        latents = encoded.latents if self.tiny_vae else encoded.latent_dist.mode()
        result: torch.Tensor = (latents - self.shift) * self.scaling
        return result

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images: torch.Tensor = self.vae.decode(latents / self.scaling + self.shift).sample
        return images

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas[t].view(-1, 1, 1, 1)
        return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(self.dtype)

    def unet_call(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, images: torch.Tensor | None
    ) -> torch.Tensor:
        extra = None if images is None else {"image_embeds": [images]}
        out: torch.Tensor = self.unet(
            x, t, encoder_hidden_states=embeds, added_cond_kwargs=extra, return_dict=False
        )[0]
        return out

    def to_eps(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "epsilon":
            return out.float()
        a = self.alphas[t].view(-1, 1, 1, 1)
        return a.sqrt() * out.float() + (1 - a).sqrt() * x.float()

    def to_x0(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.alphas[t].view(-1, 1, 1, 1)
        x0 = (x.float() - (1 - a).sqrt() * eps) / a.sqrt()
        if self.lcm_scaling is not None:
            scaled = t.float().view(-1, 1, 1, 1) * self.lcm_scaling
            c_skip = 0.25 / (scaled**2 + 0.25)
            c_out = scaled / (scaled**2 + 0.25).sqrt()
            x0 = c_out * x0 + c_skip * x.float()
        return x0.to(self.dtype)


@dataclass(eq=False)  # jobs are told apart by identity (a queue's `remove`), not by tensors
class _Job:
    x: torch.Tensor
    t: torch.Tensor
    embeds: torch.Tensor
    images: torch.Tensor | None
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: torch.Tensor | None = None
    error: BaseException | None = None

    def key(self) -> tuple[object, ...]:
        images = None if self.images is None else tuple(self.images.shape[1:])
        return tuple(self.x.shape[1:]), tuple(self.embeds.shape[1:]), images


class Batcher:
    """One UNet call for the sessions whose calls arrive while another call runs.

    No call waits for company: the first caller runs at once; calls arriving meanwhile
    queue, and when it finishes, one of them leads the next call with every queued call of
    the same shapes (at most `limit` of them). So one session alone pays nothing, and N
    sessions on a GPU pay about one batched call per frame instead of N calls.
    """

    def __init__(self, run: Callable[..., torch.Tensor], limit: int) -> None:
        self._run = run
        self._limit = limit
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._busy = False
        self.calls = 0
        self.batched = 0

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, images: torch.Tensor | None
    ) -> torch.Tensor:
        job = _Job(x, t, embeds, images)
        with self._lock:
            self._queue.append(job)
            job.lead = not self._busy
            self._busy = True
        if not job.lead:
            job.done.wait()
        if job.lead:
            self._lead(job)
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _lead(self, job: _Job) -> None:
        with self._lock:
            key = job.key()
            same = [other for other in self._queue if other is not job and other.key() == key]
            group = [job, *same[: self._limit - 1]]
            for member in group:
                self._queue.remove(member)
        try:
            sizes = [member.x.shape[0] for member in group]
            images = [m.images for m in group]
            out = self._run(
                torch.cat([m.x for m in group]),
                torch.cat([m.t for m in group]),
                torch.cat([m.embeds for m in group]),
                None if images[0] is None else torch.cat(images),
            )
            for member, result in zip(group, out.split(sizes), strict=True):
                member.result = result
        except BaseException as exc:
            for member in group:
                member.error = exc
        self.calls += 1
        self.batched += len(group)
        with self._lock:
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
                successor.done.set()
            else:
                self._busy = False
        for member in group:
            if member is not job:
                member.done.set()


class DiffusionEngine(Engine):
    """A Stable Diffusion pipeline folder, loaded once; one `DiffusionSession` per stream."""

    name = "diffusion"

    def __init__(self, options: str = "") -> None:
        try:
            self.options = DiffusionOptions.parse(options)
        except ValueError as exc:
            raise DiffusionLoadError(str(exc)) from exc
        self.model = Model(self.options)
        model = self.model
        self.stream = self.options.stream == "on" or (
            self.options.stream == "auto" and model.device.type == "cuda"
        )
        self.timesteps = self._timesteps()
        self._cache: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._sessions: weakref.WeakSet[DiffusionSession] = weakref.WeakSet()
        self._sessions_lock = threading.Lock()
        self.batcher = Batcher(model.unet_call, self.options.batch)
        logger.info(
            "diffusion engine: %s; %d step(s) at timesteps %s, stream batch %s, guidance %.1f"
            " (%s), similarity filter %s, blend %.2f, compile %s",
            model.describe(),
            self.options.steps,
            self.timesteps.tolist(),
            "on" if self.stream else "off",
            self.options.guidance,
            self.options.cfg if self.guided else "none",
            self.options.similarity or "off",
            self.options.blend,
            self.options.compile,
        )
        self._warm_up()

    @property
    def guided(self) -> bool:
        return self.options.guidance > 1.0 and self.options.cfg != "none"

    def _timesteps(self) -> torch.Tensor:
        """N timesteps from `strength` down, evenly spaced: strength 0.5, 2 steps: 499, 249."""
        total = self.model.train_steps
        first = min(total - 1, max(1, round(self.options.strength * total) - 1))
        stride = (first + 1) / self.options.steps
        steps = [round(first - i * stride) for i in range(self.options.steps)]
        return torch.tensor(steps, dtype=torch.long, device=self.model.device)

    def working_size(self, spec: ModelSpec) -> tuple[int, int]:
        """The size the model works at for this output: the `size` option, or the model's
        native area at the output's aspect; both rounded to multiples of the UNet's unit."""
        unit = self.model.unit
        if self.options.size is not None:
            width, height = self.options.size
        else:
            area = self.model.native**2
            aspect = spec.width / spec.height
            width, height = round((area * aspect) ** 0.5), round((area / aspect) ** 0.5)
        return max(unit, round(width / unit) * unit), max(unit, round(height / unit) * unit)

    def embeddings(self, prompt: str) -> torch.Tensor:
        """The text encoder's output for `prompt`, computed once and cached (LRU)."""
        key = (prompt, "text")
        with self._cache_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        with torch.inference_mode():
            embeds = self.model.embed(prompt)
        with self._cache_lock:
            self._cache[key] = embeds
            while len(self._cache) > EMBEDDING_CACHE:
                self._cache.popitem(last=False)
        return embeds

    def denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        embeds: torch.Tensor,
        images: torch.Tensor | None,
    ) -> torch.Tensor:
        """One step for a batch of noisy latents `x` at timesteps `t`: the predicted clean
        latents. `noise` is what each was noised with (residual CFG's stand-in)."""
        model, batch = self.model, x.shape[0]
        cond = embeds.expand(batch, -1, -1)
        image_batch = None if images is None else images.expand(batch, -1, -1)
        if self.guided and self.options.cfg == "full":
            negative = self.embeddings(self.options.negative).expand(batch, -1, -1)
            uncond_images = None if images is None else torch.zeros_like(image_batch)
            out = self.batcher(
                torch.cat([x, x]),
                torch.cat([t, t]),
                torch.cat([negative, cond]),
                None if images is None else torch.cat([uncond_images, image_batch]),
            )
            uncond, eps = model.to_eps(out, torch.cat([x, x]), torch.cat([t, t])).chunk(2)
            eps = uncond + self.options.guidance * (eps - uncond)
        else:
            eps = model.to_eps(self.batcher(x, t, cond, image_batch), x, t)
            if self.guided:  # residual CFG: the frame's own noise as the unconditional
                eps = noise.float() + self.options.guidance * (eps - noise.float())
        return model.to_x0(x, eps, t)

    def _warm_up(self) -> None:
        """One frame through a throwaway session: it checks that the folder's parts fit
        together (a broken folder fails at start, not on a client's first frame), and pays
        the first call's one-time costs (allocations, autotuning, compiling) up front."""
        spec = next(spec for spec in CATALOG.values() if spec.kind == RESTYLE)
        session = self.open_session(spec)
        try:
            session.configure(Controls(prompt="a photo"))
            session.transform(VideoFrame(spec.width, spec.height, OUTPUT_FORMAT))
        except Exception as exc:
            raise DiffusionLoadError(
                f"the pipeline in {self.options.model} loaded but failed on a first frame: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            session.close()

    def full(self) -> bool:
        """At `sessions=` open sessions (by default `batch`, so that all their frames fit in
        one UNet call): a session more would slow every session on the GPU, so the server
        refuses it with the at-capacity error instead."""
        limit = self.options.sessions or self.options.batch
        with self._sessions_lock:
            return len(self._sessions) >= limit

    def open_session(self, spec: ModelSpec) -> EngineSession:
        session = DiffusionSession(self, spec)
        with self._sessions_lock:
            self._sessions.add(session)
        return session

    def session_closed(self, session: DiffusionSession) -> None:
        with self._sessions_lock:
            self._sessions.discard(session)
            remaining = list(self._sessions)
        if not remaining:
            with self._cache_lock:
                self._cache.clear()
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()
        logger.info(
            "diffusion session closed after %d frames (%d skipped as near-identical); "
            "%d open, %d bytes held by sessions%s",
            session.frames,
            session.skipped,
            len(remaining),
            self.held_bytes(),
            self._device_memory(),
        )

    def held_bytes(self) -> int:
        """Bytes of tensors the open sessions hold (latents, noise, embeddings, frames)."""
        with self._sessions_lock:
            sessions = list(self._sessions)
        embeds = {id(s.embeds): s.embeds for s in sessions if s.embeds is not None}
        return sum(s.held_bytes() for s in sessions) + sum(
            e.numel() * e.element_size() for e in embeds.values()
        )

    def _device_memory(self) -> str:
        if self.model.device.type != "cuda":
            return ""
        allocated = torch.cuda.memory_allocated(self.model.device) / 2**20
        return f", {allocated:.0f} MiB allocated on {self.model.device}"

    def close(self) -> None:
        with self._cache_lock:
            self._cache.clear()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class DiffusionSession(EngineSession):
    """One stream's state: its prompt's embeddings, its fixed noise, the frames in flight."""

    def __init__(self, engine: DiffusionEngine, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._engine = engine
        model = engine.model
        self.size = engine.working_size(spec)
        width, height = self.size
        latent = (model.latent_channels, height // model.vae_scale, width // model.vae_scale)
        generator = torch.Generator().manual_seed(engine.options.seed)
        steps = engine.options.steps
        self._noise: torch.Tensor | None = torch.randn((steps, *latent), generator=generator).to(
            model.device, model.dtype
        )
        self._t = engine.timesteps
        self._rng = random.Random(engine.options.seed)
        self.embeds: torch.Tensor | None = None
        self._images: torch.Tensor | None = None
        self._prompt: str | None = None
        self._reference: np.ndarray | None = None
        self._buffer: torch.Tensor | None = None  # frames in flight, at timesteps t[1:]
        self._last_input: torch.Tensor | None = None
        self._last_latent: torch.Tensor | None = None
        #: The last output's Y, U and V planes: repeated when a frame is skipped.
        self._last_output: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._skips = 0
        #: Processed frames in a row alike enough to skip: with stream batch, only once all
        #: the frames in flight are alike may one be skipped.
        self._calm = 0
        #: Each processed frame's likeness to the one before it, for the frames in flight.
        self._similarities: deque[float | None] = deque(maxlen=engine.options.steps)
        self.frames = 0
        self.skipped = 0

    # -- controls ---------------------------------------------------------------------

    def configure(self, controls: Controls) -> None:
        engine = self._engine
        if controls.image is not None and not engine.model.ip_adapter:
            raise EngineRefused(IMAGE_REFUSED)
        if controls.passthrough:
            self.embeds, self._images, self._prompt, self._reference = None, None, None, None
            self._restart()
            return
        prompt = controls.prompt or ""
        changed = False
        if prompt != self._prompt or self.embeds is None:
            self.embeds, self._prompt, changed = engine.embeddings(prompt), prompt, True
        if engine.model.ip_adapter and (
            changed or controls.image is not self._reference or self._images is None
        ):
            with torch.inference_mode():
                self._images = engine.model.image_embeds(controls.image)
            self._reference, changed = controls.image, True
        if changed:
            self._restart()

    def _restart(self) -> None:
        """Forget the frames in flight: the next frame is denoised whole under the new
        controls, so a change governs the very next output."""
        self._buffer = None
        self._last_latent = None
        self._last_input = None
        self._last_output = None
        self._skips = 0
        self._calm = len(self._t)  # the stream is primed with copies of the next frame
        self._similarities.clear()

    # -- frames -----------------------------------------------------------------------

    def transform(self, frame: VideoFrame) -> VideoFrame:
        if self.embeds is None:
            return fit_frame(frame, self.spec.width, self.spec.height)
        with torch.inference_mode():
            image = self._input(frame)
            similarity = self._similarity(image)
            if self._skip(similarity):
                self.skipped += 1
                assert self._last_output is not None
                return frame_from_yuv(*self._last_output)
            latent = self._denoise(image)
            # The output is the frame that entered len(self._similarities) - 1 frames ago
            # (stream batch); it is blended with the output before it as far as the two
            # camera frames they came from are alike.
            self._similarities.append(similarity)
            alike = self._similarities[0] if self._engine.stream else similarity
            if self._last_latent is not None and alike is not None:
                still = min(1.0, max(0.0, (alike - STILL_FROM) / (1 - STILL_FROM)))
                weight = self._engine.options.blend * still
                if weight > 0:
                    latent = torch.lerp(latent, self._last_latent, weight)
            self._last_latent = latent
            self._last_input = image
            planes = self._output(latent)
        self._last_output = planes
        self.frames += 1
        return frame_from_yuv(*planes)

    def _input(self, frame: VideoFrame) -> torch.Tensor:
        """The camera frame cropped to the output's aspect, at the working size, in [-1, 1]."""
        model = self._engine.model
        width, height = self.size
        aspect = self.spec.width / self.spec.height
        if abs(frame.width / frame.height / aspect - 1) < 0.02:
            rgb = frame.to_ndarray(width=width, height=height, format="rgb24")
        else:
            rgb = center_crop(frame.to_ndarray(format="rgb24"), aspect)
        tensor = torch.from_numpy(np.ascontiguousarray(rgb)).to(model.device)
        image = tensor.permute(2, 0, 1)[None].float()
        if image.shape[-2:] != (height, width):
            image = F.interpolate(
                image, size=(height, width), mode="bilinear", antialias=True, align_corners=False
            )
        return (image / 127.5 - 1).to(model.dtype)

    def _similarity(self, image: torch.Tensor) -> float | None:
        if self._last_input is None:
            return None
        return float(
            F.cosine_similarity(image.flatten().float(), self._last_input.flatten().float(), 0)
        )

    def _skip(self, similarity: float | None) -> bool:
        """StreamDiffusion's stochastic similarity filter: skip with probability
        1 - (1 - similarity) / (1 - threshold), but never more than `max_skip` in a row, and
        never while frames unlike this one are still in flight (stream batch)."""
        threshold = self._engine.options.similarity
        if similarity is None or threshold <= 0 or self._last_output is None:
            return False
        if self._calm < len(self._t) - 1:
            # The frames still in flight differ from this one: skipping now would hold
            # their picture back; they are flushed first.
            self._calm = self._calm + 1 if similarity >= threshold else 0
            return False
        if self._skips >= self._engine.options.max_skip:
            self._skips = 0
            self._calm = self._calm + 1 if similarity >= threshold else 0
            return False
        probability = 1 - (1 - similarity) / (1 - threshold) if threshold < 1 else 0.0
        if self._rng.random() < probability:
            self._skips += 1
            return True
        self._skips = 0
        self._calm = self._calm + 1 if similarity >= threshold else 0
        return False

    def _denoise(self, image: torch.Tensor) -> torch.Tensor:
        engine, model = self._engine, self._engine.model
        noise, t, embeds = self._noise, self._t, self.embeds
        assert noise is not None and embeds is not None
        noisy = model.add_noise(model.encode(image), noise[:1], t[:1])
        if engine.stream and self._buffer is not None:
            # The new frame takes its first step while the older ones take their next.
            x0 = engine.denoise(torch.cat([noisy, self._buffer]), t, noise, embeds, self._images)
            self._buffer = model.add_noise(x0[:-1], noise[1:], t[1:])
            return x0[-1:]
        states = []
        x = noisy
        for i in range(len(t)):
            x0 = engine.denoise(x, t[i : i + 1], noise[i : i + 1], embeds, self._images)
            if i + 1 < len(t):
                x = model.add_noise(x0, noise[i + 1 : i + 2], t[i + 1 : i + 2])
                states.append(x)
        if engine.stream and states:
            # The stream starts full of this frame at each later step.
            self._buffer = torch.cat(states)
        return x0

    def _output(self, latent: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The decoded picture at the model's size as yuv420p planes. On a GPU they are
        made there: swscale's RGB to yuv420p of a 1280x704 frame took 9.4 ms of CPU on the
        bench machine, building a frame from planes 0.16 ms. On the CPU swscale is the
        faster (torch's elementwise conversion took 17 ms on one thread)."""
        decoded = self._engine.model.decode(latent).float()
        if decoded.shape[-2:] != (self.spec.height, self.spec.width):
            decoded = F.interpolate(
                decoded, size=(self.spec.height, self.spec.width), mode="bilinear"
            )
        rgb = ((decoded[0] + 1) * 127.5).clamp(0, 255)
        if rgb.device.type != "cpu":
            return yuv420(rgb)
        pixels = rgb.round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
        frame = VideoFrame.from_ndarray(pixels, format="rgb24").reformat(format=OUTPUT_FORMAT)
        return yuv_planes(frame)

    def held_bytes(self) -> int:
        """Bytes of the tensors this session holds (not counting shared embeddings)."""
        tensors = (self._noise, self._images, self._buffer, self._last_input, self._last_latent)
        output = 0 if self._last_output is None else sum(p.nbytes for p in self._last_output)
        return sum(_nbytes(tensor) for tensor in tensors) + output

    def close(self) -> None:
        self._noise = self.embeds = self._images = self._buffer = None
        self._last_input = self._last_latent = None
        self._last_output = self._reference = None
        self._engine.session_closed(self)


#: RGB to BT.601 limited-range YUV, as swscale converts rgb24 to yuv420p by default.
_Y = (0.256788, 0.504129, 0.097906)
_U = (-0.148223, -0.290993, 0.439216)
_V = (0.439216, -0.367788, -0.071427)


def yuv420(rgb: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(3, H, W) RGB in 0-255 (H, W even) to Y, U, V uint8 planes, chroma averaged 2x2."""

    def plane(
        pixels: torch.Tensor, weights: tuple[float, float, float], offset: float
    ) -> np.ndarray:
        r, g, b = pixels
        value = offset + weights[0] * r + weights[1] * g + weights[2] * b
        return value.round().clamp(0, 255).to(torch.uint8).cpu().numpy()

    half = F.avg_pool2d(rgb[None], 2)[0]
    return plane(rgb, _Y, 16.0), plane(half, _U, 128.0), plane(half, _V, 128.0)
