"""Batcher: columnar buffers, interning, the send decision (pure, fake clock), encoding."""

from __future__ import annotations

import sys
import threading
from array import array

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trackhouse.client.batcher import Batcher, BufferState, Rows, Taken, due_at, is_due
from trackhouse.client.wire import encode
from trackhouse.proto.points import Columns, batch_columns, batch_points
from trackhouse.proto.v1 import ingest_pb2

RUN_A = "a" * 32
RUN_B = "b" * 32


def _decode(batch: ingest_pb2.MetricBatch) -> list[tuple[str, str, int, int, float]]:
    cols = batch_columns(batch)
    assert len(cols) == batch_points(batch)
    return [
        (batch.run_ids[r], batch.keys[k], int(s), int(t), float(v))
        for r, k, s, t, v in zip(cols.run_index, cols.key_index, cols.steps, cols.timestamps, cols.values,
                                 strict=True)
    ]


def _append(b: Batcher, run: str, step: int, ts: int, items: list[tuple[str, float]]) -> bool:
    block = b.intern_keys([k for k, _ in items])
    return b.append_row(b.intern_run(run), step, ts, block, [v for _, v in items])


def _take(b: Batcher) -> Taken:
    taken = b.take()
    assert taken is not None
    return taken


def _encode(b: Batcher, taken: Taken, seq: int = 1) -> ingest_pb2.MetricBatch:
    return ingest_pb2.MetricBatch.FromString(encode(taken, b.run_ids, b.keys, writer_id="w", seq=seq))


def _u4(a: npt.ArrayLike) -> bytes:
    return np.asarray(a).astype("<u4").tobytes()


def _reference(taken: Taken, run_ids: list[str], keys: list[str], writer_id: str, seq: int) -> ingest_pb2.MetricBatch:
    """The batch ``encode`` must produce, built with the generated class (sorting instead of
    ``encode``'s counting to find the runs and keys used)."""
    cols, rows = taken.columns, taken.rows
    sets = rows.sets if rows is not None else ()
    col_runs, col_keys = (cols.run_index, cols.key_index) if cols is not None else ([], [])
    set_runs, set_keys = [r for r, _ in sets], [k for _, block in sets for k in block]
    runs_used, run_index = np.unique(np.array([*col_runs, *set_runs], np.int64), return_inverse=True)
    keys_used, key_index = np.unique(np.array([*col_keys, *set_keys], np.int64), return_inverse=True)
    batch = ingest_pb2.MetricBatch(writer_id=writer_id, seq=seq, run_ids=[run_ids[i] for i in runs_used],
                                   keys=[keys[i] for i in keys_used])
    several = len(runs_used) > 1
    if cols is not None:
        batch.run_index = _u4(run_index[: len(col_runs)]) if several else b""
        batch.key_index = _u4(key_index[: len(col_keys)])
        batch.steps, batch.timestamps = cols.steps.astype("<i8").tobytes(), cols.timestamps.astype("<i8").tobytes()
        batch.values = cols.values.astype("<f8").tobytes()
    if rows is not None:
        batch.set_runs = _u4(run_index[len(col_runs) :]) if several else b""
        batch.set_widths = _u4([len(block) for _, block in sets])
        batch.set_keys = _u4(key_index[len(col_keys) :])
        batch.row_sets = _u4(rows.row_sets) if rows.row_sets is not None else b""
        batch.row_steps = rows.steps.astype("<i8").tobytes()
        batch.row_timestamps = rows.timestamps.astype("<i8").tobytes()
        batch.row_values = rows.values.astype("<f8").tobytes()
    return batch


def _columns(runs: list[int], keys: list[int], steps: list[int], times: list[int], values: list[float]) -> Columns:
    return Columns(np.array(runs, np.uint32), np.array(keys, np.uint32), np.array(steps, np.int64),
                   np.array(times, np.int64), np.array(values, np.float64))


_I64_MAX, _I64_MIN = 2**63 - 1, -(2**63)
_RNG = np.random.default_rng(5)
_MANY = 5_000


