"""Synchronous-step bookkeeping shared by shards and the coordinator (pure).

Each shard reduces its slice of the averaged gradient to a few scalars
(:class:`ShardStats`); the coordinator turns the stats of every shard into
one :class:`Decision` (:func:`decide`), which every shard applies alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from paramserver.errors import Reason

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
    sumsq: float
    """Sum of squares of this shard's slice of G / N (inf or nan if non-finite)."""
    loss_terms: int
    """Sum of the workers' loss_terms as this shard received them."""


@dataclass(frozen=True)
class Decision:
    """The coordinator's answer for a step, the same for every shard."""

    step: int
    apply: bool
    skip_reason: str
    grad_norm: float
    clip_coef: float
    loss_terms: int


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


def decide(step: int, stats: Sequence[ShardStats], max_grad_norm: float) -> Decision:
    """Combine every shard's stats into one decision.

    Skips when the shards disagree on the loss-term count, when it is 0, or
    when the global norm is not finite; otherwise the clip coefficient is
    min(max_grad_norm / (norm + 1e-6), 1) as in torch.nn.utils.clip_grad_norm_.
    """
    terms = {s.loss_terms for s in stats}
    n = max(terms) if terms else 0
    norm = math.sqrt(math.fsum(s.sumsq for s in stats)) if all(math.isfinite(s.sumsq) for s in stats) else math.inf
    if len(terms) > 1:
        return Decision(step, False, Reason.INCONSISTENT_LOSS_TERMS, norm, 1.0, n)
    if n == 0:
        return Decision(step, False, Reason.NO_LOSS_TERMS, 0.0, 1.0, 0)
    if not math.isfinite(norm):
        return Decision(step, False, Reason.NON_FINITE_GRADIENT, norm, 1.0, n)
    coef = 1.0
    if max_grad_norm > 0:
        coef = min(max_grad_norm / (norm + CLIP_EPS), 1.0)
    return Decision(step, True, "", norm, coef, n)
