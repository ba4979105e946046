"""Schedule-Free AdamW (Defazio et al. 2024; schedulefree's AdamWScheduleFree; optimizers.md section 10).

The parameters the workers pull (and take gradients at) are y; the state keeps z and v. With k
the update count from 0 and lr the job's scheduled lr (keep the job's schedule constant: this
rule replaces the decay schedule; its own warmup is ``warmup_steps``):

    lr_k = lr * min(1, (k+1)/W);  lr_max = max(lr_max, lr_k);  w = (k+1)^r * lr_max^weight_lr_power
    c = w / sum(w);  v = b2 v + (1-b2) g^2;  d = g / (sqrt(v / (1-b2^(k+1))) + eps) + wd * y
    y = lerp(y, z, c);  y += lr_k * (b1 (1-c) - 1) * d;  z -= lr_k * d

The evaluation point x = y + (1 - 1/b1)(z - y) (what schedulefree's ``eval()`` swaps in) is what
a pull or an export asks for with the EVAL point. Element-wise, with schedulefree's op sequence
(block by block, for the cache): bit-identical to it for y and x, both of its paths. lr_max and the weight sum are kept in float64, as the
reference keeps them in Python floats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, State, Step, blocks, check_betas, check_nonnegative, register, require, views


@dataclass(frozen=True, kw_only=True)
class ScheduleFreeHyper:
    """Hyperparameters of Schedule-Free AdamW (schedulefree's defaults)."""

    lr: float = 0.0025
    """Learning rate (the job's schedule multiplies it; keep that constant)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """b1 interpolates y between z and x; b2 is the second moment's decay."""
    eps: float = 1e-8
    """Added to the bias-corrected sqrt of the second moment."""
    weight_decay: float = 0.0
    """Added to the normalised gradient as wd * y."""
    warmup_steps: int = 0
    """Linear warmup of lr_k over this many updates."""
    r: float = 0.0
    """Polynomial weighting power of the averaging weights."""
    weight_lr_power: float = 2.0
    """Power of lr_max in the averaging weights."""


@register
class ScheduleFreeAdamW(Optimizer):
    """Schedule-Free AdamW's update rule."""

    name = "adamw_schedulefree"
    Hyper: ClassVar[type[Any]] = ScheduleFreeHyper
    hyper: ScheduleFreeHyper
    eval_keys: ClassVar[tuple[str, ...]] = ("z", "k")

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        check_nonnegative(h, field, "lr", "eps", "weight_decay")
        check_betas(h.betas, f"{field}.betas")
        require(h.betas[0] > 0, f"{field}.betas[0]", "must be > 0 (x = y + (1 - 1/b1)(z - y))")
        require(h.warmup_steps >= 0, f"{field}.warmup_steps", "must be >= 0")

    def init_state(self, params: torch.Tensor) -> State:
        """z (set to y at the first update), v, and the averaging scalars."""
        device = params.device
        return {
            "z": torch.zeros_like(params),
            "exp_avg_sq": torch.zeros_like(params),
            "k": torch.zeros((), dtype=torch.int64, device=device),
            "lr_max": torch.full((), -1.0, dtype=torch.float64, device=device),
            "weight_sum": torch.zeros((), dtype=torch.float64, device=device),
        }

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One Schedule-Free AdamW step in place."""
        h = self.hyper
        b1, b2 = h.betas
        k = int(state["k"].item())
        sched = (k + 1) / h.warmup_steps if k < h.warmup_steps else 1.0
        bias_correction2 = 1 - b2 ** (k + 1)
        lr = step.lr * sched
        lr_max = max(lr, float(state["lr_max"].item()))
        weight = ((k + 1) ** h.r) * (lr_max**h.weight_lr_power)
        weight_sum = float(state["weight_sum"].item()) + weight
        try:
            ckp1 = weight / weight_sum
        except ZeroDivisionError:
            ckp1 = 0.0
        coef = lr * (b1 * (1 - ckp1) - 1)
        segments = step.segments
        for y, g, z, v in zip(params, grads, views(state["z"], segments), views(state["exp_avg_sq"], segments), strict=True):
            for a, b in blocks(y.numel()):  # block by block: the ten passes reuse the cache
                yb, gb, zb, vb = y[a:b], g[a:b], z[a:b], v[a:b]
                if k == 0:
                    zb.copy_(yb)
                vb.mul_(b2).addcmul_(gb, gb, value=1 - b2)
                denom = vb.div(bias_correction2).sqrt_().add_(h.eps)
                gb.div_(denom)
                if h.weight_decay != 0:
                    gb.add_(yb, alpha=h.weight_decay)
                yb.lerp_(zb, weight=ckp1)
                yb.add_(gb, alpha=coef)
                zb.sub_(gb, alpha=lr)
        state["k"].add_(1)
        state["lr_max"].fill_(lr_max)
        state["weight_sum"].fill_(weight_sum)

    def eval_point(self, params: Sequence[torch.Tensor], state: Mapping[str, torch.Tensor], segments: Sequence[tuple[int, int]]) -> None:
        """x = y + (1 - 1/b1)(z - y), with schedulefree's eval() op (x = y before the first update)."""
        if int(state["k"].item()) == 0:
            return
        b1 = self.hyper.betas[0]
        for y, z in zip(params, views(state["z"], segments), strict=True):
            y.lerp_(z, weight=1 - 1 / b1)
