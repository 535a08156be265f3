"""Misuse raises at once, with a message saying what to do, and appends nothing."""

from __future__ import annotations

import collections
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import trackhouse.client as th


@pytest.fixture
def client(fake: Any) -> Iterator[th.Client]:
    c = th.connect(fake.address, settings=th.Settings(flush_interval=0.05))
    try:
        yield c
    finally:
        c.close(timeout=5.0)


@pytest.fixture
def run(client: th.Client) -> th.Run:
    return client.start_run(experiment_id="0")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda r: r.log(step=0, loss="0.5"), r"metric 'loss' must be a number, got str .*float\(value\)"),
        (lambda r: r.log(step=0, loss=None), "must be a number, got NoneType"),
        (lambda r: r.log(step=0, loss=[1.0, 2.0]), "must be a number"),
        (lambda r: r.log(step=0, loss=np.array([1.0, 2.0])), "must be a single number"),
        (lambda r: r.log(step=1.5, loss=1.0), r"step must be an int, got float 1.5: pass int\(step\)"),
        (lambda r: r.log(step="3", loss=1.0), "step must be an int"),
        (lambda r: r.log(step=True, loss=1.0), "step must be an int"),
        (lambda r: r.log(step=2**63, loss=1.0), "does not fit in int64"),
        (lambda r: r.log(step=0, loss=10**400), "must be a single number, got 1000"),  # past a double
        (lambda r: r.log_metrics({"": 1.0}), "non-empty strings"),
        (lambda r: r.log_metrics({3: 1.0}), "non-empty strings"),
        (lambda r: r.log_metrics({"a": 1.0}, timestamp=1.5), "timestamp must be an int"),
        (lambda r: r.log(step=0), r"needs metrics as keywords"),
        (lambda r: r.log_metrics({}), r"needs at least one metric"),  # a run's first call too
        (lambda r: r.log_metrics({f"k{i}": 1.0 for i in range(10_001)}), "at most 10000 metrics a call"),
        (lambda r: r.log_metrics({None: 1.0}), "non-empty strings"),  # type: ignore[dict-item]
        (lambda r: r.log_metrics({"": "x"}), "non-empty strings"),  # the key is what is said wrong
        (lambda r: r.log_metrics([("loss", 0.5)]), "non-empty strings"),  # type: ignore[arg-type]
        (lambda r: r.log_params({"": 1}), "param keys must be non-empty"),
        # names and timestamps the service refuses (with a whole batch of other runs' points)
        (lambda r: r.log_metrics({"acc (top-1)": 0.9}), r"metric key 'acc \(top-1\)': invalid name"),
        (lambda r: r.log(step=0, **{"k" * 251: 1.0}), "251 characters, limit 250"),
        (lambda r: r.log_array("bad key!", [0], [1.0]), "invalid name"),
        (lambda r: r.log_params({"lr?": 1}), r"param key 'lr\?': invalid name"),
        (lambda r: r.set_tags({"a\nb": "x"}), "tag key .*invalid name"),
        (lambda r: r.log_metrics({"a": 1.0}, timestamp=1_700_000_000_000_000), r"timestamp=1700000000000000 is out"
                                                                                 r" of range \[0, 32503680000000\]"),
        (lambda r: r.log_metrics({"a": 1.0}, timestamp=-5), "out of range"),
        (lambda r: r.log_array("a", [0, 1], [1.0, 2.0], timestamps=[0, -1]), "log_array timestamps are out of range"),
        (lambda r: r.finish("DONE"), "status must be one of FINISHED, FAILED, KILLED"),
    ],
)
def test_bad_calls_raise_at_once(client: th.Client, run: th.Run, call: Any, match: str) -> None:
    with pytest.raises(th.UsageError, match=match):
        call(run)
    assert client.stats()["points_logged"] == 0


