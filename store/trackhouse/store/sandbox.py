"""Connections for user SQL: parse with ClickHouse's parser, run in a sandbox, stream Arrow.

Owns the SQL endpoint's own clickhouse-connect clients, apart from the store's
readers, because chDB applies a query's SETTINGS to the connection's session
(measured: a `readonly` or `max_result_rows` passed with one query stays set
for every later query on that connection). Here that is what we want: every
call passes the same sandbox settings, so a connection is never used without
them, and the readers that run search and history never see them.

Invariants:
- the current database of every sandbox client is the empty sandbox database
  (schema migration 7), so a table name the validator did not map resolves to
  nothing;
- sandbox clients reach the server as the store's own do: `connect()` with the
  store's `StoreSettings` (user, password, TLS, timeouts, compression);
- the store failing to open a connection, or refusing its credentials, is the
  store's error (`StoreUnavailable`), never a `QueryFailed` about the user's query;
- user text reaches the engine only as a bound parameter of `parse()` or as the
  query of `stream()`, which callers build from the text `parse()` formatted;
- no clickhouse-connect exception leaves this module (`translate`);
- at most `size` queries are admitted at once (`admit()`, a slot each, waited for
  asynchronously), each uses one connection at a time, and their steps run on the
  sandbox's own `size` threads: taking a connection never waits, and no thread of
  the store's pool (search, history, ingest) ever waits for the sandbox;
- a slot is freed only after the query's last step is over and its deferred calls
  (closing its stream) ran, however the query ended: answered, failed, cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from trackhouse.store.dsn import DSN, connect
from trackhouse.store.errors import QueryFailed, StoreError, StoreUnavailable, translate
from trackhouse.store.settings import StoreSettings

P = ParamSpec("P")
T = TypeVar("T")

# ClickHouse's answers to credentials it refuses (UNKNOWN_USER, WRONG_PASSWORD, REQUIRED_PASSWORD,
# IP_ADDRESS_NOT_ALLOWED, AUTHENTICATION_FAILED): a server checks them on every HTTP request, so
# they can also answer a query on a connection opened before the credentials changed.
_REFUSED_CREDENTIALS = frozenset({192, 193, 194, 195, 516})


@dataclass(frozen=True)
class Parsed:
    """ClickHouse's parse of one statement: its AST as JSON and the query formatted back."""

    ast_json: str
    formatted: str
    round_trip: bool  # parsing `formatted` gives the same AST


class Slots:
    """At most `size` holders at once. `acquire()` waits asynchronously, first come first
    served, from any event loop (every loop that uses the store shares the count);
    `release()` may be called from any thread."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size!r}")
        self.size = size
        self._free = size
        self._lock = threading.Lock()
        # Invariant: waiters only while no slot is free; release() hands its slot to the first.
        self._waiters: collections.deque[_Waiter] = collections.deque()

    async def acquire(self) -> None:
        """Take a slot, waiting for one. Cancelled while waiting, it holds none."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._free:
                self._free -= 1
                return
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                if not waiter.granted:
                    with contextlib.suppress(ValueError):  # release() skipped it: its loop closed
                        self._waiters.remove(waiter)
            if waiter.granted:  # handed over as it was cancelled: not ours to keep
                self.release()
            raise

    def release(self) -> None:
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                try:
                    waiter.loop.call_soon_threadsafe(_grant, waiter.future)
                except RuntimeError:  # its loop is closed: nobody waits there any more
                    continue
                waiter.granted = True
                return
            self._free += 1


class _Waiter:
    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False  # set (under the lock) when release() hands it a slot


def _grant(future: asyncio.Future[None]) -> None:
    if not future.done():  # cancelled meanwhile: its acquire() gives the slot back
        future.set_result(None)


class SqlSession:
    """One admitted query: its steps run one after another on the sandbox's threads.

    `end()` frees the slot once the last step is over, also one whose caller stopped
    waiting for it (cancelled): a step never runs alongside the clean-up of its query.
    """

    def __init__(self, executor: ThreadPoolExecutor, release: Callable[[], None]) -> None:
        self._executor = executor
        self._release = release
        self._last: Future[Any] | None = None
        self._deferred = contextlib.ExitStack()
        self._ended = False

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking step on the sandbox's threads."""
        if self._ended:
            raise StoreError("this SQL query has ended")
        try:
            future = self._executor.submit(_after, self._last, lambda: fn(*args, **kwargs))
        except RuntimeError:  # shut down
            raise StoreError("the store is closed") from None
        self._last = future
        return await asyncio.wrap_future(future)

    def defer(self, fn: Callable[P, Any], *args: P.args, **kwargs: P.kwargs) -> None:
        """Call `fn` when the query ends (last deferred first), on a sandbox thread.

        Steps call it (from their thread) for what they opened, e.g. a stream's `__exit__`:
        it is closed even when nobody awaits the step that opened it any more."""
        self._deferred.callback(fn, *args, **kwargs)

    async def end(self) -> None:
        """Run the deferred calls after the last step, then free the slot. Cancelling the
        caller does not stop this: it goes on on the sandbox's thread."""
        if self._ended:
            return
        self._ended = True
        try:
            future = self._executor.submit(self._finish, self._last)
        except RuntimeError:  # the store is closed; its close() closed the clients
            self._release()
            return
        await asyncio.shield(asyncio.wrap_future(future))

    def _finish(self, last: Future[Any] | None) -> None:
        try:
            _after(last, self._deferred.close)
        finally:
            self._release()


