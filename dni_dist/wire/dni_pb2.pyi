from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Version(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERSION_UNSPECIFIED: _ClassVar[Version]
    VERSION_1: _ClassVar[Version]

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    KIND_ACTIVATION: _ClassVar[Kind]
    KIND_GRAD: _ClassVar[Kind]
    KIND_BOOTSTRAP: _ClassVar[Kind]
    KIND_ERROR: _ClassVar[Kind]
VERSION_UNSPECIFIED: Version
VERSION_1: Version
KIND_UNSPECIFIED: Kind
KIND_ACTIVATION: Kind
KIND_GRAD: Kind
KIND_BOOTSTRAP: Kind
KIND_ERROR: Kind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "chunk_index", "chunk_count")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    chunk_index: int
    chunk_count: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., chunk_index: _Optional[int] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class Activation(_message.Message):
    __slots__ = ("step", "tensor", "labels")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    step: int
    tensor: Tensor
    labels: Tensor
    def __init__(self, step: _Optional[int] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Gradient(_message.Message):
    __slots__ = ("step", "kind", "tensor")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    step: int
    kind: Kind
    tensor: Tensor
    def __init__(self, step: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Handshake(_message.Message):
    __slots__ = ("protocol_version", "run_id", "src_stage", "dst_stage", "up", "tensors")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SRC_STAGE_FIELD_NUMBER: _ClassVar[int]
    DST_STAGE_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    protocol_version: Version
    run_id: str
    src_stage: int
    dst_stage: int
    up: bool
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, protocol_version: _Optional[_Union[Version, str]] = ..., run_id: _Optional[str] = ..., src_stage: _Optional[int] = ..., dst_stage: _Optional[int] = ..., up: _Optional[bool] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("handshake", "activation", "gradient")
    HANDSHAKE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    handshake: Handshake
    activation: Activation
    gradient: Gradient
    def __init__(self, handshake: _Optional[_Union[Handshake, _Mapping]] = ..., activation: _Optional[_Union[Activation, _Mapping]] = ..., gradient: _Optional[_Union[Gradient, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("step", "ok", "error")
    STEP_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    step: int
    ok: bool
    error: str
    def __init__(self, step: _Optional[int] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
