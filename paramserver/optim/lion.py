"""Lion (Chen et al. 2023) and Tiger in its plain form (Lion with beta1 == beta2).

optimizers.md section 4, with the op order of lucidrains' lion-pytorch (bit-identical to it):

    p = p * (1 - lr*wd)
    p = p - lr * sign(b1*m + (1-b1)*g)        sign(0) = 0
    m = b2*m + (1-b2)*g

Element-wise; each parameter piece is updated with the same per-tensor ops torch would run.
Tiger's author's full rule (per-tensor relative lr, NaN guard, no decay for biases and norms)
needs per-tensor scalars across shards and is not implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, Segments, State, register, require, views


@dataclass(frozen=True, kw_only=True)
class LionHyper:
    """Hyperparameters of Lion (lion-pytorch defaults)."""

    lr: float = 1e-4
    """Learning rate before the schedule (3-10x below AdamW's)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Interpolation factor of the update direction, and EMA factor of the momentum."""
    weight_decay: float = 0.0
    """Decoupled decay: p *= 1 - lr * weight_decay (3-10x above AdamW's)."""


@dataclass(frozen=True, kw_only=True)
class TigerHyper:
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
    segments: Segments,
) -> None:
    """One Lion step in place over the pieces (m is the flat momentum)."""
    ps, gs, ms = list(params), list(grads), views(m, segments)
    torch._foreach_mul_(ps, 1.0 - lr * wd)
    update = torch._foreach_mul(ms, b1)
    torch._foreach_add_(update, gs, alpha=1.0 - b1)
    torch._foreach_sign_(update)
    torch._foreach_add_(ps, update, alpha=-lr)
    torch._foreach_mul_(ms, b2)
    torch._foreach_add_(ms, gs, alpha=1.0 - b2)


@register
class Lion(Optimizer):
    """Lion's update rule."""

    name = "lion"
    Hyper: ClassVar[type[Any]] = LionHyper

    def betas(self) -> tuple[float, float]:
        """(beta1, beta2)."""
        b1, b2 = self.hyper.betas
        return float(b1), float(b2)

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        require(self.hyper.lr >= 0, f"{field}.lr", "must be >= 0")
        require(self.hyper.weight_decay >= 0, f"{field}.weight_decay", "must be >= 0")
        self._check_betas(field)

    def _check_betas(self, field: str) -> None:
        for i, b in enumerate(self.betas()):
            require(0 <= b <= 1, f"{field}.betas[{i}]", "must be in [0, 1]")

    def init_state(self, params: torch.Tensor) -> State:
        """A zero momentum."""
        return {"exp_avg": torch.zeros_like(params)}

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, lr: float, segments: Segments) -> None:
        """One Lion step in place."""
        b1, b2 = self.betas()
        lion_update(params, grads, state["exp_avg"], lr, self.hyper.weight_decay, b1, b2, segments)


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
