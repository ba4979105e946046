"""Adafactor (torch.optim.Adafactor semantics, with Hugging Face's options; optimizers.md section 3).

Per tensor, with t the update count and lr the scheduled learning rate:

    rho   = min(lr, 1/sqrt(t))              relative_step (torch; HF's relative_step with lr 1e-2)
          = lr                               relative_step=False (HF: the schedule alone sets it)
    alpha = max(eps2, RMS(p)) * rho          scale_parameter (torch always; HF's option)
    p    *= 1 - lr * wd                      (relative_weight_decay: p -= wd * alpha * p, as HF)
    matrix (the last two dims):  R = lerp(R, rowmean(g^2), t^beta2_decay); C likewise by column;
                                 V = R C / max(mean(R), eps1)
    vector:                      V = lerp(V, g^2, t^beta2_decay)
    U = g / sqrt(max(V, eps1^2));  U /= max(1, RMS(U) / d)
    p -= alpha * U                           (beta1 > 0: m = beta1 m + (1-beta1) alpha U; p -= m, as HF)

The op sequence is torch's single-tensor one, so with the defaults it is bit-identical to
torch.optim.Adafactor(foreach=False). Row and column factors need whole tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, Piece, State, Step, check_nonnegative, register, require, shaped
from paramserver.optim.cautious import CautiousOptions, apply_cautious, check_cautious

FP32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True, kw_only=True)
class AdafactorHyper(CautiousOptions):
    """Hyperparameters of Adafactor (torch.optim.Adafactor defaults)."""

    lr: float = 1e-2
    """Learning rate before the schedule (the cap of the relative step size)."""
    beta2_decay: float = -0.8
    """1 - beta2_t = t ** beta2_decay."""
    eps: tuple[float, float] = (FP32_EPS, 1e-3)
    """(eps1, eps2): eps1 floors the variance estimate (torch clamps; default fp32's machine eps),
    eps2 floors RMS(p)."""
    d: float = 1.0
    """Clipping threshold of the update's RMS."""
    weight_decay: float = 0.0
    """Decay p *= 1 - lr * weight_decay."""
    relative_step: bool = True
    """rho = min(lr, 1/sqrt(t)); False: rho = lr (HF relative_step=False)."""
    scale_parameter: bool = True
    """Multiply the step by max(eps2, RMS(p)) (HF's option; torch always does)."""
    beta1: float = 0.0
    """First moment of the scaled update (HF's beta1; 0 = none, as torch)."""
    relative_weight_decay: bool = False
    """Decay by wd * alpha instead of wd * lr (HF's form)."""


@register
class Adafactor(Optimizer):
    """Adafactor's update rule on whole tensors."""

    name = "adafactor"
    Hyper: ClassVar[type[Any]] = AdafactorHyper
    hyper: AdafactorHyper

    whole: ClassVar[bool] = True
    """Row/column factors and per-tensor RMS."""

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        check_nonnegative(h, field, "lr", "weight_decay")
        require(h.beta2_decay <= 0, f"{field}.beta2_decay", "must be <= 0")
        require(h.eps[0] > 0, f"{field}.eps[0]", "must be > 0")
        require(h.eps[1] >= 0, f"{field}.eps[1]", "must be >= 0")
        require(h.d > 0, f"{field}.d", "must be > 0")
        require(0 <= h.beta1 < 1, f"{field}.beta1", "must be in [0, 1)")
        check_cautious(h, field)
        if h.cautious:
            require(h.beta1 > 0, f"{field}.cautious", "needs beta1 > 0 (a first moment to compare with the gradient)")

    def init_state(self, params: torch.Tensor) -> State:
        """A step counter (the factors are per tensor)."""
        return {"step": torch.zeros((), dtype=torch.float32, device=params.device)}

    def init_tensor_state(self, piece: Piece, device: torch.device) -> State:
        """Row and column factors of a matrix, or the full variance of a vector or scalar."""
        shape = piece.param.shape
        state: State = {}
        if len(shape) > 1:
            state["row_var"] = torch.zeros((*shape[:-1], 1), device=device)
            state["col_var"] = torch.zeros((*shape[:-2], 1, shape[-1]), device=device)
        else:
            state["variance"] = torch.zeros(shape, device=device)
        if self.hyper.beta1 > 0:
            state["exp_avg"] = torch.zeros(shape, device=device)
        return state

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One Adafactor step in place, tensor by tensor."""
        h, lr = self.hyper, step.lr
        eps1, eps2 = h.eps
        state["step"].add_(1)
        t = state["step"].item()
        one_minus_beta2_t = t**h.beta2_decay
        rho = min(lr, 1 / (t**0.5)) if h.relative_step else lr
        for piece, flat_p, flat_g in zip(step.pieces, params, grads, strict=True):
            param, grad, st = shaped(flat_p, piece), shaped(flat_g, piece), step.tensor_state(piece)
            alpha = max(eps2, param.norm(2).item() / (param.numel() ** 0.5)) * rho if h.scale_parameter else rho
            if h.weight_decay != 0:
                if h.relative_weight_decay:
                    param.add_(param, alpha=-h.weight_decay * alpha)
                else:
                    param.mul_(1 - lr * h.weight_decay)
            if grad.dim() > 1:
                row_var, col_var = st["row_var"], st["col_var"]
                row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
                row_var.lerp_(row_mean, one_minus_beta2_t)
                col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
                col_var.lerp_(col_mean, one_minus_beta2_t)
                var_estimate = row_var @ col_var
                var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))
            else:
                variance = st["variance"]
                variance.lerp_(grad * grad, one_minus_beta2_t)
                var_estimate = variance.clone()
            update = var_estimate.clamp_(min=eps1 * eps1).rsqrt_()
            update.mul_(grad)
            denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * h.d))
            if h.beta1 > 0:
                exp_avg = st["exp_avg"]
                exp_avg.mul_(h.beta1).add_(update.mul_(alpha / denom), alpha=1 - h.beta1)
                if h.cautious:  # mask the first moment's step against the gradient
                    masked = exp_avg.clone()
                    apply_cautious(masked, grad, h)
                    param.sub_(masked)
                else:
                    param.sub_(exp_avg)
            else:
                param.add_(update, alpha=-alpha / denom)
