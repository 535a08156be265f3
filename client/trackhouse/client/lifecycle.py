"""How a run starts and ends: ``Client.start_run`` / ``resume_run`` and ``Run.finish``.

The client and its runs hold the state; this module decides what a start or an end sends.
A run is *shared* when ``ranks="all"`` with several ranks (``distributed``): one run, one
process per rank, the same ``start_run`` call on every rank. Invariants:

- one ``Run`` handle, and at most one system sampler, per ``start_run``; it carries the run's
  experiment id and name when this process created the run or marked it RUNNING (a rank > 0
  joining a shared run makes no call that would tell them: there they are empty);
- nothing ``start_run`` was given is dropped on a run it resumes rather than creates. Params
  are write-once: an identical value is a no-op, another one raises ``InvalidArgument`` —
  except on a shared run, where a rank's own value must not fail the job: it is logged as
  ``rank{N}/key`` instead, with one warning. A rank > 0 of a shared run sets its tags as
  ``rank{N}/key`` (tags are last-write-wins: its value would silently replace rank 0's). The
  name is set by whoever marks the run RUNNING; a rank > 0's is rank 0's (the same call);
- on a shared run only rank 0 marks the run RUNNING and records its final status; another
  rank's FAILED or KILLED is the tag ``rank{N}/status``, and the run goes on;
- ``end`` stops the run's sampler before its flush (so nothing is logged after it), all within
  one deadline; ``stop_samplers`` waits at most ``SAMPLER_WAIT`` for one caught mid-sample.

The rendezvous file is never removed: a rank > 0 that
had not read it when rank 0 ended the run would wait ``rendezvous_timeout`` and fail — ranks
need not meet between rank 0's ``start_run`` and its ``finish`` — and an elastic restart after
a failure would start a second run for one launch. Which file names another launch's run is the
run's status on the server (``_ended``; ``distributed``).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from trackhouse.client import distributed
from trackhouse.client.errors import InvalidArgument, NotFound, ServerError, UsageError
from trackhouse.client.run import now_ms, param_messages, tag_messages
from trackhouse.client.settings import Settings
from trackhouse.client.spool import EXPERIMENT_TAG, LOCAL_RUN_TAG, RESUMED_TAG
from trackhouse.proto.rules import MAX_ITEMS_PER_CALL
from trackhouse.proto.v1 import common_pb2, ingest_pb2, query_pb2

if TYPE_CHECKING:
    from trackhouse.client.client import Client
    from trackhouse.client.run import Run
    from trackhouse.client.system import SystemSampler

logger = logging.getLogger(__name__)

SAMPLER_WAIT = 5.0  # at most, of a finish's or close's deadline, for samplers inside a probe (an NVML call)


def start(client: Client, request: ingest_pb2.CreateRunRequest, experiment: str | None,
          experiment_id: str | None, run_id: str, ordinal: int) -> Run:
    """The run ``start_run`` asked for, on a process that logs: created, or resumed with what it was given."""
    s = client.settings
    shared = distributed.needs_rendezvous(s)
    if shared:  # a rank's own keys must be ones the service takes, checked on every rank alike (as metric keys)
        param_messages(_own(request.params, s))
        tag_messages(_own(request.tags, s))
    if run_id:  # the launcher's (every rank's) or the caller's
        return resume(client, run_id, mark_running=not shared or s.rank == 0, given=request)
    if not shared:
        return client._handle(*create(client, request, experiment, experiment_id))
    path = distributed.rendezvous_file(s, experiment or experiment_id or "0", request.run_name, ordinal)
    made: list[tuple[str, str, str]] = []

    def create_here() -> str:
        made.append(create(client, request, experiment, experiment_id))
        return made[0][0]

    shared_id, created = distributed.shared_run_id(path, s, create_here, lambda run: _ended(client, run))
    if created:
        return client._handle(*made[0])
    # Only rank 0 (an elastic restart) marks it RUNNING: a late rank > 0 must not revive a run rank 0 ended.
    return resume(client, shared_id, mark_running=s.rank == 0, given=request)


def create(client: Client, request: ingest_pb2.CreateRunRequest, experiment: str | None,
           experiment_id: str | None) -> tuple[str, str, str]:
    """A new run with what ``request`` holds: (run id, experiment id, name)."""
    if client.settings.offline:  # no server: a local id, mapped to the server's by `trackhouse sync`
        local = uuid.uuid4().hex
        request.experiment_id = experiment_id or ("" if experiment else "0")
        if len(request.tags) >= MAX_ITEMS_PER_CALL:  # what the sync sends: with the local id's tag
            raise UsageError(f"offline, start_run takes at most {MAX_ITEMS_PER_CALL - 1} tags (the sync adds "
                             f"{LOCAL_RUN_TAG!r}), got {len(request.tags)}: set the others with run.set_tags()")
        request.tags.add(key=LOCAL_RUN_TAG, value=local)
        if experiment:
            request.tags.add(key=EXPERIMENT_TAG, value=experiment)
        client._sender.submit_op(request)
        return local, request.experiment_id, request.run_name
    request.experiment_id = client._experiment_id(experiment) if experiment is not None else (experiment_id or "0")
    info = client.transport.create_run(request)
    return info.run_id, info.experiment_id, info.run_name


def resume(client: Client, run_id: str, *, mark_running: bool,
           given: ingest_pb2.CreateRunRequest | None = None) -> Run:
    """A handle on ``run_id``, with ``given``'s params, tags and name applied (see the module's docstring)."""
    s = client.settings
    if given is not None:  # first: a refused param leaves the run as it was
        _log_params(client, run_id, given.params, distributed.key_prefix(s))
    if mark_running:  # before RUNNING: a dead process's spooled final status is not replayed onto it (runmap)
        resumed = ingest_pb2.SetTagsRequest(run_id=run_id, tags=tag_messages({RESUMED_TAG: str(now_ms())}))
        if s.offline:
            client._submit(resumed)
        else:
            client.transport.set_tags(resumed)
    if given is not None and given.tags:
        own = distributed.needs_rendezvous(s) and s.rank > 0  # a rank > 0 of a shared run: rank{N}/key
        tags = tag_messages(_own(given.tags, s)) if own else list(given.tags)
        client._submit(ingest_pb2.SetTagsRequest(run_id=run_id, tags=tags))
    if not mark_running:
        return client._handle(run_id, "", "")
    name = given.run_name if given is not None else ""
    update = ingest_pb2.UpdateRunRequest(run_id=run_id, status=common_pb2.RUNNING, run_name=name)
    if s.offline:  # and RUNNING again, as online, once synced
        client._submit(update)
        return client._handle(run_id, "", name)
    info = client.transport.update_run(update)
    return client._handle(info.run_id or run_id, info.experiment_id, info.run_name)


def _ended(client: Client, run_id: str) -> int | None:
    """The end time (ms) of ``run_id`` when the server says it ended normally or was killed (FINISHED,
    KILLED: another launch's run, ``distributed``); None when running, failed, or when the status cannot be
    known (offline, no such run visible, no query service: UNIMPLEMENTED): then the rendezvous resumes it, as
    an elastic restart. ``ServerUnavailable`` (no answer yet) and any other refusal are raised: the rendezvous
    asks again, or fails, rather than resume a run that may have ended."""
    if client.settings.offline:
        return None
    try:
        info = client.transport.get_run(query_pb2.GetRunRequest(run_id=run_id)).info
    except ServerError as exc:  # NotFound included
        if not isinstance(exc, NotFound) and exc.code != "UNIMPLEMENTED":
            raise
        logger.debug("trackhouse: cannot know run %s's status (%s); taking it as running", run_id, exc)
        return None
    return info.end_time if info.status in (common_pb2.FINISHED, common_pb2.KILLED) else None


def _own(items: Sequence[common_pb2.Param] | Sequence[common_pb2.Tag], s: Settings) -> dict[str, str]:
    """``items`` under this rank's keys (``rank{N}/key``)."""
    return {distributed.key_prefix(s) + item.key: item.value for item in items}


def _log_params(client: Client, run_id: str, params: Sequence[common_pb2.Param], prefix: str) -> None:
    """Log ``params`` on a run that may hold some already. A different value raises InvalidArgument;
    with a ``prefix`` (a rank of a shared run) it is logged as ``prefix + key`` instead, and warned of."""
    if not params:
        return
    try:
        client._submit(ingest_pb2.LogParamsRequest(run_id=run_id, params=params))
        return
    except InvalidArgument:
        if not prefix:
            raise
    own = []
    for param in params:  # one by one: a refusal is atomic and says which key in its text only
        try:
            client._submit(ingest_pb2.LogParamsRequest(run_id=run_id, params=[param]))
        except InvalidArgument:
            own.append(param.key)
            mine = common_pb2.Param(key=prefix + param.key, value=param.value)
            client._submit(ingest_pb2.LogParamsRequest(run_id=run_id, params=[mine]))
    logger.warning("trackhouse: run %s already holds other values of params %s (rank 0's, or the first rank's "
                   "to log them); this rank's are logged as %s<key>", run_id, ", ".join(own), prefix)


def end(client: Client, run: Run, status: str, timeout: float) -> bool:
    """Stop ``run``'s sampler, flush, record ``status``: all within ``timeout``. True when all was delivered."""
    s = client.settings
    deadline = time.monotonic() + timeout
    sampler, run._sampler = run._sampler, None
    if sampler is not None:
        stop_samplers([sampler], deadline)
        with client._lock:  # no longer the client's to stop at close, and the run is no longer kept alive
            if sampler in client._samplers:
                client._samplers.remove(sampler)
    flushed = client.flush(_left(deadline))
    if not flushed:
        logger.warning("run %s finished before all its metrics were acknowledged", run.run_id)
    if distributed.needs_rendezvous(s) and s.rank > 0:  # the run is rank 0's to end: a failure here is noted
        if status == "FINISHED":
            return flushed
        note = ingest_pb2.SetTagsRequest(run_id=run.run_id, tags=tag_messages({f"rank{s.rank}/status": status}))
        return client._submit(note, _left(deadline)) and flushed
    request = ingest_pb2.UpdateRunRequest(run_id=run.run_id, status=common_pb2.RunStatus.Value(status),
                                          end_time=now_ms())
    return client._submit(request, _left(deadline)) and flushed  # queued when not in time


def stop_samplers(samplers: Sequence[SystemSampler], deadline: float) -> None:
    """Stop ``samplers`` together, waiting at most ``SAMPLER_WAIT`` s and never past ``deadline``: one
    caught mid-sample logs that sample before the flush that follows, and nothing after."""
    for sampler in samplers:
        sampler.stop(0.0)  # all told first: their waits overlap
    until = min(deadline, time.monotonic() + SAMPLER_WAIT)
    for sampler in samplers:
        sampler.stop(max(0.0, until - time.monotonic()))


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
