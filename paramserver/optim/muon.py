"""Muon: momentum orthogonalised by Newton-Schulz (torch.optim.Muon semantics; optimizers.md section 5).

For each hidden matrix of shape A x B (a conv weight is viewed as (out, in*kh*kw)):

    buf = lerp(buf, g, 1 - momentum)                 (an EMA)
    u   = lerp(g, buf, momentum) if nesterov else buf
    O   = NS5(u)        in ns_dtype: bfloat16 as Keller Jordan and torch; float32 (exact tests; and
                        on CPUs without bf16 matrix units, where bf16 is ~30x slower); "auto"
                        (the default) = bfloat16 on CUDA, float32 elsewhere
    p   = p * (1 - lr * wd) - lr * ratio * O
    ratio = sqrt(max(1, A / B))            adjust_lr "original" (Keller Jordan, torch's default)
          = 0.2 * sqrt(max(A, B))           adjust_lr "match_rms_adamw" (Moonshot: AdamW's lr and wd carry over)

The Newton-Schulz iteration is torch's (addmm form), so with ns_dtype "bfloat16" this is
bit-identical to torch.optim.Muon on the same device; fp32 differs from bf16 by ~3% relative
Frobenius per step (optimizers.md section 5: within the 5e-2 that separates bf16 implementations).
Matrices only, and whole: the placement keeps each one on a single shard. Embeddings, the output
head, biases and norm gains belong on AdamW through param groups (the client's
``muon_param_groups`` preset).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, Param, State, Step, as_matrix, check_nonnegative, register, require, require_one_of, views
from paramserver.optim.cautious import CautiousOptions, apply_cautious, check_cautious

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("original", "match_rms_adamw")
NS_DTYPES = ("auto", "bfloat16", "float32")


@dataclass(frozen=True, kw_only=True)
class MuonHyper(CautiousOptions):
    """Hyperparameters of Muon (torch.optim.Muon defaults)."""

    lr: float = 1e-3
    """Learning rate before the schedule."""
    weight_decay: float = 0.1
    """Decoupled decay p *= 1 - lr * weight_decay (with the unadjusted lr)."""
    momentum: float = 0.95
    """EMA factor of the momentum buffer."""
    nesterov: bool = True
    """Orthogonalise lerp(g, buf, momentum) instead of buf."""
    ns_steps: int = 5
    """Newton-Schulz iterations."""
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS
    """(a, b, c) of the quintic iteration."""
    eps: float = 1e-7
    """Floor of the Frobenius norm the input is divided by."""
    adjust_lr: str = "original"
    """"original" (sqrt(max(1, A/B))) or "match_rms_adamw" (0.2 * sqrt(max(A, B)))."""
    ns_dtype: str = "auto"
    """Precision of the Newton-Schulz iteration: "bfloat16", "float32", or "auto" (bfloat16 on
    CUDA, float32 on CPU, where bf16 matrix products are emulated and ~30x slower)."""


def newton_schulz(g: torch.Tensor, steps: int, coefficients: Sequence[float], eps: float, dtype: torch.dtype) -> torch.Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal factor of a matrix (torch's op order)."""
    a, b, c = coefficients
    x = g.to(dtype, copy=True)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    return x.T if tall else x


def ns_dtype(name: str, device: torch.device) -> torch.dtype:
    """The Newton-Schulz dtype for a setting on a device."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def lr_ratio(rows: int, cols: int, how: str) -> float:
    """The shape scaling of the update."""
    if how == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols))


@register
class Muon(Optimizer):
    """Muon's update rule on whole matrices."""

    name = "muon"
    Hyper: ClassVar[type[Any]] = MuonHyper
    hyper: MuonHyper

    whole: ClassVar[bool] = True
    """Newton-Schulz needs the whole matrix."""

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        check_nonnegative(h, field, "lr", "weight_decay")
        require(0 <= h.momentum < 1, f"{field}.momentum", "must be in [0, 1)")
        require(1 <= h.ns_steps < 100, f"{field}.ns_steps", "must be in [1, 100)")
        require(h.eps > 0, f"{field}.eps", "must be > 0")
        require_one_of(h.adjust_lr, ADJUST_LR, f"{field}.adjust_lr")
        require_one_of(h.ns_dtype, NS_DTYPES, f"{field}.ns_dtype")
        check_cautious(h, field)

    def check_param(self, param: Param, field: str) -> None:
        """Matrices (or conv weights) only."""
        require(
            len(param.shape) >= 2,
            f"{field}.shape",
            f"muon updates matrices; {param.name!r} has shape {list(param.shape)} (put it in an AdamW param group)",
        )

    def init_state(self, params: torch.Tensor) -> State:
        """A zero momentum buffer."""
        return {"momentum_buffer": torch.zeros_like(params)}

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One Muon step in place, matrix by matrix."""
        h, lr = self.hyper, step.lr
        dtype = ns_dtype(h.ns_dtype, params[0].device) if params else torch.float32
        for piece, p, g, b in zip(step.pieces, params, grads, views(state["momentum_buffer"], step.segments), strict=True):
            grad, buf, param = as_matrix(g, piece), as_matrix(b, piece), as_matrix(p, piece)
            buf.lerp_(grad, 1 - h.momentum)
            u = grad.lerp(buf, h.momentum) if h.nesterov else buf
            o = newton_schulz(u, h.ns_steps, h.ns_coefficients, h.eps, dtype)
            if h.cautious:  # C-Muon: mask the orthogonalised update against the gradient
                o = o.to(param.dtype)
                apply_cautious(o, grad, h)
            param.mul_(1 - lr * h.weight_decay)
            param.add_(o, alpha=-lr * lr_ratio(param.size(0), param.size(1), h.adjust_lr))
