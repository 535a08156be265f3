"""Optional system metrics, sampled on a background thread, never on the training thread.

Every ``interval`` seconds: this process's CPU use (% of one core) and resident
memory, the machine's used memory, and — only when ``pynvml`` is importable and
``gpus`` is set (the node's first rank: ``distributed.samples_gpus``) — each GPU's
utilization and memory. Logged as ``system/<name>`` with step = sample number.
Reads ``/proc`` where it exists; costs well under 1 ms a sample.

Invariants: a probe that raises (a GPU query answering NOT_SUPPORTED under MIG, a
GPU lost from the bus) is warned about once and not sampled again in this run; the
other probes go on. Only the run's end (``log`` raising ``UsageError``: run finished,
client closed) or ``stop()`` ends the thread; ``stop(timeout)`` returns once it has
ended, so nothing is logged after it returns True.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from trackhouse.client.errors import UsageError

logger = logging.getLogger(__name__)

Probe = Callable[[], dict[str, float]]


def _process_memory() -> dict[str, float]:
    """Resident memory now (Linux); elsewhere only the peak is portable, named so."""
    try:
        with open("/proc/self/statm") as f:
            return {"system/rss_bytes": float(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))}
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows: neither
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"system/peak_rss_bytes": float(peak if sys.platform == "darwin" else peak * 1024)}  # macOS: bytes


def _machine_memory() -> dict[str, float]:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) for line in f if line.count(":") == 1}
    except OSError:  # no /proc: not available here, not a failure
        return {}
    return {"system/memory_used_percent": 100.0 * (1 - info["MemAvailable"] / info["MemTotal"])}


_HOST_PROBES: dict[str, Probe] = {"process memory": _process_memory, "machine memory": _machine_memory}


def _gpu_probe(key: str, query: Callable[[Any], Any], handle: Any) -> Probe:
    return lambda: {key: float(query(handle))}


def _gpu_probes() -> tuple[dict[str, Probe], Callable[[], None]]:
    """One probe per GPU and quantity, and NVML's shutdown; none when NVML is missing."""
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # not installed, no driver, no GPU: GPU metrics are optional
        return {}, lambda: None
    probes: dict[str, Probe] = {}
    for i in range(count):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        except Exception as exc:  # this GPU only: the others are sampled
            logger.warning("trackhouse: GPU %d not sampled: %s: %s", i, type(exc).__name__, exc)
            continue
        probes[f"gpu{i} utilization"] = _gpu_probe(f"system/gpu{i}_utilization_percent",
                                                   lambda h: pynvml.nvmlDeviceGetUtilizationRates(h).gpu, handle)
        probes[f"gpu{i} memory"] = _gpu_probe(f"system/gpu{i}_memory_used_bytes",
                                              lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used, handle)
    return probes, getattr(pynvml, "nvmlShutdown", lambda: None)


class SystemSampler:
    """Samples into ``log(metrics, step=n)`` until ``stop`` or the run's end. One per run that asks for it."""

    def __init__(self, log: Callable[..., Any], interval: float, *, gpus: bool = True) -> None:
        self._log = log
        self._interval = interval
        self._gpus = gpus
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="trackhouse-system", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop sampling and wait up to ``timeout`` s for the thread to end; True when it has
        (or never started). False only while a probe or ``log`` call is still running."""
        self._stop.set()
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def sample(self, last: tuple[float, float]) -> tuple[dict[str, float], tuple[float, float]]:
        """CPU use since ``last`` = (cpu seconds, wall seconds) and memory; and the new ``last``."""
        t = os.times()
        now = (t.user + t.system, time.monotonic())
        wall = now[1] - last[1]
        metrics = {"system/cpu_percent": 100.0 * (now[0] - last[0]) / wall if wall > 0 else 0.0}
        metrics.update(self._read(_HOST_PROBES))
        return metrics, now

    def _read(self, probes: Mapping[str, Probe]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, probe in probes.items():
            if name in self._failed:
                continue
            try:
                out.update(probe())
            except Exception as exc:  # this probe only: the others keep sampling
                self._failed.add(name)
                logger.warning("trackhouse: system metric %s failed (%s: %s); not sampled again in this run",
                               name, type(exc).__name__, exc)
        return out

    def _loop(self) -> None:
        gpus, shutdown = _gpu_probes() if self._gpus else ({}, lambda: None)
        t = os.times()
        last = (t.user + t.system, time.monotonic())
        step = 0
        try:  # _gpu_probes raises nothing: every NVML call in it is guarded
            while not self._stop.wait(self._interval):
                metrics, last = self.sample(last)
                metrics.update(self._read(gpus))
                self._log(metrics, step=step)
                step += 1
        except UsageError as exc:  # the run finished or the client closed: the sampler's normal end
            logger.debug("system metrics stopped: %s", exc)
        except Exception as exc:  # a bug, not a probe: say so rather than end silently
            logger.warning("trackhouse: system metrics stopped: %s: %s", type(exc).__name__, exc)
        finally:
            with contextlib.suppress(Exception):  # NVML already gone: nothing to release
                shutdown()
