"""The global gradient norm, computed so that its bits do not depend on how the model is split
over shards (pure: numpy only, no torch; the coordinator combines what the shards send).

The flat space is cut into fixed blocks of :data:`BLOCK` elements (block k covers
``[k * BLOCK, (k + 1) * BLOCK)``; the last one is padded with zeros). A block's value is the sum
of its elements' squares in float64 (every square of a float32 is exact in float64) added in one
fixed order (:func:`block_sums`: rows halved onto each other, then columns), so it is a function
of the block's elements only, whatever shard, tile or buffer holds them. The squared norm is the
exact sum of every block's value, rounded once (:func:`math.fsum`), so it does not depend on
the order in which blocks arrive either.

A shard computes the value of every block it holds entirely (:class:`NormPart.blocks`); of a
block cut by a shard boundary it sends the elements it holds (:class:`Piece`: fewer than BLOCK
float32 values, at most two per contiguous range), and :func:`sum_of_squares` assembles those
blocks and sums them with the same function. One shard, three or five: the same bits, hence the
same clip coefficient and spike-guard decision.

Elements outside the norm (parameters a rule freezes this step, as LISA does) count as zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

#: Rows x columns of a block: rows are halved onto each other (contiguous adds), then columns.
BLOCK_ROWS = 512
BLOCK_COLS = 16
#: Elements per block of the norm's fixed reduction.
BLOCK = BLOCK_ROWS * BLOCK_COLS


def block_sums(x: np.ndarray) -> np.ndarray:
    """The float64 value of each block of `x` (float32, a multiple of BLOCK elements): the sum of
    its squares in the fixed order. The reference implementation; shards may run the same order
    on another array library (the adds are IEEE float64, so the bits agree)."""
    if x.size % BLOCK:
        raise ValueError(f"{x.size} elements is not a multiple of the block ({BLOCK})")
    y = np.multiply(x, x, dtype=np.float64).reshape(-1, BLOCK_ROWS, BLOCK_COLS)
    rows = BLOCK_ROWS
    while rows > 1:
        rows //= 2
        y[:, :rows] += y[:, rows : 2 * rows]
    z = y[:, 0, :]
    cols = BLOCK_COLS
    while cols > 1:
        cols //= 2
        z[:, :cols] += z[:, cols : 2 * cols]
    out: np.ndarray = z[:, 0].copy()
    return out


@dataclass(frozen=True)
class Piece:
    """The elements a shard holds of a block that a shard boundary cuts."""

    block: int
    """The block's index in the flat space."""
    offset: int
    """Where the elements start inside the block."""
    values: np.ndarray
    """float32 values (zeros where outside the norm)."""


@dataclass(frozen=True)
class NormPart:
    """One shard's share of the squared gradient norm."""

    blocks: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """float64 values of the blocks this shard holds entirely."""
    pieces: tuple[Piece, ...] = ()
    """What it holds of the blocks it shares with other shards."""

    @classmethod
    def of(cls, *values: float) -> NormPart:
        """A part made of ready block values (tests, and tools that have a sum of squares)."""
        return cls(np.asarray(values, dtype=np.float64))


def sum_of_squares(parts: Iterable[NormPart]) -> float:
    """The squared global norm: every shard's block values plus the blocks assembled from pieces,
    summed exactly and rounded once; inf if some value is infinite, nan if some is nan."""
    values: list[np.ndarray] = []
    shared: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    for part in parts:
        values.append(np.asarray(part.blocks, dtype=np.float64))
        for p in part.pieces:
            if not (0 <= p.offset and p.offset + p.values.size <= BLOCK):
                raise ValueError(f"piece [{p.offset}, {p.offset + p.values.size}) is outside block {p.block}")
            buf = shared.setdefault(p.block, np.zeros(BLOCK, dtype=np.float32))
            buf[p.offset : p.offset + p.values.size] = p.values
            filled[p.block] = filled.get(p.block, 0) + p.values.size
    if any(n > BLOCK for n in filled.values()):
        raise ValueError("overlapping pieces of a shared block")
    if shared:
        values.append(block_sums(np.concatenate([shared[k] for k in sorted(shared)])))
    flat = np.concatenate(values) if values else np.zeros(0)
    if np.isnan(flat).any():
        return math.nan
    if np.isinf(flat).any():
        return math.inf
    try:
        return math.fsum(flat.tolist())
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class Region:
    """A run of a shard's elements as the norm sees it."""

    start: int
    """First element in the flat space."""
    length: int
    """Elements (the whole run: several entire blocks, or the part of one shared block)."""
    local: int
    """First element in the shard's local space."""
    shared: bool
    """True for the part of a block that other shards hold the rest of (a :class:`Piece`)."""


def regions(spans: Sequence[tuple[int, int]], total: int) -> Iterator[Region]:
    """Cut a shard's spans ((flat start, length) in local order) into runs of entire blocks and
    parts of shared blocks. A block counts as entire when the shard holds all of its elements
    below `total` (the last block is padded with zeros)."""
    local = 0
    for start, length in spans:
        end = start + length
        pos = start
        while pos < end:
            k = pos // BLOCK
            block_end = min((k + 1) * BLOCK, total)
            if pos == k * BLOCK and block_end <= end:  # entire blocks from here
                last = end if end == total else (end // BLOCK) * BLOCK
                yield Region(pos, last - pos, local + pos - start, False)
                pos = last
            else:
                stop = min(block_end, end)
                yield Region(pos, stop - pos, local + pos - start, True)
                pos = stop
        local += length
