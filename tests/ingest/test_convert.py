"""convert: every validation rule of a MetricBatch, exact decoding, and merging batches into Arrow."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from trackhouse.ingest.convert import (
    MAX_KEY_LENGTH,
    MAX_TIMESTAMP_MS,
    MAX_WRITER_ID_LENGTH,
    check_key,
    decode_batch,
    to_arrow,
)
from trackhouse.ingest.errors import InvalidArgument
from trackhouse.ingest.settings import IngestSettings

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


def test_empty_batch_decodes(make_batch: Any) -> None:
    d = decode_batch(make_batch(points=0), SETTINGS)
    assert d.points == 0


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
