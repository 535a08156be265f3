"""What logging costs a training loop: ns per value of each logging API, and the slowdown
of a simulated training loop (1 ms steps, 20 metrics a step) with logging against without.

    python loadtests/client_overhead.py                        # starts an embedded server (a separate process)
    python loadtests/client_overhead.py --url 127.0.0.1:50051  # against a running server
    python loadtests/client_overhead.py --buffer-only          # the calls alone: no server, sender idle
    python loadtests/client_overhead.py --step-loop-only --workload torch  # only the step loop; a torch step

The client streams to a real server in another process while the figures are taken,
so the background sender's CPU (encoding, gRPC) is part of what the loop pays. The
step's work is numpy on one BLAS thread (it releases the GIL, as CUDA launches and
waits do). See ``step_loop_slowdown`` for how the slowdown is measured, and
``step_loop_processes`` for why it runs in several processes (``--processes``). At the end
every point is flushed and the acknowledged count checked. Prints a summary and, as
its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# One BLAS thread: the simulated step is one training thread, as a GPU-driving loop is;
# a multi-threaded BLAS would turn every other thread's CPU into step time on a small box.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402  (after the thread settings)

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import embedded_server  # noqa: E402

import trackhouse.client as th  # noqa: E402

KEYS = [f"metric_{k:02d}" for k in range(20)]
QUIET_S = 3.0  # seconds the client is left idle to measure its polling


def ns_per_value_log(run: th.Run, calls: int) -> float:
    kw = dict.fromkeys(KEYS, 0.5)
    t0 = time.perf_counter()
    for step in range(calls):
        run.log(step=step, **kw)
    return (time.perf_counter() - t0) / (calls * len(KEYS)) * 1e9


def ns_per_value_log_metrics(run: th.Run, calls: int) -> float:
    row = dict.fromkeys(KEYS, 0.5)
    t0 = time.perf_counter()
    for step in range(calls):
        row["metric_00"] = step * 1e-3  # a real loop updates its values
        run.log_metrics(row, step=step)
    return (time.perf_counter() - t0) / (calls * len(KEYS)) * 1e9


def ns_per_value_array(run: th.Run, values: int, chunk: int) -> float:
    """Time of the calls only: with the sender woken at 10k points, this is the buffer rate
    while the sender encodes and sends concurrently (they share the GIL)."""
    steps = np.arange(chunk, dtype=np.int64)
    data = np.random.default_rng(0).random(chunk)
    calls = max(1, values // chunk)
    t0 = time.perf_counter()
    for i in range(calls):
        run.log_array(f"reward_{i % 4}", steps, data)
    return (time.perf_counter() - t0) / (calls * chunk) * 1e9


def _numpy_step(size: float) -> Callable[[], None]:
    """``size`` products of 128x128 matrices on one BLAS thread: CPU-bound work that releases
    the GIL (as CUDA launches and waits do) and leaves the caches full of BLAS data, the
    harshest case for the Python call that follows. A fraction of a product (``size`` 7.25:
    seven, and one of 128x128 by 128x32) comes first, so the step can be sized to 1 ms within
    a percent (one product is ~0.13 ms here) and still ends on whole products."""
    a = np.random.default_rng(1).random((128, 128))
    whole, cols = int(size), round((size - int(size)) * 128)
    part = np.ascontiguousarray(a[:, :cols]) if cols else None

    def step() -> None:
        if part is not None:
            a @ part
        for _ in range(whole):
            a @ a

    return step


def _torch_step(size: int) -> Callable[[], None]:
    """One training step of a small MLP on the CPU, one torch thread: forward, cross-entropy,
    backward and an SGD step with momentum on a batch of ``size`` (the Python of
    ``nn.Module`` and ``optim`` runs in the step, as it does in a GPU loop)."""
    try:
        import torch
    except ImportError:
        raise SystemExit("--workload torch needs PyTorch: pip install torch (a CPU build is enough)") from None
    torch.set_num_threads(1)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))  # ~0.7 ms of dispatch at any batch
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(size, 64), torch.randint(0, 10, (size,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


# Each workload: its step's maker, the size calibration starts from, and the size's grain.
WORKLOADS: dict[str, tuple[Callable[[Any], Callable[[], None]], float, float]] = {
    "numpy": (_numpy_step, 7.0, 1 / 128), "torch": (_torch_step, 64, 1)}


def _workload(kind: str, step_ms: float, size: float = 0) -> tuple[Callable[[], None], float]:
    """The step of workload ``kind`` and its size: ``size`` when > 0 (the same work for A/B runs
    of one build), else calibrated to about ``step_ms`` ms.

    Calibration times rounds of 300 steps, one by one, and scales the size by the median step
    (a preempted step does not move it) until the median is within 2 % of ``step_ms`` or a round
    leaves the size unchanged: the machine's speed drifts under other load, so it runs when the
    loop is about to (after the flush and the idle measurement), not at the start of the process.
    The numpy step's size has a grain of 1/128 of a product (before 2026-11-28 whole products,
    ~13 % of the step: loops ran 0.77-1.19 ms steps)."""
    make, start, grain = WORKLOADS[kind]
    if size > 0:
        return make(size), size
    size, clock = start, time.perf_counter
    for _ in range(12):
        step, took = make(size), []
        for _ in range(300):
            t0 = clock()
            step()
            took.append(clock() - t0)
        median_ms = statistics.median(took) * 1e3
        now = max(grain, round(size * step_ms / median_ms / grain) * grain)
        if abs(median_ms - step_ms) <= 0.02 * step_ms or now == size:
            break
        size = now
    return step, size


_OTHERS = -1  # a snapshot's key for the CPU of all threads but the calling one, ended ones included
ENDED = "(threads that ended)"


def _thread_cpu() -> dict[int, tuple[str, int]]:
    """CPU nanoseconds used so far by each thread of this process except the calling one, with
    its name (Python's for Python threads, the kernel's for gRPC's own), from
    /proc/self/task/*/schedstat: nanoseconds, where /proc's stat counts 10 ms ticks. Key
    ``_OTHERS``: the process's CPU less the calling thread's, which counts threads that
    ended too (a stream's threads live only while it is open)."""
    others = time.process_time_ns() - time.thread_time_ns()
    me = threading.get_native_id()
    names = {t.native_id: t.name for t in threading.enumerate()}
    found = {}
    for task in Path("/proc/self/task").iterdir():
        tid = int(task.name)
        if tid == me:
            continue
        try:
            ns = int((task / "schedstat").read_text().split()[0])
            name = names.get(tid) or (task / "comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        found[tid] = (name, ns)
    found[_OTHERS] = (ENDED, others)
    return found


def _background_ns(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, int]:
    """CPU ns each thread name used between two ``_thread_cpu`` snapshots; ``ENDED``: what threads
    that ended before the second used (all the others' CPU less what the live ones account for)."""
    used: dict[str, int] = {}
    for tid, (name, ns) in after.items():
        if tid != _OTHERS:
            used[name] = used.get(name, 0) + ns - before.get(tid, (name, 0))[1]
    ended = after[_OTHERS][1] - before[_OTHERS][1] - sum(used.values())
    if ended > 0:  # below 0: only the skew of the reads (the process clock is read first)
        used[ENDED] = ended
    return used


def step_loop_slowdown(client: th.Client, run: th.Run, step_ms: float, steps: int, trials: int, reps: float = 0,
                       fresh: bool = False, workload: str = "numpy") -> dict[str, Any]:
    """The loop's slowdown from logging, three ways; the step is ``workload``'s (``WORKLOADS``).

    What is logged: one dict for the whole loop, one of its 20 values updated a step
    (``row["metric_00"] = step``, with or without logging) and the other 19 the same float
    object throughout, so the call reads keys and values gone cold in the step. ``fresh``
    (``--fresh``): each step computes its 20 metrics (new float objects, as a loss or an
    accuracy is), with or without logging, and a logging step builds a dict of them and
    logs it (``run.log_metrics(dict(zip(KEYS, values)), step=step)``): the dict's
    building is counted in the call.

    ``step_loop_slowdown_pct``: what logging costs per step — the CPU the training
    thread spends inside the logging calls plus the CPU the client's background threads
    used (sender, stream loop, gRPC's own threads), counted as if it were all taken from
    the training thread — over the loop's time without logging. The background counted is
    every CPU ns of those threads over all trials, with and without logging, per logged
    step (``background_all_us_per_step``): a batch is sent every 5 s (~5,000 steps) by default,
    more rarely than a trial ends, so a median over trials would miss most of them (and the
    sends that fall in trials without logging) — less what the idle client's polling
    (``background_polling_us_per_step``, measured for ``QUIET_S`` before the trials: gRPC's
    timed wake-ups while a stream is open) used over the trials without logging. The loop
    the issue compares with has no client at all; in a job that logs every step the client
    polls only for as long as the loop runs, which the logging trials' own background
    already counts. ``step_loop_slowdown_upper_pct`` keeps that polling of the trials
    without logging (the headline until 2026-11-28: an upper bound, charging the idle
    client twice). ``step_loop_slowdown_median_bg_pct`` is the figure with the median
    background of the logging trials instead (the definition before 2026-11-27 06:50;
    biased low when batches are rarer than trials). The loop is CPU-bound on one thread,
    so this CPU is the time logging adds; it does not count the moments the OS gives the
    core to another process, which logging does not cause.
    The CPU clock read around each call costs about a microsecond itself (a system call
    in this VM); the trials without logging read it the same way around nothing, and
    that median is subtracted (``instrument_us_per_step``);
    ``step_loop_slowdown_raw_pct`` is the upper figure without the subtraction.
    ``calls_wall_slowdown_pct``: the same with wall time inside the calls instead of
    their CPU (adds preemption by other processes and GIL waits: an upper bound).
    ``wall_ab_slowdown_pct``: the median ratio of wall times of alternating trials with
    and without logging; direct, but on a shared machine its noise is larger than 1 %.
    ``background_by_thread_us_per_step``: the median background CPU per logged step by
    thread name; ``background_all_by_thread_us_per_step``: every ns of each, as in
    ``background_all_us_per_step``;
    ``background_idle_us_per_step``: what the background threads use in the trials
    without logging (an open stream with nothing to send: gRPC's polling, and sends of
    points logged in the trial before).
    ``background_polling_us_per_step``: the background CPU of the client left idle for
    ``QUIET_S`` before the trials (flushed, stream open: gRPC's timed wake-ups), per
    step of the loop's length.
    """
    row = dict.fromkeys(KEYS, 0.0)
    source = np.random.default_rng(2).random(len(KEYS))
    assert client.flush(timeout=600)  # no backlog of earlier phases
    before = _thread_cpu()
    time.sleep(QUIET_S)  # the measurement: what an idle client costs a second
    polling_per_s = sum(_background_ns(before, _thread_cpu()).values()) / 1e9 / QUIET_S
    work, size = _workload(workload, step_ms, reps)  # calibrated now: the sender has nothing left to send
    ratios, base, calls, empty, walls, background, idle = [], [], [], [], [], [], []
    per_thread: dict[str, list[float]] = {}
    clock, cpu = time.perf_counter, time.thread_time
    first = _thread_cpu()
    for trial in range(trials):
        times = {}
        for logging in ((False, True) if trial % 2 == 0 else (True, False)):  # alternate: drift cancels
            spent, spent_cpu, snapshot = 0.0, 0.0, _thread_cpu()
            t0 = clock()
            for step in range(steps):
                work()
                values = (source * step).tolist() if fresh else ()  # the step's metrics
                t1, c1 = clock(), cpu()
                if fresh:
                    if logging:
                        run.log_metrics(dict(zip(KEYS, values, strict=True)), step=step)
                else:
                    row["metric_00"] = step
                    if logging:
                        run.log_metrics(row, step=step)
                spent_cpu += cpu() - c1
                spent += clock() - t1
            times[logging] = clock() - t0
            if logging:
                used = _background_ns(snapshot, _thread_cpu())
                for name, ns in used.items():
                    per_thread.setdefault(name, []).append(ns / 1e3 / steps)
                background.append(sum(used.values()) / 1e9)
                calls.append(spent_cpu)
                walls.append(spent)
            else:
                empty.append(spent_cpu)
                idle.append(sum(_background_ns(snapshot, _thread_cpu()).values()) / 1e9)
        ratios.append(times[True] / times[False] - 1)
        base.append(times[False])
    all_used = _background_ns(first, _thread_cpu())  # logging and plain trials
    everything = sum(all_used.values()) / 1e9
    plain, instrument = statistics.median(base), statistics.median(empty)
    in_calls, bg = statistics.median(calls), statistics.median(background)
    polling = polling_per_s * sum(base)  # of the idle client, over the trials without logging
    return {"step_loop_slowdown_pct": (in_calls - instrument + (everything - polling) / trials) / plain * 100,
            "step_loop_slowdown_upper_pct": (in_calls - instrument + everything / trials) / plain * 100,
            "background_polling_us_per_step": polling_per_s * plain / steps * 1e6,
            "step_loop_slowdown_median_bg_pct": (in_calls - instrument + bg) / plain * 100,
            "step_loop_slowdown_raw_pct": (in_calls + everything / trials) / plain * 100,
            "calls_wall_slowdown_pct": (statistics.median(walls) + everything / trials) / plain * 100,
            "wall_ab_slowdown_pct": statistics.median(ratios) * 100, "step_ms": plain / steps * 1e3,
            "metrics": "fresh" if fresh else "reused", "workload": workload, "workload_size": size,
            "calls_us_per_step": (in_calls - instrument) / steps * 1e6,
            "instrument_us_per_step": instrument / steps * 1e6,
            "background_us_per_step": bg / steps * 1e6,
            "background_idle_us_per_step": statistics.median(idle) / steps * 1e6,
            "background_all_us_per_step": everything / (trials * steps) * 1e6,
            "background_counted_us_per_step": (everything - polling) / (trials * steps) * 1e6,
            "background_all_by_thread_us_per_step": {
                name: round(ns / 1e3 / (trials * steps), 2) for name, ns in sorted(all_used.items())},
            "background_by_thread_us_per_step": {
                name: round(statistics.median(v + [0.0] * (trials - len(v))), 2)
                for name, v in sorted(per_thread.items())
            }}


def step_loop_processes(address: str, args: argparse.Namespace) -> dict[str, Any]:
    """``step_loop_slowdown`` in ``args.processes`` fresh processes, one after another, each with its
    own client of ``address``; each figure is the mean over the processes, ``*_by_process`` beside
    the headline.

    Why several: the call's cost after a step is mostly cache misses, and how many depends on
    where the process's memory lands in the caches against the step's data, which changes from
    one process to the next: the same code cost 3.8, 4.6 and 8.5 us a call in three runs in a row
    on a quiet machine (2026-11-28), and the clock read around nothing 2 or 4 us. One process is
    one draw of that; the mean over several is what a job can expect to pay."""
    runs = []
    for k in range(args.processes):
        cmd = [sys.executable, __file__, "--step-loop-only", "--processes", "1", "--url", address,
               "--steps", str(args.steps), "--trials", str(args.trials), "--workload", args.workload,
               "--step-reps", str(args.step_reps), "--spool-dir", os.path.join(args.spool_dir, f"p{k}")]
        done = subprocess.run(cmd + (["--fresh"] if args.fresh else []), capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"step loop process {k + 1} exited with {done.returncode}:\n{done.stderr[-3000:]}")
        one = json.loads(done.stdout.strip().splitlines()[-1])
        runs.append(one)
        print(f"step loop process {k + 1}/{args.processes}: {one['step_loop_slowdown_pct']:.2f} % "
              f"({one['step_ms']:.2f} ms steps; call {one['calls_us_per_step']:.1f} us, background "
              f"{one['background_counted_us_per_step']:.1f} us a step; upper bound "
              f"{one['step_loop_slowdown_upper_pct']:.2f} %)", flush=True)
    result: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, float):
            result[key] = statistics.fmean(one[key] for one in runs)
        elif isinstance(first, dict):
            names = sorted({name for one in runs for name in one[key]})
            result[key] = {name: round(statistics.fmean(one[key].get(name, 0.0) for one in runs), 2) for name in names}
        elif key in ("points_logged", "points_lost"):
            result[key] = sum(one[key] for one in runs)
        else:
            result[key] = first if all(one[key] == first for one in runs) else [one[key] for one in runs]
    headline = [one["step_loop_slowdown_pct"] for one in runs]
    result.update(processes=len(runs), step_loop_slowdown_pct_by_process=headline,
                  step_loop_slowdown_median_process_pct=statistics.median(headline),
                  step_loop_slowdown_upper_pct_by_process=[one["step_loop_slowdown_upper_pct"] for one in runs],
                  calls_us_per_step_by_process=[one["calls_us_per_step"] for one in runs])
    return result


def bench(address: str, args: argparse.Namespace) -> dict[str, Any]:
    if args.step_loop_only and args.processes > 1:
        return step_loop_processes(address, args)
    client = th.connect(address, settings=th.Settings.from_env(url=address, spool_dir=args.spool_dir))
    run = client.start_run(experiment="bench-client-overhead")
    if args.step_loop_only:
        return _finish(client, run, step_loop_slowdown(client, run, 1.0, args.steps, args.trials, args.step_reps,
                                                        args.fresh, args.workload))
    result: dict[str, Any] = {}
    result["ns_per_value_log"] = statistics.median(ns_per_value_log(run, args.calls) for _ in range(3))
    assert client.flush(timeout=600)
    result["ns_per_value_log_metrics"] = statistics.median(ns_per_value_log_metrics(run, args.calls) for _ in range(3))
    assert client.flush(timeout=600)
    result["ns_per_value_array"] = statistics.median(
        ns_per_value_array(run, args.array_values, args.chunk) for _ in range(3)
    )
    result["values_per_s_array"] = 1e9 / result["ns_per_value_array"]
    t0 = time.perf_counter()
    assert client.flush(timeout=600)
    result["array_end_to_end_values_per_s"] = 3 * args.array_values / (time.perf_counter() - t0 + 3 * args.array_values
                                                                       * result["ns_per_value_array"] / 1e9)
    quiet = th.connect(address, settings=th.Settings.from_env(
        url=address, spool_dir=args.spool_dir, flush_interval=600.0, max_batch_points=10**9, memory_budget=2**33))
    qrun = quiet.resume_run(run.run_id)
    samples = []
    for _ in range(3):  # the sender not woken during the calls: the buffer's own rate
        samples.append(ns_per_value_array(qrun, args.array_values, args.chunk))
        assert quiet.flush(timeout=600)  # sent, its arena recycled: the next pass writes warm memory, as a
    result["ns_per_value_array_buffer_only"] = statistics.median(samples)  # loop does between sends
    quiet.close()
    if args.processes == 1:
        result.update(step_loop_slowdown(client, run, 1.0, args.steps, args.trials, args.step_reps, args.fresh,
                                         args.workload))
        return _finish(client, run, result)
    _finish(client, run, result)  # closed: its idle client does not run beside the step loop's
    loops = step_loop_processes(address, args)
    for key in ("points_logged", "points_lost"):
        loops[key] += result[key]
    return {**result, **loops}


def _finish(client: th.Client, run: th.Run, result: dict[str, Any]) -> dict[str, Any]:
    if not client.flush(timeout=600):
        raise SystemExit("flush did not complete within 600 s")
    stats = client.stats()
    result["points_logged"] = stats["points_logged"]
    result["points_lost"] = stats["points_logged"] - stats["points_acked"]
    result["machine"] = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    run.finish()
    client.close()
    return result


def bench_buffer_only(args: argparse.Namespace) -> dict[str, Any]:
    """The logging calls alone: a client whose sender never wakes during the measurement
    (no server, nothing sent until the end), i.e. the cost of moving values into the buffer."""
    settings = th.Settings(flush_interval=600.0, max_batch_points=10**9, memory_budget=2**34,
                           spool_dir=args.spool_dir, replay_orphans=False)
    client = th.Client(th.MemoryTransport(), settings)
    run = client.start_run(experiment="bench-client-overhead")
    result: dict[str, Any] = {}
    for name, measure in (("ns_per_value_log", lambda: ns_per_value_log(run, args.calls)),
                          ("ns_per_value_log_metrics", lambda: ns_per_value_log_metrics(run, args.calls)),
                          ("ns_per_value_array", lambda: ns_per_value_array(run, args.array_values, args.chunk))):
        samples = []
        for _ in range(3):
            samples.append(measure())
            client._batcher.take()  # drop what was measured (the sender is idle)
            client._batcher.recycle()
        result[name] = statistics.median(samples)
    result["values_per_s_array"] = 1e9 / result["ns_per_value_array"]
    result["step_loop_slowdown_pct"] = len(KEYS) * result["ns_per_value_log_metrics"] / 1e6 * 100  # of a 1 ms step
    result["machine"] = f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    client._batcher.discard()
    client.close(timeout=1.0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--url", help="server address (default: start an embedded server)")
    parser.add_argument("--calls", type=int, default=50_000, help="log / log_metrics calls of 20 values per pass")
    parser.add_argument("--array-values", type=int, default=5_000_000, help="values per log_array pass")
    parser.add_argument("--chunk", type=int, default=100_000, help="values per log_array call")
    parser.add_argument("--steps", type=int, default=2000, help="steps per slowdown trial")
    parser.add_argument("--trials", type=int, default=7)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="numpy",
                        help="the step: numpy matrix products (default), or a torch MLP training step")
    parser.add_argument("--step-reps", type=float, default=0,
                        help="the step's size instead of calibrating it to 1 ms: matrix products (numpy) "
                             "or batch size (torch)")
    parser.add_argument("--processes", type=int, default=5,
                        help="run the step loop in this many fresh processes, one after another, and report "
                             "the mean (1: in this process)")
    parser.add_argument("--fresh", action="store_true",
                        help="the step loop logs a new dict of new values each step (built in the call)")
    parser.add_argument("--spool-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "trackhouse-bench-spool"))
    parser.add_argument("--step-loop-only", action="store_true",
                        help="with a server: only the 1 ms step loop (and its per-thread CPU breakdown)")
    parser.add_argument("--buffer-only", action="store_true",
                        help="measure only the logging calls into the buffer (no server, sender idle)")
    args = parser.parse_args()
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.buffer_only:
        result = bench_buffer_only(args)
        rate = result["values_per_s_array"] / 1e6
        print(f"buffer only: log {result['ns_per_value_log']:.0f} ns/value, log_metrics "
              f"{result['ns_per_value_log_metrics']:.0f} ns/value, log_array {rate:,.0f} M values/s; "
              f"20 metrics cost {result['step_loop_slowdown_pct']:.2f} % of a 1 ms step")
        print(json.dumps(result))
        return
    if args.url:
        result = bench(args.url, args)
    else:
        with embedded_server() as (address, _pid):
            result = bench(address, args)
    if not args.step_loop_only:
        print(f"log(**20 metrics):       {result['ns_per_value_log']:8.0f} ns per value (target <= 2000)")
        print(f"log_metrics(dict of 20): {result['ns_per_value_log_metrics']:8.0f} ns per value")
        print(f"log_array({args.chunk:,} values): {result['ns_per_value_array']:8.2f} ns per value = "
              f"{result['values_per_s_array'] / 1e6:,.0f} M values/s with the sender busy; buffer alone "
              f"{1e3 / result['ns_per_value_array_buffer_only']:,.0f} M values/s (target >= 50 M); end to end "
              f"(acknowledged) {result['array_end_to_end_values_per_s'] / 1e6:.1f} M values/s")
    print(f"1 ms step loop ({result['workload']} of size {result['workload_size']}: {result['step_ms']:.2f} ms "
          f"measured), 20 metrics a step ({result['metrics']}): "
          f"logging costs "
          f"{result['step_loop_slowdown_pct']:.2f} % of the loop in CPU (target <= 1 %; background "
          f"{result['background_all_us_per_step']:.1f} us per logged step, every ns of the trials, less an idle "
          f"client's polling over the trials without logging: {result['background_polling_us_per_step']:.2f} us "
          f"a step), {result['calls_wall_slowdown_pct']:.2f} % counting wall time in the calls; "
          f"wall-clock A/B {result['wall_ab_slowdown_pct']:+.1f} %")
    threads = ", ".join(f"{name} {us:.2f}" for name, us in result["background_by_thread_us_per_step"].items()
                        if us >= 0.05)
    print(f"upper bound, that polling counted too: {result['step_loop_slowdown_upper_pct']:.2f} %; with the "
          f"median background of the logging trials instead of all of it: "
          f"{result['step_loop_slowdown_median_bg_pct']:.2f} %")
    print(f"per step: {result['calls_us_per_step']:.1f} us CPU in the call (clock reads of "
          f"{result['instrument_us_per_step']:.1f} us subtracted), {result['background_us_per_step']:.1f} us in "
          f"background threads ({result['background_idle_us_per_step']:.1f} when idle): {threads}")
    if result.get("processes", 1) > 1:
        each = " / ".join(f"{pct:.2f}" for pct in result["step_loop_slowdown_pct_by_process"])
        print(f"means over {result['processes']} processes; step_loop_slowdown_pct by process: {each} % "
              f"(median {result['step_loop_slowdown_median_process_pct']:.2f} %)")
    print(f"{result['points_logged']:,} points logged, {result['points_lost']:,} not acknowledged")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
