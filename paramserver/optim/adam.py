"""Adam, AdamW and AMSGrad (torch.optim.Adam / AdamW semantics), optionally Cautious.

optimizers.md section 2. AdamW decays p *= 1 - lr*wd before the moments;
Adam adds wd*p to the gradient. Bias correction and eps after it, as torch.
Runs torch's fused kernel (the CPU fused AdamW is ~5x foreach on this machine).
With ``cautious`` (C-AdamW, section 8) the update direction u = m_hat / denom is
masked per tensor where it disagrees in sign with the gradient, which needs
whole tensors and runs torch's single-tensor op sequence instead, block by block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.optim.adam import adam as _torch_adam

from paramserver.optim.base import Optimizer, State, Step, blocks, check_betas, check_nonnegative, fused_supported, register, views
from paramserver.optim.cautious import CautiousOptions, cautious_scale, check_cautious, mask_disagreeing_


@dataclass(frozen=True, kw_only=True)
class AdamHyper(CautiousOptions):
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


def check_adam(h: AdamHyper, field: str) -> None:
    """Validate Adam's hyperparameters."""
    check_nonnegative(h, field, "lr", "eps", "weight_decay")
    check_betas(h.betas, f"{field}.betas")
    check_cautious(h, field)


def adam_moments(params: torch.Tensor, amsgrad: bool) -> State:
    """Zero first and second moments (and their running maximum) over a flat template."""
    state: State = {"exp_avg": torch.zeros_like(params), "exp_avg_sq": torch.zeros_like(params)}
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(params)
    return state


def fused_adam(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    state: State,
    segments: Sequence[tuple[int, int]],
    steps: list[torch.Tensor],
    h: AdamHyper,
    lr: float,
    decoupled: bool,
) -> None:
    """torch's fused Adam(W) kernel over the pieces; `steps` (one counter per piece) are advanced."""
    ps = list(params)
    _torch_adam(
        ps,
        list(grads),
        views(state["exp_avg"], segments),
        views(state["exp_avg_sq"], segments),
        views(state["max_exp_avg_sq"], segments) if h.amsgrad else [],
        steps,
        fused=fused_supported(ps[0]),
        decoupled_weight_decay=decoupled,
        amsgrad=h.amsgrad,
        beta1=h.betas[0],
        beta2=h.betas[1],
        lr=lr,
        weight_decay=h.weight_decay,
        eps=h.eps,
        maximize=False,
    )


@register
class Adam(Optimizer):
    """torch.optim.Adam's update rule."""

    name = "adam"
    Hyper: ClassVar[type[Any]] = AdamHyper
    hyper: AdamHyper
    decoupled: ClassVar[bool] = False

    @property
    def whole_tensors(self) -> bool:
        """Only the Cautious mask needs whole tensors."""
        return self.hyper.cautious

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        check_adam(self.hyper, field)

    def init_state(self, params: torch.Tensor) -> State:
        """Zero moments and a step counter of 0."""
        return {"step": torch.zeros((), dtype=torch.float32, device=params.device), **adam_moments(params, self.hyper.amsgrad)}

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One Adam(W) step in place."""
        if self.hyper.cautious:
            self._cautious(params, grads, state, step)
        else:
            # torch keeps one step counter per tensor and the kernel increments each: give it
            # copies, then advance the group's single counter.
            counters = [state["step"].clone() for _ in step.pieces]
            fused_adam(params, grads, state, step.segments, counters, self.hyper, step.lr, self.decoupled)
        state["step"].add_(1)

    def _cautious(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """torch's single-tensor Adam(W) ops block by block into an update buffer, masked as it goes;
        then one pass applies it with the tensor's normalisation."""
        h, lr = self.hyper, step.lr
        b1, b2 = h.betas
        t = float(state["step"]) + 1
        step_size = lr / (1 - b1**t)
        bias_correction2_sqrt = (1 - b2**t) ** 0.5
        segments = step.segments
        ms, vs = views(state["exp_avg"], segments), views(state["exp_avg_sq"], segments)
        vmaxes = views(state["max_exp_avg_sq"], segments) if h.amsgrad else [None] * len(ms)
        for p, g, m, v, vmax in zip(params, grads, ms, vs, vmaxes, strict=True):
            u, kept = torch.empty_like(p), 0
            for a, b in blocks(p.numel()):
                pb, gb, mb, vb, ub = p[a:b], g[a:b], m[a:b], v[a:b], u[a:b]
                raw = gb
                if self.decoupled:
                    pb.mul_(1 - lr * h.weight_decay)
                elif h.weight_decay != 0:
                    gb = gb.add(pb, alpha=h.weight_decay)
                mb.lerp_(gb, 1 - b1)
                vb.mul_(b2).addcmul_(gb, gb, value=1 - b2)
                if vmax is not None:
                    torch.maximum(vmax[a:b], vb, out=vmax[a:b])
                    vb = vmax[a:b]
                torch.div(mb, (vb.sqrt() / bias_correction2_sqrt).add_(h.eps), out=ub)
                kept += mask_disagreeing_(ub, raw)
            p.add_(u, alpha=-step_size * cautious_scale(kept, p.numel(), h))


@register
class AdamW(Adam):
    """torch.optim.AdamW's update rule (Adam with decoupled weight decay)."""

    name = "adamw"
    Hyper: ClassVar[type[Any]] = AdamWHyper
    decoupled: ClassVar[bool] = True
