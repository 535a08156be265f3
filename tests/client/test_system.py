"""System-metrics sampler: one failing probe (a GPU query) stops only itself; the run's end stops the
thread quietly; stop() returns once the thread has ended; the interval has a floor; peak memory is named."""

from __future__ import annotations

import logging
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import pytest

from trackhouse.client import Settings, UsageError
from trackhouse.client.system import SystemSampler


class NVMLError(Exception):
    pass


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A pynvml with two GPUs; ``broken`` holds the (gpu, query) pairs that raise."""
    state: dict[str, Any] = {"broken": set(), "shutdown": 0}

    def query(name: str, value: Any) -> Any:
        def call(handle: int) -> Any:
            if (handle, name) in state["broken"]:
                raise NVMLError("Not Supported")
            return value
        return call

    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = query("util", types.SimpleNamespace(gpu=40))  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = query("mem", types.SimpleNamespace(used=123))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    yield state


class Recorder:
    """A ``log`` callable that lets the test wait for the n-th sample, or raise from it."""

    def __init__(self, until: int, then: BaseException | None = None) -> None:
        self.samples: list[dict[str, float]] = []
        self.until, self.then = until, then
        self.reached = threading.Event()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if len(self.samples) >= self.until and self.then is not None:
            raise self.then
        self.samples.append(dict(metrics))
        if len(self.samples) >= self.until:
            self.reached.set()


def test_a_failing_gpu_query_stops_only_that_metric(nvml: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    # MIG answers NOT_SUPPORTED to utilization: memory, CPU and the other GPU keep being sampled.
    nvml["broken"].add((0, "util"))
    log = Recorder(until=3)
    sampler = SystemSampler(log, 0.01)
    with caplog.at_level(logging.WARNING, logger="trackhouse.client.system"):
        sampler.start()
        assert log.reached.wait(30.0)
        assert sampler.stop(10.0)
    last = log.samples[-1]
    assert {"system/cpu_percent", "system/gpu0_memory_used_bytes", "system/gpu1_utilization_percent",
            "system/gpu1_memory_used_bytes"} <= set(last)
    assert not any("gpu0_utilization" in key for sample in log.samples for key in sample)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "gpu0 utilization" in warnings[0] and "Not Supported" in warnings[0]
    assert nvml["shutdown"] == 1


def test_a_lost_gpu_does_not_stop_cpu_and_memory(nvml: dict[str, Any]) -> None:
    nvml["broken"].update({(0, "util"), (0, "mem"), (1, "util"), (1, "mem")})
    log = Recorder(until=3)
    sampler = SystemSampler(log, 0.01)
    sampler.start()
    assert log.reached.wait(30.0)
    assert sampler.stop(10.0)
    assert {"system/cpu_percent", "system/rss_bytes"} <= set(log.samples[-1])
    assert not any(key.startswith("system/gpu") for key in log.samples[-1])


def test_without_gpus_the_node_gpus_are_not_sampled(nvml: dict[str, Any]) -> None:
    log = Recorder(until=1)
    sampler = SystemSampler(log, 0.01, gpus=False)  # not the node's first rank
    sampler.start()
    assert log.reached.wait(30.0)
    assert sampler.stop(10.0)
    assert not any(key.startswith("system/gpu") for key in log.samples[0])


@pytest.mark.parametrize(
    ("error", "warned"),
    [(UsageError("run r is finished; start a new run"), False), (RuntimeError("a bug"), True)],
    ids=["run_finished", "unexpected"],
)
def test_the_runs_end_stops_the_sampler_quietly(error: BaseException, warned: bool,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    log = Recorder(until=1, then=error)
    sampler = SystemSampler(log, 0.01, gpus=False)
    with caplog.at_level(logging.WARNING, logger="trackhouse.client.system"):
        sampler.start()
        assert log.reached.wait(30.0)
        sampler._thread.join(30.0)  # it ends by itself, not by stop()
        assert not sampler._thread.is_alive()
    assert any("a bug" in r.getMessage() for r in caplog.records) is warned
    assert sampler.stop(0.0)


def test_stop_returns_once_the_thread_has_ended_and_is_bounded() -> None:
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def log(metrics: dict[str, float], step: int) -> None:
        calls.append(step)
        entered.set()
        release.wait(30.0)  # a slow log call: stop() must not wait for it past its timeout

    sampler = SystemSampler(log, 0.01, gpus=False)
    sampler.start()
    assert entered.wait(30.0)
    assert sampler.stop(0.01) is False  # still inside log: bounded, says so
    release.set()
    assert sampler.stop(30.0) is True
    assert not sampler._thread.is_alive() and calls == [0]  # stopped: the loop did not sample again


def test_stop_before_start_is_fine() -> None:
    assert SystemSampler(lambda metrics, step: None, 1.0).stop() is True


@pytest.mark.parametrize("interval", [1e-6, 0.05])
def test_the_interval_has_a_floor(interval: float) -> None:
    with pytest.raises(UsageError, match=r"Settings\.system_metrics_interval must be 0 \(off\) or >= 0\.1"):
        Settings(system_metrics_interval=interval)
    with pytest.raises(UsageError, match=r"system_metrics_interval"):
        Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", "TRACKHOUSE_CLIENT_SYSTEM_METRICS_INTERVAL": str(interval)})
    assert Settings(system_metrics_interval=0.1).system_metrics_interval == 0.1
    assert Settings(system_metrics_interval=0).system_metrics_interval == 0


@pytest.mark.parametrize(("platform", "unit"), [("darwin", 1), ("linux", 1024)])
def test_without_proc_the_peak_is_reported_as_the_peak(monkeypatch: pytest.MonkeyPatch, platform: str,
                                                       unit: int) -> None:
    # ru_maxrss is the peak, in bytes on macOS and KiB on Linux: never reported as current resident memory
    import resource

    real_open = open

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(resource, "getrusage", lambda who: types.SimpleNamespace(ru_maxrss=5000))
    metrics, _ = SystemSampler(lambda metrics, step: None, 1.0).sample((0.0, 0.0))
    assert metrics["system/peak_rss_bytes"] == 5000 * unit
    assert "system/rss_bytes" not in metrics and "system/memory_used_percent" not in metrics


@pytest.mark.parametrize("local_rank", [0, 1])
def test_a_runs_sampler_reads_the_gpus_only_on_the_nodes_first_rank(
        nvml: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Any, local_rank: int) -> None:
    import trackhouse.client as th

    opened, sampled = threading.Event(), threading.Event()
    monkeypatch.setattr(sys.modules["pynvml"], "nvmlInit", opened.set)
    monkeypatch.setattr("trackhouse.client.system._HOST_PROBES", {"marker": lambda: sampled.set() or {}})
    client = th.Client(th.MemoryTransport(), Settings(system_metrics_interval=0.1, local_rank=local_rank,
                                                      spool_dir=str(tmp_path), replay_orphans=False))
    run = client.start_run()
    assert sampled.wait(30.0)  # a sample is taken after NVML is opened, when it is
    run.finish()
    assert opened.is_set() is (local_rank == 0)
    client.close()
