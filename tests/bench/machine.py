"""What the numbers were measured on, and how busy the machine was meanwhile.

Timings move with whatever else runs on the machine and, on a VM, with its neighbours;
the CPU time other processes used and the time the hypervisor stole are recorded per
section, so a reader can tell a slow run from a slow pipeline.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import zmq

_TICKS = os.sysconf("SC_CLK_TCK")


def _first(path: str, key: str) -> str:
    for line in Path(path).read_text().splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return "unknown"


def describe() -> dict[str, str]:
    """CPU, cores, RAM, kernel, Python and ZeroMQ versions."""
    ram_kib = int(_first("/proc/meminfo", "MemTotal").split()[0])
    return {
        "CPU": _first("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "RAM": f"{ram_kib / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "pyzmq / libzmq": f"{zmq.pyzmq_version()} / {zmq.zmq_version()}",
    }


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds used on the whole machine, by this process tree, and stolen by the hypervisor.

    The tree's share comes from os.times(), which counts descendants once they are reaped,
    so read it after a section's processes have exited.
    """

    busy: float
    idle: float
    steal: float
    own: float

    @classmethod
    def now(cls) -> CpuTimes:
        user, nice, system, idle, iowait, irq, softirq, steal = (
            int(field) / _TICKS for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
        mine = os.times()
        return cls(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal,
                   own=mine.user + mine.system + mine.children_user + mine.children_system)

    def since(self, earlier: CpuTimes) -> dict[str, float]:
        """Shares of all CPU time between two readings, in %: busy, stolen, and used by others."""
        busy, idle, steal = self.busy - earlier.busy, self.idle - earlier.idle, self.steal - earlier.steal
        total = max(1e-9, busy + idle + steal) / 100
        others = max(0.0, busy - (self.own - earlier.own))
        return {"busy": busy / total, "steal": steal / total, "others": others / total}


def load() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())
