"""Tensors to and from the data plane's wire format, on the service side (torch): what the shard
runtime decodes pushes with and encodes pulls with. The state never sees wire bytes.

A chunk on the wire is (flat offset, element count, wire dtype, little-endian bytes); see
``protos/paramserver/v1/tensor.proto`` and :mod:`paramserver_client.codec`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from paramserver.errors import ParamServerError
from paramserver_client import compression
from paramserver_client.codec import BFLOAT16, COMPRESSED, FLOAT16, FLOAT32, ITEMSIZE, chunk_elements, encode_chunk_message
from paramserver_client.reasons import Reason

_TORCH_DTYPE = {FLOAT32: torch.float32, BFLOAT16: torch.bfloat16, FLOAT16: torch.float16}


def wire_tensor(data: bytes | memoryview, dtype: int) -> torch.Tensor:
    """A zero-copy, read-only tensor over little-endian wire bytes, in its wire dtype (copying it
    into an fp32 tensor converts bf16/fp16 exactly)."""
    return torch.frombuffer(data, dtype=_TORCH_DTYPE[dtype])


def decode_compressed(data: bytes | memoryview, count: int, dtype: int, index: int = 0) -> torch.Tensor:
    """The fp32 values of a compressed chunk (codec.COMPRESSED; layouts in tensor.proto) of
    `count` elements; INVALID_ARGUMENT ENCODING_INVALID (field chunk.data, the chunk's `index`)
    when the data does not decode."""
    try:
        values = compression.decode(data, count, COMPRESSED[dtype])
    except ValueError as exc:
        raise ParamServerError.invalid(
            "chunk.data", f"{COMPRESSED[dtype]} chunk: {exc}", Reason.ENCODING_INVALID, chunk_index=index
        ) from None
    return torch.from_numpy(values)


def wire_bytes(values: torch.Tensor, dtype: int) -> memoryview:
    """The little-endian wire bytes of fp32 values in `dtype` (a view for fp32 host values)."""
    if values.device.type != "cpu":
        values = values.cpu()
    if dtype != FLOAT32:
        values = values.to(_TORCH_DTYPE[dtype]).view(torch.int16)
    return values.contiguous().numpy().data.cast("B")


def encode_blocks(blocks: Iterable[tuple[int, torch.Tensor]], dtype: int, elements: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """Serialised ``PullParametersResponse{chunk}`` messages (offset, count, message) of fp32
    (offset, values) blocks in flat order: contiguous blocks are packed into chunks of up to
    `elements` (the documented chunk size by default), each message built with one copy of the data.

    bf16/fp16 are converted piece by piece into one chunk-sized scratch buffer, which stays in
    cache and is never faulted in again, instead of into a fresh copy of each whole block."""
    step = elements or chunk_elements(dtype)
    size = ITEMSIZE[dtype]
    scratch = None if dtype == FLOAT32 else torch.empty(step, dtype=_TORCH_DTYPE[dtype])
    pending: list[memoryview | bytes] = []
    start = count = 0
    for offset, values in blocks:
        if values.device.type != "cpu":  # one copy to the host per block, not one per piece
            values = values.cpu()
        data = wire_bytes(values, dtype) if scratch is None else None
        flat = values.reshape(-1)
        n = values.numel()
        pos = 0
        if pending and offset != start + count:  # not contiguous with what is pending
            yield start, count, encode_chunk_message(start, count, dtype, b"".join(pending))
            pending, count = [], 0
        while pos < n:
            if not pending:
                start = offset + pos
            take = min(step - count, n - pos)
            if data is not None:
                pending.append(data[pos * size : (pos + take) * size])
            else:
                assert scratch is not None
                scratch[:take].copy_(flat[pos : pos + take])
                pending.append(scratch[:take].view(torch.int16).numpy().data.cast("B"))
            count += take
            pos += take
            if count == step:
                yield start, count, encode_chunk_message(start, count, dtype, pending[0] if len(pending) == 1 else b"".join(pending))
                pending, count = [], 0
        if pending:  # carried over to the next block: copy it (a block may be a reused buffer, the piece is the scratch)
            pending = [b"".join(pending)]
    if pending:
        yield start, count, encode_chunk_message(start, count, dtype, pending[0] if len(pending) == 1 else b"".join(pending))
