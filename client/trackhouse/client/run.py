"""``Run``: the handle a training loop logs through.

The hot path (``log``, ``log_metrics``) is one Python frame (two for a key set of one
key, whose getter is a lambda returning a 1-tuple): exact type checks,
the values of the last key set logged read from a ``dict`` of as many keys by one
``operator.itemgetter`` (in the set's order, whatever the dict's; a missing key
means another key set; a dict subclass, whose ``__missing__`` could invent a
value, takes the general path, which compares ``tuple(metrics)`` with the set's
keys), the values converted and checked by one precompiled
``struct`` pack in C (``PyFloat_AsDouble`` per value: what ``float()`` takes,
strings refused), and one ``list.append`` of the row
``(key set id, step, timestamp, values)`` to the batcher's shared row list —
no lock (see ``batcher.py``), no call into the batcher except on the first row of
an empty buffer and when the buffer fills (to wake the sender). Anything unusual
(a new key set, a value ``struct`` refuses) takes the slow path, which validates
value by value and says what is wrong; a bad call appends nothing.

Why one frame and ``struct`` (measured, ``loadtests/client_call_ab.py``): right
after a training step the call runs with caches cold, and there a second frame,
the batcher's bookkeeping and ``array("d", ...)`` (which parses a format string
per value) cost more than the values themselves.

Params, tags and the final status go through the client (``Client._submit``),
which spools them when the server is away or the client is offline, and then
sends later ones the same way, behind them, until they are delivered. They, and
a new run's name, are checked at the call against the service's rules
(``trackhouse.proto.rules``), online and offline alike: a sync must not meet a
refusal the call could have raised.
"""

from __future__ import annotations

import logging
import operator
import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, SupportsFloat, SupportsIndex, cast

import numpy as np
import numpy.typing as npt

from trackhouse.client.batcher import Batcher, row_packer
from trackhouse.client.errors import UsageError
from trackhouse.proto import rules
from trackhouse.proto.rules import MAX_BATCH_KEYS, key_problem, timestamps_problem
from trackhouse.proto.v1 import common_pb2, ingest_pb2

if TYPE_CHECKING:
    from trackhouse.client.client import Client
    from trackhouse.client.system import SystemSampler

logger = logging.getLogger(__name__)

_I64 = 2**63
_I64_MIN, _I64_MAX = -_I64, _I64 - 1  # precomputed: ``-_I64`` in the call made a big int each time (~0.3 µs cold)
_TERMINAL = ("FINISHED", "FAILED", "KILLED")
_MAX_KEY_SETS = 256  # cached key blocks per run; a loop logs a handful of distinct key sets
_ACTIVE, _FINISHED, _DISABLED, _CLOSED = 0, 1, 2, 3
_time_ns = time.time_ns
_NO_KEYS = (object(),)  # the key set of a Run that has logged nothing yet


# get(mapping) -> its values in the key set's order, key set id, pack(*values), rows that fill a batch,
# key block, keys, width
_KeySet = tuple[Callable[[Any], tuple[Any, ...]], int, Callable[..., bytes], int, "array[int]",
                tuple[object, ...], int]


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def check_int(name: str, value: object) -> int:
    """``value`` as an int64, or UsageError saying what to pass."""
    if type(value) is not int:
        if isinstance(value, bool) or not hasattr(type(value), "__index__"):
            raise UsageError(f"{name} must be an int, got {type(value).__name__} {value!r}: pass int({name})")
        value = operator.index(cast(SupportsIndex, value))
    if not -_I64 <= value < _I64:
        raise UsageError(f"{name}={value} does not fit in int64")
    return value