@pytest.mark.parametrize(
    ("cols", "writer_id", "seq"),
    [
        pytest.param(_columns([], [], [], [], []), "w" * 32, 1, id="empty"),
        pytest.param(_columns([3], [7], [0], [0], [0.0]), "w", 1, id="one point, zeros"),
        pytest.param(_columns([0, 0, 0, 0], [0, 1, 0, 1], [1, 1, 2, 2], [5, 5, 6, 6],
                              [float("nan"), float("inf"), float("-inf"), -0.0]), "w", 2, id="nan and inf"),
        pytest.param(_columns([1, 1, 1], [2, 2, 2], [_I64_MAX, _I64_MIN, -1], [_I64_MAX, _I64_MIN, 2**62],
                              [1e308, 5e-324, -1e-300]), "w", 2**64 - 1, id="extreme steps, times and seq"),
        pytest.param(Columns(_RNG.integers(0, 300, _MANY, dtype=np.uint32), _RNG.integers(0, 1000, _MANY,
                                                                                         dtype=np.uint32),
                             _RNG.integers(_I64_MIN, _I64_MAX, _MANY, dtype=np.int64),
                             _RNG.integers(0, 2**41, _MANY, dtype=np.int64), _RNG.standard_normal(_MANY)),
                     "writer-é" * 20, 300, id="many runs and keys"),
    ],
)  # fmt: skip
def test_encoded_bytes_are_exactly_what_the_generated_class_serializes(cols: Columns, writer_id: str,
                                                                       seq: int) -> None:
    run_ids = [f"run-{i:04d}" for i in range(300)]
    keys = [f"loss/é{i}" if i % 3 else f"k{i}" for i in range(1000)]  # multi-byte UTF-8 too
    wire = encode(Taken(None, cols), run_ids, keys, writer_id=writer_id, seq=seq)
    expected = _reference(Taken(None, cols), run_ids, keys, writer_id, seq)
    assert ingest_pb2.MetricBatch.FromString(wire) == expected
    assert wire == expected.SerializeToString(deterministic=True)


def _row_take(sets: list[tuple[int, list[int]]], rows: list[tuple[int, int, int, list[float]]],
              cols: Columns | None = None) -> Taken:
    """A take of rows (set index, step, timestamp, values) of key sets (run, keys)."""
    key_sets = tuple((run, array("I", keys)) for run, keys in sets)
    row_sets = np.array([r[0] for r in rows], np.uint32) if len(sets) > 1 else None
    values = np.array([v for r in rows for v in r[3]], np.float64)
    return Taken(Rows(key_sets, row_sets, np.array([r[1] for r in rows], np.int64),
                      np.array([r[2] for r in rows], np.int64), values, len(values)), cols)


_SETS = [(7, list(range(20, 40))), (3, [5]), (7, [999, 0, 21])]


@pytest.mark.parametrize(
    "taken",
    [
        pytest.param(_row_take([(3, [4, 2])], [(0, 1, 5, [0.5, -0.0])]), id="one row"),
        pytest.param(_row_take([(0, [0])], [(0, _I64_MAX, _I64_MAX, [float("nan")]),
                                            (0, _I64_MIN, _I64_MIN, [float("-inf")])]), id="extremes"),
        pytest.param(_row_take(_SETS[:1], [(0, s, 1000 + s, [s / 7] * 20) for s in range(500)]),
                     id="one run, 20 keys"),
        pytest.param(_row_take(_SETS, [(s % 3, s, s, [1.5] * len(_SETS[s % 3][1])) for s in range(30)]),
                     id="several runs and sets"),
        pytest.param(_row_take(_SETS[:1], [(0, 1, 2, [3.0] * 20)], _columns([7, 299], [0, 30], [1, 2], [3, 4],
                                                                             [5.0, 6.0])), id="rows and columns"),
        pytest.param(_row_take(_SETS[1:2], [(0, 1, 2, [3.0])], _columns([3], [5], [1], [2], [3.0])),
                     id="rows and columns, one run and key"),
    ],
)  # fmt: skip
def test_rows_encode_exactly_what_the_generated_class_serializes(taken: Taken) -> None:
    run_ids = [f"run-{i:04d}" for i in range(300)]
    keys = [f"loss/é{i}" if i % 3 else f"k{i}" for i in range(1000)]
    wire = encode(taken, run_ids, keys, writer_id="w", seq=3)
    expected = _reference(taken, run_ids, keys, "w", 3)
    assert ingest_pb2.MetricBatch.FromString(wire) == expected
    assert wire == expected.SerializeToString(deterministic=True)


