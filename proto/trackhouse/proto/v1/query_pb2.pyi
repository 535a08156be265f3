from trackhouse.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchRunsRequest(_message.Message):
    __slots__ = ("experiment_ids", "filter", "order_by", "max_results", "page_token", "run_view_type", "include_total")
    EXPERIMENT_IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_VIEW_TYPE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    experiment_ids: _containers.RepeatedScalarFieldContainer[str]
    filter: str
    order_by: _containers.RepeatedScalarFieldContainer[str]
    max_results: int
    page_token: str
    run_view_type: _common_pb2.ViewType
    include_total: bool
    def __init__(self, experiment_ids: _Optional[_Iterable[str]] = ..., filter: _Optional[str] = ..., order_by: _Optional[_Iterable[str]] = ..., max_results: _Optional[int] = ..., page_token: _Optional[str] = ..., run_view_type: _Optional[_Union[_common_pb2.ViewType, str]] = ..., include_total: _Optional[bool] = ...) -> None: ...

class SearchRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token", "total")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_common_pb2.Run]
    next_page_token: str
    total: int
    def __init__(self, runs: _Optional[_Iterable[_Union[_common_pb2.Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetMetricHistoryRequest(_message.Message):
    __slots__ = ("run_id", "key", "min_step", "max_step", "max_results", "page_token")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULTS_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key: str
    min_step: int
    max_step: int
    max_results: int
    page_token: str
    def __init__(self, run_id: _Optional[str] = ..., key: _Optional[str] = ..., min_step: _Optional[int] = ..., max_step: _Optional[int] = ..., max_results: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class MetricHistory(_message.Message):
    __slots__ = ("run_id", "key", "steps", "timestamps", "values", "next_page_token")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key: str
    steps: bytes
    timestamps: bytes
    values: bytes
    next_page_token: str
    def __init__(self, run_id: _Optional[str] = ..., key: _Optional[str] = ..., steps: _Optional[bytes] = ..., timestamps: _Optional[bytes] = ..., values: _Optional[bytes] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetMetricBucketsRequest(_message.Message):
    __slots__ = ("run_ids", "key", "buckets", "min_step", "max_step")
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_FIELD_NUMBER: _ClassVar[int]
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    key: str
    buckets: int
    min_step: int
    max_step: int
    def __init__(self, run_ids: _Optional[_Iterable[str]] = ..., key: _Optional[str] = ..., buckets: _Optional[int] = ..., min_step: _Optional[int] = ..., max_step: _Optional[int] = ...) -> None: ...

class MetricBucketSeries(_message.Message):
    __slots__ = ("run_id", "bucket", "min_steps", "min_values", "max_steps", "max_values", "counts")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    MIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_VALUES_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_VALUES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    bucket: bytes
    min_steps: bytes
    min_values: bytes
    max_steps: bytes
    max_values: bytes
    counts: bytes
    def __init__(self, run_id: _Optional[str] = ..., bucket: _Optional[bytes] = ..., min_steps: _Optional[bytes] = ..., min_values: _Optional[bytes] = ..., max_steps: _Optional[bytes] = ..., max_values: _Optional[bytes] = ..., counts: _Optional[bytes] = ...) -> None: ...

class MetricBuckets(_message.Message):
    __slots__ = ("key", "min_step", "max_step", "buckets", "series")
    KEY_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    key: str
    min_step: int
    max_step: int
    buckets: int
    series: _containers.RepeatedCompositeFieldContainer[MetricBucketSeries]
    def __init__(self, key: _Optional[str] = ..., min_step: _Optional[int] = ..., max_step: _Optional[int] = ..., buckets: _Optional[int] = ..., series: _Optional[_Iterable[_Union[MetricBucketSeries, _Mapping]]] = ...) -> None: ...

class ExportMetricsRequest(_message.Message):
    __slots__ = ("run_ids", "keys", "min_step", "max_step")
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MIN_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_FIELD_NUMBER: _ClassVar[int]
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedScalarFieldContainer[str]
    min_step: int
    max_step: int
    def __init__(self, run_ids: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[str]] = ..., min_step: _Optional[int] = ..., max_step: _Optional[int] = ...) -> None: ...

class ExportMetricsResponse(_message.Message):
    __slots__ = ("arrow_stream", "rows")
    ARROW_STREAM_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    arrow_stream: bytes
    rows: int
    def __init__(self, arrow_stream: _Optional[bytes] = ..., rows: _Optional[int] = ...) -> None: ...

class SqlRequest(_message.Message):
    __slots__ = ("query",)
    QUERY_FIELD_NUMBER: _ClassVar[int]
    query: str
    def __init__(self, query: _Optional[str] = ...) -> None: ...

class SqlChunk(_message.Message):
    __slots__ = ("arrow", "rows")
    ARROW_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    arrow: bytes
    rows: int
    def __init__(self, arrow: _Optional[bytes] = ..., rows: _Optional[int] = ...) -> None: ...
