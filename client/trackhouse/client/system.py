"""Optional system metrics, sampled on a background thread, never on the training thread.

Every ``interval`` seconds: this process's CPU use (% of one core) and resident
memory, the machine's used memory, and — only when ``pynvml`` is importable —
each GPU's utilization and memory. Logged as ``system/<name>`` with step =
sample number. Reads ``/proc`` where it exists; costs well under 1 ms a sample.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def _memory_used_percent() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.count(":") == 1}
        return 100.0 * (1 - info["MemAvailable"] / info["MemTotal"])
    except (OSError, ValueError, KeyError, IndexError, ZeroDivisionError):
        return None


def _gpu_probe() -> Callable[[], dict[str, float]] | None:
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # not installed, no driver, no GPU: GPU metrics are optional
        return None

    def sample() -> dict[str, float]:
        out: dict[str, float] = {}
        for i, h in enumerate(handles):
            out[f"system/gpu{i}_utilization_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            out[f"system/gpu{i}_memory_used_bytes"] = float(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        return out

    return sample


class SystemSampler:
    """Samples into ``log(metrics, step)`` until ``stop``. One per run that asks for it."""

    def __init__(self, log: Callable[..., Any], interval: float) -> None:
        self._log = log
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trackhouse-system", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self, last: tuple[float, float]) -> tuple[dict[str, float], tuple[float, float]]:
        """Metrics since ``last`` = (cpu seconds, wall seconds), and the new ``last``."""
        t = os.times()
        now = (t.user + t.system, time.monotonic())
        wall = now[1] - last[1]
        metrics = {
            "system/cpu_percent": 100.0 * (now[0] - last[0]) / wall if wall > 0 else 0.0,
            "system/rss_bytes": float(_rss_bytes()),
        }
        used = _memory_used_percent()
        if used is not None:
            metrics["system/memory_used_percent"] = used
        return metrics, now

    def _loop(self) -> None:
        gpu = _gpu_probe()
        t = os.times()
        last = (t.user + t.system, time.monotonic())
        step = 0
        while not self._stop.wait(self._interval):
            try:
                metrics, last = self.sample(last)
                if gpu is not None:
                    metrics.update(gpu())
                self._log(metrics, step=step)
            except Exception as exc:  # the run finished or the client closed: stop quietly
                logger.debug("system metrics stopped: %s", exc)
                return
            step += 1