def test_rows_travel_in_a_third_of_the_bytes_of_columns() -> None:
    b = Batcher(max_points=10**6)
    keys = [f"metric_{k:02d}" for k in range(20)]
    for step in range(1000):
        _append(b, RUN_A, step, 1_700_000_000_000 + step, [(k, step * 0.5) for k in keys])
    taken = _take(b)
    wire = encode(taken, b.run_ids, b.keys, writer_id="w" * 32, seq=1)
    assert len(wire) / 20_000 < 10  # columns: 28 bytes a point (key, step, timestamp, value)
    batch = ingest_pb2.MetricBatch.FromString(wire)
    assert batch.steps == b"" and len(_decode(batch)) == 20_000
    assert _decode(batch)[21] == (RUN_A, "metric_01", 1, 1_700_000_000_001, 0.5)


def test_rows_split_at_row_boundaries_and_a_wide_row_goes_alone() -> None:
    taken = _row_take(_SETS, [(0, 0, 0, [0.0] * 20), (1, 1, 1, [1.0]), (2, 2, 2, [2.0] * 3), (1, 3, 3, [3.0]),
                              (2, 4, 4, [4.0] * 3), (1, 5, 5, [5.0])])  # fmt: skip
    parts = taken.split(4)
    assert [len(p) for p in parts] == [20, 4, 4, 1]
    assert [p.rows.steps.tolist() for p in parts if p.rows is not None] == [[0], [1, 2], [3, 4], [5]]
    run_ids, keys = [f"r{i}" for i in range(8)], [f"k{i}" for i in range(1000)]
    whole = _decode(ingest_pb2.MetricBatch.FromString(encode(taken, run_ids, keys, writer_id="w", seq=1)))
    pieces = [r for i, p in enumerate(parts)
              for r in _decode(ingest_pb2.MetricBatch.FromString(encode(p, run_ids, keys, writer_id="w", seq=i + 1)))]
    assert pieces == whole and len(whole) == 29
    named = [ingest_pb2.MetricBatch.FromString(encode(p, run_ids, keys, writer_id="w", seq=1)).run_ids for p in parts]
    assert [len(runs) for runs in named] == [1, 2, 2, 1]  # each part names only the runs it uses
    assert [[run for run, _ in p.rows.sets] for p in parts if p.rows is not None] == [[7], [3, 7], [3, 7], [3]]
    assert [p.rows.row_sets is None for p in parts if p.rows is not None] == [True, False, False, True]
    one_set = _row_take(_SETS[:1], [(0, s, s, [float(s)] * 20) for s in range(5)])
    assert [p.rows.steps.tolist() for p in one_set.split(45) if p.rows is not None] == [[0, 1], [2, 3], [4]]


def test_encoding_a_view_of_a_strided_column_copies_its_values() -> None:
    cols = _columns([0] * 6, [0, 1] * 3, list(range(6)), [9] * 6, [float(i) for i in range(6)])
    strided = Columns(cols.run_index[::2], cols.key_index[::2], cols.steps[::2], cols.timestamps[::2],
                      cols.values[::2])
    batch = ingest_pb2.MetricBatch.FromString(encode(Taken(None, strided), ["r"], ["a", "b"], writer_id="w", seq=1))
    assert list(batch.keys) == ["a"] and np.frombuffer(batch.steps, "<i8").tolist() == [0, 2, 4]
    assert np.frombuffer(batch.values, "<f8").tolist() == [0.0, 2.0, 4.0]


def test_encode_then_decode_round_trips_every_column() -> None:
    b = Batcher(max_points=100)
    _append(b, RUN_A, 0, 1_000, [("loss", 0.5), ("acc", 0.25)])
    _append(b, RUN_A, 1, 1_001, [("loss", float("nan")), ("acc", float("-inf"))])
    _append(b, RUN_A, -5, 2**62, [("loss", 1e300)])
    batch = _encode(b, _take(b), seq=7)
    assert batch.writer_id == "w" and batch.seq == 7
    assert batch.run_index == b""  # one run: the column may be empty
    rows = _decode(batch)
    assert rows[0] == (RUN_A, "loss", 0, 1_000, 0.5)
    assert rows[1] == (RUN_A, "acc", 0, 1_000, 0.25)
    assert np.isnan(rows[2][4]) and rows[3][4] == float("-inf")
    assert rows[4] == (RUN_A, "loss", -5, 2**62, 1e300)


