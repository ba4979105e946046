"""Lion (Chen et al. 2023) and plain Tiger (Lion with beta1 == beta2), optionally Cautious.

optimizers.md section 4, with the op order of lucidrains' lion-pytorch (bit-identical to it):

    p = p * (1 - lr*wd)
    p = p - lr * sign(b1*m + (1-b1)*g)        sign(0) = 0
    m = b2*m + (1-b2)*g

Element-wise; each parameter piece is updated with lion-pytorch's per-tensor ops, block by block
(:func:`paramserver.optim.base.blocks`) so that the four passes reuse the cache.
With ``cautious`` (C-Lion, section 8) the sign update is masked per tensor, with the op order of
lion-pytorch's cautious_lion (bit-identical to it with cautious_clamp 1e-5); that needs whole
tensors. Tiger's author's full rule is :mod:`paramserver.optim.tiger`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, State, Step, blocks, check_betas, check_nonnegative, register, require, views
from paramserver.optim.cautious import CautiousOptions, apply_cautious, check_cautious


@dataclass(frozen=True, kw_only=True)
class LionHyper(CautiousOptions):
    """Hyperparameters of Lion (lion-pytorch defaults)."""

    lr: float = 1e-4
    """Learning rate before the schedule (3-10x below AdamW's)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Interpolation factor of the update direction, and EMA factor of the momentum."""
    weight_decay: float = 0.0
    """Decoupled decay: p *= 1 - lr * weight_decay (3-10x above AdamW's)."""


@dataclass(frozen=True, kw_only=True)
class TigerHyper(CautiousOptions):
    """Hyperparameters of plain Tiger (the author's defaults)."""

    lr: float = 1e-3
    """Learning rate before the schedule."""
    beta: float = 0.965
    """Momentum factor, used as both of Lion's betas."""
    weight_decay: float = 0.01
    """Decoupled decay: p *= 1 - lr * weight_decay."""


def lion_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    m: torch.Tensor,
    lr: float,
    wd: float,
    b1: float,
    b2: float,
    segments: Sequence[tuple[int, int]],
    cautious: CautiousOptions | None = None,
) -> None:
    """One Lion step in place over the pieces (m is the flat momentum): block by block, or with
    the Cautious mask tensor by tensor (each piece then a whole tensor)."""
    for p, g, exp_avg in zip(params, grads, views(m, segments), strict=True):
        for a, b in blocks(p.numel()) if cautious is None else [(0, p.numel())]:
            pb, gb, mb = p[a:b], g[a:b], exp_avg[a:b]
            update = mb.clone().mul_(b1).add_(gb, alpha=1.0 - b1).sgn_()
            if cautious is not None:
                apply_cautious(update, gb, cautious)
            if wd != 0:  # (a multiplication by 1.0 changes no bit)
                pb.mul_(1.0 - lr * wd)
            pb.add_(update, alpha=-lr)
            mb.mul_(b2).add_(gb, alpha=1.0 - b2)


@register
class Lion(Optimizer):
    """Lion's update rule."""

    name = "lion"
    Hyper: ClassVar[type[Any]] = LionHyper

    def betas(self) -> tuple[float, float]:
        """(beta1, beta2)."""
        b1, b2 = self.hyper.betas
        return float(b1), float(b2)

    @property
    def whole_tensors(self) -> bool:
        """Only the Cautious mask needs whole tensors."""
        return bool(self.hyper.cautious)

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        check_nonnegative(self.hyper, field, "lr", "weight_decay")
        self._check_betas(field)
        check_cautious(self.hyper, field)

    def _check_betas(self, field: str) -> None:
        check_betas(self.betas(), f"{field}.betas", closed=True)

    def init_state(self, params: torch.Tensor) -> State:
        """A zero momentum."""
        return {"exp_avg": torch.zeros_like(params)}

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One Lion step in place."""
        b1, b2 = self.betas()
        wd = self.hyper.weight_decay
        cautious = self.hyper if self.hyper.cautious else None
        lion_update(params, grads, state["exp_avg"], step.lr, wd, b1, b2, step.segments, cautious)


@register
class Tiger(Lion):
    """Tiger in its plain form: Lion with beta1 == beta2 == beta."""

    name = "tiger"
    Hyper: ClassVar[type[Any]] = TigerHyper

    def betas(self) -> tuple[float, float]:
        """(beta, beta)."""
        return float(self.hyper.beta), float(self.hyper.beta)

    def _check_betas(self, field: str) -> None:
        require(0 <= self.hyper.beta <= 1, f"{field}.beta", "must be in [0, 1]")
