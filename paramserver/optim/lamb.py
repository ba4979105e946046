"""LAMB (You et al. 2019, arXiv 1904.00962, Algorithm 2; tensorflow-addons' lamb.py; optimizers.md section 6).

    m, v as Adam; r = m_hat / (sqrt(v_hat) + eps)        (no bias correction with bias_correction=False)
    u = r + wd * p
    trust = ||p|| / ||u||  if both > 0, else 1            (per tensor; adapt=False: 1)
    p = p - lr * trust * u

The trust ratio is per tensor, so LAMB needs whole tensors. Exclude biases and norms from decay
and adaptation with a param group (e.g. {"weight_decay": 0, "adapt": false}).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, State, Step, check_betas, register, require, views


@dataclass(frozen=True, kw_only=True)
class LambHyper:
    """Hyperparameters of LAMB (the paper's Algorithm 2; tfa defaults except weight decay)."""

    lr: float = 1e-3
    """Learning rate before the schedule."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the first and second moments."""
    eps: float = 1e-6
    """Added to sqrt(v_hat)."""
    weight_decay: float = 0.0
    """Added to the ratio as wd * p before the trust ratio (the paper uses 0.01)."""
    bias_correction: bool = True
    """Divide the moments by 1 - beta^t."""
    adapt: bool = True
    """Scale by the per-tensor trust ratio ||p|| / ||u|| (False: plain AdamW-like step)."""


@register
class Lamb(Optimizer):
    """LAMB's update rule on whole tensors."""

    name = "lamb"
    Hyper: ClassVar[type[Any]] = LambHyper
    hyper: LambHyper

    @property
    def whole_tensors(self) -> bool:
        """The trust ratio is per tensor."""
        return True

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        require(h.lr >= 0, f"{field}.lr", "must be >= 0")
        require(h.eps >= 0, f"{field}.eps", "must be >= 0")
        require(h.weight_decay >= 0, f"{field}.weight_decay", "must be >= 0")
        check_betas(h.betas, f"{field}.betas")

    def init_state(self, params: torch.Tensor) -> State:
        """Zero moments and a step counter of 0."""
        return {
            "step": torch.zeros((), dtype=torch.float32, device=params.device),
            "exp_avg": torch.zeros_like(params),
            "exp_avg_sq": torch.zeros_like(params),
        }

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One LAMB step in place, tensor by tensor."""
        h, lr = self.hyper, step.lr
        b1, b2 = h.betas
        state["step"].add_(1)
        t = state["step"].item()
        bc1, bc2 = (1 - b1**t, 1 - b2**t) if h.bias_correction else (1.0, 1.0)
        segments = step.segments
        for p, g, m, v in zip(params, grads, views(state["exp_avg"], segments), views(state["exp_avg_sq"], segments), strict=True):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            u = (m / bc1).div_((v / bc2).sqrt_().add_(h.eps))
            if h.weight_decay != 0:
                u.add_(p, alpha=h.weight_decay)
            if h.adapt:
                w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
                u.mul_(trust)
            p.add_(u, alpha=-lr)
