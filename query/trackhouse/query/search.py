"""Run search: scope + filter + ordering + keyset pages, then hydrate one page.

Two phases. Phase one picks the ids of one page over the search layout of
schema migration 2 (`trackhouse.query.plan`, docs/search.md): runs
(`search_runs` FINAL, sorted by start_time) in scope that pass the compiled
filter, each order key joined in from the key-first copies of params, tags or
latest metrics (never from metrics), ordered as MLflow orders them — values,
then NaN, then missing, whatever the direction — with a stable tiebreak
(start_time DESC, run_id ASC), cut by a keyset predicate from the page token —
never OFFSET. A cursor holds the last row's values as they are (NaN and ±inf
included: the token's JSON carries them), so each value's rank is known from
the value itself. The order is total and the cursor names a place in it, not a
count of rows, so a token is bound to its question (scope, view, filter, order)
but not to the page size: the next page may ask for any number of runs. Phase
two hydrates exactly those runs (params, tags, latest metrics) by id. On request,
a third query counts every match (`total`).

All user text travels as bound parameters; identifiers come from whitelists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from time import monotonic
from typing import Any

from trackhouse.query.errors import InvalidArgument
from trackhouse.query.filters import ATTRIBUTES, METRICS, Binder, Comparison, Node, parse_filter
from trackhouse.query.order import OrderKey, parse_order_by
from trackhouse.query.plan import RUNS, compile_search_filter, has_key_terms, key_values, split_pushed, value_condition
from trackhouse.query.runindex import (
    FRESH_SETTINGS,
    INDEX,
    changed_runs_sql,
    compile_index_filter,
    fresh_sql,
    key_column,
    state_sql,
)
from trackhouse.query.runorder import after_sqls, candidates_sql
from trackhouse.query.runpages import RECORD, newest, page_details_steps
from trackhouse.query.settings import QuerySettings
from trackhouse.query.tokens import TokenCodec, fingerprint
from trackhouse.store import RunDetails, RunRecord, Store, run_id_prefix
from trackhouse.store.reads import Rows, Steps
from trackhouse.store.schema import latest_value

VIEWS = {"ACTIVE_ONLY": ("active",), "DELETED_ONLY": ("deleted",), "ALL": ("active", "deleted")}
# Attribute columns a search may order by, with their ClickHouse types for cursors.
ATTRIBUTE_TYPES = {
    "run_id": "String", "run_name": "String", "status": "String", "user_id": "String",
    "start_time": "Int64", "end_time": "Int64", "artifact_uri": "String",
    "lifecycle_stage": "String", "experiment_id": "String",
}
TIEBREAK = (OrderKey(ATTRIBUTES, "start_time", False), OrderKey(ATTRIBUTES, "run_id", True))
# Windowed pages (`RunSearch._windowed`): runs per window, first and second round.
WINDOW_GROWTH = 8
# Rows per read of a window: a read of search_runs FINAL in order with LIMIT above 1,000
# costs ~2 s at 10 M runs against ~30 ms at 1,000 (docs/search.md, "Windowed pages").
WINDOW_READ = 1000
# Runs changed since the run index's watermark beyond which a search reads the per-key copies
# alone (their current rows are computed per search: a few granules each, fine for thousands).
MAX_CHANGED = 10_000
# Pages ordered by one metric (`RunSearch._ordered_hits`): candidates of run_order in the first
# read per run asked for, growth of each next read, and the most read before the whole index is.
ORDER_CHUNK = 3
ORDER_GROWTH = 4
ORDER_CANDIDATES = 5_000


def _clustered(window: Sequence[tuple[Any, ...]]) -> bool:
    """Whether most of a window's ids (rows of run_id, start_time, ...) begin with their
    start time: ids trackhouse minted, which sit together in every copy."""
    minted = sum(1 for row in window if row[0][:12] == run_id_prefix(row[1]))
    return minted * 10 >= len(window) * 9


@dataclass(frozen=True)
class SearchRequest:
    experiment_ids: tuple[str, ...] = ()
    filter: str = ""
    order_by: tuple[str, ...] = ()
    max_results: int = 0
    page_token: str = ""
    view: str = "ACTIVE_ONLY"
    include_total: bool = False
    # The caller's experiments (an experiment-scoped token); None: no restriction. Results
    # are filtered to them, whatever `experiment_ids` asks.
    allowed_experiments: tuple[str, ...] | None = None


@dataclass(frozen=True)
class SearchPage:
    runs: list[RunDetails]
    next_page_token: str
    # Every run matching scope and filter (all pages), when the request asked for it.
    total: int | None = None


def sort_keys(order: Sequence[OrderKey]) -> list[OrderKey]:
    """The user's keys plus MLflow's tiebreak, without repeating a key."""
    keys = list(order)
    seen = {(k.entity, k.key) for k in keys}
    # TIEBREAK ends with run_id, which is unique: the order is total.
    return keys + [k for k in TIEBREAK if (k.entity, k.key) not in seen]


def _attribute_type(key: OrderKey) -> str:
    if key.key not in ATTRIBUTE_TYPES:
        raise InvalidArgument(f"order_by: cannot order by attribute {key.key!r}")
    return ATTRIBUTE_TYPES[key.key]


def _key_expr(i: int, key: OrderKey, db: str, binder: Binder,
              pushed: Sequence[Comparison] = ()) -> tuple[str, str, str]:
    """(select expression, join clause, ClickHouse type) for one order key.

    With `pushed` filter terms on the same key (`plan.split_pushed`), the join is an
    INNER JOIN on the key's rows that pass them: they are the filter's terms.
    """
    if key.entity == ATTRIBUTES:
        return f"base.{key.key}", "", _attribute_type(key)
    sub, kind = key_values(key.entity, db, binder.bind(key.key, "String"))
    if pushed:
        conds = " AND ".join(value_condition(c, binder) for c in pushed)
        passing = f"SELECT run_id, v FROM ({sub}) WHERE {conds}"
        return f"j{i}.v", f"INNER JOIN ({passing}) AS j{i} ON j{i}.run_id = base.run_id", kind
    return f"j{i}.v", f"LEFT JOIN ({sub}) AS j{i} ON j{i}.run_id = base.run_id", kind


def _rank_expr(expr: str, kind: str) -> str:
    """0 for a value, 1 for NaN (metrics), 2 for missing: sorted ascending whatever the direction."""
    if kind == "Float64":
        return f"multiIf(isNull({expr}), 2, isNaN({expr}), 1, 0)"
    return f"if(isNull({expr}), 2, 0)"


def _place(value: float, start_time: int, run_id: str, ascending: bool) -> tuple[int, float, int, str]:
    """A run's place in run_order, (rank, value, neg_start, run_id), as `runorder.rows_sql` writes it."""
    if math.isnan(value):
        return 1, 0.0, -start_time, run_id
    return 0, (value if ascending else -value) + 0.0, -start_time, run_id


