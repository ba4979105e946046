"""Optimizer health per parameter group, measured by a shard on sampled steps: the averaged
gradient's sum of squares (accumulated by float32 BLAS: a metric, not the clip norm, which
paramserver.gradnorm computes exactly), and the update's and the parameters' sums of squares
over a sample (in float64).

The front door combines every shard's sums (paramserver.metrics): the group's gradient norm is
sqrt(sum of the shards' gradient squares), over the whole group; the update/parameter RMS
ratio is sqrt(sum of update squares / sum of parameter squares) over the first SAMPLE elements
of the group on each shard (reading all the parameters twice a step would cost as much as the
update). Measured every EVERY-th step (step 0 included); nothing is measured on skipped steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from paramserver.placement import Span

if TYPE_CHECKING:
    from paramserver.shard import ShardState

#: Steps between two measurements.
EVERY = 10
#: Elements per group per shard whose update is measured.
SAMPLE = 65_536


def sampled(step: int) -> bool:
    """Whether step `step` is measured."""
    return step % EVERY == 0


def group_spans(state: ShardState) -> dict[int, list[Span]]:
    """Each parameter group's ranges of the flat space held by this shard, in order."""
    out: dict[int, list[Span]] = {}
    for p, group in zip(state.config.layout(), state.config.assign(), strict=True):
        for s in state.spans:
            start, end = max(s.start, p.offset), min(s.end, p.offset + p.numel)
            if start < end:
                out.setdefault(group, []).append(Span(start, end - start))
    return out


def head(spans: list[Span], limit: int) -> list[Span]:
    """The first `limit` elements of `spans`."""
    out, left = [], limit
    for s in spans:
        if left <= 0:
            break
        out.append(Span(s.start, min(s.length, left)))
        left -= out[-1].length
    return out


def _values(state: ShardState, spans: list[Span]) -> torch.Tensor:
    """A float64 copy of the current parameters over `spans`."""
    if not spans:
        return torch.zeros(0, dtype=torch.float64)
    blocks = [b.to("cpu", torch.float64, copy=True).reshape(-1) for _, b in state.publication(spans).blocks]
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.float64)


class HealthProbe:
    """Started just before a step's update (the reduced gradient is in place), finished just
    after: ``{group: (step, grad_sq, update_sq, param_sq)}``."""

    def __init__(self, state: ShardState) -> None:
        self.state = state
        self.groups = group_spans(state)
        self.samples = {g: head(spans, SAMPLE) for g, spans in self.groups.items()}
        self.before = {g: _values(state, spans) for g, spans in self.samples.items()}
        self.grad_sq = {g: self._grad_sq(spans) for g, spans in self.groups.items()}

    def _grad_sq(self, spans: list[Span]) -> float:
        grad = self.state.step_gradient()
        if grad is None:
            return 0.0
        total = 0.0
        for s in spans:
            local = self.state.local_of(s.start, s.length)
            if local is None:
                continue
            (values,) = grad.read([(local, s.length)])
            total += float(torch.dot(values, values))  # float32 BLAS (a metric: no float64 copy of the gradient)
        return total

    def finish(self, step: int) -> dict[int, tuple[int, float, float, float]]:
        """The sums for `step`, measured after its update."""
        out = {}
        for g, spans in self.samples.items():
            after = _values(self.state, spans)
            before = self.before[g]
            diff = after - before
            out[g] = (step, self.grad_sq[g], float(torch.dot(diff, diff)), float(torch.dot(before, before)))
        return out
