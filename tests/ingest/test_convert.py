"""convert: every validation rule of a MetricBatch, exact decoding, and merging batches into Arrow."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trackhouse.ingest.convert import (
    MAX_WRITER_ID_LENGTH,
    check_key,
    decode_batch,
    to_arrow,
)
from trackhouse.ingest.errors import InvalidArgument
from trackhouse.ingest.settings import BYTES_PER_POINT, IngestSettings
from trackhouse.proto.rules import MAX_BATCH_RUNS, MAX_KEY_LENGTH, MAX_TIMESTAMP_MS
from trackhouse.proto.v1 import ingest_pb2

SETTINGS = IngestSettings(max_batch_points=100, max_batch_keys=3, buffer_bytes=1 << 20)


def rejects(batch: Any, *fragments: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_batch(batch, SETTINGS)
    for fragment in fragments:
        assert fragment in str(info.value)


# -- header --------------------------------------------------------------------------


def test_empty_writer_id_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(writer_id=""), "writer_id", str(MAX_WRITER_ID_LENGTH))


def test_too_long_writer_id_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(writer_id="w" * (MAX_WRITER_ID_LENGTH + 1)), "writer_id", str(MAX_WRITER_ID_LENGTH))
    decode_batch(make_batch(writer_id="w" * MAX_WRITER_ID_LENGTH), SETTINGS)


def test_seq_zero_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(seq=0), "seq", ">= 1")


def test_no_run_ids_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(run_ids=()), "run_ids")


def test_too_many_keys_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(keys=("a", "b", "c", "d")), "keys", "4", "limit 3")
    decode_batch(make_batch(keys=("a", "b", "c")), SETTINGS)


@pytest.mark.parametrize("key", ["bad*key", "semi;colon", "new\nline", "trailing\n", "tab\there", "quote'"])
def test_key_with_bad_characters_is_rejected(make_batch: Any, key: str) -> None:
    rejects(make_batch(keys=("ok", key)), "keys[1]", "invalid name")


def test_empty_key_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(keys=("",)), "keys[0]", "empty")


def test_too_long_key_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(keys=("k" * (MAX_KEY_LENGTH + 1),)), "keys[0]", str(MAX_KEY_LENGTH + 1),
            f"limit {MAX_KEY_LENGTH}")
    decode_batch(make_batch(keys=("k" * MAX_KEY_LENGTH,)), SETTINGS)


@pytest.mark.parametrize("key", ["loss", "train/loss", "a.b-c_d e:f", "épsilon", "0"])
def test_legal_keys_are_accepted(key: str) -> None:
    check_key(key, "keys[0]")


# -- columns ---------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "width"), [
    ("steps", 8), ("timestamps", 8), ("values", 8), ("key_index", 4), ("run_index", 4),
])
def test_column_length_not_a_multiple_of_the_width_is_rejected(make_batch: Any, field: str, width: int) -> None:
    batch = make_batch(run_ids=("r1", "r2"), run_index=[0, 1, 0, 1])
    setattr(batch, field, getattr(batch, field) + b"\x00")
    rejects(batch, field, f"multiple of {width}")


@pytest.mark.parametrize("field", ["timestamps", "values", "key_index", "run_index"])
def test_columns_of_different_lengths_are_rejected(make_batch: Any, field: str) -> None:
    batch = make_batch(run_ids=("r1", "r2"), run_index=[0, 1, 0, 1])
    width = 4 if field.endswith("index") else 8
    setattr(batch, field, getattr(batch, field)[:-width])
    rejects(batch, field, "3 values", "steps has 4")


def test_key_index_out_of_range_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(keys=("a", "b"), key_index=[0, 1, 2, 0]), "key_index", "index 2", "keys has 2")


def test_run_index_out_of_range_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(run_ids=("r1", "r2"), run_index=[0, 1, 5, 0]), "run_index", "index 5", "run_ids has 2")


def test_missing_run_index_with_several_runs_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(run_ids=("r1", "r2")), "run_index", "2 run_ids")


@pytest.mark.parametrize("ts", [-1, MAX_TIMESTAMP_MS + 1])
def test_timestamps_out_of_range_are_rejected(make_batch: Any, ts: int) -> None:
    rejects(make_batch(timestamps=[1, 2, ts, 3]), "timestamps", str(MAX_TIMESTAMP_MS))


def test_timestamp_limits_are_inclusive(make_batch: Any) -> None:
    decoded = decode_batch(make_batch(timestamps=[0, 1, 2, MAX_TIMESTAMP_MS]), SETTINGS)
    assert decoded.timestamps.tolist() == [0, 1, 2, MAX_TIMESTAMP_MS]


def test_too_many_points_are_rejected(make_batch: Any) -> None:
    rejects(make_batch(points=101), "steps", "101 points", "limit 100")
    assert decode_batch(make_batch(points=100), SETTINGS).points == 100


# -- decoding --------------------------------------------------------------------------


def test_valid_batch_decodes_to_exact_arrays(make_batch: Any) -> None:
    batch = make_batch(
        writer_id="writer-1", seq=7, run_ids=("r1", "r2"), keys=("loss", "acc"),
        run_index=[0, 1, 1, 0], key_index=[1, 0, 1, 0], steps=[-5, 0, 2**40, 3],
        timestamps=[0, 10, 20, 30], values=[1.5, -math.inf, math.nan, 1e300],
    )
    d = decode_batch(batch, SETTINGS)
    assert (d.writer_id, d.seq, d.run_ids, d.keys) == ("writer-1", 7, ("r1", "r2"), ("loss", "acc"))
    assert d.points == 4
    assert d.run_index.dtype == np.uint32 and d.run_index.tolist() == [0, 1, 1, 0]
    assert d.key_index.dtype == np.uint32 and d.key_index.tolist() == [1, 0, 1, 0]
    assert d.steps.dtype == np.int64 and d.steps.tolist() == [-5, 0, 2**40, 3]
    assert d.timestamps.tolist() == [0, 10, 20, 30]
    assert d.values.dtype == np.float64
    np.testing.assert_array_equal(d.values, [1.5, -math.inf, math.nan, 1e300])


def test_single_run_batch_without_run_index_points_at_run_zero(make_batch: Any) -> None:
    d = decode_batch(make_batch(points=3), SETTINGS)
    assert d.run_index.tolist() == [0, 0, 0]


def test_a_batch_without_points_is_rejected(make_batch: Any) -> None:
    """Only a flush answers a buffered batch, and such a batch has nothing to flush: it is refused."""
    rejects(make_batch(points=0), "steps and row_values", "no points")
    rejects(ingest_pb2.MetricBatch(writer_id="w", seq=1, run_ids=["r1"]), "no points")  # no keys, columns, rows
    rejects(make_batch(points=0, run_ids=["r1"] * 200), "no points")


def test_too_many_run_ids_are_rejected_naming_the_limit(make_batch: Any) -> None:
    names = [f"r{i}" for i in range(MAX_BATCH_RUNS + 1)]
    rejects(make_batch(run_ids=names, run_index=[0, 1, 2, 3]), "run_ids", f"{MAX_BATCH_RUNS + 1} run ids",
            f"limit {MAX_BATCH_RUNS}")
    rejects(make_batch(run_ids=["r1"] * (MAX_BATCH_RUNS + 1), run_index=[0] * 4), f"limit {MAX_BATCH_RUNS}")
    at_the_limit = IngestSettings(max_batch_points=MAX_BATCH_RUNS, buffer_bytes=1 << 20)
    d = decode_batch(make_batch(run_ids=names[:-1], run_index=range(MAX_BATCH_RUNS), points=MAX_BATCH_RUNS),
                     at_the_limit)
    assert len(d.run_ids) == MAX_BATCH_RUNS


def test_a_run_id_no_point_belongs_to_is_rejected(make_batch: Any) -> None:
    rejects(make_batch(run_ids=("r1", "r2", "r3"), run_index=[0, 2, 0, 2]), "run_ids[1]", "'r2'", "no point",
            "1 of its 3")
    rejects(make_batch(run_ids=["r1"] * 200, points=1, run_index=[0]), "run_ids[1]", "199 of its 200")
    rejects(_rows(set_runs=_u4(1, 1)), "run_ids[0]", "'r0'")  # the row form: every key set is run 1's
    d = decode_batch(make_batch(run_ids=("r1", "r1"), run_index=[0, 1, 1, 0]), SETTINGS)  # a name twice, both used
    assert d.run_ids == ("r1", "r1") and d.nbytes == 4 * BYTES_PER_POINT + 64 * 3


# -- to_arrow ------------------------------------------------------------------------------


def test_to_arrow_merges_batches_with_different_keys_and_runs(make_batch: Any) -> None:
    batches = [
        decode_batch(make_batch(writer_id="w1", seq=1, run_ids=("ra",), keys=("loss", "acc"),
                                key_index=[0, 1], steps=[1, 2], values=[0.1, 0.2]), SETTINGS),
        decode_batch(make_batch(writer_id="w2", seq=9, run_ids=("rb", "ra"), keys=("acc",),
                                run_index=[1, 0, 1], key_index=[0, 0, 0], steps=[3, 4, 5],
                                values=[0.3, 0.4, 0.5]), SETTINGS),
        decode_batch(make_batch(writer_id="w1", seq=2, run_ids=("rc", "rb"), keys=("lr", "loss", "acc"),
                                run_index=[0, 1], key_index=[2, 0], steps=[6, 7], timestamps=[60, 70],
                                values=[0.6, 0.7]), SETTINGS),
    ]
    table = to_arrow(batches)
    assert table.num_rows == 7
    assert table.column_names == ["run_id", "key", "step", "timestamp", "value", "writer_id", "seq"]
    assert table.column("run_id").to_pylist() == ["ra", "ra", "ra", "rb", "ra", "rc", "rb"]
    assert table.column("key").to_pylist() == ["loss", "acc", "acc", "acc", "acc", "acc", "lr"]
    assert table.column("step").to_pylist() == [1, 2, 3, 4, 5, 6, 7]
    assert table.column("timestamp").to_pylist() == [1_000] * 5 + [60, 70]
    assert table.column("value").to_pylist() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert table.column("writer_id").to_pylist() == ["w1", "w1", "w2", "w2", "w2", "w1", "w1"]
    assert table.column("seq").to_pylist() == [1, 1, 9, 9, 9, 2, 2]


# -- the row form ----------------------------------------------------------------------


def _u4(*xs: int) -> bytes:
    return np.array(xs, "<u4").tobytes()


def _i8(*xs: int) -> bytes:
    return np.array(xs, "<i8").tobytes()


def _f8(*xs: float) -> bytes:
    return np.array(xs, "<f8").tobytes()


def _rows(**fields: Any) -> Any:
    """Two runs, three keys; set 0 = run 1 with keys (2, 0), set 1 = run 0 with key 1;
    rows: set 0 at step 5, set 1 at step 6, set 0 at step 7."""
    base: dict[str, Any] = dict(
        writer_id="w", seq=1, run_ids=["r0", "r1"], keys=["a", "b", "c"],
        set_runs=_u4(1, 0), set_widths=_u4(2, 1), set_keys=_u4(2, 0, 1), row_sets=_u4(0, 1, 0),
        row_steps=_i8(5, 6, 7), row_timestamps=_i8(50, 60, 70), row_values=_f8(1.0, 2.0, 3.0, 4.0, 5.0),
    )  # fmt: skip
    base.update(fields)
    return ingest_pb2.MetricBatch(**base)


def _named(decoded: Any) -> list[tuple[str, str, int, int, float]]:
    return [(decoded.run_ids[r], decoded.keys[k], int(s), int(t), float(v)) for r, k, s, t, v in
            zip(decoded.run_index, decoded.key_index, decoded.steps, decoded.timestamps, decoded.values, strict=True)]


def test_rows_expand_to_a_point_per_key_of_their_set() -> None:
    decoded = decode_batch(_rows(), SETTINGS)
    assert decoded.points == 5
    assert _named(decoded) == [("r1", "c", 5, 50, 1.0), ("r1", "a", 5, 50, 2.0), ("r0", "b", 6, 60, 3.0),
                               ("r1", "c", 7, 70, 4.0), ("r1", "a", 7, 70, 5.0)]


def test_one_run_and_one_set_need_neither_run_nor_set_indices() -> None:
    batch = _rows(run_ids=["r0"], set_runs=b"", set_widths=_u4(2), set_keys=_u4(1, 2), row_sets=b"",
                  row_steps=_i8(1, 2), row_timestamps=_i8(10, 20), row_values=_f8(0.5, math.inf, -0.0, math.nan))
    named = _named(decode_batch(batch, SETTINGS))
    assert named[:3] == [("r0", "b", 1, 10, 0.5), ("r0", "c", 1, 10, math.inf), ("r0", "b", 2, 20, -0.0)]
    assert named[3][:4] == ("r0", "c", 2, 20) and math.isnan(named[3][4])


def test_columns_and_rows_in_one_batch_decode_columns_first(make_batch: Any) -> None:
    cols = make_batch(points=2)
    batch = _rows(run_ids=[*cols.run_ids, "r1"], keys=[cols.keys[0], "b", "c"], key_index=_u4(0, 0),
                  steps=cols.steps, timestamps=cols.timestamps, values=cols.values, run_index=_u4(0, 0))
    decoded = decode_batch(batch, SETTINGS)
    assert decoded.points == 7 and decoded.steps.tolist()[:2] == np.frombuffer(cols.steps, "<i8").tolist()
    assert decoded.steps.tolist()[2:] == [5, 5, 6, 7, 7]


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        (dict(set_widths=_u4(2, 0), set_keys=_u4(2, 0)), ("set_widths", "width 0")),
        (dict(set_widths=b"", set_keys=b"", set_runs=b""), ("set_widths", "at least one key set")),
        (dict(row_steps=_i8(5), row_timestamps=_i8(50), row_sets=_u4(0), row_values=_f8(1.0, 2.0)),
         ("set_widths", "2 key sets for 1 rows")),
        (dict(set_keys=_u4(2, 0)), ("set_keys", "2 keys", "adds up to 3")),
        (dict(set_keys=_u4(2, 0, 3)), ("set_keys", "index 3 out of range", "keys has 3")),
        (dict(set_runs=b""), ("set_runs", "required", "2 run_ids")),
        (dict(set_runs=_u4(1)), ("set_runs", "1 values", "set_widths has 2")),
        (dict(set_runs=_u4(1, 2)), ("set_runs", "index 2 out of range", "run_ids has 2")),
        (dict(row_sets=b""), ("row_sets", "required", "2 key sets")),
        (dict(row_sets=_u4(0, 2, 0)), ("row_sets", "index 2 out of range")),
        (dict(row_sets=_u4(0, 1)), ("row_sets", "2 values", "row_steps has 3")),
        (dict(row_timestamps=_i8(50, 60)), ("row_timestamps", "2 values", "row_steps has 3")),
        (dict(row_values=_f8(1.0, 2.0, 3.0, 4.0)), ("row_values", "4 values", "5 keys")),
        (dict(row_values=_f8(*range(6))), ("row_values", "6 values", "5 keys")),
        (dict(row_values=b"\x00" * 7), ("row_values", "multiple of 8")),
        (dict(row_steps=b"", row_timestamps=b"", row_sets=b""), ("set_runs", "no rows")),
        (dict(row_timestamps=_i8(50, -1, 70)), ("timestamps", "out of range")),
    ],
)  # fmt: skip
def test_a_malformed_row_form_is_rejected_naming_the_field(fields: dict[str, Any], fragments: tuple[str, ...]) -> None:
    rejects(_rows(**fields), *fragments)


def test_the_point_limit_counts_row_points_before_expanding() -> None:
    rejects(_rows(set_widths=_u4(60, 1), set_keys=_u4(*[0] * 60, 1), row_values=_f8(*range(121))),
            "row_values", "121 points", "limit 100")
    huge = _rows(set_widths=_u4(2**32 - 1, 1))  # claims billions of points: refused on its sizes, nothing expanded
    rejects(huge, "set_keys")


_SMALL_U4 = st.lists(st.integers(0, 4), max_size=6).map(lambda xs: _u4(*xs))
_ANY_BYTES = st.binary(max_size=40)


@settings(max_examples=300, deadline=None)
@given(set_runs=st.one_of(_SMALL_U4, _ANY_BYTES), set_widths=st.one_of(_SMALL_U4, _ANY_BYTES),
       set_keys=st.one_of(_SMALL_U4, _ANY_BYTES), row_sets=st.one_of(_SMALL_U4, _ANY_BYTES),
       row_steps=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4).map(lambda xs: _i8(*xs)),
       row_timestamps=st.lists(st.integers(0, 2**40), max_size=4).map(lambda xs: _i8(*xs)),
       row_values=st.lists(st.floats(), max_size=12).map(lambda xs: _f8(*xs)))
def test_any_row_form_decodes_consistently_or_is_rejected(**fields: bytes) -> None:
    """Whatever the row fields hold: InvalidArgument or points that agree with the sets."""
    batch = _rows(**fields)
    try:
        decoded = decode_batch(batch, SETTINGS)
    except InvalidArgument:
        return
    widths = np.frombuffer(batch.set_widths, "<u4")
    rows = len(batch.row_steps) // 8
    sets = np.frombuffer(batch.row_sets, "<u4") if batch.row_sets else np.zeros(rows, np.int64)
    assert decoded.points == len(batch.row_values) // 8 == int(widths[sets].sum()) if rows else decoded.points == 0
    assert int(decoded.key_index.max(initial=0)) < 3 and int(decoded.run_index.max(initial=0)) < 2
