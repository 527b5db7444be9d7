"""What each viewer of a session costs the server, with the shared encoder and without.

    python bench/viewers.py                          # 0, 1, 2, 4, 8 viewers, both modes
    python bench/viewers.py --viewers 0 1 4 --seconds 20 --modes shared

A real `livemorph serve --engine passthrough` (the engine costs ~nothing, so what changes
with the viewers is the encoding and sending) gets one `mirage` session from the Python
SDK: a panning picture at the model's size and rate (1280x704, 25 fps). Viewers then
join through `client.realtime.subscribe`, one count after another; each count is held
for `--warmup` seconds (keyframes, the bitrate's ramp) and then measured for `--seconds`:
the server process's CPU (% of one core, from /proc) and its increase per viewer over the
count with none; the same as CPU milliseconds per output frame (what a frame costs, even
where a starved server put out fewer); the frames a second the slowest viewer and the
publisher received; and the whole machine's CPU (the viewers decode in this process: on a
small machine they compete with the server, so read the fps beside the CPU).

Modes: `shared`, one VP8 encode of each output frame for all the session's senders
(media/shared_encoder.py, the default), and `per-sender`, one encoder for each, as aiortc
does (`LIVEMORPH_SHARED_ENCODER=0`). Each mode gets a fresh server. The shared one logs,
at the session's end, how many frames it encoded and its senders sent, and the keyframes
and the frames skipped waiting for one: printed after its rows.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpu import CpuSampler
from latency import StampedSource
from livemorph import create_client, models
from livemorph.media.shared_encoder import ENV
from livemorph.testing import serve

MODEL = "mirage"
MODES = {"shared": "1", "per-sender": "0"}


class Counter:
    """Drains a track like a video element would, counting what arrives."""

    def __init__(self, track: Any) -> None:
        self.frames = 0
        self._task = asyncio.create_task(self._drain(track))

    async def _drain(self, track: Any) -> None:
        while True:
            await track.recv()
            self.frames += 1

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class Row:
    mode: str
    viewers: int
    server_pct: float
    machine_pct: float
    viewer_fps: float  # the slowest viewer's
    publisher_fps: float

    @property
    def ms_per_frame(self) -> float:
        """Server CPU per output frame (the publisher's): the work a frame costs, whatever
        rate a starved server managed."""
        return 10 * self.server_pct / self.publisher_fps if self.publisher_fps else float("nan")

    def line(self, baseline: Row | None) -> str:
        extra = extra_ms = "-"
        if baseline is not None and self.viewers:
            extra = f"{(self.server_pct - baseline.server_pct) / self.viewers:.1f}%"
            extra_ms = f"{(self.ms_per_frame - baseline.ms_per_frame) / self.viewers:.1f}"
        viewer_fps = f"{self.viewer_fps:5.1f}" if self.viewers else "-"
        return (
            f"{self.mode:<11} {self.viewers:>7} {self.server_pct:9.1f}% {extra:>9} "
            f"{self.ms_per_frame:9.1f} {extra_ms:>9} {viewer_fps:>10} {self.publisher_fps:9.1f} "
            f"{self.machine_pct:9.1f}%"
        )


HEADER = (
    f"{'mode':<11} {'viewers':>7} {'server':>10} {'+/viewer':>9} {'ms/frame':>9} "
    f"{'+/viewer':>9} {'viewer fps':>10} {'pub. fps':>9} {'machine':>10}"
)


async def measure_mode(mode: str, counts: list[int], warmup: float, seconds: float) -> list[Row]:
    spec = models.realtime(MODEL)
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="livemorph-bench-") as data_dir,
        serve(
            Path(data_dir),
            "--engine",
            "passthrough",
            "--log-level",
            "info",
            env={ENV: MODES[mode]},
        ) as server,
    ):
        sampler = CpuSampler(server.process.pid)
        sampler.start()
        async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
            source = StampedSource(spec.width, spec.height, spec.fps)
            rt = await client.realtime.connect(
                source, model=spec, initial_state={"prompt": {"text": "ink"}}
            )
            assert rt.video_track is not None
            publisher = Counter(rt.video_track)
            viewers: list[tuple[Any, Counter]] = []
            try:
                for count in sorted(counts):
                    while len(viewers) < count:
                        viewer = await client.realtime.subscribe(rt.subscribe_token)
                        assert viewer.video_track is not None
                        viewers.append((viewer, Counter(viewer.video_track)))
                    await asyncio.sleep(warmup)
                    start, frames = time.monotonic(), [c.frames for _, c in viewers]
                    published = publisher.frames
                    await asyncio.sleep(seconds)
                    end = time.monotonic()
                    server_pct, _, machine_pct = sampler.shares(start, end)
                    got = [c.frames - f for (_, c), f in zip(viewers, frames, strict=True)]
                    rows.append(
                        Row(
                            mode,
                            count,
                            server_pct,
                            machine_pct,
                            min(got, default=0) / (end - start),
                            (publisher.frames - published) / (end - start),
                        )
                    )
                    print(rows[-1].line(rows[0]), flush=True)
            finally:
                for viewer, counter in viewers:
                    await counter.close()
                    await viewer.disconnect()
                await publisher.close()
                await rt.disconnect()
                source.stop()
            sampler.stop()
            await asyncio.sleep(1)  # the session's end, logged
            for line in server.log.splitlines():
                if "frames encoded" in line:
                    print(f"{mode}: {line[line.find('session ') :]}", flush=True)
    return rows


async def main(args: argparse.Namespace) -> None:
    print(f"{MODEL}, passthrough engine; {args.warmup:g} s warm-up, {args.seconds:g} s each")
    print(HEADER, flush=True)
    results = {
        mode: await measure_mode(mode, args.viewers, args.warmup, args.seconds)
        for mode in args.modes
    }
    print("\n" + HEADER)
    for rows in results.values():
        for row in rows:
            print(row.line(rows[0]))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--viewers", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
