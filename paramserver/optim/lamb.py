"""LAMB (You et al. 2019, arXiv 1904.00962, Algorithm 2; tensorflow-addons' lamb.py; optimizers.md section 6).

    m, v as Adam; r = m_hat / (sqrt(v_hat) + eps)        (no bias correction with bias_correction=False)
    u = r + wd * p
    trust = ||p|| / ||u||  if both > 0, else 1            (per tensor; adapt=False: 1)
    p = p - lr * trust * u

The trust ratio is per tensor, so LAMB needs whole tensors. One blocked pass computes the moments,
u and both norms (sums of squares accumulated in float64), a second applies the update. Exclude biases and norms from decay
and adaptation with a param group (e.g. {"weight_decay": 0, "adapt": false}).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, State, Step, blocks, check_betas, check_nonnegative, register, views
from paramserver.optim.cautious import CautiousOptions, apply_cautious, check_cautious


@dataclass(frozen=True, kw_only=True)
class LambHyper(CautiousOptions):
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

    whole: ClassVar[bool] = True
    """The trust ratio is per tensor."""

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        check_nonnegative(h, field, "lr", "eps", "weight_decay")
        check_betas(h.betas, f"{field}.betas")
        check_cautious(h, field)

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
            u, p_sq, u_sq = torch.empty_like(p), 0.0, 0.0
            if h.cautious:  # C-LAMB: mask the Adam ratio r (before decay and the trust ratio)
                for a, b in blocks(p.numel()):
                    m[a:b].mul_(b1).add_(g[a:b], alpha=1 - b1)
                    v[a:b].mul_(b2).addcmul_(g[a:b], g[a:b], value=1 - b2)
                torch.div(m, bc1, out=u).div_((v / bc2).sqrt_().add_(h.eps))
                apply_cautious(u, g, h)
            for a, b in blocks(p.numel()):  # one pass for the moments, u and both norms
                pb, gb, mb, vb, ub = p[a:b], g[a:b], m[a:b], v[a:b], u[a:b]
                if not h.cautious:
                    mb.mul_(b1).add_(gb, alpha=1 - b1)
                    vb.mul_(b2).addcmul_(gb, gb, value=1 - b2)
                    torch.div(mb, bc1, out=ub).div_((vb / bc2).sqrt_().add_(h.eps))
                if h.weight_decay != 0:
                    ub.add_(pb, alpha=h.weight_decay)
                if h.adapt:  # (not torch.dot: MKL's result depends on the block's memory alignment)
                    p_sq += float(torch.linalg.vector_norm(pb)) ** 2
                    u_sq += float(torch.linalg.vector_norm(ub)) ** 2
            trust = (p_sq / u_sq) ** 0.5 if h.adapt and p_sq > 0 and u_sq > 0 else 1.0
            p.add_(u, alpha=-lr * trust)
