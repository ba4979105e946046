"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD semantics).

optimizers.md section 1: d = g + wd*p; the first momentum step copies d (the buffer exists from
the start, flagged by ``momentum_started``, so that its storage is fixed);
then buf = momentum*buf + (1-dampening)*d; d = d + momentum*buf (Nesterov) or
buf; p -= lr*d. Runs torch's fused kernel. With ``cautious`` (needs momentum)
the direction d is masked per tensor where it disagrees in sign with the
gradient (section 8), with torch's single-tensor op sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.optim.sgd import sgd as _torch_sgd

from paramserver.optim.base import Optimizer, State, Step, check_nonnegative, fused_supported, register, require, views
from paramserver.optim.cautious import CautiousOptions, apply_cautious, check_cautious


@dataclass(frozen=True, kw_only=True)
class SGDHyper(CautiousOptions):
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

    @property
    def whole_tensors(self) -> bool:
        """Only the Cautious mask needs whole tensors."""
        return self.hyper.cautious

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        check_nonnegative(h, field, "lr", "momentum", "weight_decay")
        if h.nesterov:
            require(h.momentum > 0 and h.dampening == 0, f"{field}.nesterov", "needs momentum > 0 and dampening == 0")
        check_cautious(h, field)
        if h.cautious:
            require(h.momentum > 0, f"{field}.cautious", "needs momentum > 0 (the mask compares the momentum direction with the gradient)")

    def init_state(self, params: torch.Tensor) -> State:
        """The momentum buffer (when momentum > 0) and a flag: torch starts the buffer as a copy of
        d at the first step, so until then it is not used."""
        if self.hyper.momentum == 0:
            return {}
        return {"momentum_buffer": torch.zeros_like(params), "momentum_started": torch.zeros((), dtype=torch.int64, device=params.device)}

    def restored(self, state: State, loaded: set[str]) -> None:
        """A snapshot with a momentum buffer but no flag (written before the flag existed) has started."""
        if "momentum_buffer" in loaded and "momentum_started" not in loaded and "momentum_started" in state:
            state["momentum_started"].fill_(1)

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One SGD step in place."""
        if self.hyper.cautious:
            self._cautious(params, grads, state, step)
            return
        h = self.hyper
        ps = list(params)
        started = h.momentum != 0 and bool(state["momentum_started"])
        bufs: list[torch.Tensor | None] = list(views(state["momentum_buffer"], step.segments)) if started else [None] * len(ps)
        _torch_sgd(
            ps,
            list(grads),
            bufs,
            fused=fused_supported(ps[0]),
            weight_decay=h.weight_decay,
            momentum=h.momentum,
            lr=step.lr,
            dampening=h.dampening,
            nesterov=h.nesterov,
            maximize=False,
        )
        if h.momentum != 0 and not started:  # the first step created one buffer per piece
            for dst, src in zip(views(state["momentum_buffer"], step.segments), bufs, strict=True):
                assert src is not None
                dst.copy_(src)
            state["momentum_started"].fill_(1)

    def _cautious(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        h = self.hyper
        first = not bool(state["momentum_started"])
        for p, g, buf in zip(params, grads, views(state["momentum_buffer"], step.segments), strict=True):
            d = g.add(p, alpha=h.weight_decay) if h.weight_decay != 0 else g
            if first:
                buf.copy_(d)
            else:
                buf.mul_(h.momentum).add_(d, alpha=1 - h.dampening)
            u = d.add(buf, alpha=h.momentum) if h.nesterov else buf.clone()
            apply_cautious(u, g, h)
            p.add_(u, alpha=-step.lr)
        state["momentum_started"].fill_(1)
