"""Synchronous-step bookkeeping shared by shards and the coordinator (pure).

Each shard reduces its slice of the averaged gradient to a few scalars
(:class:`ShardStats`); the coordinator turns the stats of every shard into
one :class:`Decision` (:func:`decide`), which every shard applies alike.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from paramserver.errors import Reason
from paramserver.gradnorm import NormPart, sum_of_squares
from paramserver.membership import Roster

#: torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
CLIP_EPS = 1e-6


class Outcome(Enum):
    """What became of a step (mirrors paramserver.v1.StepOutcome)."""

    PENDING = 1
    APPLIED = 2
    SKIPPED = 3


@dataclass(frozen=True)
class ShardStats:
    """One shard's scalars for a step."""

    shard: int
    norm: NormPart
    """This shard's share of the squared norm of G / N (see paramserver.gradnorm)."""
    loss_terms: int
    """Sum of the workers' loss_terms as this shard received them."""
    contributors: tuple[tuple[int, int], ...] = ()
    """(worker id, lease) of the contributions reduced, ascending: every shard must reduce the same."""
    generation: int = 0
    """The job's generation the shard serves (a report of a generation a recovery replaced is refused)."""
    lrs: tuple[tuple[float, ...], ...] = ()
    """The distinct group-lr lists its contributors sent (``()`` in it = the job's schedule)."""


@dataclass(frozen=True)
class Decision:
    """The coordinator's answer for a step, the same for every shard."""

    step: int
    apply: bool
    skip_reason: str
    grad_norm: float
    clip_coef: float
    loss_terms: int
    workers: tuple[int, ...] = ()
    """The workers whose gradients made the step."""
    missing: tuple[int, ...] = ()
    """Members removed while the step was open whose gradients are not in it."""
    lrs: tuple[float, ...] = ()
    """Each group's lr for the step, from the training loop (empty = the job's schedule)."""


@dataclass(frozen=True)
class Redo:
    """The coordinator's answer when a shard reduced another set of contributions than the job's
    members: adopt `roster`, drop what is not in it and reduce again once every member is in."""

    step: int
    roster: Roster


@dataclass(frozen=True)
class StepReport:
    """What a shard reports of a processed step (mirrors paramserver.v1.StepReport)."""

    step: int
    outcome: Outcome
    skip_reason: str
    grad_norm: float
    clip_coef: float
    lr: float
    loss_terms: int
    workers: tuple[int, ...] = ()
    missing_workers: tuple[int, ...] = ()


class SpikeGuard:
    """Skip steps whose pre-clip gradient norm is a spike (optimizers.md section 13, OLMo-core).

    A finite norm above mean + k * std of the previous `window` finite norms is a spike, once at
    least `warmup` norms were seen. Every finite norm (spikes included) enters the window;
    non-finite ones never do (they are skipped as NON_FINITE_GRADIENT anyway).
    """

    def __init__(self, window: int, warmup: int, k: float, history: Sequence[float] = ()) -> None:
        self.window, self.warmup, self.k = window, warmup, k
        self.norms: collections.deque[float] = collections.deque(history, maxlen=window)

    def is_spike(self, norm: float) -> bool:
        """Whether `norm` is a spike; records it."""
        spike = False
        if len(self.norms) >= self.warmup and len(self.norms) >= 2:
            mean = statistics.fmean(self.norms)
            spike = norm > mean + self.k * statistics.pstdev(self.norms, mean)
        self.norms.append(norm)
        return spike


def decide(
    step: int, stats: Sequence[ShardStats], max_grad_norm: float, guard: SpikeGuard | None = None, nan_handled: bool = False
) -> Decision:
    """Combine every shard's stats into one decision.

    The global norm is computed from fixed blocks of the flat space (paramserver.gradnorm),
    so the decision does not depend on the shard count. Skips when the shards disagree on the
    loss-term count, when it is 0, when the global norm is not finite, when the guard calls it a spike,
    or when the workers sent different group lrs (LR_MISMATCH; one shared list becomes the
    decision's `lrs`, overriding the job's schedule for the step);
    otherwise the clip coefficient is min(max_grad_norm / (norm + 1e-6), 1) as
    in torch.nn.utils.clip_grad_norm_. With `nan_handled` (every rule of the
    job guards against NaN itself, as Tiger does per tensor) a NaN norm is
    applied unclipped instead of skipped; an infinite one is still skipped.
    """
    terms = {s.loss_terms for s in stats}
    n = max(terms) if terms else 0
    norm = math.sqrt(sum_of_squares(s.norm for s in stats))  # the same bits on any shard count
    lr_lists = {lrs for s in stats for lrs in s.lrs}
    if len(lr_lists) > 1:
        return Decision(step, False, Reason.LR_MISMATCH, norm, 1.0, n)
    lrs = next(iter(lr_lists), ())
    decision = _decide(step, n, len(terms), norm, max_grad_norm, guard, nan_handled)
    return dataclasses.replace(decision, lrs=lrs) if lrs else decision


def _decide(step: int, n: int, distinct_terms: int, norm: float, max_grad_norm: float, guard: SpikeGuard | None,
            nan_handled: bool) -> Decision:  # fmt: skip
    if distinct_terms > 1:
        return Decision(step, False, Reason.INCONSISTENT_LOSS_TERMS, norm, 1.0, n)
    if n == 0:
        return Decision(step, False, Reason.NO_LOSS_TERMS, 0.0, 1.0, 0)
    if nan_handled and math.isnan(norm):
        return Decision(step, True, "", norm, 1.0, n)
    if not math.isfinite(norm):
        return Decision(step, False, Reason.NON_FINITE_GRADIENT, norm, 1.0, n)
    if guard is not None and guard.is_spike(norm):
        return Decision(step, False, Reason.GRADIENT_SPIKE, norm, 1.0, n)
    coef = 1.0
    if max_grad_norm > 0:
        coef = min(max_grad_norm / (norm + CLIP_EPS), 1.0)
    return Decision(step, True, "", norm, coef, n)
