"""What the diffusion engine delivers, in figures: fps, step-response latency and time to
first frame, at 512x512 and at the model's size, for 1 and 4 sessions sharing the engine.

    python bench/diffusion.py                                  # CUDA: SD-Turbo-shaped weights
    python bench/diffusion.py --model DIR [--vae TAESD_DIR]    # your own weights
    python bench/diffusion.py --shape tiny --sizes 64x64,model --seconds 3    # a CPU smoke run
    python bench/diffusion.py --options steps=2,compile=graphs --sessions 1 4 8

Speed does not depend on the weights' values, so without `--model` it builds a pipeline of
the right shape with random weights, saves it with `save_pretrained` into a temporary folder
and loads it through the engine's own loading code: `sd-turbo` (the default on CUDA) is the
SD 2.1 UNet config at SD-Turbo's 512 px, the SD VAE and a 23-layer 1024-wide CLIP text
encoder (`--taesd` adds a TAESD-shaped tiny autoencoder); `tiny` (the default on the CPU) is
the tests' tiny pipeline. It says so in its output: the pictures of random weights mean
nothing, only the times do.

In process, no server and no codec: each session runs on its own thread, as the server's
worker threads run them, frames handed over as fast as it takes them (no camera pacing).
The camera is the astronaut photo panning 4 px a frame, its brightness stepping between
100% and 55% every `--hold` frames; the similarity filter is off (`similarity=0`) unless
`--options` sets it, so every frame is denoised.

- fps: frames out per second, per session (median) and for all sessions together.
- step response: from handing over the first frame of a new brightness to the first output
  that has gone half way from the picture before the step to the picture at the end of the
  hold (mean absolute difference, so it needs no trained weights); in ms and in frames
  (stream batch delays by steps - 1 frames, by design).
- time to first frame: from opening a session and setting its prompt to its first output,
  the engine already loaded (its load, warm-up included, is given apart).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from av import VideoFrame

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.media import photo

from livemorph.engines.base import Controls
from livemorph.models import CATALOG

SPEC = CATALOG["mirage"]


def build_sd_turbo_shaped(folder: Path, taesd: Path | None) -> Path:
    """A Stable Diffusion 2.1-shaped pipeline (SD-Turbo's shapes) with random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        LCMScheduler,
        StableDiffusionImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from tests.tiny_diffusion import _clip_vocabulary
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    vocabulary, merges = _clip_vocabulary()
    words = folder.parent / "words"
    words.mkdir(parents=True, exist_ok=True)
    import json

    (words / "vocab.json").write_text(json.dumps(vocabulary))
    (words / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(words), model_max_length=77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1024,
        )
    )
    pipeline = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=LCMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder))
    if taesd is not None:
        AutoencoderTiny().save_pretrained(str(taesd))  # the default config is TAESD's shape
    return folder