@pytest.mark.parametrize(("bad", "match"), [
    ({}, "needs at least one metric"),
    # a name the service refuses: it would refuse a whole batch, every run's points in it
    # (``MemoryTransport`` as the service does)
    ({"acc (top-1)": 0.9}, "invalid name"),
])
def test_a_refused_call_after_other_runs_logged_spoils_none_of_their_points(bad: dict[str, float],
                                                                              match: str) -> None:
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(flush_interval=600.0, replay_orphans=False))
    try:
        first, fresh = client.start_run(experiment="e"), client.start_run(experiment="e")
        first.log(step=0, loss=0.5)
        with pytest.raises(th.UsageError, match=match):
            fresh.log_metrics(bad, step=0)  # a run's first call
        first.log_metrics({"loss": 0.25}, step=1)
        with pytest.raises(th.UsageError, match=match):
            first.log_metrics(bad, step=2)
        fresh.log_metrics({"acc_top1": 0.9}, step=0)
        assert client.flush(timeout=10.0)
        assert [v for _, _, v in transport.points(first.run_id, "loss")] == [0.5, 0.25]
        assert [v for _, _, v in transport.points(fresh.run_id, "acc_top1")] == [0.9]
        assert client.stats()["points_rejected"] == 0
    finally:
        client.close(timeout=5.0)


def test_one_bad_value_appends_nothing_of_the_call(client: th.Client, run: th.Run) -> None:
    with pytest.raises(th.UsageError):
        run.log(step=0, good=1.0, bad="x")  # type: ignore[arg-type]
    assert client.stats()["points_logged"] == 0


def test_numpy_scalars_and_ints_are_accepted(client: th.Client, run: th.Run) -> None:
    run.log(step=np.int64(3), a=np.float32(0.5), b=np.int64(2), c=1, d=True)
    assert client.stats()["points_logged"] == 4
    assert client.flush(timeout=10.0)


def test_log_after_finish_says_to_start_a_new_run(run: th.Run) -> None:
    run.finish()
    with pytest.raises(th.UsageError, match=r"finished; start a new run with client.start_run\(\)"):
        run.log(step=0, loss=1.0)
    assert run.finish() is True  # a second finish is a no-op


def test_log_after_close_says_to_connect_again(client: th.Client, run: th.Run) -> None:
    client.close(timeout=5.0)
    with pytest.raises(th.UsageError, match="client is closed"):
        run.log(step=0, loss=1.0)
    with pytest.raises(th.UsageError, match="client is closed"):
        client.start_run()


def test_bad_client_arguments(client: th.Client) -> None:
    with pytest.raises(th.UsageError, match="not both"):
        client.start_run(experiment="a", experiment_id="1")
    with pytest.raises(th.UsageError, match="non-empty name"):
        client.start_run(experiment="")
    with pytest.raises(th.UsageError, match="take a list"):
        client.search_runs("1")
    with pytest.raises(th.UsageError, match="page_size"):
        client.search_runs(page_size=0)
    with pytest.raises(th.UsageError, match="run_view"):
        client.search_runs(run_view="some")
    with pytest.raises(th.UsageError, match="unsupported trackhouse URL"):
        th.connect("http://localhost:5000")


def test_values_are_stored_as_float_gives_them_whatever_the_key_order(tmp_path: Any) -> None:
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(spool_dir=str(tmp_path), replay_orphans=False))
    run = client.start_run(experiment="order")
    run.log_metrics({"a": 1.5, "b": np.float32(0.25), "c": 2**53 + 1}, step=0)
    run.log_metrics({"c": True, "a": -0.0, "b": np.int64(7)}, step=1)  # same keys, another order
    run.log_metrics({"a": float("inf")}, step=2)  # another key set
    with pytest.raises(th.UsageError, match="'b' must be a number"):
        run.log_metrics({"c": 1.0, "a": 2.0, "b": "x"}, step=3)  # back to a known key set, one bad value
    run.log_metrics({"a": 3.0, "b": 4.0, "c": 5.0}, step=4)
    assert client.flush(timeout=10.0)
    got = {key: [(step, value) for step, _, value in transport.points(run.run_id, key)] for key in "abc"}
    assert got == {"a": [(0, 1.5), (1, -0.0), (2, float("inf")), (4, 3.0)], "b": [(0, 0.25), (1, 7.0), (4, 4.0)],
                   "c": [(0, float(2**53 + 1)), (1, 1.0), (4, 5.0)]}
    assert client.stats()["points_logged"] == 10
    client.close(timeout=5.0)


def _memory_client(tmp_path: Any) -> tuple[th.MemoryTransport, th.Client, th.Run]:
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(spool_dir=str(tmp_path), replay_orphans=False))
    return transport, client, client.start_run(experiment="values")


