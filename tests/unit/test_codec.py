"""The numpy wire codec agrees bit for bit with torch's conversions."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from paramserver_client.codec import BFLOAT16, FLOAT16, FLOAT32, ITEMSIZE, decode, encode, fp32_to_bf16_bits, split, to_wire


def _specials() -> np.ndarray:
    rng = np.random.default_rng(0)
    vals = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * np.float32(1e3),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38, -3.4e38], dtype=np.float32),
            # exact ties between two bf16 values: low 16 bits == 0x8000
            (np.arange(1, 200, dtype=np.uint32) << np.uint32(16) | np.uint32(0x8000)).view(np.float32),
        ]
    )
    return vals.astype(np.float32)


def test_bf16_rounding_matches_torch() -> None:
    x = _specials()
    ours = fp32_to_bf16_bits(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(ours[~nan], ref[~nan])
    # any NaN pattern is fine (torch's differs by code path); it must decode as NaN
    assert np.isnan(decode(ours[nan].tobytes(), BFLOAT16)).all()


@pytest.mark.parametrize("dtype", [FLOAT32, BFLOAT16, FLOAT16], ids=["fp32", "bf16", "fp16"])
def test_encode_decode_matches_torch(dtype: int) -> None:
    x = _specials()
    data = encode(x, dtype)
    assert len(data) == x.size * ITEMSIZE[dtype]
    tdt = {FLOAT32: torch.float32, BFLOAT16: torch.bfloat16, FLOAT16: torch.float16}[dtype]
    ref = torch.from_numpy(x).to(tdt).float().numpy()
    got = decode(data, dtype)
    assert np.array_equal(got, ref, equal_nan=True)
    # what the service reads from the same bytes
    served = torch.frombuffer(bytearray(data), dtype=tdt).float().numpy()
    assert np.array_equal(served, ref, equal_nan=True)


def test_split_tiles_the_range() -> None:
    pieces = list(split(7, 1000, 333))
    assert pieces == [(7, 333), (340, 333), (673, 333), (1006, 1)]
    assert list(split(5, 0, 10)) == []


def test_hand_encoded_chunk_message_parses_as_protobuf() -> None:
    from paramserver.v1 import shard_service_pb2 as spb
    from paramserver_client.codec import encode_chunk_message

    for offset, count in [(0, 1), (300, 5), (2**40 + 3, 2)]:
        data = np.arange(count, dtype="<f4").tobytes()
        msg = spb.PushGradientsRequest.FromString(encode_chunk_message(offset, count, FLOAT32, data))
        assert msg.WhichOneof("kind") == "chunk"
        assert (msg.chunk.offset, msg.chunk.count, msg.chunk.dtype, msg.chunk.data) == (offset, count, FLOAT32, data)
        up = spb.UploadParametersRequest.FromString(encode_chunk_message(offset, count, BFLOAT16, data))
        assert up.chunk.dtype == BFLOAT16 and up.chunk.data == data


def test_chunk_message_parser_roundtrips_and_skips_unknown_fields() -> None:
    from paramserver.v1 import shard_service_pb2 as spb
    from paramserver.v1 import tensor_pb2
    from paramserver_client.codec import parse_chunk_message

    data = np.arange(7, dtype="<f4").tobytes()
    msg = spb.PullParametersResponse(chunk=tensor_pb2.TensorChunk(offset=2**33 + 1, count=7, dtype=FLOAT32, data=data))
    raw = msg.SerializeToString()
    offset, count, dtype, start, length = parse_chunk_message(raw)  # type: ignore[misc]
    assert (offset, count, dtype, raw[start : start + length]) == (2**33 + 1, 7, FLOAT32, data)
    header = spb.PullParametersResponse(header=spb.PullHeader(version=5, elements=7)).SerializeToString()
    assert parse_chunk_message(header) is None
    # an unknown field (number 15, varint) before the chunk is skipped
    assert parse_chunk_message(b"\x78\x05" + raw)[:3] == (2**33 + 1, 7, FLOAT32)  # type: ignore[index]
    with pytest.raises(ValueError):
        parse_chunk_message(raw[:-3])


@pytest.mark.parametrize("dtype", [FLOAT32, BFLOAT16, FLOAT16], ids=["fp32", "bf16", "fp16"])
def test_decode_into_matches_decode(dtype: int) -> None:
    from paramserver_client.codec import decode_into

    x = _specials()
    out = np.zeros(x.size + 5, dtype=np.float32)
    decode_into(encode(x, dtype), dtype, out, 3)
    assert np.array_equal(out[3 : 3 + x.size], decode(encode(x, dtype), dtype), equal_nan=True)
    assert not out[:3].any() and not out[-2:].any()


@pytest.mark.parametrize("torch_loaded", [True, False], ids=["torch", "numpy"])
@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16], ids=["bf16", "fp16"])
def test_to_wire_into_a_reused_buffer_equals_a_fresh_conversion(dtype: int, torch_loaded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch_loaded:
        monkeypatch.delitem(sys.modules, "torch")  # the numpy path of a worker without torch
    x = _specials()
    fresh = to_wire(x, dtype).view(np.uint16)
    buffer = np.full(x.size, 0xABCD, dtype="<u2")  # stale bits from an earlier push
    got = to_wire(x, dtype, out=buffer)
    assert got is buffer
    nan = np.isnan(x)
    assert np.array_equal(buffer[~nan], fresh[~nan])
    assert np.isnan(decode(buffer[nan].tobytes(), dtype)).all()
    assert to_wire(x, FLOAT32, out=buffer) is not buffer  # fp32 is its own wire form: out is not used


def test_to_wire_refuses_an_out_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="out must be a contiguous 2-byte array of 4 elements"):
        to_wire(np.ones(4, dtype=np.float32), BFLOAT16, out=np.empty(3, dtype="<u2"))
    with pytest.raises(ValueError, match="2-byte"):
        to_wire(np.ones(4, dtype=np.float32), FLOAT16, out=np.empty(4, dtype=np.float32))