def _after(previous: Future[Any] | None, fn: Callable[[], T]) -> T:
    """`fn()` once `previous` (this session's step before, maybe abandoned by a cancelled caller)
    is over. `previous` was submitted first, so it is running or over: this never deadlocks."""
    if previous is not None:
        wait_for_future([previous])
    return fn()


class SqlSandbox:
    """A small pool of sandbox clients, opened on first use (the constructor does no I/O).

    Async callers run a query as `session = await sandbox.admit()`, then `session.call(...)`
    for each blocking step (which may use `parse` and `stream`), then `await session.end()`.
    """

    def __init__(self, dsn: DSN, database: str, size: int = 2, *, options: StoreSettings) -> None:
        self._dsn = dsn
        self._options = options  # how to reach a server: the store's own, never defaults
        self._database = database
        self._size = size
        self._idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._opened = 0
        self._lock = threading.Lock()
        self._all: list[Any] = []
        self.slots = Slots(size)
        # As many threads as slots: each admitted query runs one step at a time, so no step waits
        # for another query's (only, briefly, for its own step that a cancelled caller left running).
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="trackhouse-sql")

    async def admit(self) -> SqlSession:
        """Wait (asynchronously) for a slot; the session returned holds it until its `end()`."""
        await self.slots.acquire()
        return SqlSession(self._executor, self.slots.release)

    @contextlib.contextmanager
    def _client(self) -> Iterator[Any]:
        client = self._take()
        try:
            yield client
        finally:
            self._idle.put(client)

    def _take(self) -> Any:
        with self._lock:
            if self._idle.empty() and self._opened < self._size:
                self._opened += 1
                try:
                    client = connect(self._dsn, options=self._options)
                except StoreError as exc:
                    self._opened -= 1
                    raise self._refused(exc) from None
                except BaseException:
                    self._opened -= 1
                    raise
                client.database = self._database
                self._all.append(client)
                return client
        return self._idle.get()

    def _refused(self, exc: StoreError) -> StoreUnavailable:
        """The store's error for a connection it would not open or credentials it refused."""
        return StoreUnavailable(
            f"the store at {self._dsn.redacted()} refused the SQL endpoint's connection or its credentials "
            f"(check TRACKHOUSE_STORE_USER, TRACKHOUSE_STORE_PASSWORD and the server's address): {exc}")

    def _translate(self, exc: BaseException) -> StoreError:
        error = translate(exc)
        if isinstance(error, QueryFailed) and error.code in _REFUSED_CREDENTIALS:
            return self._refused(error)
        return error

    def parse(self, text: str, settings: Mapping[str, Any]) -> Parsed:
        """Parse `text` (bound as a parameter: never executed) into (AST JSON, formatted text)."""
        sql = ("SELECT parseQueryToJSON({q:String}) AS ast, formatQuery({q:String}) AS formatted, "
               "parseQueryToJSON(formatQuery({q:String})) = parseQueryToJSON({q:String}) AS same")
        with self._client() as client:
            try:
                row = client.query(sql, parameters={"q": text}, settings=dict(settings)).result_rows[0]
            except Exception as exc:
                raise self._translate(exc) from None
        return Parsed(str(row[0]), str(row[1]), bool(row[2]))

    @contextlib.contextmanager
    def stream(
        self, sql: str, parameters: Mapping[str, Any] | None, settings: Mapping[str, Any]
    ) -> Iterator[tuple[Any, Iterator[Any]]]:
        """Run `sql`; yield (pyarrow Schema, iterator of RecordBatches); the client is held until exit."""
        with self._client() as client:
            try:
                context = client.query_arrow_stream(sql, parameters=dict(parameters) if parameters else None,
                                                    settings=dict(settings), use_strings=True)
            except Exception as exc:
                raise self._translate(exc) from None
            with context as batches:
                # The stream reader read the schema already: an empty answer still has columns.
                yield getattr(context.gen, "schema", None), _translated(batches)

    def close(self) -> None:
        self._executor.shutdown(wait=True)  # steps still running finish on their clients first
        for client in self._all:
            with contextlib.suppress(Exception):
                client.close()
        self._all.clear()


def _translated(batches: Iterator[Any]) -> Iterator[Any]:
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:
            raise translate(exc) from None
        # clickhouse-connect yields one pyarrow Table per block; hand out its batches.
        yield from (item.to_batches() if hasattr(item, "to_batches") else [item])
