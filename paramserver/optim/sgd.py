"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD semantics).

optimizers.md section 1: d = g + wd*p; the first momentum step copies d;
then buf = momentum*buf + (1-dampening)*d; d = d + momentum*buf (Nesterov) or
buf; p -= lr*d. Runs torch's fused kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.optim.sgd import sgd as _torch_sgd

from paramserver.optim.base import Optimizer, Segments, State, fused_supported, register, require, views


@dataclass(frozen=True, kw_only=True)
class SGDHyper:
    """Hyperparameters of SGD."""

    lr: float = 1e-3
    """Learning rate before the schedule."""
    momentum: float = 0.0
    """Heavy-ball momentum factor (0 = none)."""
    dampening: float = 0.0
    """Dampening of the momentum's gradient term."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0 and dampening == 0)."""


@register
class SGD(Optimizer):
    """torch.optim.SGD's update rule."""

    name = "sgd"
    Hyper = SGDHyper
    hyper: SGDHyper

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        require(h.lr >= 0, f"{field}.lr", "must be >= 0")
        require(h.momentum >= 0, f"{field}.momentum", "must be >= 0")
        require(h.weight_decay >= 0, f"{field}.weight_decay", "must be >= 0")
        if h.nesterov:
            require(h.momentum > 0 and h.dampening == 0, f"{field}.nesterov", "needs momentum > 0 and dampening == 0")

    def init_state(self, params: torch.Tensor) -> State:
        """No state until the first step (the momentum buffer starts as a copy of d)."""
        return {}

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, lr: float, segments: Segments) -> None:
        """One SGD step in place."""
        h = self.hyper
        flat_buf = state.get("momentum_buffer")
        ps = list(params)
        bufs: list[torch.Tensor | None] = list(views(flat_buf, segments)) if flat_buf is not None else [None] * len(ps)
        _torch_sgd(
            ps,
            list(grads),
            bufs,
            fused=fused_supported(ps[0]),
            weight_decay=h.weight_decay,
            momentum=h.momentum,
            lr=lr,
            dampening=h.dampening,
            nesterov=h.nesterov,
            maximize=False,
        )
        if h.momentum != 0 and flat_buf is None:  # the first step created one buffer per segment
            state["momentum_buffer"] = torch.cat([b for b in bufs if b is not None]) if len(bufs) > 1 else bufs[0]  # type: ignore[assignment]