def test_a_value_that_can_change_is_read_at_the_call(tmp_path: Any) -> None:
    """Values are read at the call: a 0-d array, or an object with ``__float__`` (a tensor), changed
    after the call is stored as it was, on the fast path and the general one."""

    class Box:  # a mutable number, as a tensor is
        def __init__(self, value: float) -> None:
            self.value = value

        def __float__(self) -> float:
            return self.value

    transport, client, run = _memory_client(tmp_path)
    scalar, box = np.array(0.5), Box(0.25)
    for step, row in enumerate(({"a": scalar, "c": 1.0}, {"a": scalar, "c": 1.0},  # a new key set, then the fast path
                                {"a": 2.0, "c": box}, {"a": 3.0, "c": box})):
        run.log_metrics(row, step=step)  # type: ignore[arg-type]
    run.log(step=4, a=scalar, c=box)  # type: ignore[arg-type]
    scalar[...] = 9.0
    box.value = 9.0
    assert client.flush(timeout=10.0)
    got = {key: [value for _, _, value in transport.points(run.run_id, key)] for key in "ac"}
    assert got == {"a": [0.5, 0.5, 2.0, 3.0, 0.5], "c": [1.0, 1.0, 0.25, 0.25, 0.25]}
    client.close(timeout=5.0)


def test_plain_numbers_kept_by_the_call_are_sent_as_doubles(tmp_path: Any) -> None:
    transport, client, run = _memory_client(tmp_path)
    for step in range(3):  # ints, bools, an int past 2**63 (a double still), mixed with floats
        run.log_metrics({"i": step, "b": step == 1, "big": 2**70 + step, "f": step / 4}, step=step)
    run.log_metrics({"only": 7}, step=3)  # another width in the same take
    assert client.flush(timeout=10.0)
    got = {key: [value for _, _, value in transport.points(run.run_id, key)] for key in ("i", "b", "big", "f", "only")}
    assert got == {"i": [0.0, 1.0, 2.0], "b": [0.0, 1.0, 0.0], "big": [float(2**70)] * 3, "f": [0.0, 0.25, 0.5],
                   "only": [7.0]}
    assert all(type(v) is float for values in got.values() for v in values)
    client.close(timeout=5.0)


def test_mappings_that_answer_for_missing_keys_are_logged_as_they_are_and_left_untouched(tmp_path: Any) -> None:
    # The fast path reads the current key set's values with an itemgetter: on a defaultdict or a
    # Counter of other keys it would invent values (and insert keys into the caller's defaultdict).
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(spool_dir=str(tmp_path), replay_orphans=False))
    run = client.start_run(experiment="mappings")
    run.log_metrics({"a": 1.0, "b": 2.0}, step=0)
    other = collections.defaultdict(float, {"c": 3.0, "d": 4.0})  # as many keys, none of the current ones
    run.log_metrics(other, step=1)
    assert dict(other) == {"c": 3.0, "d": 4.0}
    run.log_metrics(collections.Counter({"a": 5, "x": 6}), step=2)  # a Counter answers 0 for any key
    run.log_metrics(types.MappingProxyType({"b": 7.0, "a": 8.0}), step=3)  # a mapping that is not a dict
    run.log_metrics({"z": 9.0}, step=4)
    run.log_metrics({"y": 10.0}, step=5)  # one key, another one
    run.log_metrics({"b": 12.0, "a": 11.0}, step=6)
    assert client.flush(timeout=10.0)
    got = {key: [(step, value) for step, _, value in transport.points(run.run_id, key)] for key in "abcdxyz"}
    assert got == {"a": [(0, 1.0), (2, 5.0), (3, 8.0), (6, 11.0)], "b": [(0, 2.0), (3, 7.0), (6, 12.0)],
                   "c": [(1, 3.0)], "d": [(1, 4.0)], "x": [(2, 6.0)], "y": [(5, 10.0)], "z": [(4, 9.0)]}
    client.close(timeout=5.0)


