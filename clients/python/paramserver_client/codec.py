"""The wire codec: fp32 arrays <-> little-endian chunk bytes (numpy only).

See ``protos/paramserver/v1/tensor.proto`` for the format. The service
decodes the same bytes with torch; ``tests/unit/test_codec.py`` checks that
both agree bit for bit (including bf16 rounding).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

from paramserver.v1 import tensor_pb2

#: Data bytes per chunk that clients send and the service streams back (1 MiB).
CHUNK_BYTES = 1 << 20
#: Largest chunk data the service accepts (4 MiB); larger is RESOURCE_EXHAUSTED.
MAX_CHUNK_BYTES = 4 << 20
#: Largest gRPC message the service and the clients accept (64 MiB).
MAX_MESSAGE_BYTES = 64 << 20

#: Wire dtype values (paramserver.v1.DType) as plain ints.
FLOAT32: int = int(tensor_pb2.DTYPE_FLOAT32)
BFLOAT16: int = int(tensor_pb2.DTYPE_BFLOAT16)
FLOAT16: int = int(tensor_pb2.DTYPE_FLOAT16)
#: Compressed wire dtypes (pushes; int8/int4 also broadcast pulls; layouts in tensor.proto and paramserver_client.compression).
INT8_BLOCK: int = int(tensor_pb2.DTYPE_INT8_BLOCK)
INT4_BLOCK: int = int(tensor_pb2.DTYPE_INT4_BLOCK)
TOPK: int = int(tensor_pb2.DTYPE_TOPK)

#: Pull points (paramserver.v1.ParameterPoint) as plain ints: the training point (what the
#: optimizer updates) and the evaluation point (Schedule-Free's x; the same values otherwise).
TRAIN: int = 1
EVAL: int = 2

#: Bytes per element of each wire dtype.
ITEMSIZE: dict[int, int] = {FLOAT32: 4, BFLOAT16: 2, FLOAT16: 2}

#: The compression method (paramserver_client.compression) of each compressed wire dtype.
COMPRESSED: dict[int, str] = {INT8_BLOCK: "int8", INT4_BLOCK: "int4", TOPK: "topk"}

_NAMES = {"fp32": FLOAT32, "float32": FLOAT32, "bf16": BFLOAT16, "bfloat16": BFLOAT16, "fp16": FLOAT16, "float16": FLOAT16}

F32Array = npt.NDArray[np.float32]


def dtype_from_name(name: str) -> int:
    """Map "fp32" / "bf16" / "fp16" (or the long names) to a wire DType value."""
    try:
        return _NAMES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown wire dtype {name!r}; use one of fp32, bf16, fp16") from None


def compressed_dtype(method: str) -> int:
    """The compressed wire dtype of a compression method ("int8", "int4" or "topk")."""
    for dtype, name in COMPRESSED.items():
        if name == method:
            return dtype
    raise ValueError(f"unknown compression {method!r}; use one of {', '.join(COMPRESSED.values())}")


def chunk_elements(dtype: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Elements per chunk of `chunk_bytes` for a wire dtype."""
    return max(1, chunk_bytes // ITEMSIZE[dtype])


def split(start: int, length: int, step: int) -> Iterator[tuple[int, int]]:
    """Yield (offset, count) pieces of [start, start + length) of at most `step` elements."""
    end = start + length
    pos = start
    while pos < end:
        n = min(step, end - pos)
        yield pos, n
        pos += n


def encode(values: F32Array, dtype: int) -> bytes:
    """Encode a 1-D fp32 array as little-endian bytes of the wire dtype."""
    if dtype == FLOAT32:
        return np.ascontiguousarray(values, dtype="<f4").tobytes()
    if dtype in ITEMSIZE:  # |x| > 65504 becomes inf in fp16, as torch's .half()
        return to_wire(values, dtype).tobytes()
    raise ValueError(f"unsupported wire dtype {dtype}")


def to_wire(values: F32Array, dtype: int, out: npt.NDArray[np.generic] | None = None) -> npt.NDArray[np.generic]:
    """A whole flat fp32 array in a wire dtype, as a little-endian array whose bytes are the
    wire bytes (fp32: the array itself; bf16: uint16 bits; fp16: float16). Converting once
    and slicing is much faster than converting chunk by chunk.

    `out`: for bf16/fp16, an array of the wire's item size and the values' length to convert
    into (a buffer reused step after step converts at about the speed of a copy; a fresh one
    costs its page faults first); returned. Ignored for fp32, whose wire form is the values."""
    arr = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    if dtype == FLOAT32:
        return arr
    if dtype not in (FLOAT16, BFLOAT16):
        raise ValueError(f"unsupported wire dtype {dtype}")
    if out is not None and (out.shape != arr.shape or out.dtype.itemsize != 2 or not out.flags.c_contiguous):
        raise ValueError(f"out must be a contiguous 2-byte array of {arr.size} elements, not {out.dtype} {out.shape}")
    if dtype == FLOAT16:
        with np.errstate(over="ignore"):
            if out is None:
                return arr.astype("<f2")
            np.copyto(out.view("<f2"), arr, casting="unsafe")
            return out
    torch = sys.modules.get("torch")
    if torch is not None:  # already loaded by the caller (a torch worker): one fast pass
        if out is None:
            bits: npt.NDArray[np.generic] = torch.from_numpy(arr).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
            return bits
        torch.from_numpy(out.view("<i2")).view(torch.bfloat16).copy_(torch.from_numpy(arr))
        return out
    if out is None:
        return fp32_to_bf16_bits(arr).astype("<u2")
    out.view("<u2")[:] = fp32_to_bf16_bits(arr)
    return out


def decode(data: bytes | memoryview, dtype: int) -> F32Array:
    """Decode little-endian wire bytes to a new fp32 array."""
    if dtype == FLOAT32:
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if dtype == FLOAT16:
        return np.frombuffer(data, dtype="<f2").astype(np.float32)
    if dtype == BFLOAT16:
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    raise ValueError(f"unsupported wire dtype {dtype}")


def fp32_to_bf16_bits(values: F32Array) -> npt.NDArray[np.uint16]:
    """Round fp32 to bfloat16 (nearest, ties to even; NaN -> the quiet NaN 0x7FC0), as uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = np.uint16(0x7FC0)
    return out


def decode_into(data: bytes | memoryview, dtype: int, out: F32Array, start: int = 0) -> None:
    """Decode wire bytes straight into ``out[start:start + n]`` (one copy for fp32)."""
    if dtype == FLOAT32:
        src = np.frombuffer(data, dtype="<f4")
    elif dtype == FLOAT16:
        src = np.frombuffer(data, dtype="<f2")
    elif dtype == BFLOAT16:
        bits = np.frombuffer(data, dtype="<u2")
        view = out[start : start + bits.size].view(np.uint32)
        np.left_shift(bits, 16, out=view, dtype=np.uint32)
        return
    else:
        raise ValueError(f"unsupported wire dtype {dtype}")
    out[start : start + src.size] = src


# ---- chunk messages, built and parsed without copying the data more than once -----------------
#
# {chunk: TensorChunk} is field 2 (length-delimited) of UploadParametersRequest,
# PushGradientsRequest and PullParametersResponse alike; TensorChunk is
# {1: offset, 2: count, 3: dtype (varints), 4: data (bytes)}.

CHUNK_FIELD_TAG = 0x12


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_chunk_message(offset: int, count: int, dtype: int, data: bytes | memoryview) -> bytes:
    """A serialised ``{chunk: TensorChunk}`` stream message, with the data copied once."""
    head = b"".join([b"\x08", _varint(offset), b"\x10", _varint(count), b"\x18", _varint(dtype), b"\x22", _varint(len(data))])
    return b"".join([bytes([CHUNK_FIELD_TAG]), _varint(len(head) + len(data)), head, data])


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _skip(buf: bytes, pos: int, wire: int) -> int:
    if wire == 0:
        return _read_varint(buf, pos)[1]
    if wire == 1:
        return pos + 8
    if wire == 2:
        n, pos = _read_varint(buf, pos)
        return pos + n
    if wire == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire}")


def parse_chunk_message(buf: bytes) -> tuple[int, int, int, int, int] | None:
    """Parse a serialised stream message; if it holds a chunk, return
    (offset, count, dtype, data_start, data_length) with the data at ``buf[data_start:...]``.
    Returns None for any other message (e.g. a header). Unknown fields are skipped."""
    pos, end = 0, len(buf)
    chunk: tuple[int, int] | None = None
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if field == 2 and wire == 2:
            n, pos = _read_varint(buf, pos)
            chunk = (pos, pos + n)
            pos += n
        else:
            pos = _skip(buf, pos, wire)
    if chunk is None:
        return None
    offset = count = dtype = 0
    data_start = data_len = 0
    pos, end = chunk
    while pos < end:
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0 and field in (1, 2, 3):
            value, pos = _read_varint(buf, pos)
            if field == 1:
                offset = value
            elif field == 2:
                count = value
            else:
                dtype = value
        elif field == 4 and wire == 2:
            data_len, pos = _read_varint(buf, pos)
            data_start = pos
            pos += data_len
        else:
            pos = _skip(buf, pos, wire)
    if pos != end or data_start + data_len > len(buf):
        raise ValueError("malformed chunk message")
    return offset, count, dtype, data_start, data_len
