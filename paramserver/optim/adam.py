"""Adam, AdamW and AMSGrad (torch.optim.Adam / AdamW semantics).

optimizers.md section 2. AdamW decays p *= 1 - lr*wd before the moments;
Adam adds wd*p to the gradient. Bias correction and eps after it, as torch.
Runs torch's fused kernel (the CPU fused AdamW is ~5x foreach on this machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim.adam import adam as _torch_adam

from paramserver.optim.base import Optimizer, Segments, State, fused_supported, register, require, views


@dataclass(frozen=True, kw_only=True)
class AdamHyper:
    """Hyperparameters of Adam (weight_decay is an L2 penalty)."""

    lr: float = 1e-3
    """Learning rate before the schedule."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moments."""
    eps: float = 1e-8
    """Added to the bias-corrected sqrt of the second moment."""
    weight_decay: float = 0.0
    """Adam: L2 penalty; AdamW: decoupled decay factor."""
    amsgrad: bool = False
    """Keep the running maximum of the second moment."""


@dataclass(frozen=True, kw_only=True)
class AdamWHyper(AdamHyper):
    """Hyperparameters of AdamW (decoupled weight decay, default 1e-2)."""

    weight_decay: float = 1e-2
    """Decoupled decay: p *= 1 - lr * weight_decay each step."""


@register
class Adam(Optimizer):
    """torch.optim.Adam's update rule."""

    name = "adam"
    Hyper: ClassVar[type[Any]] = AdamHyper
    hyper: AdamHyper
    decoupled: ClassVar[bool] = False

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        require(h.lr >= 0, f"{field}.lr", "must be >= 0")
        require(h.eps >= 0, f"{field}.eps", "must be >= 0")
        require(h.weight_decay >= 0, f"{field}.weight_decay", "must be >= 0")
        for i, b in enumerate(h.betas):
            require(0 <= b < 1, f"{field}.betas[{i}]", "must be in [0, 1)")

    def init_state(self, params: torch.Tensor) -> State:
        """Zero moments and a step counter of 0."""
        state: State = {
            "step": torch.zeros((), dtype=torch.float32, device=params.device),
            "exp_avg": torch.zeros_like(params),
            "exp_avg_sq": torch.zeros_like(params),
        }
        if self.hyper.amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(params)
        return state

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, lr: float, segments: Segments) -> None:
        """One Adam(W) step in place."""
        h = self.hyper
        ps = list(params)
        vmax = views(state["max_exp_avg_sq"], segments) if h.amsgrad else []
        # torch keeps one step counter per tensor and the kernel increments each: give it
        # copies, then advance the shard's single counter.
        steps = [state["step"].clone() for _ in ps]
        _torch_adam(
            ps,
            list(grads),
            views(state["exp_avg"], segments),
            views(state["exp_avg_sq"], segments),
            vmax,
            steps,
            fused=fused_supported(ps[0]),
            decoupled_weight_decay=self.decoupled,
            amsgrad=h.amsgrad,
            beta1=h.betas[0],
            beta2=h.betas[1],
            lr=lr,
            weight_decay=h.weight_decay,
            eps=h.eps,
            maximize=False,
        )
        state["step"].add_(1)


@register
class AdamW(Adam):
    """torch.optim.AdamW's update rule (Adam with decoupled weight decay)."""

    name = "adamw"
    Hyper: ClassVar[type[Any]] = AdamWHyper
    decoupled: ClassVar[bool] = True
