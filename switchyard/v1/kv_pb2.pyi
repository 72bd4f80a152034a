from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockHeader(_message.Message):
    __slots__ = ("fingerprint", "block_hash", "size", "checksum")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    block_hash: bytes
    size: int
    checksum: bytes
    def __init__(self, fingerprint: _Optional[bytes] = ..., block_hash: _Optional[bytes] = ..., size: _Optional[int] = ..., checksum: _Optional[bytes] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("header", "data", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    data: bytes
    offset: int
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, stored: _Optional[_Iterable[bool]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("fingerprint", "block_hashes")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, fingerprint: _Optional[bytes] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetChunk(_message.Message):
    __slots__ = ("header", "found", "data", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: BlockHeader
    found: bool
    data: bytes
    offset: int
    def __init__(self, header: _Optional[_Union[BlockHeader, _Mapping]] = ..., found: _Optional[bool] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("fingerprint", "block_hashes")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, fingerprint: _Optional[bytes] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("num_present",)
    NUM_PRESENT_FIELD_NUMBER: _ClassVar[int]
    num_present: int
    def __init__(self, num_present: _Optional[int] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("fingerprint", "block_hashes")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    fingerprint: bytes
    block_hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, fingerprint: _Optional[bytes] = ..., block_hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("num_deleted",)
    NUM_DELETED_FIELD_NUMBER: _ClassVar[int]
    num_deleted: int
    def __init__(self, num_deleted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "hits", "misses", "hit_rate", "corrupt_blocks", "evictions", "refused_writes", "errors", "bytes_read", "bytes_written", "blocks", "bytes_used", "capacity_bytes")
    TIER_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_WRITES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    tier: str
    hits: int
    misses: int
    hit_rate: float
    corrupt_blocks: int
    evictions: int
    refused_writes: int
    errors: int
    bytes_read: int
    bytes_written: int
    blocks: int
    bytes_used: int
    capacity_bytes: int
    def __init__(self, tier: _Optional[str] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., corrupt_blocks: _Optional[int] = ..., evictions: _Optional[int] = ..., refused_writes: _Optional[int] = ..., errors: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., blocks: _Optional[int] = ..., bytes_used: _Optional[int] = ..., capacity_bytes: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("store", "tiers", "block_hits", "block_misses")
    STORE_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HITS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_MISSES_FIELD_NUMBER: _ClassVar[int]
    store: str
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    block_hits: int
    block_misses: int
    def __init__(self, store: _Optional[str] = ..., tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., block_hits: _Optional[int] = ..., block_misses: _Optional[int] = ...) -> None: ...
