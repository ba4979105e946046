"""Small helpers shared by the unit tests (pure; no Ray, no gRPC)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from paramserver.optim.base import Param, Piece, Step


def pieces(shapes: Sequence[tuple[int, ...]], segments: Sequence[tuple[int, int]] | None = None, names: Sequence[str] = ()) -> list[Piece]:
    """Pieces of parameters laid end to end: whole parameters, or the given flat (start, length)
    segments, each inside one parameter (the group's flat state covers every element)."""
    params, offsets, pos = [], [], 0
    for i, shape in enumerate(shapes):
        params.append(Param(i, names[i] if i < len(names) else f"p{i}", tuple(shape)))
        offsets.append(pos)
        pos += math.prod(shape)
    if segments is None:
        segments = [(o, p.numel) for o, p in zip(offsets, params, strict=True)]
    out = []
    for a, n in segments:
        k = max(i for i, o in enumerate(offsets) if o <= a)
        assert a + n <= offsets[k] + params[k].numel, "a segment crosses a parameter boundary"
        out.append(Piece(params[k], a - offsets[k], n, a))
    return out


def step(lr: float, ps: Sequence[Piece], count: int = 0, tensors: dict[int, dict[str, object]] | None = None) -> Step:
    """A Step over pieces (per-parameter state created by the caller when the rule has some)."""
    return Step(lr, ps, tensors if tensors is not None else {}, count)  # type: ignore[arg-type]