def test_runs_are_coalesced_into_one_batch_with_only_the_keys_it_uses() -> None:
    b = Batcher(max_points=100)
    _append(b, RUN_B, 0, 1, [("unused", 1.0)])
    b.take()  # interned for good, but the next batch does not carry it
    for step in range(3):
        _append(b, RUN_A, step, 10, [("loss", 1.0), ("acc", 2.0)])
        _append(b, RUN_B, step, 10, [("acc", 3.0)])
    batch = _encode(b, _take(b))
    assert list(batch.run_ids) == [RUN_B, RUN_A]  # interning order
    assert list(batch.keys) == ["loss", "acc"]
    assert batch.run_index == b"" and len(batch.set_runs) == 2 * 4 and len(batch.row_sets) == 6 * 4  # rows
    rows = _decode(batch)
    assert [r[:3] for r in rows[:3]] == [(RUN_A, "loss", 0), (RUN_A, "acc", 0), (RUN_B, "acc", 0)]
    assert sum(1 for r in rows if r[0] == RUN_B) == 3
    assert b.take() is None


def test_split_keeps_order_and_rows_and_arrays_mix() -> None:
    b = Batcher(max_points=4)
    for step in range(5):
        _append(b, RUN_A if step % 2 else RUN_B, step, 0, [(f"k{step}", float(step))])
    key = b.intern_keys(["arr"])[0]
    b.append_arrays(b.intern_run(RUN_A), key, np.arange(10, 13), 7, np.array([1.0, 2.0, 3.0]))
    parts = _take(b).split(3)
    assert [len(p) for p in parts] == [3, 2, 3]  # the rows' parts, then the arrays' ones
    rows = [r for i, p in enumerate(parts) for r in _decode(_encode(b, p, i + 1))]
    assert [(r[0], r[1], r[2]) for r in rows[:5]] == [(RUN_A if s % 2 else RUN_B, f"k{s}", s) for s in range(5)]
    assert rows[5:] == [(RUN_A, "arr", 10, 7, 1.0), (RUN_A, "arr", 11, 7, 2.0), (RUN_A, "arr", 12, 7, 3.0)]
    assert b.appended == 8


_KEY_SETS = [(RUN_A, ["loss"]), (RUN_A, ["acc"]), (RUN_B, ["loss", "acc"]), (RUN_A, ["x", "y"]),
             (RUN_B, ["a", "b", "c", "d", "e"])]


@given(st.lists(st.tuples(st.integers(0, len(_KEY_SETS) - 1), st.integers(_I64_MIN, _I64_MAX),
                          st.integers(_I64_MIN, _I64_MAX), st.floats(allow_nan=False)), min_size=1, max_size=40),
       st.integers(1, 12))
def test_any_rows_are_taken_split_and_decoded_as_appended(rows: list[tuple[int, int, int, float]],
                                                          limit: int) -> None:
    """Rows of one width or several, of one key set or several (``take`` reads them by numpy)."""
    b = Batcher(max_points=10**9)
    expected = []
    for which, step, ts, value in rows:
        run, keys = _KEY_SETS[which]
        values = [value + i for i in range(len(keys))]
        _append(b, run, step, ts, list(zip(keys, values, strict=True)))
        expected += [(run, key, step, ts, v) for key, v in zip(keys, values, strict=True)]
    taken = _take(b)
    assert len(taken) == len(expected) == b.appended
    parts = taken.split(limit)
    assert all(len(p) <= limit or (p.rows is not None and len(p.rows.steps) == 1) for p in parts)
    assert [r for i, p in enumerate(parts) for r in _decode(_encode(b, p, i + 1))] == expected


def test_a_refused_value_appends_nothing() -> None:
    b = Batcher(max_points=10)
    block = b.intern_keys(["a", "b"])
    with pytest.raises(TypeError):
        b.append_row(0, 0, 0, block, [1.0, "x"])
    assert b.state().points == 0 and b.take() is None
    assert b.append_row(0, 0, 0, block, [1, True]) is True  # ints and bools are numbers


def test_append_asks_for_a_wake_when_non_empty_and_when_full() -> None:
    b = Batcher(max_points=3)
    assert _append(b, RUN_A, 0, 0, [("a", 1.0)]) is True  # arms the interval
    assert _append(b, RUN_A, 1, 0, [("a", 1.0)]) is False
    assert _append(b, RUN_A, 2, 0, [("a", 1.0), ("b", 2.0)]) is True  # reached max_points
    assert _append(b, RUN_A, 3, 0, [("a", 1.0)]) is False  # already signalled
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


