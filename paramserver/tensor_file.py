"""Shard files in the safetensors format: written in one streaming pass that also hashes them, and
read by range without loading or executing anything (pure: numpy and the standard library).

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a
JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the raw little-endian data. :func:`read_header` checks everything a reader relies on (dtypes,
shapes against byte ranges, the data tiling the rest of the file exactly) before any data is read,
so a file that is not a valid safetensors file (a pickle, a truncated header...) is DATA_LOSS and is
never interpreted further.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from paramserver.manifest import data_loss

#: dtype names and their numpy types (the ones snapshots use).
DTYPES: dict[str, np.dtype[Any]] = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8"), "I64": np.dtype("<i8")}
_NAMES = {v: k for k, v in DTYPES.items()}
#: A header larger than this is refused (ours are a few KB).
MAX_HEADER_BYTES = 64 << 20
#: Bytes per write (and hash) block.
WRITE_BLOCK = 16 << 20


class Sink(Protocol):
    """Where a file's bytes go, in order (a temp file, an upload)."""

    def write(self, data: memoryview) -> None:
        """Append bytes."""
        ...


class RangeReader(Protocol):
    """Random access to a stored file's bytes."""

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset` (an error if the file is shorter)."""
        ...


@dataclass(frozen=True)
class TensorStream:
    """A tensor written from blocks: its dtype name, shape and a callable that yields its
    little-endian bytes in order (exactly nbytes in all)."""

    dtype: str
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[memoryview]]
    stable: bool = False
    """True when a block stays valid after the next is produced (an array's memory); otherwise
    the hasher gets a copy."""

    @property
    def nbytes(self) -> int:
        """Bytes of the data."""
        return math.prod(self.shape) * int(DTYPES[self.dtype].itemsize)


def array_stream(arr: np.ndarray) -> TensorStream:
    """A TensorStream over an in-memory array (written straight from its memory)."""
    a = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # (ascontiguousarray makes 0-d arrays 1-d)
    if a.dtype not in _NAMES:
        raise TypeError(f"unsupported dtype {a.dtype}")

    def blocks() -> Iterator[memoryview]:
        view = a.data.cast("B") if a.ndim else memoryview(a.tobytes())
        for i in range(0, len(view), WRITE_BLOCK):
            yield view[i : i + WRITE_BLOCK]

    return TensorStream(_NAMES[a.dtype], tuple(arr.shape), blocks, stable=True)


@dataclass(frozen=True)
class Written:
    """A written file's size and sha256."""

    size: int
    sha256: str


def write_tensors(
    sink: Sink,
    tensors: Mapping[str, np.ndarray | TensorStream],
    metadata: Mapping[str, str],
    progress: Callable[[int], None] | None = None,
    writeback: Callable[[int, int], None] | None = None,
) -> Written:
    """Stream a safetensors file into `sink` and return its size and sha256.

    Arrays are written straight from their memory in 16 MiB blocks (no staging copy), a
    :class:`TensorStream` from its blocks as they are produced (a spilled shard streams its
    tiles). The sha256 runs on a second thread, block by block, while the next block is written
    (hashlib releases the GIL); `writeback(offset, length)` is called after each block (a local
    file starts its writeback there rather than at fsync).
    """
    streams = [(name, value if isinstance(value, TensorStream) else array_stream(value)) for name, value in tensors.items()]
    head = _head(streams, metadata)
    digest = hashlib.sha256()
    written = 0
    with ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        pending: list[Future[None]] = []
        for piece in (struct.pack("<Q", len(head)), head):
            sink.write(memoryview(piece))
            digest.update(piece)
            written += len(piece)
        for name, st in streams:
            start = written
            for block in st.blocks():
                sink.write(block)
                pending.append(hasher.submit(digest.update, block if st.stable else bytes(block)))  # in order: one thread
                while not st.stable and len(pending) > 4:  # bound the copies waiting for the hasher
                    pending.pop(0).result()
                if writeback is not None:
                    writeback(written, len(block))
                written += len(block)
                if progress is not None:
                    progress(len(block))
            if written - start != st.nbytes:
                raise ValueError(f"{name}: {written - start} bytes written, {st.nbytes} expected")
        for fut in pending:
            fut.result()
    return Written(written, digest.hexdigest())


def _head(streams: Iterable[tuple[str, TensorStream]], metadata: Mapping[str, str]) -> bytes:
    """The JSON header of a file of `streams`, padded to 8 bytes (without its length prefix)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pos = 0
    for name, st in streams:
        header[name] = {"dtype": st.dtype, "shape": list(st.shape), "data_offsets": [pos, pos + st.nbytes]}
        pos += st.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    return head + b" " * (-len(head) % 8)


class ArrayFile:
    """The file :func:`write_tensors` would write for in-memory arrays, never serialised: a
    :class:`RangeReader` that answers each read from the header or the arrays themselves (no copy
    of the data is made, no hash is computed). Pickled, it is its arrays (Ray moves them out of
    band: one copy into the object store, read in place there)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
        arrays = {}
        for name, arr in tensors.items():
            a = np.ascontiguousarray(arr).reshape(-1)  # 0-d as 1 element: the header keeps the shape
            if a.dtype not in _NAMES:
                raise TypeError(f"unsupported dtype {a.dtype}")
            arrays[name] = (a, tuple(arr.shape))
        self.metadata = dict(metadata)
        self.arrays = arrays
        self._index()

    def _index(self) -> None:
        streams = [(n, TensorStream(_NAMES[a.dtype], shape, lambda: ())) for n, (a, shape) in self.arrays.items()]
        head = _head(streams, self.metadata)
        self._parts: list[memoryview] = [memoryview(struct.pack("<Q", len(head)) + head)]
        self._parts += [a.view(np.uint8).data for a, _ in self.arrays.values()]
        self._starts = [0]
        for part in self._parts[:-1]:
            self._starts.append(self._starts[-1] + len(part))
        self._size = self._starts[-1] + len(self._parts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "arrays": self.arrays}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.metadata, self.arrays = state["metadata"], state["arrays"]
        self._index()

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`."""
        return read_parts(self._parts, self._starts, self._size, offset, length)


def read_parts(parts: Sequence[memoryview | np.ndarray], starts: Sequence[int], size: int, offset: int, length: int) -> bytes:
    """Exactly `length` bytes from `offset` of a file held as byte `parts` (uint8 arrays or byte
    memoryviews) beginning at `starts` (ValueError beyond its `size`)."""
    if offset < 0 or length < 0 or offset + length > size:
        raise ValueError(f"read of [{offset}, {offset + length}) beyond {size} bytes")
    out = []
    i = max(bisect.bisect_right(starts, offset) - 1, 0)
    end = offset + length
    while offset < end:
        lo = offset - starts[i]
        piece = parts[i][lo : lo + end - offset]
        out.append(bytes(piece))
        offset += len(piece)
        i += 1
    return b"".join(out) if len(out) != 1 else out[0]


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies in a file."""

    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of its first element."""

    @property
    def numel(self) -> int:
        """Elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(reader: RangeReader, where: str) -> Header:
    """Read and validate a safetensors header (DATA_LOSS naming `where` if the file is not one)."""
    size = reader.size
    if size < 8:
        raise data_loss(where, f"{size} bytes: too short for a safetensors file")
    (hlen,) = struct.unpack("<Q", reader.read(0, 8))
    if hlen > min(MAX_HEADER_BYTES, size - 8):
        raise data_loss(where, f"not a valid safetensors file (header length {hlen} for a {size}-byte file)")
    try:
        header = json.loads(reader.read(8, hlen))
    except (ValueError, UnicodeDecodeError) as exc:
        raise data_loss(where, f"not a valid safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise data_loss(where, "not a valid safetensors file (the header is not an object)")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise data_loss(where, "bad __metadata__ (must map strings to strings)")
    data_start = 8 + hlen
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*shape, begin, end)):
                raise ValueError("negative or non-integer shape or offsets")
        except (KeyError, TypeError, ValueError) as exc:
            raise data_loss(where, f"tensor {name!r}: bad entry ({exc})") from None
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise data_loss(where, f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} of {info['dtype']}")
        tensors[name] = TensorInfo(dtype, shape, data_start + begin)
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise data_loss(where, "tensor data overlaps or leaves gaps")
        pos = end
    if data_start + pos != size:
        raise data_loss(where, f"the tensors end at byte {data_start + pos}, the file has {size}")
    return Header(tensors, dict(meta))


def read_elements(reader: RangeReader, info: TensorInfo, start: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
    """Elements [start, start + count) of a tensor, flat (into `out` when given)."""
    if start < 0 or start + count > info.numel:
        raise ValueError(f"elements [{start}, {start + count}) outside a tensor of {info.numel}")
    item = info.dtype.itemsize
    data = np.frombuffer(reader.read(info.begin + start * item, count * item), dtype=info.dtype)
    if out is None:
        return data.copy()
    out[...] = data
    return out


def read_tensor(reader: RangeReader, info: TensorInfo) -> np.ndarray:
    """A whole tensor in its shape."""
    return read_elements(reader, info, 0, info.numel).reshape(info.shape)


class FileRangeReader:
    """A RangeReader over a local file (pread)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._size = os.fstat(self._fd).st_size

    @property
    def size(self) -> int:
        """Bytes."""
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`."""
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(self._fd, length - len(out), offset + len(out))
            if not chunk:
                raise data_loss(self.path, f"short read at byte {offset + len(out)}")
            out += chunk
        return bytes(out)

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
