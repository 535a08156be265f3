"""IngestSettings: validation of impossible values and reading from the environment."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from trackhouse.ingest.catalog import MAX_CACHED_RUNS
from trackhouse.ingest.convert import decode_batch
from trackhouse.ingest.progress import MAX_CACHED_WRITERS
from trackhouse.ingest.settings import BYTES_PER_POINT, IngestSettings


def test_defaults_are_valid_and_frozen() -> None:
    s = IngestSettings()
    assert s.flush_interval == 0.5 and s.buffer_bytes == 64 * 1024 * 1024
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.flush_rows = 1  # type: ignore[misc]
    assert IngestSettings() == s


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(IngestSettings)])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_values_are_rejected(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=name):
        IngestSettings(**{name: value})


def test_the_cache_caps_default_to_the_modules_constants() -> None:
    s = IngestSettings()
    assert (s.max_cached_writers, s.max_cached_runs) == (MAX_CACHED_WRITERS, MAX_CACHED_RUNS)


def test_buffer_must_hold_one_largest_batch() -> None:
    with pytest.raises(ValueError, match="buffer_bytes"):
        IngestSettings(buffer_bytes=1000, max_batch_points=1000)
    IngestSettings(buffer_bytes=1 << 20, max_batch_points=1000)


def test_the_largest_batch_is_sized_as_the_buffer_counts_it(make_batch: Any) -> None:
    """The check uses the bytes per point that the buffer charges, not a smaller guess."""
    full = decode_batch(make_batch(points=100), IngestSettings(max_batch_points=100, buffer_bytes=1 << 20))
    points_bytes = full.nbytes - 64 * 2  # one key and one run name
    IngestSettings(buffer_bytes=points_bytes, max_batch_points=100)
    with pytest.raises(ValueError, match=f"100 × {BYTES_PER_POINT} bytes = {points_bytes}"):
        IngestSettings(buffer_bytes=points_bytes - 1, max_batch_points=100)


def test_from_env_reads_every_variable() -> None:
    env = {
        "TRACKHOUSE_INGEST_FLUSH_ROWS": "10",
        "TRACKHOUSE_INGEST_FLUSH_INTERVAL": "0.25",
        "TRACKHOUSE_INGEST_BUFFER_BYTES": "1048576",
        "TRACKHOUSE_INGEST_MAX_BATCH_POINTS": "100",
        "TRACKHOUSE_INGEST_MAX_BATCH_KEYS": "7",
        "TRACKHOUSE_INGEST_MAX_MESSAGE_BYTES": "4096",
        "TRACKHOUSE_INGEST_MAX_CACHED_WRITERS": "50",
        "TRACKHOUSE_INGEST_MAX_CACHED_RUNS": "60",
        "UNRELATED": "x",
    }
    s = IngestSettings.from_env(env)
    assert s == IngestSettings(flush_rows=10, flush_interval=0.25, buffer_bytes=1 << 20,
                               max_batch_points=100, max_batch_keys=7, max_message_bytes=4096,
                               max_cached_writers=50, max_cached_runs=60)
    assert isinstance(s.flush_interval, float) and isinstance(s.flush_rows, int)


def test_from_env_without_variables_gives_defaults() -> None:
    assert IngestSettings.from_env({}) == IngestSettings()


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACKHOUSE_INGEST_FLUSH_ROWS", "123")
    assert IngestSettings.from_env().flush_rows == 123


def test_from_env_names_a_malformed_variable() -> None:
    with pytest.raises(ValueError, match="TRACKHOUSE_INGEST_FLUSH_ROWS='lots' is not a valid int"):
        IngestSettings.from_env({"TRACKHOUSE_INGEST_FLUSH_ROWS": "lots"})
    with pytest.raises(ValueError, match="TRACKHOUSE_INGEST_FLUSH_INTERVAL"):
        IngestSettings.from_env({"TRACKHOUSE_INGEST_FLUSH_INTERVAL": "soon"})


def test_from_env_validates_the_combination() -> None:
    with pytest.raises(ValueError, match="flush_interval"):
        IngestSettings.from_env({"TRACKHOUSE_INGEST_FLUSH_INTERVAL": "0"})
    with pytest.raises(ValueError, match="buffer_bytes"):
        IngestSettings.from_env({"TRACKHOUSE_INGEST_BUFFER_BYTES": "1024"})
