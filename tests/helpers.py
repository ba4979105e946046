"""Small helpers shared by the unit tests (pure; no Ray, no gRPC)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from paramserver.grad_buffers import GradBuffer
from paramserver.optim.base import Param, Piece, Step
from paramserver.shard import Contribution, Landed, ShardState
from paramserver.wire import encode_blocks, wire_tensor
from paramserver_client.codec import FLOAT32, TRAIN, encode


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


# ---- shard states fed directly (no runtime, no gRPC) ------------------------------------------


def stage(state: ShardState, values: np.ndarray, dtype: int = FLOAT32, seed: int = 0, chunk: int = 1 << 14) -> GradBuffer:
    """A buffer holding this shard's elements of flat `values`, written as a stream of chunks
    would be (in a shuffled order, decoded from `dtype` wire bytes)."""
    buf = state.grads.acquire()
    chunks = [(a, min(chunk, s.end - a)) for s in state.spans for a in range(s.start, s.end, chunk)]
    np.random.default_rng(seed).shuffle(chunks)
    landed = []
    for a, n in chunks:
        local = state.local_of(a, n)
        assert local is not None
        buf.write(local, wire_tensor(encode(values[a : a + n], dtype), dtype))
        landed.append(Landed(local, n))
    state.check_coverage(landed)
    return buf


def load(state: ShardState, values: np.ndarray) -> None:
    """Upload flat `values` as the initial parameters."""
    state.load(stage(state, values))


def set_gradient(state: ShardState, local: torch.Tensor) -> None:
    """Make `local` (this shard's elements in local order) the step's reduced gradient."""
    buf = state.grads.acquire()
    buf.write(0, local)
    state.reduce([Contribution(0, 1, buf)])


def pulled(state: ShardState, dtype: int = FLOAT32, point: int = TRAIN) -> list[tuple[int, int, bytes]]:
    """The encoded chunk messages a pull of the whole shard would stream."""
    with state.lock:
        return list(encode_blocks(state.publication((), point).blocks, dtype))


def local_params(state: ShardState) -> np.ndarray:
    """This shard's parameters in local order."""
    return state.snapshot_tensors()["params"].numpy()


def flat_params(states: Sequence[ShardState]) -> np.ndarray:
    """Every shard's parameters assembled in the flat space."""
    out = np.full(states[0].total, np.nan, dtype=np.float32)
    for st in states:
        local, pos = local_params(st), 0
        for span in st.spans:
            out[span.start : span.end] = local[pos : pos + span.length]
            pos += span.length
    return out
