"""Tiger, its author's full rule (Su Jianlin, bojone/tiger tiger.py; optimizers.md section 4).

Lion with beta1 = beta2 = beta, plus, per tensor:

* a relative learning rate: eta = lr * RMS(p) over the whole tensor; for embeddings,
  eta = lr * RMS over the last axis (per row); for biases and norm gains/shifts, eta = lr / 2
  and no weight decay;
* the update p -= eta * (sign(m) + wd * p), decay multiplied by eta;
* a NaN guard: when the tensor's gradient has a NaN, m is left unchanged and
  p = c + shrink_ratio * (p - c), with c = 1 for norm gains and 0 otherwise (Inf is not checked,
  as in the original).

Roles come from the parameter's name by regular expressions (``re.search``), checked in the order
gain, bias, embedding; the defaults cover PyTorch names (``ln_1.weight``, ``*.bias``,
``embed_tokens.weight``) and the original's TF names (``gamma``, ``beta``, ``embeddings``). The
original's gradient accumulation without a buffer does not apply here: the service sums the
workers' gradients exactly before the update. Per-tensor scalars need whole tensors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, Param, State, Step, check_nonnegative, register, require, shaped, views
from paramserver.optim.cautious import CautiousOptions, apply_cautious, check_cautious


class Role(Enum):
    """How the full Tiger rule treats a parameter."""

    GAIN = "gain"
    BIAS = "bias"
    EMBEDDING = "embedding"
    TENSOR = "tensor"


@dataclass(frozen=True, kw_only=True)
class TigerFullHyper(CautiousOptions):
    """Hyperparameters of the full Tiger rule (the author's defaults)."""

    lr: float = 1e-3
    """Learning rate before the schedule (scaled per tensor by RMS(p))."""
    beta: float = 0.965
    """Momentum factor (Lion's beta1 = beta2)."""
    weight_decay: float = 0.01
    """Decay, multiplied by the tensor's eta (not applied to gains and biases)."""
    shrink_ratio: float = 0.99
    """The NaN guard's shrink factor s: p = c + s * (p - c)."""
    gain_pattern: str = r"gamma|norm[^.]*\.weight$|(^|\.)(ln|bn)[^.]*\.weight$"
    """Names of norm gains (half lr, no decay, NaN shrink towards 1)."""
    bias_pattern: str = r"bias|beta"
    """Names of biases and norm shifts (half lr, no decay, NaN shrink towards 0)."""
    embedding_pattern: str = r"embed|wte|wpe"
    """Names of embeddings (lr scaled by the RMS of each row)."""


def role_of(name: str, h: TigerFullHyper) -> Role:
    """A parameter's role by its name."""
    if re.search(h.gain_pattern, name):
        return Role.GAIN
    if re.search(h.bias_pattern, name):
        return Role.BIAS
    if re.search(h.embedding_pattern, name):
        return Role.EMBEDDING
    return Role.TENSOR


@register
class TigerFull(Optimizer):
    """Tiger with its author's relative learning rate, NaN guard and no decay for gains and biases."""

    name = "tiger_full"
    Hyper: ClassVar[type[Any]] = TigerFullHyper
    hyper: TigerFullHyper
    handles_nan: ClassVar[bool] = True

    def __init__(self, hyper: Any) -> None:
        super().__init__(hyper)
        self.roles: dict[int, Role] = {}

    whole: ClassVar[bool] = True
    """Per-tensor RMS and NaN flags."""

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges and patterns."""
        h = self.hyper
        check_nonnegative(h, field, "lr", "weight_decay")
        require(0 <= h.beta <= 1, f"{field}.beta", "must be in [0, 1]")
        require(0 <= h.shrink_ratio <= 1, f"{field}.shrink_ratio", "must be in [0, 1]")
        check_cautious(h, field)
        for key in ("gain_pattern", "bias_pattern", "embedding_pattern"):
            try:
                re.compile(getattr(h, key))
            except re.error as exc:
                require(False, f"{field}.{key}", f"not a regular expression ({exc})")

    def bind(self, params: Sequence[Param], field: str) -> None:
        """Give every parameter of the group its role."""
        self.roles = {p.index: role_of(p.name, self.hyper) for p in params}

    def init_state(self, params: torch.Tensor) -> State:
        """A zero momentum."""
        return {"exp_avg": torch.zeros_like(params)}

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One Tiger step in place, tensor by tensor."""
        h, lr = self.hyper, step.lr
        for piece, p, g, m in zip(step.pieces, params, grads, views(state["exp_avg"], step.segments), strict=True):
            role = self.roles.get(piece.param.index) or role_of(piece.param.name, h)
            if bool(torch.isnan(g).any()):
                c = 1.0 if role is Role.GAIN else 0.0
                p.sub_(c).mul_(h.shrink_ratio).add_(c)
                continue
            m.mul_(h.beta).add_(g, alpha=1.0 - h.beta)
            decay = h.weight_decay
            eta: float | torch.Tensor
            if role in (Role.GAIN, Role.BIAS):
                eta, decay = 0.5 * lr, 0.0
            elif role is Role.EMBEDDING and len(piece.param.shape) >= 1:
                rows = shaped(p, piece)
                eta = (rows.square().mean(dim=-1, keepdim=True).sqrt() * lr).reshape(-1, 1)
            else:
                eta = p.square().mean().sqrt() * lr
            u = torch.sign(m)
            if h.cautious:  # mask the sign update (before decay) against the gradient
                apply_cautious(u, g, h)
            u.add_(p, alpha=decay)
            if isinstance(eta, torch.Tensor) and eta.dim() == 2:
                u.view(eta.shape[0], -1).mul_(eta)
            else:
                u.mul_(eta)
            p.sub_(u)
