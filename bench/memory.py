"""What a node keeps after its sessions end: its RSS after each round of sessions and viewers.

    python bench/memory.py                 # 12 rounds of 2 sessions, each with a viewer
    python bench/memory.py --rounds 24 --sessions 3

One `livemorph serve` process (passthrough engine, `mirage` at 1280x704), and rounds in
which `--sessions` sessions connect at once, each watched by a viewer, stream for a second
and leave. After each round the bench waits for the node to have no session and `--idle`
seconds more (longer than server/housekeeping.py's IDLE_AFTER, so an idle node has tidied),
then prints the node's RSS from /proc. A node that keeps something per session grows by
about the same step each round; one whose allocator only keeps its high-water mark levels
off. At the end it prints the node's own account of each idle tidy (collected objects and
the milliseconds it held the event loop), from its debug log.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
from pathlib import Path

from livemorph import create_client
from livemorph.testing import LiveServer, start_server, stop_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's tests package
from tests.media import FrameSink, SceneTrack


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def one_session(server: LiveServer) -> None:
    async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
        rt = await client.realtime.connect(SceneTrack(640, 352), model="mirage")
        viewer = await client.realtime.subscribe(rt.subscribe_token)
        sink = FrameSink(viewer.video_track)
        try:
            await sink.fresh()
            await asyncio.sleep(1.0)
        finally:
            await sink.close()
            await viewer.disconnect()
            await rt.disconnect()


async def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="livemorph-memory-"))
    flags = ("--engine", "passthrough", "--capacity", "off", "--log-level", "debug")
    server = await asyncio.to_thread(start_server, workdir, *flags)
    pid = server.process.pid
    try:
        start = rss_mib(pid)
        print(f"round  node RSS MiB  (at start {start:.0f})", flush=True)
        for round_ in range(args.rounds):
            await asyncio.gather(*(one_session(server) for _ in range(args.sessions)))
            await asyncio.to_thread(server.wait_sessions, 0, 30.0)
            await asyncio.sleep(args.idle)
            print(f"{round_:5d}  {rss_mib(pid):12.0f}", flush=True)
    finally:
        await asyncio.to_thread(stop_server, server)
    tidies = re.findall(r"idle: collected \d+ objects and trimmed the heap in (\d+) ms", server.log)
    if tidies:
        times = sorted(int(ms) for ms in tidies)
        print(
            f"idle tidies: {len(tidies)}, {times[0]}-{times[-1]} ms each "
            f"(median {times[len(times) // 2]} ms)"
        )
    else:
        print("idle tidies: none logged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--sessions", type=int, default=2, help="at once, each with a viewer")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds idle before reading")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
