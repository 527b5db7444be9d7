"""CPU time from /proc, for the benches: one process, or the whole machine."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on the machine (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples, every `period` seconds while running, the CPU seconds of a server process,
    of this process and of the whole machine; `shares` turns a window of them into % of
    one core each."""

    def __init__(self, server_pid: int, period: float = 0.25) -> None:
        self.server_pid = server_pid
        self.period = period
        self.samples: list[tuple[float, float, float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            self.samples.append(
                (
                    time.monotonic(),
                    process_cpu_seconds(self.server_pid),
                    process_cpu_seconds(os.getpid()),
                    machine_busy_seconds(),
                )
            )
            await asyncio.sleep(self.period)

    def shares(self, start: float, end: float) -> tuple[float, float, float]:
        """% of one core used by the server, this process and the machine in [start, end]."""
        window = [s for s in self.samples if start <= s[0] <= end]
        span = window[-1][0] - window[0][0]
        server, client, machine = ((window[-1][i] - window[0][i]) / span * 100 for i in (1, 2, 3))
        return server, client, machine
