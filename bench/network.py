"""A session over a lossy network: loss, jitter and a dropout on the server's link.

    python bench/network.py                          # Chromium and the SDK, 0/1/2/5 % loss
    python bench/network.py --clients chromium --loss 2 --runs 5

The server runs in this process (passthrough by default, `--engine` for another) and its
side of every peer connection goes through `impair.Impairment`: each way `--loss` percent
lost in Wi-Fi-like bursts (mean 2 datagrams), 30 +/- 10 ms one-way delay in order, and a
1 s dropout both ways in the middle of the run. A client on the same machine then meets
what a client on a poor link would.

- **chromium**: Debian's Chromium opens the demo page at `/` (its fake camera plays the
  astronaut at the model's size). From its own `getStats()` every 100 ms: frames decoded a
  second, its freezes (`freezeCount`, `totalFreezesDuration`), the longest stall outside
  the dropout, how long after the dropout the picture moved again, NACKs and PLIs it sent;
  and from the server's receiver of the camera: gaps given up, keyframes asked for, NACKs
  asked and answered, the round trip it measured.
- **sdk**: the Python SDK (aiortc) sends a camera stamped with its capture time
  (latency.py) and reads the stamp back: glass-to-glass p50 and p95, fps, the longest
  stall outside the dropout, and the recovery after it.

Only the server's side is impaired (the SDK's connections are the controlling ones: they
are left alone), so each datagram is impaired once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's tests package

from tests.browser import CHROMIUM, camera_file, chromium_args
from tests.inprocess import serve_in_process

import latency
from browser import COUNT_FRAMES, RTP_STATS
from impair import Impairment, Link
from livemorph.config import Settings
from livemorph.models import CATALOG

#: One-way delay and its jitter, seconds; the mean length of a loss burst, datagrams.
DELAY, JITTER, BURST = 0.03, 0.01, 2.0
#: How long the dropout lasts, seconds (it starts `--dropout-at` seconds into the run).
DROPOUT = 1.0
#: Frames that must follow the dropout before the picture counts as back.
BACK_AFTER = 2


@dataclass
class Figures:
    client: str
    loss: float
    fps: float
    longest_stall_ms: float
    recovery_ms: float | None
    p50_ms: float | None = None
    p95_ms: float | None = None
    freezes: int | None = None
    frozen_s: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        latency_text = (
            f"p50 {self.p50_ms:6.1f} ms  p95 {self.p95_ms:6.1f} ms  "
            if self.p50_ms is not None and self.p95_ms is not None
            else ""
        )
        freezes = (
            f"freezes {self.freezes} ({self.frozen_s:.2f} s)  " if self.freezes is not None else ""
        )
        recovery = "never" if self.recovery_ms is None else f"{self.recovery_ms:.0f} ms"
        notes = "  ".join(f"{key} {value}" for key, value in self.notes.items())
        return (
            f"{self.client:<9} loss {100 * self.loss:3.0f}%  fps {self.fps:5.1f}  "
            f"{latency_text}longest stall {self.longest_stall_ms:5.0f} ms  {freezes}"
            f"back {recovery} after the dropout  {notes}"
        )


def link(loss: float) -> Link:
    return Link(loss=loss, burst=BURST, delay=DELAY, jitter=JITTER)


def stalls(arrivals: list[float], dropout: tuple[float, float]) -> tuple[float, float | None]:
    """The longest gap between frames outside the dropout, and how long after the dropout
    ended the picture was back (`BACK_AFTER` frames), in ms."""
    start, end = dropout
    longest = 0.0
    for before, after in itertools.pairwise(arrivals):
        if after <= start or before >= end + 0.5:  # the dropout and the recovery aside
            longest = max(longest, after - before)
    later = [at for at in arrivals if at > end]
    back = later[BACK_AFTER] if len(later) > BACK_AFTER else None
    return 1000 * longest, None if back is None else 1000 * (back - end)


def uplink_stats(server: Any) -> dict[str, Any]:
    """What the server's receivers of the camera did (media/jitter.py's counters)."""
    found: dict[str, Any] = {}
    for session in server.state.sessions.all():
        pc = getattr(session, "pc", None)
        for transceiver in pc.getTransceivers() if pc is not None else []:
            if transceiver.kind != "video":
                continue
            receiver = transceiver.receiver
            buffer = getattr(receiver, "_RTCRtpReceiver__jitter_buffer", None)
            nacks = getattr(receiver, "_RTCRtpReceiver__nack_generator", None)
            if buffer is not None and hasattr(buffer, "skipped"):
                found["up-gaps-given-up"] = buffer.skipped
                found["up-keyframes-asked"] = buffer.keyframes_asked
            if nacks is not None and hasattr(nacks, "rtt"):
                found["up-nacked"] = f"{nacks.recovered}/{nacks.asked}"
                found["up-rtt"] = f"{1000 * nacks.rtt:.0f}ms"
    return found


async def run_chromium(args: argparse.Namespace, loss: float, playwright: Any) -> Figures:
    spec = CATALOG[args.model]
    with tempfile.TemporaryDirectory(prefix="livemorph-network-") as folder:
        camera = camera_file(Path(folder), spec.width, spec.height, spec.fps)
        settings = Settings(data_dir=Path(folder) / "data", engine=args.engine, demo=True)
        async with serve_in_process(settings) as server:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=chromium_args(camera)
            )
            try:
                page = await browser.new_page()
                await page.add_init_script(
                    f"document.addEventListener('DOMContentLoaded', () => ({COUNT_FRAMES})())"
                )
                await page.goto(f"{server.base_url}/?model={args.model}")
                await page.wait_for_function(
                    "() => window.benchFrames?.firstOutput != null", timeout=60_000
                )
                await asyncio.sleep(2.0)  # the bitrate ramp, on a clean link
                with Impairment(send=link(loss), receive=link(loss), seed=args.seed) as impaired:
                    samples = await _sample_chromium(page, impaired, args.seconds, args.dropout_at)
                notes = uplink_stats(server)
            finally:
                await browser.close()
    first, last = samples[0], samples[-1]
    elapsed = last["t"] - first["t"]
    arrivals, decoded = [], first["decoded"]
    for sample in samples:
        if sample["decoded"] > decoded:
            arrivals.append(sample["t"])
            decoded = sample["decoded"]
    longest, back = stalls(arrivals, (args.dropout_at, args.dropout_at + DROPOUT))
    notes |= {
        "nacks-sent": last["nacks"] - first["nacks"],
        "plis-sent": last["plis"] - first["plis"],
    }
    return Figures(
        "chromium",
        loss,
        (last["decoded"] - first["decoded"]) / elapsed,
        longest,
        back,
        freezes=last["freezes"] - first["freezes"],
        frozen_s=last["frozen"] - first["frozen"],
        notes=notes,
    )


async def _sample_chromium(
    page: Any, impaired: Impairment, seconds: float, dropout_at: float
) -> list[dict]:
    samples: list[dict] = []
    started = time.monotonic()
    dropped = False
    while (now := time.monotonic() - started) < seconds:
        if not dropped and now >= dropout_at:
            impaired.dropout(DROPOUT)
            dropped = True
        stats = (await page.evaluate(RTP_STATS)).get("received", {})
        samples.append(
            {
                "t": time.monotonic() - started,
                "decoded": stats.get("framesDecoded", 0),
                "freezes": stats.get("freezeCount", 0),
                "frozen": stats.get("totalFreezesDuration", 0.0),
                "nacks": stats.get("nackCount", 0),
                "plis": stats.get("pliCount", 0),
            }
        )
        await asyncio.sleep(0.1)
    return samples


async def run_sdk(args: argparse.Namespace, loss: float) -> Figures:
    spec = CATALOG[args.model]
    with tempfile.TemporaryDirectory(prefix="livemorph-network-") as folder:
        settings = Settings(data_dir=Path(folder) / "data", engine=args.engine)
        async with serve_in_process(settings) as server:
            arrivals: list[float] = []
            impaired = Impairment(
                send=link(loss),
                receive=link(loss),
                seed=args.seed,
                applies=lambda connection: not connection.ice_controlling,  # the server's
            )
            started = 0.0

            def on_frame(arrived: float, stamp: int | None, ms: int | None) -> None:
                nonlocal started
                if not arrivals:
                    started = arrived
                    impaired.install()
                    loop = asyncio.get_running_loop()
                    loop.call_later(args.dropout_at, impaired.dropout, DROPOUT)
                arrivals.append(arrived - started)

            try:
                result = await latency.measure(
                    functools.partial(latency.StampedSource, spec.width, spec.height, spec.fps),
                    latency.through_server(server, args.model, True),  # type: ignore[arg-type]
                    args.seconds,
                    1.0,
                    on_frame=on_frame,
                )
            finally:
                impaired.uninstall()
            notes = uplink_stats(server)
    longest, back = stalls(arrivals, (args.dropout_at, args.dropout_at + DROPOUT))
    return Figures(
        "sdk", loss, result.fps, longest, back, result.p50_ms, result.p95_ms, notes=notes
    )


async def main_async(args: argparse.Namespace) -> list[Figures]:
    from playwright.async_api import async_playwright

    results: list[Figures] = []
    async with async_playwright() as playwright:
        for loss in args.loss:
            for _ in range(args.runs):
                for client in args.clients:
                    figures = (
                        await run_chromium(args, loss / 100, playwright)
                        if client == "chromium"
                        else await run_sdk(args, loss / 100)
                    )
                    print(figures.line(), flush=True)
                    results.append(figures)
    if args.runs > 1:
        print("medians:")
        for loss in args.loss:
            for client in args.clients:
                runs = [f for f in results if f.client == client and f.loss == loss / 100]
                recoveries = [f.recovery_ms for f in runs if f.recovery_ms is not None]
                fps = statistics.median(f.fps for f in runs)
                print(
                    f"{client:<9} loss {loss:3.0f}%  fps {fps:5.1f}"
                    f"  longest stall {max(f.longest_stall_ms for f in runs):5.0f} ms (worst)"
                    f"  back {max(recoveries) if recoveries else float('nan'):.0f} ms (worst)"
                    f"  never back {len(runs) - len(recoveries)} of {len(runs)}",
                    flush=True,
                )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", nargs="+", choices=["chromium", "sdk"], default=["chromium", "sdk"]
    )
    parser.add_argument(
        "--loss", nargs="+", type=float, default=[0, 1, 2, 5], help="percent, each way"
    )
    parser.add_argument("--model", default="mirage", choices=sorted(CATALOG))
    parser.add_argument("--engine", default="passthrough")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--dropout-at", type=float, default=8.0, help="seconds into the run")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
