"""`trackhouse sync DIR`: upload a client spool (offline runs, or what a job could not deliver).

DIR is a spool root (``.trackhouse/spool`` by default, one subdirectory per
writer) or one writer's directory. Each writer's batches are replayed with their
original (writer_id, seq), so the server stores every point once however many
times the sync runs; offline runs are created once (see trackhouse.client.replay).
Exit status 0 when every directory was uploaded, 1 when some must be synced again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import trackhouse.client as th


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "sync", help="upload a client spool directory (offline runs, undelivered points)",
        description="Upload what the trackhouse client spooled to disk. Safe to re-run: points already "
                    "stored are recognised by their writer id and sequence number and not stored twice.",
    )  # fmt: skip
    parser.add_argument("directory", metavar="DIR",
                        help="spool root (e.g. .trackhouse/spool) or one writer's directory")
    parser.add_argument("--url", default=None,
                        help="ingest address host:port / grpc://host:port (default: env TRACKHOUSE_CLIENT_URL, "
                             "else 127.0.0.1:50051)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


class _Bar:
    """A one-line progress bar on a terminal stream, redrawn at most 10 times a second."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last = 0.0

    def __call__(self, directory: Path, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        frac = done / total if total else 1.0
        filled = int(frac * 30)
        self._out.write(f"\r  {directory.name[:12]} [{'#' * filled}{'.' * (30 - filled)}] {frac:6.1%} "
                        f"{done / 1e6:8.1f} / {total / 1e6:.1f} MB")
        self._out.flush()

    def end(self) -> None:
        self._out.write("\n")


def run(args: argparse.Namespace) -> int:
    root = Path(args.directory)
    if not root.exists():
        print(f"trackhouse sync: {root} does not exist", file=sys.stderr)
        return 2
    bar = None if args.quiet else _Bar(sys.stderr)
    reports = th.sync(root, url=args.url, progress=bar)
    if bar is not None and reports:
        bar.end()
    if not reports:
        print(f"nothing to sync in {root}")
        return 0
    for r in reports:
        state = "done" if r.complete else f"INCOMPLETE ({r.error})"  # the error says what to do next
        print(f"{r.directory}: {state}; {r.points:,} points in {r.batches:,} batches "
              f"({r.duplicate_batches:,} already stored), {r.runs_created} runs created, {r.ops} run updates")
        for local, remote in r.runs.items():
            print(f"  offline run {local} -> run {remote}")
        for local in r.missing_runs:
            print(f"  run {local} was created by another directory, not synced yet: sync that one, then this again")
        for local, kept in r.set_aside.items():
            print(f"  offline run {local} refused by the server: its records are kept in {kept}")
        if r.rejected_points:
            print(f"  {r.rejected_points:,} points rejected by the server (see the log)")
        for c in r.corruptions:
            print(f"  CORRUPT: {c}; that record is lost, the rest was replayed")
    return 0 if all(r.complete for r in reports) else 1