def test_state_tracks_the_oldest_point_with_an_injected_clock() -> None:
    now = [5.0]
    b = Batcher(max_points=10, clock=lambda: now[0])
    _append(b, RUN_A, 0, 0, [("a", 1.0)])
    now[0] = 9.0
    _append(b, RUN_A, 1, 0, [("a", 1.0)])
    assert b.state() == BufferState(2, 5.0)
    b.take()
    assert b.state() == BufferState(0, None)
    assert b.discard() == 0
    assert isinstance(b.intern_keys([]), array)


def test_vectorized_chunks_are_copied_into_a_recycled_arena() -> None:
    b = Batcher(max_points=10)
    run, key = b.intern_run(RUN_A), b.intern_keys(["r"])[0]
    steps, values = np.arange(4, dtype=np.int32), np.array([1, 2, 3, 4], np.int16)  # converted on copy
    b.append_arrays(run, key, steps, 9, values)
    values[:] = 0  # the caller's buffer is its own again
    first = _take(b).columns
    assert first is not None and first.values.tolist() == [1.0, 2.0, 3.0, 4.0] and first.steps.dtype == np.int64
    arena = b._lent
    b.recycle()
    b.append_arrays(run, key, np.arange(10, 12), 9, np.array([5.0, 6.0]))
    assert b._arena is arena  # the same memory, no new pages to fault in
    second = _take(b).columns
    assert second is not None and second.steps.tolist() == [10, 11] and second.values.tolist() == [5.0, 6.0]


def test_rows_appended_by_many_threads_while_taken_are_each_taken_once_and_intact() -> None:
    """append_row takes no lock: rows appended while ``take`` runs stay for the next take."""
    b = Batcher(max_points=10**9)
    assert b.intern_run(RUN_A) == 0
    blocks = [b.intern_keys([f"t{t}.a", f"t{t}.b", f"t{t}.c"]) for t in range(4)]
    per_thread, taken = 10_000, []
    done, first_take = threading.Event(), threading.Event()

    def produce(t: int) -> None:
        for step in range(per_thread):
            if step == per_thread // 2:  # half-way: make sure takes happen while rows are appended
                assert first_take.wait(30.0)
            b.append_row(0, step, t, blocks[t], (float(step), float(t), -float(step)))

    def consume() -> None:
        while not done.is_set():
            cols = b.take()
            if cols is not None:
                taken.append(cols)
                first_take.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads far more often than the default 5 ms
    try:
        consumer = threading.Thread(target=consume)
        consumer.start()
        producers = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
        for thread in producers:
            thread.start()
        for thread in producers:
            thread.join()
        done.set()
        consumer.join()
    finally:
        sys.setswitchinterval(old)
    last = b.take()
    batches = [_encode(b, t) for t in taken + ([last] if last is not None else [])]
    cols = [batch_columns(batch) for batch in batches]
    keys = np.concatenate([np.array(batch.keys)[c.key_index] for batch, c in zip(batches, cols, strict=True)])
    steps, times, values = (np.concatenate([getattr(c, f) for c in cols]) for f in ("steps", "timestamps", "values"))
    assert len(values) == 4 * per_thread * 3 == b.appended and b.state().points == 0
    for t in range(4):
        mine = times == t
        assert np.array_equal(keys[mine], np.tile([f"t{t}.a", f"t{t}.b", f"t{t}.c"], per_thread))
        assert sorted(steps[mine][::3].tolist()) == list(range(per_thread))  # every row once
        row_values = values[mine].reshape(-1, 3)
        assert np.array_equal(row_values[:, 0], steps[mine][::3]) and np.all(row_values[:, 1] == t)
        assert np.array_equal(row_values[:, 2], -row_values[:, 0])


def test_appended_and_state_count_rows_added_after_an_earlier_count() -> None:
    b = Batcher(max_points=100)
    block = b.intern_keys(["a", "b"])
    b.append_row(0, 0, 0, block, [1.0, 2.0])
    assert b.state().points == 2 and b.appended == 2
    b.append_row(0, 1, 0, block, [1.0, 2.0])
    b.append_arrays(0, block[0], np.arange(3), 0, np.zeros(3))
    assert b.state().points == 7 and b.appended == 7
    assert b.discard() == 7 and b.state().points == 0 and b.appended == 7
    assert b.append_row(0, 2, 0, block, [1.0, 2.0]) is True  # empty again: wake to arm the interval
    assert b.appended == 9
