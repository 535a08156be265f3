"""Start `trackhouse serve` as a separate process on a free port, for benchmarks.

A separate process, as in production: the client's CPU and the server's are not
shared by one interpreter. The server prints its address; we read it from stdout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_ADDRESS = re.compile(r"gRPC \(ingest \+ query\): (\S+)")


@contextmanager
def embedded_server(env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Yield (address, pid) of a fresh embedded server over a temporary store."""
    with tempfile.TemporaryDirectory(prefix="trackhouse-bench-") as tmp:
        cmd = [sys.executable, "-m", "trackhouse.cli.main", "serve",
               "--store", f"chdb://{Path(tmp) / 'data'}", "--grpc-port", "0", "--http-port", "0"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                env={**os.environ, **(env or {})})
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                match = _ADDRESS.search(line)
                if match:
                    break
            else:
                raise RuntimeError(f"server exited with {proc.wait()} before printing its address")
            yield match.group(1), proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks
