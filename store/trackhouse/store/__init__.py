"""trackhouse.store — the schema, its migrations, and the one way to talk to ClickHouse.

Imported by the ingest and query services; never by the client.
"""

from trackhouse.store.dsn import DEFAULT_DSN, DSN, parse_dsn
from trackhouse.store.errors import InvalidDSN, QueryFailed, QueryTimeout, StoreError, StoreUnavailable, ValueRefused
from trackhouse.store.records import (
    ACTIVE,
    DELETED,
    RUN_STATUSES,
    TERMINAL_STATUSES,
    ExperimentRecord,
    LatestMetricRecord,
    RunDetails,
    RunRecord,
    TokenRecord,
    new_run_id,
    run_id_prefix,
)
from trackhouse.store.store import Store, new_version, open_store

__all__ = [
    "ACTIVE",
    "DEFAULT_DSN",
    "DELETED",
    "DSN",
    "RUN_STATUSES",
    "TERMINAL_STATUSES",
    "ExperimentRecord",
    "InvalidDSN",
    "LatestMetricRecord",
    "QueryFailed",
    "QueryTimeout",
    "RunDetails",
    "RunRecord",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TokenRecord",
    "ValueRefused",
    "new_run_id",
    "new_version",
    "open_store",
    "parse_dsn",
    "run_id_prefix",
]