def camera(count: int, hold: int) -> list[np.ndarray]:
    """The astronaut panning 4 px a frame, brightness stepping every `hold` frames."""
    base = photo(SPEC.width + 4 * count, SPEC.height)
    frames = []
    for i in range(count):
        level = 1.0 if (i // hold) % 2 == 0 else 0.55
        window = base[:, 4 * i : 4 * i + SPEC.width]
        frames.append((window * level).astype(np.uint8))
    return frames


@dataclass
class Run:
    first_frame: float = 0.0
    fed: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    outputs: list[np.ndarray] = field(default_factory=list)


def drive(
    engine, frames: list[np.ndarray], seconds: float, run: Run, start: threading.Barrier
) -> None:
    video = [
        VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p") for rgb in frames
    ]
    start.wait()
    opened = time.perf_counter()
    session = engine.open_session(SPEC)
    try:
        session.configure(Controls(prompt="a marble statue, studio light"))
        deadline = None
        for i, frame in enumerate(video * 1000):
            run.fed.append(time.perf_counter())
            out = session.transform(frame).to_ndarray(format="rgb24")
            run.done.append(time.perf_counter())
            run.outputs.append(out[::8, ::8].astype(np.int16))
            if i == 0:
                run.first_frame = run.done[0] - opened
                deadline = run.done[0] + seconds
            if deadline is not None and run.done[-1] >= deadline:
                break
    finally:
        session.close()


def step_responses(run: Run, hold: int) -> list[tuple[float, int]]:
    """(ms, frames) from each brightness step to the first output half way there."""
    results = []
    outputs = run.outputs
    for step in range(hold, len(outputs) - hold + 1, hold):
        before, after = outputs[step - 1], outputs[step + hold - 1]
        full = np.abs(after - before).mean()
        if full < 1:
            continue
        for k in range(step, step + hold):
            if np.abs(outputs[k] - before).mean() >= full / 2:
                results.append(((run.done[k] - run.fed[step]) * 1000, k - step))
                break
    return results


def measure(engine, sessions: int, seconds: float, hold: int) -> dict[str, float]:
    frames = camera(4 * hold, hold)
    runs = [Run() for _ in range(sessions)]
    start = threading.Barrier(sessions)
    threads = [
        threading.Thread(target=drive, args=(engine, frames, seconds, run, start)) for run in runs
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    fps = [(len(run.done) - 1) / (run.done[-1] - run.done[0]) for run in runs if len(run.done) > 1]
    steps = [item for run in runs for item in step_responses(run, hold)]
    return {
        "fps": statistics.median(fps),
        "total_fps": sum(fps),
        "step_ms": statistics.median(ms for ms, _ in steps) if steps else float("nan"),
        "step_frames": statistics.median(n for _, n in steps) if steps else float("nan"),
        "steps": len(steps),
        "first_ms": statistics.median(run.first_frame for run in runs) * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a diffusers pipeline folder (real weights)")
    parser.add_argument("--vae", type=Path, help="a TAESD (AutoencoderTiny) folder")
    parser.add_argument("--shape", choices=("sd-turbo", "tiny"), help="random weights' shape")
    parser.add_argument("--taesd", action="store_true", help="random weights: add a TAESD")
    parser.add_argument("--sizes", default="512x512,model", help="working sizes; model: 1280x704")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--hold", type=int, default=12, help="frames per brightness level")
    parser.add_argument("--options", default="steps=1", help="more engine options, k=v,...")
    args = parser.parse_args()

    import torch

    from livemorph.engines.diffusion.engine import DiffusionEngine

    cuda = torch.cuda.is_available()
    shape = args.shape or ("sd-turbo" if cuda else "tiny")
    with contextlib.ExitStack() as stack:
        model, vae = args.model, args.vae
        if model is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            began = time.perf_counter()
            if shape == "tiny":
                from tests.tiny_diffusion import build_tiny_pipeline, build_tiny_taesd

                model = build_tiny_pipeline(root / "pipeline")
                vae = build_tiny_taesd(root / "taesd") if args.taesd else None
            else:
                vae = root / "taesd" if args.taesd else None
                model = build_sd_turbo_shaped(root / "pipeline", vae)
            print(
                f"weights: RANDOM, {shape}-shaped{' with a TAESD' if vae else ''} (built and "
                f"saved in {time.perf_counter() - began:.1f} s): the times are real, the "
                "pictures mean nothing"
            )
        else:
            print(f"weights: {model}")
        device = f"CUDA {torch.cuda.get_device_name()}" if cuda else "CPU"
        print(f"torch {torch.__version__}, {device}")
        print(
            f"{'size':>10} {'sessions':>8} {'fps':>7} {'all fps':>8} {'step ms':>8} "
            f"{'frames':>6} {'first ms':>9}"
        )
        for size in args.sizes.split(","):
            size = f"{SPEC.width}x{SPEC.height}" if size == "model" else size
            spec = f"model={model},size={size},similarity=0"
            spec += f",vae={vae}" if vae else ""
            spec += f",{args.options}" if args.options else ""
            began = time.perf_counter()
            engine = DiffusionEngine(spec)
            loaded = time.perf_counter() - began
            options = spec.split(",", 1)[1]
            print(f"{size:>10}  engine loaded and warmed up in {loaded:.1f} s ({options})")
            for sessions in args.sessions:
                r = measure(engine, sessions, args.seconds, args.hold)
                print(
                    f"{size:>10} {sessions:>8} {r['fps']:>7.1f} {r['total_fps']:>8.1f} "
                    f"{r['step_ms']:>8.0f} {r['step_frames']:>6.0f} {r['first_ms']:>9.0f}"
                )
            engine.close()
            del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