def _candidate_place(c: Sequence[Any]) -> tuple[int, float, int, str]:
    """A candidate's place, from its row (`runorder.CANDIDATE`: run_id, neg_start, version, rank, value)."""
    return int(c[3]), float(c[4]), int(c[1]), str(c[0])


def _late(moved: dict[str, tuple[tuple[int, float, int, str], int]], seen: set[str],
          start: tuple[int, float, int, str] | None, upto: tuple[int, float, int, str] | None,
          late: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """`late` and the superseded candidates (`moved`, taken out) whose run's current run_order
    row sorts where this search has read, from after `start` up to `upto` (None: the end), and
    was not among what it read: a pass wrote it after that read (answered as changed runs, as
    (run_id, start_time)). Those before `start` belong to earlier pages, those read were
    checked at their place, those after `upto` are left for later reads."""
    for run_id, (place, start_time) in list(moved.items()):
        if run_id in seen or (start is not None and place <= start):
            del moved[run_id]
        elif upto is None or place <= upto:
            del moved[run_id]
            late.append((run_id, start_time))
    return late


def _read_keys(req: SearchRequest, keys: Sequence[OrderKey], binder: Binder) -> dict[str, str]:
    """What rows computed now for a page or a count must hold (`runindex.rows_sql`'s `keys`): the
    params, tags and metrics its filter compares and it orders by, as a bound condition on `key`
    per map (computing only those: ~40 against ~90 ms for 1,000 runs at 10 M runs)."""
    found: dict[str, set[str]] = {}
    stack: list[Node | None] = [parse_filter(req.filter)]
    while stack:
        node = stack.pop()
        if isinstance(node, Comparison):
            found.setdefault(node.entity, set()).add(node.key)
        elif node is not None:
            stack.extend(node.items)
    for key in keys:
        found.setdefault(key.entity, set()).add(key.key)
    found.pop(ATTRIBUTES, None)
    return {entity: f"key IN {binder.bind(sorted(names), 'Array(String)')}" for entity, names in found.items()}


def _rank(value: Any) -> int:
    """What `_rank_expr` gives for a value read back from a row or a cursor."""
    if value is None:
        return 2
    return 1 if isinstance(value, float) and math.isnan(value) else 0


def _order(exprs: Sequence[tuple[str, str]], keys: Sequence[OrderKey]) -> str:
    """ORDER BY terms: per key its rank (values, NaN, missing), then the value in its direction."""
    return ", ".join(f"{_rank_expr(e, t)} ASC, {e} {'ASC' if k.ascending else 'DESC'}"
                     for (e, t), k in zip(exprs, keys, strict=True))


def _keyset(exprs: Sequence[tuple[str, str]], keys: Sequence[OrderKey], cursor: Sequence[Any],
            binder: Binder) -> str:
    """Rows strictly after `cursor` in the order (rank ASC, e dir) per key, expanded OR form."""
    comps: list[tuple[str, str, Any, str]] = []  # (expr, op-after, value, type)
    for (expr, kind), key, value in zip(exprs, keys, cursor, strict=True):
        rank = _rank(value)
        comps.append((_rank_expr(expr, kind), ">", rank, "UInt8"))
        if rank == 0:  # rows tied on NaN or on missing are tied on the value too
            comps.append((expr, ">" if key.ascending else "<", value, kind))
    terms = []
    for j, (expr, op, value, kind) in enumerate(comps):
        equal = [f"{e} = {binder.bind(v, t)}" for e, _, v, t in comps[:j]]
        terms.append("(" + " AND ".join([*equal, f"{expr} {op} {binder.bind(value, kind)}"]) + ")")
    return "(" + " OR ".join(terms) + ")"


class RunSearch:
    def __init__(self, store: Store, tokens: TokenCodec, settings: QuerySettings) -> None:
        self._store = store
        self._tokens = tokens
        self._settings = settings
        self._state: tuple[float, tuple[Any, ...]] | None = None  # (when read, run index state)

    @property
    def settings(self) -> QuerySettings:
        return self._settings

    def _limit(self, asked: int) -> int:
        if asked < 0 or asked > self._settings.max_results:
            raise InvalidArgument(f"max_results: {asked} is outside 1..{self._settings.max_results}")
        return asked or self._settings.default_max_results

    def search(self, req: SearchRequest) -> SearchPage:
        """One page of runs (blocking; run it on the store's thread)."""
        return self._store.run(self._search(req))

    async def asearch(self, req: SearchRequest) -> SearchPage:
        """One page of runs, on the store's async client (or its thread pool)."""
        return await self._store.arun(self._search(req))

    def _search(self, req: SearchRequest) -> Steps[SearchPage]:
        limit = self._limit(req.max_results)
        if req.view not in VIEWS:
            raise InvalidArgument(f"run_view_type: {req.view!r} is not one of {', '.join(VIEWS)}")
        if len(req.filter) > self._settings.max_filter_length:
            raise InvalidArgument(
                f"filter: {len(req.filter)} characters, limit {self._settings.max_filter_length}")
        keys = sort_keys(parse_order_by(list(req.order_by)))
        # Not the page size: the cursor is the last row's place in a total order, so the next page
        # is right whatever its size (MLflow's client asks for the remainder on its last page).
        question = fingerprint(sorted(req.experiment_ids), req.filter, req.order_by, req.view)
        cursor = self._tokens.decode(req.page_token, question) if req.page_token else None
        if cursor is not None and (not isinstance(cursor, list) or len(cursor) != len(keys)):
            raise InvalidArgument("page_token: does not match this search's ordering")
        changed: list[tuple[str, int]] | None = None
        state = (yield from self._changed()) if self._indexed(req, keys) else None
        if state is not None:
            changed, generation = state
            found = None
            if generation and self._value_ordered(keys, limit):
                found = yield from self._ordered_hits(req, keys, cursor, limit, changed, generation)
            merge = changed if found is None else [*changed, *found[1]]
            places = None
            if found is not None and merge and len(found[0]) > limit:
                merge, places = yield from self._may_enter(keys[0], found[0][-1], merge)
            if found is not None and not merge:  # the page itself: nothing to merge in
                rows, with_info = found[0], not self._settings.run_pages
            else:
                hits = None if found is None else [(h[0], h[2]) for h in found[0]]
                rows, with_info = (yield from self._merged(req, keys, cursor, limit, merge, hits, places)), True
            changed = [*changed, *found[1]] if found is not None else changed
        elif self._windowed(req, keys):
            rows, with_info = yield from self._windowed_rows(req, keys, cursor, limit)
        else:
            sql, params, with_info = self._sql(req, keys, cursor, limit)
            rows = yield Rows(sql, params, settings={"join_use_nulls": 1})
        more = len(rows) > limit
        rows = rows[:limit]
        n = len(keys)
        token = self._tokens.encode(question, list(rows[-1][1:1 + n])) if more else ""
        total = (yield from self._count(req, changed)) if req.include_total else None
        infos = {r[0]: RunRecord(r[0], *r[1 + n:]) for r in rows} if with_info else None
        ids = [r[0] for r in rows]
        if changed is not None and self._settings.run_pages:  # the index answered
            runs = yield from page_details_steps(self._store, ids, infos, {c[0] for c in changed})
        else:
            runs = yield from self._store.run_details_steps(ids, infos)
        return SearchPage(runs, token, total)

    def _windowed(self, req: SearchRequest, keys: Sequence[OrderKey]) -> bool:
        """Whether a page the run index cannot answer is answered window by window: ordered by
        start_time first (a read in `search_runs` order) with only attributes to order by, and a
        filter on params, tags or metrics (whose sets today's plan would build over every run).
        The index answers them faster whatever the filter (docs/search.md, "Sixth pass")."""
        return (keys[0].entity == ATTRIBUTES and keys[0].key == "start_time"
                and all(k.entity == ATTRIBUTES for k in keys) and has_key_terms(parse_filter(req.filter)))

    def _indexed(self, req: SearchRequest, keys: Sequence[OrderKey]) -> bool:
        """Whether a page reads the run index when it can answer: ordered by a param, tag or
        metric, or filtered on them (both build sets over every run on the per-key copies)."""
        return bool(self._settings.run_index) and (
            any(k.entity != ATTRIBUTES for k in keys) or has_key_terms(parse_filter(req.filter)))

    def _changed(self) -> Steps[tuple[list[tuple[str, int]], int] | None]:
        """(the runs changed since the run index's watermark, (run_id, start_time) each; the
        generation of run_order to read, 0 for none); None when the index cannot answer: not
        built, too old (`runindex.state_sql`), or more than MAX_CHANGED runs behind (a bulk
        import the refresher has not taken in yet).

        The state (watermark and generation, read together) is held for
        `run_index_state_seconds` (a read of ~10 ms at 10 M runs): an older watermark only makes
        more runs changed ones (every pass since refreshed runs changed after it), and an older
        generation stays readable DROP_GRACE_SECONDS after a newer one is published, as for a
        search that began when it was read. The changed runs are read every time."""
        db = self._store.database
        held, now = self._state, monotonic()
        if held is None or now - held[0] >= self._settings.run_index_state_seconds:
            held = (now, tuple((yield Rows(state_sql(db), {}))[0]))
            self._state = held  # one store: a racing search keeps the one it read
        watermark, usable, generation = held[1]
        if not usable or watermark is None:
            return None
        rows = yield Rows(changed_runs_sql(db, "{w:Int64}", MAX_CHANGED + 1), {"w": int(watermark)})
        return None if len(rows) > MAX_CHANGED else ([(r[0], int(r[1])) for r in rows], int(generation))

    def _value_ordered(self, keys: Sequence[OrderKey], limit: int) -> bool:
        """Whether a page may read run_order: ordered by one metric (then the tiebreak alone)."""
        return (self._settings.run_order_max_results >= limit and keys[0].entity == METRICS
                and list(keys[1:]) == list(TIEBREAK))

    def _ordered_hits(self, req: SearchRequest, keys: Sequence[OrderKey], cursor: Any, limit: int,
                      changed: Sequence[tuple[str, int]], generation: int,
                      ) -> Steps[tuple[list[tuple[Any, ...]], list[tuple[str, int]]] | None]:
        """(The first limit + 1 runs of the index not changed since its watermark in the page's
        order after `cursor`, as page rows: run_id, the key's value, start_time, run_id (what
        `_index_sql` gives for them; the record too only without run_pages, which holds it);
        the runs whose index row a refresher pass replaced while this search ran, as (run_id,
        start_time), to be answered as changed runs are, from rows computed now): candidates
        read from run_order a chunk
        at a time (ORDER_CHUNK x (limit + 1), then as many as the rate at which checked runs were
        kept says are missing, half again to spare, at most ORDER_GROWTH times the last read), each kept
        when its run_index row passes scope and filter and is of the candidate's version.
        A candidate of an older version (a row an earlier pass superseded: it stays until the
        next generation) is skipped when its run's current row sorts outside what this search
        has read (before its start, or after the rows read so far: read later at its place),
        and answered as changed only when that place was read without it (`_late`). A run is
        checked once: the run_index row read then decides each of its candidates.

        None — read the index whole — when the cursor is past every value (runs missing the
        key), or after ORDER_CANDIDATES candidates (a filter too selective to stop early), or
        when the candidates run out and runs missing the key may still match.
        """
        key, db = keys[0], self._store.database
        after: tuple[int, float, int, str] | None = None
        if cursor is not None:
            if _rank(cursor[0]) == 2:  # past every value: runs missing the key
                return None
            after = _place(float(cursor[0]), int(cursor[1]), str(cursor[2]), key.ascending)
        start = after
        skip = {c[0] for c in changed}
        # A top-level AND term on the order key matches only runs that have it (`split_pushed`).
        complete = bool(split_pushed(parse_filter(req.filter), key.entity, key.key)[1])
        hits: list[tuple[Any, ...]] = []
        late: list[tuple[str, int]] = []
        seen: set[str] = set()
        moved: dict[str, tuple[tuple[int, float, int, str], int]] = {}  # superseded: (current place, start)
        checked: dict[str, tuple[Any, ...] | None] = {}  # run_id: its run_index row read (None: none)
        read, chunk, first_of_value = 0, ORDER_CHUNK * (limit + 1), False  # (a token's cursor: not known)
        while True:
            binder = Binder()
            scope = self._where(req, binder, None)
            cands: list[tuple[Any, ...]] = []
            for cond in [""] if after is None else after_sqls(after, binder.bind, first_of_value):
                sql = candidates_sql(db, scope, cond, chunk - len(cands))
                cands += yield Rows(sql, {**binder.params, "g": generation, "k": key.key, "d": int(not key.ascending)})
                if len(cands) >= chunk:
                    break
            read += len(cands)
            todo = [c for c in cands if c[0] not in skip and c[0] not in seen]
            # A run is checked once per search: the run_index row its first check read decides each
            # of its candidates (a pass that changes no value leaves a run's old rows right beside
            # its current one: one read, not one per row).
            unread = {c[0]: -int(c[1]) for c in todo if c[0] not in checked}
            if unread:
                binder = Binder()
                where, _, _ = self._index_parts(req, binder, ())
                ids = binder.bind(list(unread), "Array(String)")
                times = binder.bind(sorted(set(unread.values())), "Array(Int64)")
                # Every row of each candidate, whether it passes: the newest row of a run is what
                # FINAL would keep (about a third of the time at 10 M runs: 52 ms against 143 with
                # FINAL and the record, which the page reads from run_pages).
                # Without run_pages (TRACKHOUSE_QUERY_RUN_PAGES=0) the records come from here.
                record = "" if self._settings.run_pages else ", " + ", ".join(RECORD)
                found = newest((yield Rows(
                    f"SELECT run_id, version, {key_column(key.entity, key.key)[0]}, start_time, {where}{record} "
                    f"FROM {db}.{INDEX} WHERE start_time IN {times} AND run_id IN {ids}", binder.params,
                    settings=FRESH_SETTINGS)))
                checked.update({run_id: found.get(run_id) for run_id in unread})
            for cand in todo:
                run_id, version = cand[0], cand[2]
                row = checked[run_id]
                if run_id in seen or row is None or row[1] < version:
                    continue
                if not row[4]:  # out of scope or filter now (NULL: a key it compares is missing)
                    continue
                if row[1] > version:  # refreshed since this candidate's row: where is its current one?
                    if row[2] is not None:  # (none: the run lacks the key now, it is not in run_order)
                        moved[run_id] = (_place(row[2], int(row[3]), run_id, key.ascending), int(row[3]))
                    continue
                seen.add(run_id)
                hits.append((run_id, row[2], row[3], run_id, *row[5:]))
                if len(hits) > limit:
                    return hits, _late(moved, seen, start, _candidate_place(cand), late)
            if len(cands) < chunk:
                return (hits, _late(moved, seen, start, None, late)) if complete else None
            last = cands[-1]
            after = _candidate_place(last)
            late = _late(moved, seen, start, after, late)
            skip.update(r for r, _ in late)
            if read >= ORDER_CANDIDATES:
                return None
            first_of_value = len(cands) > 1 and (cands[-2][3], cands[-2][4]) != (last[3], last[4])
            need = limit + 1 - len(hits)  # at the rate checked runs were kept so far, half again to spare
            chunk = min(chunk * ORDER_GROWTH, max(need, math.ceil(need * len(checked) / len(hits) * 1.5))) if hits \
                else chunk * ORDER_GROWTH

    def _merged(self, req: SearchRequest, keys: Sequence[OrderKey], cursor: Any, limit: int,
                merge: Sequence[tuple[str, int]], hits: Sequence[tuple[str, int]] | None,
                places: dict[str, tuple[int, float, int, str]] | None) -> Steps[list[tuple[Any, ...]]]:
        """The page: the index's rows (`hits`, or all) without the `merge` runs, merged with those
        runs' rows computed now (`_index_sql`). With their `places` (`merge` in that order), the
        runs are computed a chunk at a time (ORDER_CHUNK x (limit + 1), then ORDER_GROWTH times
        more) until the next one sorts after the page's limit + 1 rows: it, and every one after
        it, cannot enter. Runs a filter leaves out still cost their computation, so with 1,000
        changed runs at the top of the order (~250 ms to compute at 10 M runs) a page that fills
        from the first few hundred stops there."""
        upto = len(merge) if places is None else min(len(merge), ORDER_CHUNK * (limit + 1))
        while True:
            sql, params = self._index_sql(req, keys, cursor, limit, merge, hits, merge[:upto])
            rows: list[tuple[Any, ...]] = yield Rows(sql, params, settings=FRESH_SETTINGS)
            if upto >= len(merge) or places is None:
                return rows
            last = rows[-1] if len(rows) > limit else None
            if last is not None and last[1] is not None and (
                    _place(last[1], int(last[2]), str(last[0]), keys[0].ascending) < places[merge[upto][0]]):
                return rows
            upto = min(len(merge), upto * ORDER_GROWTH)

    def _may_enter(self, key: OrderKey, last: tuple[Any, ...], changed: list[tuple[str, int]],
                   ) -> Steps[tuple[list[tuple[str, int]], dict[str, tuple[int, float, int, str]]]]:
        """The changed runs that may enter a page `_ordered_hits` filled (limit + 1 rows, `last`
        the last): those whose latest value of the page's metric sorts no later than `last`'s,
        in the page's order, with their places (`_merged` computes them in that order).
        The others sort after the page's every row, so their rows need not be computed now (at
        10 M runs ~250 ms for 1,000 changed runs; this read ~35 ms when their ids are close, as
        the newest runs' are). A run without the metric sorts after every value: left out."""
        db, binder = self._store.database, Binder()
        ids = binder.bind([c[0] for c in changed], "Array(String)")
        rows = yield Rows(f"SELECT run_id, {latest_value('max(last_key)')} FROM {db}.latest_metrics "
                          f"WHERE run_id IN {ids} AND key = {binder.bind(key.key, 'String')} GROUP BY run_id",
                          binder.params)
        values = dict(rows)
        bound = _place(last[1], int(last[2]), "", key.ascending)[:2]  # (rank, value): ties kept
        places = {c[0]: _place(values[c[0]], c[1], c[0], key.ascending) for c in changed if c[0] in values}
        entering = sorted((c for c in changed if c[0] in places and places[c[0]][:2] <= bound),
                          key=lambda c: places[c[0]])
        return entering, places

    def _index_parts(self, req: SearchRequest, binder: Binder,
                     changed: Sequence[tuple[str, int]]) -> tuple[str, str, str]:
        """(scope and filter over run_index's columns, the changed runs' ids, their start times),
        the two last bound (empty strings when no run changed)."""
        node = parse_filter(req.filter)
        where = self._where(req, binder, None)
        if node is not None:
            where += " AND " + compile_index_filter(node, binder)
        if not changed:
            return where, "", ""
        return (where, binder.bind([c[0] for c in changed], "Array(String)"),
                binder.bind(sorted({c[1] for c in changed}), "Array(Int64)"))

    def _index_sql(self, req: SearchRequest, keys: Sequence[OrderKey], cursor: Any, limit: int,
                   changed: Sequence[tuple[str, int]], hits: Sequence[tuple[str, int]] | None = None,
                   fresh: Sequence[tuple[str, int]] | None = None) -> tuple[str, dict[str, Any]]:
        """One page from the run index. The changed runs' rows there may be stale: the index's
        first limit + 1 + len(changed) rows without them, merged with the first limit + 1 of
        their rows computed now (`runindex.fresh_sql`; of the `fresh` ones only, when given),
        in the page's order.

        `hits`: those first rows of the index, found by `_ordered_hits`: only they are read.
        Each row carries the run's record after the order keys: hydration does not read it
        again. (Params and tags as JSON from the same rows cost as much as reading them by id:
        at 10 M runs ~125 ms for a page of 100, docs/search.md "Fifth pass".)"""
        db, binder = self._store.database, Binder()
        where, ids, _ = self._index_parts(req, binder, changed)
        only = ""
        if hits is not None:
            only = (f" AND start_time IN {binder.bind(sorted({h[1] for h in hits}), 'Array(Int64)')} "
                    f"AND run_id IN {binder.bind([h[0] for h in hits], 'Array(String)')}")
        exprs = [(k.key, _attribute_type(k)) if k.entity == ATTRIBUTES else key_column(k.entity, k.key) for k in keys]
        if cursor is not None:
            where += " AND " + _keyset(exprs, keys, cursor, binder)
        order = _order(exprs, keys)
        info = RECORD  # the run's record: current on an index row as on a fresh one
        select = ", ".join(["run_id", *(f"{e} AS k{i}" for i, (e, _) in enumerate(exprs)), *info])
        indexed = (f"SELECT {select} FROM {db}.{INDEX} FINAL WHERE {where}{only} "
                   f"ORDER BY {order} LIMIT {int(limit) + 1 + len(changed)}")
        if not changed:
            return indexed, binder.params
        now = ids if fresh is None or len(fresh) == len(changed) else binder.bind([c[0] for c in fresh],
                                                                                   "Array(String)")
        computed = (f"SELECT {select} FROM ({fresh_sql(db, now, keys=_read_keys(req, keys, binder))}) "
                    f"WHERE {where} ORDER BY {order} "
                    f"LIMIT {int(limit) + 1}")
        outer = [(f"k{i}", kind) for i, (_, kind) in enumerate(exprs)]
        sql = (f"SELECT run_id, {', '.join([*(e for e, _ in outer), *info])} FROM (SELECT * FROM ({indexed}) "
               f"WHERE run_id NOT IN {ids} UNION ALL SELECT * FROM ({computed})) "
               f"ORDER BY {_order(outer, keys)} LIMIT {int(limit) + 1}")
        return sql, binder.params

    def _windowed_rows(self, req: SearchRequest, keys: Sequence[OrderKey], cursor: Any,
                       limit: int) -> Steps[tuple[list[tuple[Any, ...]], bool]]:
        """The page's rows, looking at the runs in scope in page order, one window at a time.

        A window is the next W runs in scope after the cursor, in the page's order (reads of
        `search_runs` in its sorting order, ≤ WINDOW_READ rows each). The filter is evaluated
        on them alone: every set of run ids it needs is restricted to the window's ids, and
        the runs to its start-time range. The windows are a prefix of the order, so the
        matches found in them, in order, are the first matches: once limit + 1 are found (or
        the runs run out) the page is exact. After two windows (W, then WINDOW_GROWTH x W)
        the rest is one query of today's plan from the last window's end.

        Only ids that begin with their start time (`store.new_run_id`) make the restricted
        sets cheap (the window's ids are then a few granules of each copy); a window whose
        ids mostly do not (runs imported with their own ids) goes to today's plan at once.
        """
        rows: list[tuple[Any, ...]] = []
        with_info = True
        size = self._settings.search_window
        for _ in range(2):
            window: list[tuple[Any, ...]] = []
            after = cursor
            while len(window) < size:
                want = min(WINDOW_READ, size - len(window))
                window_sql, window_params = self._window_sql(req, keys, after, want)
                part = yield Rows(window_sql, window_params)
                window += part
                if len(part) < want:
                    break
                after = list(part[-1][1:])
            if window and not _clustered(window):
                break
            if window:
                sql, params, with_info = self._sql(req, keys, cursor, limit - len(rows), window)
                rows += yield Rows(sql, params, settings={"join_use_nulls": 1})
            if len(rows) > limit or len(window) < size:
                return rows, with_info
            cursor = list(window[-1][1:])
            size *= WINDOW_GROWTH
        sql, params, with_info = self._sql(req, keys, cursor, limit - len(rows))
        rows += yield Rows(sql, params, settings={"join_use_nulls": 1})
        return rows, with_info

    def _window_sql(self, req: SearchRequest, keys: Sequence[OrderKey], cursor: Any,
                    size: int) -> tuple[str, dict[str, Any]]:
        """The next `size` runs in scope after `cursor`, in the page's order: run_id, then the
        order keys' values (a cursor for the next window)."""
        binder = Binder()
        exprs = [_key_expr(i, key, self._store.database, binder)[::2] for i, key in enumerate(keys)]
        outer = "WHERE " + _keyset(exprs, keys, cursor, binder) if cursor is not None else ""
        order = _order(exprs, keys)
        select = ", ".join(["base.run_id", *(e for e, _ in exprs)])
        sql = (f"SELECT {select} FROM (SELECT * FROM {self._store.database}.{RUNS} FINAL "
               f"WHERE {self._where(req, binder, None)}) AS base {outer} ORDER BY {order} LIMIT {int(size)}")
        return sql, binder.params

    def count(self, req: SearchRequest) -> int:
        """How many runs match the scope and filter of `req` (every page)."""
        return self._store.run(self._count(req))

    def _count(self, req: SearchRequest, changed: list[tuple[str, int]] | None = None) -> Steps[int]:
        """The run index's count, corrected for the runs changed since its watermark (their
        stale rows' count out, their current rows' count in); the copies alone until the
        index can answer (`_changed`)."""
        if req.view not in VIEWS:
            raise InvalidArgument(f"run_view_type: {req.view!r} is not one of {', '.join(VIEWS)}")
        db, binder = self._store.database, Binder()
        if changed is None and self._settings.run_index:  # not already read by this search's page
            state = yield from self._changed()
            changed = None if state is None else state[0]
        if changed is None:
            sql = f"SELECT count() FROM {db}.{RUNS} FINAL WHERE {self._where(req, binder)}"
            return int((yield Rows(sql, binder.params))[0][0])
        where, ids, times = self._index_parts(req, binder, changed)
        sql = f"SELECT (SELECT count() FROM {db}.{INDEX} FINAL WHERE {where})"
        if changed:
            sql += (f" - (SELECT count() FROM {db}.{INDEX} FINAL WHERE start_time IN {times} AND run_id IN {ids} "
                    f"AND {where}) + (SELECT count() FROM ({fresh_sql(db, ids, keys=_read_keys(req, (), binder))}) "
                    f"WHERE {where})")
        return int((yield Rows(sql, binder.params, settings=FRESH_SETTINGS))[0][0])

    def _where(self, req: SearchRequest, binder: Binder, node: Node | str | None = "parse",
               restrict: str = "") -> str:
        where = [f"lifecycle_stage IN {binder.bind(list(VIEWS[req.view]), 'Array(String)')}"]
        if restrict:
            where.append(restrict)
        if req.experiment_ids:
            where.append(f"experiment_id IN {binder.bind(list(req.experiment_ids), 'Array(String)')}")
        if req.allowed_experiments is not None:
            where.append(f"experiment_id IN {binder.bind(list(req.allowed_experiments), 'Array(String)')}")
        if isinstance(node, str):
            node = parse_filter(req.filter)
        if node is not None:
            where.append(compile_search_filter(node, self._store.database, binder, restrict))
        return " AND ".join(where)

    def _sql(self, req: SearchRequest, keys: Sequence[OrderKey], cursor: Any,
             limit: int, window: Sequence[tuple[Any, ...]] | None = None) -> tuple[str, dict[str, Any], bool]:
        """(SQL, parameters, whether each row also carries the run's record after the order keys).

        `window`: only these runs are candidates (`_windowed_rows`); the filter's sets of run
        ids are restricted to them too.

        Without joins (every order key an attribute) the page's rows come from
        `search_runs` alone, which holds each run's latest record: selecting it here
        (ClickHouse reads those columns for the page's rows only) saves hydration a
        by-id query of `runs` — 186–206 ms of a 476 ms first page at 10 M runs.
        """
        db = self._store.database
        binder = Binder()
        node, pushed = parse_filter(req.filter), list[Comparison]()
        if keys[0].entity != ATTRIBUTES:  # the first order key's own filter terms ride on its join
            node, pushed = split_pushed(node, keys[0].entity, keys[0].key)
        restrict = "" if window is None else f"run_id IN {binder.bind([w[0] for w in window], 'Array(String)')}"
        where = self._where(req, binder, node, restrict)
        if window is not None:  # the window's start-time range: search_runs' primary key narrows to it
            times = [w[1] for w in window]
            where += (f" AND start_time BETWEEN {binder.bind(min(times), 'Int64')} "
                      f"AND {binder.bind(max(times), 'Int64')}")
        exprs, joins = [], []
        for i, key in enumerate(keys):
            expr, join, kind = _key_expr(i, key, db, binder, pushed if i == 0 else ())
            exprs.append((expr, kind))
            if join:
                joins.append(join)
        outer = ""
        if cursor is not None:
            outer = "WHERE " + _keyset(exprs, keys, cursor, binder)
        order = _order(exprs, keys)
        info = [] if joins else [f"base.{c}" for c in RECORD]
        select = ", ".join(["base.run_id", *(e for e, _ in exprs), *info])
        sql = (
            f"SELECT {select} FROM (SELECT * FROM {db}.{RUNS} FINAL WHERE {where}) AS base "
            f"{' '.join(joins)} {outer} ORDER BY {order} LIMIT {int(limit) + 1}"
        )
        return sql, binder.params, bool(info)
