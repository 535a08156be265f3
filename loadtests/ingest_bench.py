"""Ingest throughput: N client processes × M runs, each run a training rank streaming metrics.

    python loadtests/ingest_bench.py --procs 4 --runs 8 --seconds 60       # starts an embedded server
    python loadtests/ingest_bench.py --url 127.0.0.1:50051 --procs 2 ...    # an existing server

Each run has its own stream and behaves like a rank: `--keys` metric keys (default
a spread of 10–100), increasing steps, one columnar MetricBatch of `--batch-steps`
steps × its keys at a time, at most `--window` batches unacknowledged (as the client
keeps them). Batches are encoded with numpy directly, so the client processes cost
little and the figure is the server's. Afterwards it checks, per run, that the
store holds exactly the acknowledged points (lost / duplicates), prints a summary,
and as its last line one JSON object:
{"points_per_s", "ack_p50_ms", "ack_p99_ms", "server_rss_mb", "streams", "lost", "duplicates"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _server import cpu_seconds, embedded_server, rss_mb


def _keys_for(run_index: int, fixed: int) -> int:
    return fixed if fixed else 10 + (run_index * 37) % 91  # 10..100 keys


async def _rank(stub: Any, pb: Any, run_id: str, keys: int, args: argparse.Namespace,
                deadline: float, counter: Any, latencies: list[float]) -> int:
    """Stream batches for one run until the deadline; return the acknowledged points."""
    names = [f"layer{k // 10}/metric_{k}" for k in range(keys)]
    steps_per_batch = args.batch_steps
    n = steps_per_batch * keys
    key_index = np.tile(np.arange(keys, dtype="<u4"), steps_per_batch).tobytes()
    writer = uuid.uuid4().hex
    queue: asyncio.Queue[Any] = asyncio.Queue(args.window)
    sent_at: dict[int, float] = {}
    acked = 0

    async def requests() -> Any:
        seq, step = 0, 0
        rng = np.random.default_rng(seq)
        started = time.monotonic()
        while time.monotonic() < deadline:
            if args.rate:  # pace like a rank producing `rate` points/s (a load generator may sleep)
                await asyncio.sleep(max(0.0, started + seq * n / args.rate - time.monotonic()))
            seq += 1
            steps = np.repeat(np.arange(step, step + steps_per_batch, dtype="<i8"), keys)
            step += steps_per_batch
            await queue.put(seq)  # blocks when `window` batches are unacknowledged
            sent_at[seq] = time.perf_counter()
            yield pb.MetricBatch(
                writer_id=writer, seq=seq, run_ids=[run_id], keys=names, key_index=key_index,
                steps=steps.tobytes(), timestamps=np.full(n, int(time.time() * 1000), "<i8").tobytes(),
                values=rng.random(n).tobytes(),
            )

    async for ack in stub.StreamMetrics(requests()):
        await queue.get()
        if ack.status != pb.STORED:
            raise RuntimeError(f"batch {ack.seq} not stored: {ack.status} {ack.message}")
        latencies.append(time.perf_counter() - sent_at.pop(ack.seq))
        acked += ack.points
        with counter.get_lock():
            counter.value += ack.points
    return acked


async def _client(address: str, run_ids: list[str], first: int, args: argparse.Namespace,
                  deadline: float, counter: Any) -> dict[str, Any]:
    import grpc

    from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        acked = await asyncio.gather(*(
            _rank(stub, ingest_pb2, rid, _keys_for(first + i, args.keys), args, deadline, counter, latencies)
            for i, rid in enumerate(run_ids)
        ))
    return {"acked": dict(zip(run_ids, acked, strict=True)), "latencies": latencies}


def _client_process(address: str, run_ids: list[str], first: int, args: argparse.Namespace,
                    deadline_wall: float, counter: Any, out: Any) -> None:
    deadline = time.monotonic() + (deadline_wall - time.time())
    out.send(asyncio.run(_client(address, run_ids, first, args, deadline, counter)))


def _create_runs(address: str, count: int) -> list[str]:
    import grpc

    from trackhouse.proto.v1 import ingest_pb2, ingest_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        exp = stub.CreateExperiment(ingest_pb2.CreateExperimentRequest(name=f"ingest-bench-{uuid.uuid4().hex[:8]}"))
        return [stub.CreateRun(ingest_pb2.CreateRunRequest(experiment_id=exp.experiment_id,
                                                          run_name=f"rank-{i}")).run_id for i in range(count)]


def _stored(address: str, run_ids: list[str]) -> dict[str, int]:
    import grpc

    from trackhouse.proto.v1 import query_pb2, query_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        stub = query_pb2_grpc.QueryServiceStub(ch)
        return {rid: sum(m.count for m in stub.GetRun(query_pb2.GetRunRequest(run_id=rid)).metrics)
                for rid in run_ids}


def _progress(counter: Any, seconds: float, stop: threading.Event, samples: list[float], pid: int | None) -> None:
    start, last, last_t = time.monotonic(), 0, time.monotonic()
    while not stop.wait(1.0):
        now, value = time.monotonic(), counter.value
        rate = (value - last) / (now - last_t)
        last, last_t = value, now
        rss = rss_mb(pid) if pid else 0.0
        samples.append(rss)
        print(f"\r  {now - start:5.0f}/{seconds:.0f} s  {value:>13,} points acked  {rate:>12,.0f} points/s"
              + (f"  server RSS {rss:,.0f} MB" if pid else ""), end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def run_bench(address: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    run_ids = _create_runs(address, args.procs * args.runs)
    ctx = mp.get_context("spawn")
    counter = ctx.Value("q", 0)
    deadline_wall = time.time() + args.seconds + 2.0  # processes need ~1-2 s to start
    procs, pipes = [], []
    for p in range(args.procs):
        parent, child = ctx.Pipe(duplex=False)
        chunk = run_ids[p * args.runs:(p + 1) * args.runs]
        proc = ctx.Process(target=_client_process,
                           args=(address, chunk, p * args.runs, args, deadline_wall, counter, child))
        proc.start()
        child.close()  # so recv() sees EOF if the child dies
        procs.append(proc)
        pipes.append(parent)
    while time.time() < deadline_wall - args.seconds:
        time.sleep(0.05)
    t0, base = time.perf_counter(), counter.value
    cpu0 = cpu_seconds(pid) if pid else 0.0
    stop, rss_samples = threading.Event(), []
    progress = threading.Thread(target=_progress, args=(counter, args.seconds, stop, rss_samples, pid), daemon=True)
    progress.start()
    try:
        results = [pipe.recv() for pipe in pipes]
    except EOFError:
        stop.set()
        raise SystemExit("a client process failed (its traceback is above)") from None
    elapsed = time.perf_counter() - t0
    server_cpu = cpu_seconds(pid) - cpu0 if pid else 0.0
    stop.set()
    progress.join()
    for proc in procs:
        proc.join()
    acked = {rid: n for r in results for rid, n in r["acked"].items()}
    latencies = np.array([x for r in results for x in r["latencies"]]) * 1000
    stored = _stored(address, run_ids)
    lost = sum(max(0, acked[r] - stored[r]) for r in run_ids)
    duplicates = sum(max(0, stored[r] - acked[r]) for r in run_ids)
    return {
        "points_per_s": round((sum(acked.values()) - base) / elapsed),
        "ack_p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "ack_p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "server_rss_mb": round(max(rss_samples, default=0.0)),
        "streams": len(run_ids),
        "lost": lost,
        "duplicates": duplicates,
        "points_acked": sum(acked.values()),
        "server_cpu_us_per_point": round(server_cpu / max(1, sum(acked.values()) - base) * 1e6, 3),
        "seconds": round(elapsed, 1),
    }


def mlflow_baseline(procs: int, seconds: float) -> float:
    """MLflow's log_batch throughput (points/s) from `procs` processes, its server started here.

    The same machine, the same run: `mlflow server` over SQLite with --workers 1 (its best
    configuration, measured before the project started), 1,000 metrics per log_batch through MlflowClient.
    """
    import shutil
    import tempfile

    from mlflow_compare import free_port, log_throughput, process

    tmp = Path(tempfile.mkdtemp(prefix="ingest-bench-mlflow-"))
    try:
        port = free_port()
        uri = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
               "--default-artifact-root", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
        with process(cmd, f"{uri}/health", tmp / "mlflow.log"):
            from mlflow import MlflowClient

            experiment = MlflowClient(tracking_uri=uri).create_experiment("ingest-bench")
            print(f"[mlflow] log_batch from {procs} processes for {seconds:.0f} s …", file=sys.stderr, flush=True)
            return log_throughput(uri, experiment, seconds, clients=procs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="server address (default: start an embedded server)")
    parser.add_argument("--procs", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--runs", type=int, default=4, help="runs (streams) per process (default 4)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--keys", type=int, default=0, help="keys per run (default: 10-100, varying)")
    parser.add_argument("--batch-steps", type=int, default=200, help="steps per batch (default 200)")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="points/s per stream, paced like a training rank (default 0: as fast as acks allow)")
    parser.add_argument("--window", type=int, default=2, help="unacknowledged batches per stream (default 2)")
    parser.add_argument("--mlflow", action="store_true",
                        help="also measure MLflow's log_batch throughput in this run (needs the loadtests extra)")
    args = parser.parse_args()
    baseline = mlflow_baseline(args.procs, args.seconds) if args.mlflow else None
    if args.url:
        result = run_bench(args.url, None, args)
    else:
        with embedded_server() as (address, pid):
            result = run_bench(address, pid, args)
    print(f"{result['points_acked']:,} points acked in {result['seconds']} s from {result['streams']} streams: "
          f"{result['points_per_s']:,} points/s; ack p50 {result['ack_p50_ms']} ms, p99 {result['ack_p99_ms']} ms; "
          f"server RSS {result['server_rss_mb']} MB, CPU {result['server_cpu_us_per_point']} µs/point; "
          f"lost {result['lost']}, duplicates {result['duplicates']}")
    if baseline is not None:
        result["mlflow_log_batch_points_per_s"] = round(baseline)
        result["ratio_vs_mlflow"] = round(result["points_per_s"] / baseline, 1)
        print(f"MLflow log_batch (SQLite, --workers 1, {args.procs} processes): {baseline:,.0f} points/s; "
              f"trackhouse/MLflow = {result['ratio_vs_mlflow']}×")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
