"""What a person meets at `/`: the demo page in Debian's Chromium against a real server.

    python bench/browser.py                       # mirage, 15 s, prompt "anime"
    python bench/browser.py --model mirage_v2 --seconds 30 --runs 3

For each run a fresh page opens `/` (Chromium's fake camera plays scikit-image's astronaut
photo at the model's size and rate) and the bench reports, from the page's own clock:
- time to first transformed frame: from navigation start to the first frame the output
  <video> presents (the page fetches a client token, opens the camera, connects, and the
  engine loads its look), and the moment the page reached `generating`;
- delivered fps: the transformed video as Chromium receives it over `--seconds` (its RTP
  stats: frames decoded and dropped, size, mean jitter-buffer delay), the frames the output
  <video> presented (requestVideoFrameCallback; headless Chromium paints fewer than it
  decodes), and what Chromium's encoder sent of the camera (size, fps, and what held it back);
- CPU: the server process, and everything else on the machine (the browser, mostly), in %
  of one core.
Needs `scripts/install-system-deps.sh` (Chromium) and the test extras (Playwright).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cpu import machine_busy_seconds, process_cpu_seconds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's tests package

from tests.browser import camera_file, chromium

from livemorph.models import CATALOG
from livemorph.testing import serve

#: Counts frames each <video> presents, from the moment the script runs.
COUNT_FRAMES = """
() => {
  window.benchFrames = { camera: 0, output: 0, firstOutput: null };
  for (const id of ["camera", "output"]) {
    const video = document.getElementById(id);
    const tick = (now) => {
      window.benchFrames[id] += 1;
      if (id === "output" && window.benchFrames.firstOutput === null) {
        window.benchFrames.firstOutput = now;
      }
      video.requestVideoFrameCallback(tick);
    };
    video.requestVideoFrameCallback(tick);
  }
}
"""

#: The video RTP stats of the demo's peer connection (reached through the SDK's internals):
#: what Chromium sends (its encoder adapts size to CPU and bandwidth) and what it receives.
RTP_STATS = """
async () => {
  const pc = window.livemorphDemo.session?._signaling?.pc;
  const found = { now: performance.now(), frames: { ...window.benchFrames } };
  if (!pc) return found;
  for (const report of (await pc.getStats()).values()) {
    if (report.kind !== "video") continue;
    if (report.type === "outbound-rtp") found.sent = report;
    if (report.type === "inbound-rtp") found.received = report;
  }
  return found;
}
"""


#: Set when the page first shows `generating` (time since navigation start, ms).
WATCH_STATE = """
() => {
  window.benchGenerating = null;
  const state = document.getElementById("state");
  const seen = () => {
    if (window.benchGenerating === null && state.textContent === "generating") {
      window.benchGenerating = performance.now();
    }
  };
  const watched = { childList: true, characterData: true, subtree: true };
  new MutationObserver(seen).observe(state, watched);
  seen();
}
"""


def run_once(browser: Any, base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    # Installed before the page's own scripts run, so nothing is missed.
    page.add_init_script(
        "document.addEventListener('DOMContentLoaded', () => {"
        f"({COUNT_FRAMES})(); ({WATCH_STATE})();"
        "});"
    )
    try:
        page.goto(f"{base_url}/?model={args.model}")
        page.wait_for_function("() => window.benchFrames?.firstOutput != null", timeout=60_000)
        first_frame = page.evaluate("() => window.benchFrames.firstOutput")
        generating = page.evaluate("() => window.benchGenerating")
        if args.prompt:
            page.fill("#prompt", args.prompt)
            page.click("#prompt-form button[type=submit]")
        time.sleep(1.0)  # the prompt's first frames and the bitrate ramp, as a person sees it

        before = page.evaluate(RTP_STATS)
        cpu_before = (process_cpu_seconds(args.server_pid), machine_busy_seconds())
        time.sleep(args.seconds)
        after = page.evaluate(RTP_STATS)
        server_cpu = process_cpu_seconds(args.server_pid) - cpu_before[0]
        machine_cpu = machine_busy_seconds() - cpu_before[1]
        elapsed = (after["now"] - before["now"]) / 1000

        def rate(count: int, was: int) -> float:
            return (count - was) / elapsed

        got, had, sent = after["received"], before["received"], after["sent"]
        jitter_delay = got["jitterBufferDelay"] - had["jitterBufferDelay"]
        emitted = got["jitterBufferEmittedCount"] - had["jitterBufferEmittedCount"]
        return {
            "first_frame_s": first_frame / 1000,
            "generating_s": (generating or float("nan")) / 1000,
            "decoded_fps": rate(got["framesDecoded"], had["framesDecoded"]),
            "dropped": got.get("framesDropped", 0) - had.get("framesDropped", 0),
            "size": f"{got.get('frameWidth')}x{got.get('frameHeight')}",
            "jitter_ms": 1000 * jitter_delay / max(1, emitted),
            "presented_fps": rate(after["frames"]["output"], before["frames"]["output"]),
            "camera_fps": rate(after["frames"]["camera"], before["frames"]["camera"]),
            "sent": f"{sent.get('frameWidth')}x{sent.get('frameHeight')} at "
            f"{rate(sent['framesSent'], before['sent']['framesSent']):.1f} fps "
            f"(held back by: {sent.get('qualityLimitationReason')})",
            "server_cpu": 100 * server_cpu / elapsed,
            "other_cpu": 100 * (machine_cpu - server_cpu) / elapsed,
        }
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mirage", choices=sorted(CATALOG))
    parser.add_argument("--prompt", default="anime", help="typed into the page once it runs")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    spec = CATALOG[args.model]

    with tempfile.TemporaryDirectory(prefix="livemorph-bench-") as scratch:
        camera = camera_file(Path(scratch), spec.width, spec.height, spec.fps)
        with (
            serve(Path(scratch) / "data", "--log-level", "warning") as server,
            chromium(camera) as browser,
        ):
            args.server_pid = server.process.pid
            size = f"{spec.width}x{spec.height} @ {spec.fps} fps"
            print(f"{args.model}: {size}, prompt {args.prompt!r}")
            results = []
            for run in range(1, args.runs + 1):
                result = run_once(browser, server.base_url, args)
                results.append(result)
                print(
                    f"  run {run}: first transformed frame {result['first_frame_s']:.2f} s after "
                    f"navigation (generating at {result['generating_s']:.2f} s)\n"
                    f"    received {result['size']} at {result['decoded_fps']:.1f} fps decoded, "
                    f"{result['dropped']} dropped, jitter buffer {result['jitter_ms']:.0f} ms; "
                    f"presented {result['presented_fps']:.1f} fps (headless Chromium paints "
                    f"fewer than it decodes)\n"
                    f"    sent {result['sent']}; camera {result['camera_fps']:.1f} fps\n"
                    f"    CPU, % of one core: server {result['server_cpu']:.0f}, browser and the "
                    f"rest {result['other_cpu']:.0f}"
                )
            if len(results) > 1:
                keys = ("first_frame_s", "decoded_fps")
                median = {k: statistics.median(r[k] for r in results) for k in keys}
                print(
                    f"  median of {len(results)}: first frame {median['first_frame_s']:.2f} s, "
                    f"received {median['decoded_fps']:.1f} fps"
                )


if __name__ == "__main__":
    main()