def test_two_threads_logging_other_key_sets_into_one_run_never_mix_keys_and_values(tmp_path: Any) -> None:
    # The system-metrics sampler logs into the training run from its own thread: a call must
    # take keys, key block and packer from one key set even when the other thread switches it.
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(spool_dir=str(tmp_path), replay_orphans=False))
    run = client.start_run(experiment="threads")
    n = 5_000

    def produce(name: str, sign: float) -> None:
        for step in range(n):
            run.log_metrics({f"{name}0": sign * step, f"{name}1": sign * step - 0.5}, step=step)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads far more often than the default 5 ms
    try:
        threads = [threading.Thread(target=produce, args=args) for args in (("a", 1.0), ("b", -1.0))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(old)
    assert client.flush(timeout=30.0)
    for name, sign in (("a", 1.0), ("b", -1.0)):
        for k, offset in ((0, 0.0), (1, -0.5)):
            points = transport.points(run.run_id, f"{name}{k}")
            assert sorted((step, value) for step, _, value in points) == [(s, sign * s + offset) for s in range(n)]
    client.close(timeout=5.0)


@pytest.mark.parametrize(("keys", "timestamps", "message"), [
    (["ok", "not ok!"], [0], "keys[1]: invalid name 'not ok!'"),
    (["ok"], [-1], "timestamps: out of range [0, 32503680000000]"),
])
def test_memory_transport_refuses_a_batch_the_service_refuses(keys: list[str], timestamps: list[int],
                                                              message: str) -> None:
    from trackhouse.proto.v1 import ingest_pb2

    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(replay_orphans=False))
    run_id = client.start_run(experiment="e").run_id
    client.close(timeout=5.0)
    batch = ingest_pb2.MetricBatch(
        writer_id="w", seq=1, run_ids=[run_id], keys=keys, key_index=np.array([0], "<u4").tobytes(),
        steps=np.array([0], "<i8").tobytes(), timestamps=np.array(timestamps, "<i8").tobytes(),
        values=np.array([1.0], "<f8").tobytes())
    ack = transport._store(batch)
    assert (ack.status, ack.code) == (ingest_pb2.REJECTED, 3)
    assert message in ack.message
    assert transport.point_count() == 0


def test_run_operations_after_the_client_closed_raise_at_once(client: th.Client, run: th.Run) -> None:
    """A closed client's sender is stopped: ``finish`` used to wait out ``close_timeout`` and drop
    the status, ``set_tags`` and ``log_params`` to vanish."""
    finished = client.start_run(experiment_id="0")
    assert finished.finish()
    client.close(timeout=5.0)
    for call in (run.finish, lambda: run.set_tags({"a": "b"}), lambda: run.log_params({"lr": 1})):
        with pytest.raises(th.UsageError, match="the client is closed"):
            call()
    assert finished.finish()  # already recorded: nothing to do


def test_a_full_buffer_wakes_the_sender_whatever_key_sets_filled_it() -> None:
    """The row count that fills the buffer depends on the key set's width; rows of other key sets
    can pass one key set's count without landing on it."""
    client = th.Client(th.MemoryTransport(), th.Settings(max_batch_points=42, flush_interval=600.0,
                                                         replay_orphans=False))
    try:
        run = client.start_run(experiment="e")
        wakes: list[int] = []
        run._wake = lambda: wakes.append(len(client._batcher.rows))  # type: ignore[method-assign]
        wide, narrow = dict.fromkeys("abcdef", 1.0), dict.fromkeys("xyz", 1.0)  # full at 7 / 14 rows
        run.log(step=0, loss=1.0)
        for step in range(1, 10):  # counts 2..10: the wide set at even counts never lands on 7
            run.log_metrics(wide if step % 2 else narrow, step=step)
        assert wakes[0] == 1  # the first row arms the interval
        assert any(count >= 7 for count in wakes[1:])  # and a full buffer wakes the sender
    finally:
        client._batcher.discard()
        client.close(timeout=1.0)


def test_more_distinct_keys_than_a_batch_may_name_are_sent_in_several_batches() -> None:
    """The service refuses a batch naming more than 10,000 keys; many single-key calls fit in
    one batch by points, so the sender cuts it by keys too (``MemoryTransport`` refuses as the
    service does)."""
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(flush_interval=600.0, replay_orphans=False))
    try:
        run = client.start_run(experiment="e")
        for i in range(10_050):
            run.log_metrics({f"layer{i}/grad_norm": float(i)}, step=0)
        run.log_array("loss", np.arange(3), np.ones(3))
        assert client.flush(timeout=30.0)
        stats = client.stats()
        assert (stats["points_acked"], stats["points_rejected"]) == (10_053, 0)
        assert stats["batches_acked"] >= 2
        assert transport.points(run.run_id, "layer10049/grad_norm")[0][2] == 10049.0
    finally:
        client.close(timeout=5.0)