def check_metric(key: object, value: object) -> float:
    """A validated value; values are anything float() takes except strings."""
    if type(value) is float:
        return value
    if isinstance(value, str | bytes) or not hasattr(type(value), "__float__"):
        raise UsageError(f"metric {key!r} must be a number, got {type(value).__name__} {value!r}: log float(value)")
    if isinstance(value, np.ndarray) and value.ndim > 0:
        raise UsageError(f"metric {key!r} must be a single number, got an array of shape {value.shape}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: an int past a double's range
        raise UsageError(f"metric {key!r} must be a single number, got {value!r}: {exc}") from None


def check_key(key: object, prefix: str = "") -> str:
    """The metric name ``prefix + key``, when it is one the service takes (``trackhouse.proto.rules``:
    it refuses a whole batch holding a bad name, other runs' points with it)."""
    if not isinstance(key, str) or not key:
        raise UsageError(f"metric keys must be non-empty strings, got {key!r}")
    name = prefix + str.__str__(key)  # a str subclass (StrEnum, numpy.str_) as the plain string it equals
    problem = key_problem(name)
    if problem is not None:
        raise UsageError(f"metric key {key!r}: {problem}")
    return name


def check_start_time(value: object) -> int:
    """A run's start: an int of ms since the epoch, not before it (the service refuses that)."""
    ts = check_int("start_time", value)
    if ts < 0:
        raise UsageError(f"start_time={ts} is before the epoch: pass ms since the epoch, or None for now")
    return ts


def check_timestamp(value: object) -> int:
    """A timestamp the caller passed: an int of ms since the epoch, in the service's range."""
    ts = check_int("timestamp", value)
    problem = timestamps_problem(ts, ts)
    if problem is not None:
        raise UsageError(f"timestamp={ts} is {problem}")
    return ts


def _string_pairs(kind: str, items: Mapping[str, Any], max_value: int) -> list[tuple[str, str]]:
    """``items`` as (key, value) strings, when the service takes them (``rules.items_problem``: online it
    refuses them at once, offline a sync would, long after the call)."""
    pairs = []
    for key, value in items.items():
        if not isinstance(key, str) or not key:
            raise UsageError(f"{kind} keys must be non-empty strings, got {key!r}")
        problem = key_problem(key := str.__str__(key))
        if problem is not None:
            raise UsageError(f"{kind} key {key!r}: {problem}")
        pairs.append((key, value if isinstance(value, str) else str(value)))
    check_items(pairs, f"{kind}s", max_value)
    return pairs


def check_items(pairs: Sequence[tuple[str, str]], field: str, max_value: int) -> None:
    """UsageError when params or tags of one call break the service's rules (``rules.items_problem``)."""
    problem = rules.items_problem(pairs, field, max_value)
    if problem is not None:
        raise UsageError(f"{problem}: the service refuses this; split the call or shorten the value")


def check_run_name(name: object) -> str:
    """A run name the service takes (at most ``MAX_RUN_NAME`` characters)."""
    if not isinstance(name, str):
        raise UsageError(f"run name must be a string, got {type(name).__name__} {name!r}")
    if len(name) > rules.MAX_RUN_NAME:
        raise UsageError(f"run name {name[:40]!r}… is {len(name)} characters, limit {rules.MAX_RUN_NAME}")
    return name


def param_messages(params: Mapping[str, Any]) -> list[common_pb2.Param]:
    return [common_pb2.Param(key=k, value=v) for k, v in _string_pairs("param", params, rules.MAX_PARAM_VALUE)]


def tag_messages(tags: Mapping[str, Any]) -> list[common_pb2.Tag]:
    return [common_pb2.Tag(key=k, value=v) for k, v in _string_pairs("tag", tags, rules.MAX_TAG_VALUE)]


class Run:
    """One run being logged. Create it with ``Client.start_run``; use it as a context manager.

    On a rank that does not log (``Settings.ranks == "zero"`` and rank > 0) every
    logging call returns at once and does nothing; ``enabled`` is False.
    """

    def __init__(self, client: Client, run_id: str, experiment_id: str, name: str, *,
                 key_prefix: str = "", enabled: bool = True) -> None:
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.name = name
        self._client = client
        self._batcher: Batcher = client._batcher
        self._rows = self._batcher.rows  # shared with the batcher: producers only append (batcher.py)
        self._wake = client._sender.wake
        self._max_points = client.settings.max_batch_points
        self._prefix = key_prefix
        self._slot = self._batcher.intern_run(run_id)
        self._state = _ACTIVE if enabled else _DISABLED
        self._sets: dict[tuple[str, ...], _KeySet] = {}
        # The key set of the last call and what the hot path needs of it, in one tuple that a
        # call reads once: another thread logging into this run (the system-metrics sampler)
        # may switch it meanwhile, and keys, block and packer must come from the same set.
        # No mapping has -1 keys, and none's keys equal _NO_KEYS (it holds an object only this
        # module has), so the first call always switches, and its keys are checked (an empty
        # mapping is refused there).
        self._current: _KeySet = (tuple, -1, row_packer(0), 1, array("I"), _NO_KEYS, -1)
        self._status_sent = False
        self._sampler: SystemSampler | None = None  # its system metrics, stopped by finish()

    def __repr__(self) -> str:
        return f"Run(run_id={self.run_id!r}, experiment_id={self.experiment_id!r}, name={self.name!r})"

    @property
    def enabled(self) -> bool:
        """False on a rank whose calls are ignored (see ``Settings.ranks``)."""
        return self._state != _DISABLED

    def log(self, *, step: SupportsIndex = 0, **metrics: SupportsFloat) -> None:
        """Log metrics at ``step`` (``run.log(step=3, loss=0.5, acc=0.9)``); returns at once."""
        if not metrics:
            raise UsageError("run.log() needs metrics as keywords, e.g. run.log(step=3, loss=0.5)")
        self.log_metrics(metrics, step=step)

    def log_metrics(
        self, metrics: Mapping[str, SupportsFloat], *, step: SupportsIndex = 0, timestamp: SupportsIndex | None = None
    ) -> None:
        """Log a mapping of metrics at ``step``; ``timestamp`` in ms since epoch, default now."""
        if self._state:
            return self._inactive()
        if type(step) is not int or not _I64_MIN <= step <= _I64_MAX:
            step = check_int("step", step)
        ts = _time_ns() // 1_000_000 if timestamp is None else check_timestamp(timestamp)
        current = self._current
        if type(metrics) is dict and len(metrics) == current[6]:  # not a subclass: no __missing__
            try:  # the current key set's values, in its order: a KeyError if a key is not there
                values = current[2](*current[0](metrics))
            except Exception:  # another key set as long, or a value struct refused
                current, values = self._other(metrics)
        else:
            current, values = self._other(metrics)
        row = (current[1], step, ts, values)
        rows = self._rows
        rows.append(row)
        count = len(rows)
        if count < 3 or count >= current[3]:  # not ==: rows of other key sets may pass it by
            self._arm(row, count >= current[3])

    def _arm(self, row: object, full: bool) -> None:
        """After an append that may have made the buffer non-empty (``len(rows)`` 1, or 2 when
        another thread appended between our append and ``len``), or full: wake the sender."""
        if full or self._batcher.first_row(row):
            self._wake()

    def _switch(self, keys: tuple[str, ...]) -> _KeySet:
        """Make ``keys`` the current key set (validated and interned once per run); returns it."""
        found = self._sets.get(keys)
        if found is None:
            if not keys:
                raise UsageError("log_metrics() needs at least one metric, e.g. {'loss': 0.5}")
            if len(keys) > MAX_BATCH_KEYS:
                raise UsageError(f"log_metrics() takes at most {MAX_BATCH_KEYS} metrics a call (the service's limit "
                                 f"of keys in a batch), got {len(keys)}")
            block = self._batcher.intern_keys([check_key(k, self._prefix) for k in keys])
            get = operator.itemgetter(*keys) if len(keys) > 1 else lambda m, k=keys[0]: (m[k],)
            found = (get, self._batcher.key_set(self._slot, block), row_packer(len(block)),
                     max(1, self._max_points // len(block)), block, keys, len(keys))
            if len(self._sets) >= _MAX_KEY_SETS:
                self._sets.clear()
            self._sets[keys] = found
        self._current = found  # one store: a racing call reads the old set or this one, whole
        return found

    def _other(self, metrics: Mapping[str, SupportsFloat]) -> tuple[_KeySet, bytes]:
        """A call the fast path did not take: another key set, a mapping that is not a ``dict``
        (its keys are read in its order), or a value ``struct`` refused (``_checked`` says which)."""
        keys = tuple(metrics)
        current = self._current
        if keys != current[5]:
            current = self._switch(keys)  # a bad key raises its UsageError here
        try:
            return current, current[2](*metrics.values())
        except Exception:
            return self._checked(metrics)

    def _checked(self, metrics: Mapping[str, SupportsFloat]) -> tuple[_KeySet, bytes]:
        items = list(metrics.items())  # one snapshot: keys and values agree
        values = [check_metric(k, v) for k, v in items]
        current = self._switch(tuple(k for k, _ in items))
        return current, current[2](*values)

    def _block_of(self, key: str) -> array[int]:
        found = self._sets.get((key,)) if type(key) is str else None
        if found is None:
            found = self._switch((check_key(key),))
        return found[4]

    def log_array(self, key: str, steps: npt.ArrayLike, values: npt.ArrayLike, *,
                  timestamps: npt.ArrayLike | None = None) -> None:
        """Log a whole series of one key at once (RL loops): ``steps`` ints, ``values`` numbers.

        The arrays are copied (into a reused arena: ~10 ns a value or less), so the caller
        may reuse them; ``timestamps`` (ms since epoch, one per point) default to now.
        """
        if self._state:
            return self._inactive()
        block = self._block_of(key)
        steps_a = _int_column("steps", steps)
        values_a = np.asarray(values)
        if values_a.dtype.kind not in "fiub" or values_a.ndim != 1 or len(values_a) != len(steps_a):
            raise UsageError(
                f"log_array values must be a 1-D numeric array as long as steps ({len(steps_a)}), "
                f"got dtype {values_a.dtype} shape {values_a.shape}"
            )
        if timestamps is None:
            ts: npt.NDArray[np.int64] | int = _time_ns() // 1_000_000
        else:
            ts = _int_column("timestamps", timestamps).astype(np.int64)  # rare: a plain copy
            if len(ts) != len(steps_a):
                raise UsageError(f"log_array timestamps must be as long as steps ({len(steps_a)})")
            problem = timestamps_problem(int(ts.min()), int(ts.max())) if len(ts) else None
            if problem is not None:
                raise UsageError(f"log_array timestamps are {problem}")
        if len(steps_a) and self._batcher.append_arrays(self._slot, block[0], steps_a, ts, values_a):
            self._wake()

    def _inactive(self) -> None:
        if self._state == _FINISHED:
            raise UsageError(f"run {self.run_id} is finished; start a new run with client.start_run()")
        if self._state == _CLOSED:
            raise UsageError("the client is closed; create a new one with trackhouse.client.connect()")
        # disabled rank: validate nothing more and drop the call

    def _client_closed(self) -> None:
        """The client was closed: logging calls raise from now on (a disabled rank's stay no-ops)."""
        if self._state == _ACTIVE:
            self._state = _CLOSED

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (write-once: another value for a logged key raises InvalidArgument; logged instead while
        operations wait in the sender after an outage, or offline at sync)."""
        messages = param_messages(params)
        if messages and self._state != _DISABLED:
            self._client._submit(ingest_pb2.LogParamsRequest(run_id=self.run_id, params=messages))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (last write wins)."""
        messages = tag_messages(tags)
        if messages and self._state != _DISABLED:
            self._client._submit(ingest_pb2.SetTagsRequest(run_id=self.run_id, tags=messages))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every point logged so far (by any run of this client) is acknowledged.

        Returns False when ``timeout`` (default ``Settings.flush_timeout``) passes first;
        the points stay queued and keep being retried (or spooled).
        """
        return self._client.flush(timeout)

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> bool:
        """Stop the run's system metrics, flush, then record ``status``, all within ``timeout``
        (default ``Settings.close_timeout``).

        Returns whether every point and the status were delivered (offline: spooled).
        What could not be is kept: in memory while the client lives, in the spool at
        close. Calling it again only retries a status update that failed. In a shared run
        (``ranks="all"``, several ranks) only rank 0 records the status; another rank
        flushes, and records FAILED or KILLED as the tag ``rank{N}/status`` without
        ending the run.
        """
        if status not in _TERMINAL:
            raise UsageError(f"status must be one of {', '.join(_TERMINAL)}, got {status!r}")
        if self._state == _DISABLED or self._status_sent:
            return True
        self._client._check_open()  # a closed client's sender is stopped: nothing would be sent
        self._state = _FINISHED
        done = self._client._end_run(self, status, self._client.settings.close_timeout if timeout is None else timeout)
        self._status_sent = True
        return done

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.finish("FINISHED")
            return
        status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        try:
            self.finish(status)
        except Exception:  # never mask the training loop's own exception
            logger.exception("could not mark run %s %s", self.run_id, status)


def _int_column(name: str, data: npt.ArrayLike) -> npt.NDArray[Any]:
    """``data`` as a 1-D integer array that fits int64 (not copied), or UsageError: float
    steps are a mistake, not something to convert."""
    a = np.asarray(data)
    if a.ndim != 1 or a.dtype.kind not in "iu":
        raise UsageError(f"log_array {name} must be a 1-D integer array, got dtype {a.dtype} shape {a.shape}")
    if a.dtype == np.uint64 and a.size and int(a.max()) >= _I64:
        raise UsageError(f"log_array {name} do not fit in int64")
    return a
