"""A shard's share of the global gradient norm, computed with torch on the shard's device
(see :mod:`paramserver.gradnorm` for the fixed blocks and why the bits do not depend on the split)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from paramserver.gradnorm import BLOCK, BLOCK_COLS, BLOCK_ROWS, NormPart, Piece, regions

#: Blocks reduced per pass (4 MiB of float64 scratch).
CHUNK_BLOCKS = 64

#: Reads `count` float32 gradient elements from local offset `start` (a view, or a buffer that
#: stays valid until the next read).
GradReader = Callable[[int, int], torch.Tensor]


def block_sums(y: torch.Tensor) -> torch.Tensor:
    """In place on float64 squares `y` (a multiple of BLOCK elements): each block's value in the
    order of :func:`paramserver.gradnorm.block_sums` (the same float64 adds, so the same bits)."""
    v = y.view(-1, BLOCK_ROWS, BLOCK_COLS)
    rows = BLOCK_ROWS
    while rows > 1:
        rows //= 2
        v[:, :rows].add_(v[:, rows : 2 * rows])
    z = v[:, 0, :]
    cols = BLOCK_COLS
    while cols > 1:
        cols //= 2
        z[:, :cols].add_(z[:, cols : 2 * cols])
    return z[:, 0]


def norm_part(
    read: GradReader,
    spans: Sequence[tuple[int, int]],
    total: int,
    outside: Sequence[tuple[int, int]] = (),
    device: torch.device | None = None,
) -> NormPart:
    """This shard's NormPart: `spans` are its (flat start, length) in local order, `total` the
    size of the flat space, `outside` local [start, end) ranges that count as zeros (frozen)."""
    device = device or torch.device("cpu")
    chunk = CHUNK_BLOCKS * BLOCK
    scratch = torch.empty(0, dtype=torch.float64, device=device)
    values: list[torch.Tensor] = []
    pieces: list[Piece] = []
    for r in regions(spans, total):
        if r.shared:
            x = read(r.local, r.length).to("cpu", torch.float32, copy=True)
            _zero(x, r.local, outside)
            pieces.append(Piece(r.start // BLOCK, r.start % BLOCK, x.numpy()))
            continue
        for off in range(0, r.length, chunk):
            n = min(chunk, r.length - off)
            padded = -(-n // BLOCK) * BLOCK
            if scratch.numel() < padded:
                scratch = torch.empty(chunk, dtype=torch.float64, device=device)
            y = scratch[:padded]
            y[:n].copy_(read(r.local + off, n))
            y[n:].zero_()
            _zero(y, r.local + off, outside)
            y.mul_(y)
            values.append(block_sums(y).clone())
    blocks = torch.cat(values).cpu().numpy() if values else torch.zeros(0, dtype=torch.float64).numpy()
    return NormPart(blocks, tuple(pieces))


def _zero(x: torch.Tensor, local: int, outside: Sequence[tuple[int, int]]) -> None:
    """Zero the elements of x (starting at local offset `local`) inside the `outside` ranges."""
    end = local + x.numel()
    for a, b in outside:
        a, b = max(a, local), min(b, end)
        if a < b:
            x[a - local : b - local].zero_()