def test_more_runs_than_a_batch_may_name_are_sent_in_several_batches() -> None:
    """The service refuses a batch naming more than 10,000 runs (``MemoryTransport`` too): a sweep
    logging into that many runs of one process between two sends is cut by runs."""
    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(flush_interval=600.0, replay_orphans=False))
    try:
        runs = [client.start_run(experiment="sweep") for _ in range(10_010)]
        for i, run in enumerate(runs):
            run.log_metrics({"loss": float(i)}, step=0)
        runs[-1].log_array("reward", np.arange(3), np.ones(3))
        assert client.flush(timeout=60.0)
        stats = client.stats()
        assert (stats["points_acked"], stats["points_rejected"]) == (10_013, 0)
        assert stats["batches_acked"] >= 2
        assert transport.points(runs[-1].run_id, "loss")[0][2] == 10_009.0
    finally:
        client.close(timeout=5.0)


def test_str_subclass_keys_are_the_strings_they_equal() -> None:
    """A ``StrEnum`` or ``numpy.str_`` key was refused on a run's first call and accepted once an
    equal key set was current; it is the plain string it equals, first call or not."""
    import enum

    class Metric(enum.StrEnum):
        LOSS = "loss"

    transport = th.MemoryTransport()
    client = th.Client(transport, th.Settings(flush_interval=600.0, replay_orphans=False))
    try:
        run = client.start_run(experiment="e")
        run.log_metrics({Metric.LOSS: 0.5}, step=0)
        run.log_metrics({"loss": 0.25}, step=1)
        run.log_metrics({np.str_("loss"): 0.125}, step=2)
        run.log_array(Metric.LOSS, [3], [0.0625])
        run.log_params({Metric.LOSS: "x"})
        assert client.flush(timeout=10.0)
        assert [v for _, _, v in sorted(transport.points(run.run_id, "loss"))] == [0.5, 0.25, 0.125, 0.0625]
        assert transport.params[run.run_id] == {"loss": "x"}
    finally:
        client.close(timeout=5.0)


_TOO_MANY = {f"t{i}": 1 for i in range(1001)}


@pytest.mark.parametrize("mode", ["online", "offline"])
@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c: c.start_run(name="x" * 251), "is 251 characters, limit 250"),
        (lambda c: c.start_run(name=3), "run name must be a string"),
        (lambda c: c.start_run(start_time=-1), "start_time=-1 is before the epoch"),
        (lambda c: c.start_run(params={"lr": "x" * 6001}), r"params\[0\]\.value: 6001 characters for 'lr', limit 6000"),
        (lambda c: c.start_run(tags={"a": 1, "b": "x" * 5001}), r"tags\[1\]\.value: 5001 characters .*limit 5000"),
        (lambda c: c.start_run(params=_TOO_MANY), "params: 1001 items in one call, limit 1000"),
        (lambda c: c.start_run().log_params({"lr": "x" * 6001}), r"params\[0\]\.value: 6001 characters"),
        (lambda c: c.start_run().set_tags(_TOO_MANY), "tags: 1001 items in one call, limit 1000"),
    ],
)
def test_what_the_service_refuses_raises_at_the_call_online_and_offline(tmp_path: Any, mode: str, call: Any,
                                                                        match: str) -> None:
    """Offline, the refused operation used to be spooled, and the sync then refused it, long after."""
    spool = tmp_path / "spool"
    client = th.Client(th.MemoryTransport(), th.Settings(mode=mode, spool_dir=str(spool), replay_orphans=False))
    with pytest.raises(th.UsageError, match=match):
        call(client)
    assert client.close(timeout=5.0)
    server = th.MemoryTransport()
    assert all(r.complete for r in th.sync(spool, transport=server))  # nothing refused was recorded
    assert all(not params for params in server.params.values())


def test_offline_a_run_keeps_one_tag_free_for_the_sync(tmp_path: Any) -> None:
    tags = {f"t{i}": 1 for i in range(1000)}
    offline = th.Client(th.MemoryTransport(), th.Settings(mode="offline", spool_dir=str(tmp_path),
                                                          replay_orphans=False))
    with pytest.raises(th.UsageError, match="at most 999 tags"):
        offline.start_run(tags=tags)  # the sync adds the local id's tag: 1001, which the service refuses
    offline.close()
    online = th.Client(th.MemoryTransport(), th.Settings(spool_dir=str(tmp_path), replay_orphans=False))
    assert len(online.transport.tags[online.start_run(tags=tags).run_id]) == 1000  # type: ignore[attr-defined]
    online.close()
