"""Settings: defaults, TRACKHOUSE_CLIENT_* overlay, rejection of impossible values, URL forms."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from trackhouse.client import Settings, UsageError
from trackhouse.client.settings import parse_url


def test_from_env_reads_every_documented_variable() -> None:
    env = {
        "TRACKHOUSE_CLIENT_URL": "grpc://ingest:1",
        "TRACKHOUSE_CLIENT_QUERY_URL": "query:2",
        "TRACKHOUSE_CLIENT_FLUSH_INTERVAL": "0.25",
        "TRACKHOUSE_CLIENT_MAX_BATCH_POINTS": "500",
        "TRACKHOUSE_CLIENT_FLUSH_TIMEOUT": "3",
        "TRACKHOUSE_CLIENT_CLOSE_TIMEOUT": "4",
        "TRACKHOUSE_CLIENT_RPC_TIMEOUT": "5",
        "TRACKHOUSE_CLIENT_BACKOFF_INITIAL": "0.1",
        "TRACKHOUSE_CLIENT_BACKOFF_MAX": "2",
        "TRACKHOUSE_CLIENT_USER": "alice",
        "TRACKHOUSE_CLIENT_MODE": "offline",
        "TRACKHOUSE_CLIENT_ACK_TIMEOUT": "9",
        "TRACKHOUSE_CLIENT_SPOOL_DIR": "/spool",
        "TRACKHOUSE_CLIENT_SPOOL_GRACE": "0",
        "TRACKHOUSE_CLIENT_MEMORY_BUDGET": "1000",
        "TRACKHOUSE_CLIENT_SPOOL_SEGMENT_BYTES": "8192",
        "TRACKHOUSE_CLIENT_REPLAY_ORPHANS": "0",
        "TRACKHOUSE_CLIENT_RANKS": "all",
        "TRACKHOUSE_CLIENT_RANK": "3",
        "TRACKHOUSE_CLIENT_WORLD_SIZE": "4",
        "TRACKHOUSE_CLIENT_JOB_ID": "j",
        "TRACKHOUSE_CLIENT_RUN_ID": "r" * 32,
        "TRACKHOUSE_CLIENT_RENDEZVOUS_DIR": "/shared",
        "TRACKHOUSE_CLIENT_RENDEZVOUS_TIMEOUT": "7",
        "TRACKHOUSE_CLIENT_SYSTEM_METRICS_INTERVAL": "15",
        "UNRELATED": "x",
    }
    s = Settings.from_env(env)
    assert s == Settings(
        url="grpc://ingest:1", query_url="query:2", flush_interval=0.25, max_batch_points=500,
        flush_timeout=3.0, close_timeout=4.0, rpc_timeout=5.0, backoff_initial=0.1, backoff_max=2.0,
        user="alice", mode="offline", ack_timeout=9.0, spool_dir="/spool", spool_grace=0.0, memory_budget=1000,
        spool_segment_bytes=8192, replay_orphans=False, ranks="all", rank=3, world_size=4, job_id="j",
        run_id="r" * 32, rendezvous_dir="/shared", rendezvous_timeout=7.0, system_metrics_interval=15.0,
    )  # fmt: skip
    assert s.effective_query_url == "query:2"
    documented = Settings.__doc__ or ""
    for field in dataclasses.fields(Settings):
        assert f"TRACKHOUSE_CLIENT_{field.name.upper()}" in documented


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"RANK": "1", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "abc"}, (1, 8, "abc")),
        ({"RANK": "1", "WORLD_SIZE": "8", "TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "77"}, (1, 8, "77")),
        ({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_JOB_ID": "77"}, (5, 6, "77")),
        # mpirun inside an sbatch script: every rank inherits the script's SLURM_PROCID and SLURM_NTASKS
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "77", "OMPI_COMM_WORLD_RANK": "3",
          "OMPI_COMM_WORLD_SIZE": "4"}, (3, 4, "77")),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "PMI_RANK": "1", "PMI_SIZE": "8"}, (1, 8, "")),
        ({"RANK": "1", "WORLD_SIZE": "2", "TRACKHOUSE_CLIENT_RANK": "0"}, (0, 2, "")),
        ({}, (0, 1, "")),
    ],
)
def test_rank_world_size_and_job_id_come_from_the_launcher(env: dict[str, str], expected: tuple[int, int, str]) -> None:
    s = Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", **env})
    assert (s.rank, s.world_size, s.job_id) == expected


def test_from_env_defaults_and_overrides() -> None:
    s = Settings.from_env({"TRACKHOUSE_CLIENT_USER": "bob", "TRACKHOUSE_CLIENT_FLUSH_INTERVAL": ""})
    assert s == Settings(user="bob")
    assert s.effective_query_url == s.url
    assert Settings.from_env({"TRACKHOUSE_CLIENT_USER": "b"}, max_batch_points=7).max_batch_points == 7


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"TRACKHOUSE_CLIENT_MAX_BATCH_POINTS": "many"}, "MAX_BATCH_POINTS='many' is not a valid int"),
        ({"TRACKHOUSE_CLIENT_FLUSH_INTERVAL": "0"}, "flush_interval must be > 0"),
        ({"TRACKHOUSE_CLIENT_MAX_BATCH_POINTS": "0"}, "max_batch_points must be >= 1"),
        ({"TRACKHOUSE_CLIENT_BACKOFF_MAX": "0.1"}, "backoff_max"),
        ({"TRACKHOUSE_CLIENT_URL": "http://x:1"}, "unsupported trackhouse URL"),
        ({"TRACKHOUSE_CLIENT_MODE": "sometimes"}, "mode must be one of online, offline"),
        ({"TRACKHOUSE_CLIENT_RANKS": "some"}, "ranks must be one of zero, all"),
        ({"TRACKHOUSE_CLIENT_RANK": "2", "TRACKHOUSE_CLIENT_WORLD_SIZE": "2"}, r"rank \(2\) must be in"),
        ({"TRACKHOUSE_CLIENT_REPLAY_ORPHANS": "maybe"}, "not a valid boolean"),
        ({"TRACKHOUSE_CLIENT_SPOOL_GRACE": "-1"}, "spool_grace must be >= 0"),
    ],
)
def test_impossible_values_are_rejected_at_start(env: dict[str, str], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", **env})


# Every numeric setting, by kind: counts and sizes are ints, the rest are seconds.
INT_FIELDS = ("max_batch_points", "memory_budget", "spool_segment_bytes", "rank", "world_size", "local_rank")
SECONDS_FIELDS = (
    "rpc_timeout",
    "flush_interval",
    "flush_timeout",
    "close_timeout",
    "ack_timeout",
    "backoff_initial",
    "backoff_max",
    "spool_grace",
    "rendezvous_timeout",
    "system_metrics_interval",
)
NOT_FINITE = [float("inf"), float("-inf"), float("nan")]


def test_numeric_field_lists_cover_every_numeric_setting() -> None:
    fields = dataclasses.fields(Settings)
    assert {f.name for f in fields if f.type in ("int", int)} == set(INT_FIELDS)
    assert {f.name for f in fields if f.type in ("float", float)} == set(SECONDS_FIELDS)


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("wrong", [float, bool, str], ids=["float", "bool", "str"])
def test_int_settings_refuse_other_types(name: str, wrong: type) -> None:
    value = wrong(getattr(Settings(), name))  # the default's value, the wrong type: 200000.0, True, "200000"
    with pytest.raises(UsageError, match=rf"Settings\.{name} must be an int, got {wrong.__name__} {value!r}"):
        Settings(**{name: value})


def test_float_literal_batch_size_is_refused() -> None:
    # The review's case: sent on, 1e3 killed the sender thread at range(0, n, 1e3).
    with pytest.raises(UsageError, match=r"Settings\.max_batch_points must be an int, got float 1000\.0"):
        Settings(max_batch_points=1e3)
    with pytest.raises(UsageError, match=r"Settings\.max_batch_points must be an int, got float 1000\.0"):
        Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u"}, max_batch_points=1e3)


@pytest.mark.parametrize("name", SECONDS_FIELDS)
@pytest.mark.parametrize(
    "value",
    [*NOT_FINITE, threading.TIMEOUT_MAX * 2, 10**400],
    ids=["inf", "-inf", "nan", "over_timeout_max", "huge_int"],
)
def test_seconds_settings_must_be_finite_and_waitable(name: str, value: float) -> None:
    # inf made flush() / close() raise OverflowError: threading waits cap at threading.TIMEOUT_MAX
    with pytest.raises(UsageError, match=rf"Settings\.{name} must be finite and <= \d+ seconds"):
        Settings(**{name: value})


@pytest.mark.parametrize("name", SECONDS_FIELDS)
@pytest.mark.parametrize("value", [True, "10", None], ids=["bool", "str", "none"])
def test_seconds_settings_refuse_non_numbers(name: str, value: object) -> None:
    with pytest.raises(UsageError, match=rf"Settings\.{name} must be a number of seconds"):
        Settings(**{name: value})


def test_seconds_settings_accept_ints_and_the_largest_wait() -> None:
    s = Settings(flush_timeout=10, close_timeout=threading.TIMEOUT_MAX, backoff_max=threading.TIMEOUT_MAX)
    assert (s.flush_timeout, s.close_timeout) == (10, threading.TIMEOUT_MAX)


@pytest.mark.parametrize("name", SECONDS_FIELDS)
@pytest.mark.parametrize("raw", ["inf", "-Infinity", "nan", "1e400"])
def test_non_finite_seconds_from_env_are_refused(name: str, raw: str) -> None:
    with pytest.raises(UsageError, match=rf"Settings\.{name} must be finite"):
        Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", f"TRACKHOUSE_CLIENT_{name.upper()}": raw})


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("raw", ["1e5", "2.0", "true"])
def test_non_int_counts_from_env_are_refused(name: str, raw: str) -> None:
    variable = f"TRACKHOUSE_CLIENT_{name.upper()}"
    with pytest.raises(UsageError, match=rf"{variable}='{raw}' is not a valid int"):
        Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", variable: raw})


@pytest.mark.parametrize("variable", ["RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"])
def test_non_int_launcher_ranks_are_refused(variable: str) -> None:
    with pytest.raises(UsageError, match=r"is not a valid int"):
        Settings.from_env({"TRACKHOUSE_CLIENT_USER": "u", variable: "1.0"})


def test_settings_are_frozen_values() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.url = "x:1"  # type: ignore[misc]
    assert Settings() == s and hash(Settings()) == hash(s)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("127.0.0.1:50051", ("127.0.0.1:50051", False)),
        ("grpc://host:1", ("host:1", False)),
        ("grpcs://host:443/", ("host:443", True)),
    ],
)
def test_url_forms(url: str, expected: tuple[str, bool]) -> None:
    assert parse_url(url) == expected
