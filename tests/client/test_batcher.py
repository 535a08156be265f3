"""Batcher: columnar buffers, interning, the send decision (pure, fake clock), encoding."""

from __future__ import annotations

import numpy as np

from trackhouse.client.batcher import Batcher, BufferState, Pending, due_at, encode, is_due
from trackhouse.proto.v1 import ingest_pb2

RUN_A = "a" * 32
RUN_B = "b" * 32


def _decode(batch: ingest_pb2.MetricBatch) -> list[tuple[str, str, int, int, float]]:
    n = len(batch.steps) // 8
    run_index = np.frombuffer(batch.run_index, "<u4") if batch.run_index else np.zeros(n, "<u4")
    key_index = np.frombuffer(batch.key_index, "<u4")
    steps = np.frombuffer(batch.steps, "<i8")
    times = np.frombuffer(batch.timestamps, "<i8")
    values = np.frombuffer(batch.values, "<f8")
    assert len(run_index) == len(key_index) == len(times) == len(values) == n
    return [
        (batch.run_ids[r], batch.keys[k], int(s), int(t), float(v))
        for r, k, s, t, v in zip(run_index, key_index, steps, times, values, strict=True)
    ]


def _take_one(b: Batcher, limit: int = 1_000_000) -> Pending:
    chunk = b.take(limit)
    assert chunk is not None
    return chunk


def test_encode_then_decode_round_trips_every_column() -> None:
    b = Batcher(max_points=100)
    b.append(RUN_A, 0, 1_000, [("loss", 0.5), ("acc", 0.25)], now=0.0)
    b.append(RUN_A, 1, 1_001, [("loss", float("nan")), ("acc", float("-inf"))], now=0.0)
    b.append(RUN_A, -5, 2**62, [("loss", 1e300)], now=0.0)
    batch = encode(_take_one(b), writer_id="w", seq=7)
    assert batch.writer_id == "w" and batch.seq == 7
    assert batch.run_index == b""  # one run: the column may be empty
    rows = _decode(batch)
    assert rows[0] == (RUN_A, "loss", 0, 1_000, 0.5)
    assert rows[1] == (RUN_A, "acc", 0, 1_000, 0.25)
    assert np.isnan(rows[2][4]) and rows[3][4] == float("-inf")
    assert rows[4] == (RUN_A, "loss", -5, 2**62, 1e300)


def test_runs_are_coalesced_into_one_batch_with_interned_keys() -> None:
    b = Batcher(max_points=100)
    for step in range(3):
        b.append(RUN_A, step, 10, [("loss", 1.0), ("acc", 2.0)], now=0.0)
        b.append(RUN_B, step, 10, [("acc", 3.0)], now=0.0)
    batch = encode(_take_one(b), writer_id="w", seq=1)
    assert list(batch.run_ids) == [RUN_A, RUN_B]
    assert list(batch.keys) == ["loss", "acc"]
    assert len(batch.run_index) == 9 * 4
    rows = _decode(batch)
    assert [r[:3] for r in rows[:3]] == [(RUN_A, "loss", 0), (RUN_A, "acc", 0), (RUN_B, "acc", 0)]
    assert sum(1 for r in rows if r[0] == RUN_B) == 3
    assert b.take(10) is None


def test_take_respects_the_limit_and_keeps_indices_valid() -> None:
    b = Batcher(max_points=4)
    for step in range(5):
        b.append(RUN_A if step % 2 else RUN_B, step, 0, [(f"k{step}", float(step))], now=0.0)
    first, second = _take_one(b, 3), _take_one(b, 3)
    assert len(first) == 3 and len(second) == 2 and b.take(3) is None
    rows = _decode(encode(first, writer_id="w", seq=1)) + _decode(encode(second, writer_id="w", seq=2))
    assert [(r[0], r[1], r[2]) for r in rows] == [(RUN_A if s % 2 else RUN_B, f"k{s}", s) for s in range(5)]
    assert b.appended == 5


def test_append_asks_for_a_wake_when_non_empty_and_when_full() -> None:
    b = Batcher(max_points=3)
    assert b.append(RUN_A, 0, 0, [("a", 1.0)], now=0.0) is True  # arms the interval
    assert b.append(RUN_A, 1, 0, [("a", 1.0)], now=0.0) is False
    assert b.append(RUN_A, 2, 0, [("a", 1.0), ("b", 2.0)], now=0.0) is True  # reached max_points
    assert b.append(RUN_A, 3, 0, [("a", 1.0)], now=0.0) is False  # already signalled
    assert b.state().points == 5


def test_send_decision_by_size_age_and_force() -> None:
    empty = BufferState(0, None)
    assert not is_due(empty, 100.0, max_points=10, interval=1.0, forced=True)
    assert due_at(empty, interval=1.0) is None
    young = BufferState(3, 50.0)
    assert not is_due(young, 50.5, max_points=10, interval=1.0, forced=False)
    assert is_due(young, 51.0, max_points=10, interval=1.0, forced=False)
    assert is_due(young, 50.5, max_points=10, interval=1.0, forced=True)
    assert is_due(BufferState(10, 50.0), 50.0, max_points=10, interval=1.0, forced=False)
    assert due_at(young, interval=1.0) == 51.0


def test_state_tracks_the_oldest_point() -> None:
    b = Batcher(max_points=10)
    b.append(RUN_A, 0, 0, [("a", 1.0)], now=5.0)
    b.append(RUN_A, 1, 0, [("a", 1.0)], now=9.0)
    assert b.state() == BufferState(2, 5.0)
    b.take(10)
    assert b.state() == BufferState(0, None)
    assert b.discard() == 0
