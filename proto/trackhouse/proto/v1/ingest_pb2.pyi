from trackhouse.proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    STORED: _ClassVar[AckStatus]
    DUPLICATE: _ClassVar[AckStatus]
    REJECTED: _ClassVar[AckStatus]
ACK_STATUS_UNSPECIFIED: AckStatus
STORED: AckStatus
DUPLICATE: AckStatus
REJECTED: AckStatus

class RunRef(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ExperimentRef(_message.Message):
    __slots__ = ("experiment_id",)
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    def __init__(self, experiment_id: _Optional[str] = ...) -> None: ...

class DeleteTagRequest(_message.Message):
    __slots__ = ("run_id", "key")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    key: str
    def __init__(self, run_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class DeleteTagResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateExperimentRequest(_message.Message):
    __slots__ = ("experiment_id", "new_name")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_NAME_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    new_name: str
    def __init__(self, experiment_id: _Optional[str] = ..., new_name: _Optional[str] = ...) -> None: ...

class SetExperimentTagsRequest(_message.Message):
    __slots__ = ("experiment_id", "tags")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    tags: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tag]
    def __init__(self, experiment_id: _Optional[str] = ..., tags: _Optional[_Iterable[_Union[_common_pb2.Tag, _Mapping]]] = ...) -> None: ...

class DeleteExperimentTagRequest(_message.Message):
    __slots__ = ("experiment_id", "key")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    key: str
    def __init__(self, experiment_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class CreateExperimentRequest(_message.Message):
    __slots__ = ("name", "artifact_location")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_LOCATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    artifact_location: str
    def __init__(self, name: _Optional[str] = ..., artifact_location: _Optional[str] = ...) -> None: ...

class GetExperimentRequest(_message.Message):
    __slots__ = ("experiment_id", "name")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    name: str
    def __init__(self, experiment_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class CreateRunRequest(_message.Message):
    __slots__ = ("experiment_id", "run_name", "user_id", "start_time", "params", "tags")
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    run_name: str
    user_id: str
    start_time: int
    params: _containers.RepeatedCompositeFieldContainer[_common_pb2.Param]
    tags: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tag]
    def __init__(self, experiment_id: _Optional[str] = ..., run_name: _Optional[str] = ..., user_id: _Optional[str] = ..., start_time: _Optional[int] = ..., params: _Optional[_Iterable[_Union[_common_pb2.Param, _Mapping]]] = ..., tags: _Optional[_Iterable[_Union[_common_pb2.Tag, _Mapping]]] = ...) -> None: ...

class UpdateRunRequest(_message.Message):
    __slots__ = ("run_id", "status", "end_time", "run_name")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: _common_pb2.RunStatus
    end_time: int
    run_name: str
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.RunStatus, str]] = ..., end_time: _Optional[int] = ..., run_name: _Optional[str] = ...) -> None: ...

class LogParamsRequest(_message.Message):
    __slots__ = ("run_id", "params")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    params: _containers.RepeatedCompositeFieldContainer[_common_pb2.Param]
    def __init__(self, run_id: _Optional[str] = ..., params: _Optional[_Iterable[_Union[_common_pb2.Param, _Mapping]]] = ...) -> None: ...

class LogParamsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetTagsRequest(_message.Message):
    __slots__ = ("run_id", "tags")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    tags: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tag]
    def __init__(self, run_id: _Optional[str] = ..., tags: _Optional[_Iterable[_Union[_common_pb2.Tag, _Mapping]]] = ...) -> None: ...

class SetTagsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MetricBatch(_message.Message):
    __slots__ = ("writer_id", "seq", "run_ids", "keys", "run_index", "key_index", "steps", "timestamps", "values", "set_runs", "set_widths", "set_keys", "row_sets", "row_steps", "row_timestamps", "row_values")
    WRITER_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    RUN_INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SET_RUNS_FIELD_NUMBER: _ClassVar[int]
    SET_WIDTHS_FIELD_NUMBER: _ClassVar[int]
    SET_KEYS_FIELD_NUMBER: _ClassVar[int]
    ROW_SETS_FIELD_NUMBER: _ClassVar[int]
    ROW_STEPS_FIELD_NUMBER: _ClassVar[int]
    ROW_TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    ROW_VALUES_FIELD_NUMBER: _ClassVar[int]
    writer_id: str
    seq: int
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedScalarFieldContainer[str]
    run_index: bytes
    key_index: bytes
    steps: bytes
    timestamps: bytes
    values: bytes
    set_runs: bytes
    set_widths: bytes
    set_keys: bytes
    row_sets: bytes
    row_steps: bytes
    row_timestamps: bytes
    row_values: bytes
    def __init__(self, writer_id: _Optional[str] = ..., seq: _Optional[int] = ..., run_ids: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[str]] = ..., run_index: _Optional[bytes] = ..., key_index: _Optional[bytes] = ..., steps: _Optional[bytes] = ..., timestamps: _Optional[bytes] = ..., values: _Optional[bytes] = ..., set_runs: _Optional[bytes] = ..., set_widths: _Optional[bytes] = ..., set_keys: _Optional[bytes] = ..., row_sets: _Optional[bytes] = ..., row_steps: _Optional[bytes] = ..., row_timestamps: _Optional[bytes] = ..., row_values: _Optional[bytes] = ...) -> None: ...

class BatchAck(_message.Message):
    __slots__ = ("seq", "status", "points", "code", "message")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    POINTS_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: AckStatus
    points: int
    code: int
    message: str
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[AckStatus, str]] = ..., points: _Optional[int] = ..., code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...
