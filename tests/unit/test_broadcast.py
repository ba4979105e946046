"""paramserver.broadcast: the values a shard's compressed pulls hand out (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from paramserver.broadcast import Broadcast, Piece
from paramserver_client import compression
from paramserver_client.codec import COMPRESSED, FLOAT32, INT4_BLOCK, INT8_BLOCK, TOPK, parse_chunk_message

PIECES = [Piece(100, 0, 700), Piece(2000, 700, 300)]  # two runs of a shard: flat starts, local starts


def decode_into(held: np.ndarray, messages: list[bytes], dtype: int) -> np.ndarray:
    """What a worker holding `held` (local order) has after the messages (as the client applies them)."""
    out = held.copy()
    flat_to_local = {p.start: p for p in PIECES}
    for m in messages:
        parsed = parse_chunk_message(m)
        assert parsed is not None
        offset, count, wire, start, length = parsed
        p = next(p for s, p in flat_to_local.items() if s <= offset < s + p.length)
        at = p.local + offset - p.start
        data = m[start : start + length]
        if wire == FLOAT32:
            out[at : at + count] = np.frombuffer(data, dtype="<f4")
        else:
            assert wire == dtype
            out[at : at + count] = held[at : at + count] + compression.decode(data, count, COMPRESSED[dtype])
    return out


@pytest.mark.parametrize("dtype", [INT8_BLOCK, INT4_BLOCK])
def test_updates_keep_every_follower_on_the_broadcast_without_drift(dtype: int) -> None:
    rng = np.random.default_rng(0)
    theta = rng.standard_normal(1000).astype(np.float32)
    b = Broadcast.start(dtype, PIECES, theta, 0)
    held = decode_into(np.zeros(1000, np.float32), b.answer(None), dtype)  # a first pull: whole, fp32
    assert np.array_equal(held, theta)
    qmax = 127 if dtype == INT8_BLOCK else 7
    for version in range(1, 30):
        step = (rng.standard_normal(1000) * 0.01).astype(np.float32)
        theta = theta + step
        b.advance(theta, version)
        held = decode_into(held, b.answer(version - 1), dtype)
        assert np.array_equal(held, b.values)  # the follower holds the broadcast, bit for bit
        # error feedback: within one quantisation step of the parameters' last update, at any version
        assert np.abs(held - theta).max() <= np.abs(step).max() * 2 / qmax
    # a worker with another base gets the values whole
    assert np.array_equal(decode_into(np.zeros(1000, np.float32), b.answer(3), dtype), b.values)


def test_a_broadcast_needs_a_block_dtype_and_a_newer_version() -> None:
    with pytest.raises(ValueError, match="broadcast dtype"):
        Broadcast.start(TOPK, PIECES, np.zeros(1000, np.float32), 0)
    b = Broadcast.start(INT8_BLOCK, PIECES, np.zeros(1000, np.float32), 5)
    with pytest.raises(ValueError, match="not after"):
        b.advance(np.zeros(1000, np.float32), 5)
