"""The two mappings of errors to codes: gRPC (`service.status_for`) and MLflow REST (`to_mlflow_error`).

An engine error that can only mean the request's own value was refused (a ClickHouse code on
the whitelist, `store.errors.REFUSED_VALUE_CODES`, raised as `ValueRefused`) is the client's
error: INVALID_ARGUMENT / 400 INVALID_PARAMETER_VALUE, which clients do not retry. Every other
store error stays UNAVAILABLE / 503, so an outage is never reported as a bad request.
"""

from __future__ import annotations

import grpc
import pytest

from trackhouse.query.http.errors import to_mlflow_error
from trackhouse.query.service import status_for
from trackhouse.store import QueryFailed, QueryTimeout, Store, StoreError, StoreUnavailable, ValueRefused
from trackhouse.store.errors import REFUSED_VALUE_CODES


def _both(exc: Exception) -> tuple[grpc.StatusCode, str, int, str, str]:
    code, message = status_for(exc)
    rest = to_mlflow_error(exc)
    return code, message, rest.status, rest.error_code, rest.message


@pytest.mark.parametrize("store_url", ["chdb", "http"], indirect=True)
def test_an_engine_refusal_of_a_request_value_is_invalid_argument(store: Store) -> None:
    """A real engine error (a LIKE pattern ending in a lone backslash), in both deployments."""
    with pytest.raises(ValueRefused) as info:
        store.query_rows("SELECT like('a', {p:String})", {"p": "%\\"})
    assert info.value.code == 25  # CANNOT_PARSE_ESCAPE_SEQUENCE
    code, message, status, error_code, rest_message = _both(info.value)
    assert (code, status, error_code) == (grpc.StatusCode.INVALID_ARGUMENT, 400, "INVALID_PARAMETER_VALUE")
    assert message == rest_message
    assert message.startswith("the store refused a value of the request: Invalid escape sequence at the end "
                              "of LIKE pattern")
    assert "while executing" not in message and "version" not in message


@pytest.mark.parametrize(
    "exc",
    [
        StoreUnavailable("connection refused"),
        StoreError("the store is closed"),
        QueryFailed("HTTPDriver: server closed the connection mid-answer", None),
        QueryFailed("Code: 241. DB::Exception: Memory limit (total) exceeded. (MEMORY_LIMIT_EXCEEDED)", 241),
        QueryFailed("Code: 202. DB::Exception: Too many simultaneous queries. (TOO_MANY_SIMULTANEOUS_QUERIES)", 202),
        QueryFailed("Code: 210. DB::NetException: Connection reset by peer. (NETWORK_ERROR)", 210),
        QueryFailed("Code: 62. DB::Exception: Syntax error. (SYNTAX_ERROR)", 62),  # our SQL, not the request
        QueryFailed("Escape sequence at the end", None),  # no code: not an answer of the engine
    ],
)
def test_other_store_errors_stay_unavailable(exc: StoreError) -> None:
    code, message, status, error_code, _ = _both(exc)
    assert (code, status, error_code) == (grpc.StatusCode.UNAVAILABLE, 503, "TEMPORARILY_UNAVAILABLE")
    assert message.startswith("store error: ")


def test_timeouts_keep_their_own_code() -> None:
    exc = QueryTimeout("Code: 159. DB::Exception: Timeout exceeded. (TIMEOUT_EXCEEDED)", 159)
    code, _, status, error_code, _ = _both(exc)
    assert (code, status, error_code) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "REQUEST_LIMIT_EXCEEDED")


def test_the_whitelist_holds_only_codes_about_a_value() -> None:
    # CANNOT_PARSE_ESCAPE_SEQUENCE. Adding a code here needs a test that only a request's
    # value raises it (never a timeout, memory, connection or server-side condition).
    assert sorted(REFUSED_VALUE_CODES) == [25]
