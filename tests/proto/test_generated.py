"""The committed generated code is what scripts/gen_proto.py produces from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
GENERATED = ROOT / "proto" / "trackhouse" / "proto" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    fresh = tmp_path / "trackhouse" / "proto" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    committed = sorted(p.name for p in GENERATED.iterdir() if p.is_file() and "_pb2" in p.name)
    assert names == committed, "generated file set differs: run `make proto` and commit"
    for name in names:
        assert (fresh / name).read_bytes() == (GENERATED / name).read_bytes(), (
            f"{name} is stale: run `make proto` (scripts/gen_proto.py) and commit the result"
        )


def test_generated_code_imports() -> None:
    from trackhouse.proto.v1 import ingest_pb2, query_pb2

    batch = ingest_pb2.MetricBatch(writer_id="w", seq=1, steps=b"\x00" * 8)
    assert ingest_pb2.MetricBatch.FromString(batch.SerializeToString()) == batch
    assert query_pb2.SearchRunsRequest(filter="x").filter == "x"
