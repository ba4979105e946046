"""The flat parameter space and the placement plan (which shard owns which ranges).

Parameters are laid end to end in one flat fp32 space in the order of the
model description. The plan gives each shard a list of ranges, balanced by
bytes. Element-wise optimizers may split a tensor anywhere; a parameter
marked ``whole`` is never split (it goes to the least-loaded shard).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from paramserver.errors import ConfigError

#: Cuts inside a tensor fall on multiples of this many elements from the tensor's start (64 bytes
#: of fp32: a cache line, and a multiple of every SIMD width). torch's fused CPU kernels vectorise
#: from a tensor's start and finish with a scalar tail that may round differently, so aligned cuts
#: make a sharded update bit-identical to the unsharded one.
ALIGN = 16


@dataclass(frozen=True, order=True)
class Span:
    """A half-open range [start, start + length) of the flat space, in elements."""

    start: int
    length: int

    @property
    def end(self) -> int:
        """One past the last element."""
        return self.start + self.length


@dataclass(frozen=True)
class ParamLayout:
    """One parameter's place in the flat space."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        """Number of elements (1 for a scalar)."""
        return math.prod(self.shape)


def layout(params: Sequence[tuple[str, tuple[int, ...]]]) -> list[ParamLayout]:
    """Lay parameters end to end; names must be unique and non-empty, dims >= 1."""
    seen: set[str] = set()
    out: list[ParamLayout] = []
    offset = 0
    for i, (name, shape) in enumerate(params):
        field = f"spec.parameters[{i}]"
        if not name:
            raise ConfigError(f"{field}.name", "must not be empty")
        if name in seen:
            raise ConfigError(f"{field}.name", f"duplicate parameter name {name!r}")
        if any(d < 1 for d in shape):
            raise ConfigError(f"{field}.shape", f"every dimension must be >= 1, got {list(shape)}")
        seen.add(name)
        p = ParamLayout(name, tuple(shape), offset)
        out.append(p)
        offset += p.numel
    if not out:
        raise ConfigError("spec.parameters", "the model description is empty")
    return out


def plan(params: Sequence[ParamLayout], num_shards: int, whole: Sequence[bool] | None = None, align: int = ALIGN) -> list[list[Span]]:
    """Assign the flat space to `num_shards` shards, balanced by element count (= bytes).

    Without ``whole`` constraints each shard gets one contiguous range of about
    total / num_shards elements. A cut inside a tensor is moved to the nearest
    multiple of ``align`` elements from that tensor's start (or to its edge), so
    shards stay balanced to within ``align`` elements; the flat offsets of cuts
    are otherwise arbitrary (odd when the tensor starts at an odd offset). If
    aligned cuts would leave a shard empty, the cuts are not aligned.
    Parameters with ``whole[i]`` set are first placed
    intact, largest first, on the least-loaded shard; the remaining elements
    fill the shards up to the balanced target in flat order, cut on multiples
    of ``align`` from each tensor's start as well.
    """
    total = sum(p.numel for p in params)
    if num_shards < 1:
        raise ConfigError("spec.num_shards", "must be >= 1")
    if num_shards > total:
        raise ConfigError("spec.num_shards", f"{num_shards} shards for {total} elements: every shard needs at least one")
    whole = list(whole) if whole is not None else [False] * len(params)
    if not any(whole):
        base, extra = divmod(total, num_shards)
        ideal = [k * base + min(k, extra) for k in range(num_shards + 1)]
        cuts = [0, *(_aligned(params, c, align) for c in ideal[1:-1]), total]
        if any(b <= a for a, b in itertools.pairwise(cuts)):
            cuts = ideal
        return [[Span(a, b - a)] for a, b in itertools.pairwise(cuts)]
    return _plan_with_whole(params, num_shards, whole, total, align)


def _plan_with_whole(params: Sequence[ParamLayout], num_shards: int, whole: list[bool], total: int, align: int) -> list[list[Span]]:
    target = math.ceil(total / num_shards)
    loads = [0] * num_shards
    spans: list[list[Span]] = [[] for _ in range(num_shards)]
    for i in sorted((i for i, w in enumerate(whole) if w), key=lambda i: -params[i].numel):
        k = min(range(num_shards), key=lambda j: (loads[j], j))
        spans[k].append(Span(params[i].offset, params[i].numel))
        loads[k] += params[i].numel
    k = 0
    for i, p in enumerate(params):
        if whole[i]:
            continue
        done = 0  # elements of p placed so far (a multiple of align, or all of them)
        while done < p.numel:
            while k < num_shards - 1 and loads[k] >= target:
                k += 1
            cut = p.numel if k == num_shards - 1 else min(p.numel, done + target - loads[k])
            if cut < p.numel:  # a cut inside the tensor: on a multiple of align from its start
                aligned = round(cut / align) * align
                cut = min(p.numel, aligned if aligned > done else math.ceil(cut / align) * align)
            spans[k].append(Span(p.offset + done, cut - done))
            loads[k] += cut - done
            done = cut
    if any(not s for s in spans):
        raise ConfigError("spec.num_shards", "too many shards for the tensors that must stay whole")
    return [_merge(sorted(s)) for s in spans]


def _aligned(params: Sequence[ParamLayout], cut: int, align: int) -> int:
    """Move a cut inside a tensor to the nearest multiple of align from the tensor's start."""
    for p in params:
        if p.offset < cut < p.offset + p.numel:
            rel = round((cut - p.offset) / align) * align
            return p.offset + min(rel, p.numel)
    return cut


def _merge(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for s in spans:
        if out and out[-1].end == s.start:
            out[-1] = Span(out[-1].start, out[-1].length + s.length)
        else:
            out.append(s)
    return out
