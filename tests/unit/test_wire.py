"""The service's pull encoder: chunk messages of (offset, values) blocks in every wire dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paramserver.wire import encode_blocks
from paramserver_client.codec import BFLOAT16, FLOAT16, FLOAT32, ITEMSIZE, parse_chunk_message, to_wire


@pytest.mark.parametrize("dtype", [FLOAT32, BFLOAT16, FLOAT16], ids=["fp32", "bf16", "fp16"])
def test_blocks_pack_into_chunks_whose_bytes_are_the_wire_form(dtype: int) -> None:
    """Blocks of odd sizes, contiguous runs and a gap: every chunk holds at most `elements`
    values, never spans the gap, and its bytes are the values' wire form (a block's last piece
    is carried into the next chunk although the scratch it was converted in is reused)."""
    rng = np.random.default_rng(3)
    layout = [(0, 7), (7, 5), (12, 1), (13, 9), (40, 6), (46, 17)]  # a gap between 22 and 40
    values = {off: torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 100) for off, n in layout}
    blocks = [(off, values[off].clone()) for off, _ in layout]
    messages = list(encode_blocks(blocks, dtype, elements=4))
    expect = np.zeros(63, dtype=np.float32)
    for off, n in layout:
        expect[off : off + n] = values[off].numpy()
    wire = to_wire(expect, dtype).view(np.uint8)
    size = ITEMSIZE[dtype]
    covered = []
    for start, count, message in messages:
        parsed = parse_chunk_message(message)
        assert parsed is not None
        offset, n, got_dtype, a, length = parsed
        assert (offset, n, got_dtype) == (start, count, dtype)
        assert 0 < n <= 4 and not (offset < 40 < offset + n and offset < 22)
        assert message[a : a + length] == wire[offset * size : (offset + n) * size].tobytes()
        covered += range(offset, offset + n)
    assert covered == [*range(22), *range(40, 63)]
