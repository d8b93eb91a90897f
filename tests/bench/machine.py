"""What the numbers were measured on, and how busy the machine was meanwhile.

Timings on a shared VM move with its neighbours; CPU steal and load are recorded per
section so a reader can tell a slow run from a slow pipeline.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import zmq


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
    """The aggregate `cpu` line of /proc/stat (jiffies)."""

    busy: int
    idle: int
    steal: int

    @classmethod
    def now(cls) -> "CpuTimes":
        user, nice, system, idle, iowait, irq, softirq, steal = map(
            int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
        return cls(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)

    def since(self, earlier: "CpuTimes") -> tuple[float, float]:
        """(busy %, steal %) of all CPU time between two readings."""
        busy, idle, steal = self.busy - earlier.busy, self.idle - earlier.idle, self.steal - earlier.steal
        total = max(1, busy + idle + steal)
        return 100 * busy / total, 100 * steal / total


def load() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())
