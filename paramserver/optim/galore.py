"""GaLore AdamW (Zhao et al. 2024; galore-torch's GaLoreAdamW with proj_type "std"; optimizers.md section 7).

For a matrix g of shape m x n and r = min(rank, m, n), the projection P is refreshed from the
SVD of the current gradient every ``update_proj_gap`` updates of the tensor (k % gap == 0, k
counted from 0); the smaller side is reduced:

    m >= n:  P = Vh[:r, :]  (r x n),  R = g P^T  (m x r),  back(N) = N P
    m <  n:  P = U[:, :r]   (m x r),  R = P^T g  (r x n),  back(N) = P N

Adam with HF-legacy eps runs on R (the moments are not reset or rotated when P changes):

    N = m / (sqrt(v) + eps);  p -= lr * sqrt(1-b2^t)/(1-b1^t) * scale * back(N);  p -= lr * wd * p

The op sequence is galore-torch's, so it is bit-identical to GaLoreAdamW on the same backend.
Matrices only, whole on one shard; put the other parameters in an AdamW group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from paramserver.optim.base import Optimizer, Param, Piece, State, Step, check_betas, check_nonnegative, register, require, shaped
from paramserver.optim.cautious import CautiousOptions, apply_cautious, check_cautious


@dataclass(frozen=True, kw_only=True)
class GaLoreHyper(CautiousOptions):
    """Hyperparameters of GaLore AdamW (galore-torch's defaults for the Adam part; its README's
    rank, gap and scale)."""

    lr: float = 1e-3
    """Learning rate before the schedule."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Decay rates of the projected moments."""
    eps: float = 1e-6
    """Added to sqrt(v) (before bias correction, HF-legacy)."""
    weight_decay: float = 0.0
    """Decoupled decay p -= lr * wd * p, after the update."""
    correct_bias: bool = True
    """Bias-correct the step size."""
    rank: int = 128
    """Rank r of the projection."""
    update_proj_gap: int = 200
    """Refresh the projection every this many updates."""
    scale: float = 0.25
    """Multiplier of the projected-back update."""


def reduced_shape(shape: tuple[int, ...], rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(shape of P^T, moment shape) of an m x n matrix."""
    m, n = shape[0], shape[1]
    r = min(rank, m, n)
    return ((n, r), (m, r)) if m >= n else ((r, m), (r, n))


@register
class GaLore(Optimizer):
    """GaLore AdamW on whole matrices."""

    name = "galore"
    Hyper: ClassVar[type[Any]] = GaLoreHyper
    hyper: GaLoreHyper

    whole: ClassVar[bool] = True
    """SVD and projections need the whole matrix."""

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges."""
        h = self.hyper
        check_nonnegative(h, field, "lr", "eps", "weight_decay")
        check_betas(h.betas, f"{field}.betas")
        require(h.rank >= 1, f"{field}.rank", "must be >= 1")
        require(h.update_proj_gap >= 1, f"{field}.update_proj_gap", "must be >= 1")
        check_cautious(h, field)

    def check_param(self, param: Param, field: str) -> None:
        """2-D matrices only."""
        require(
            len(param.shape) == 2,
            f"{field}.shape",
            f"galore projects 2-D matrices; {param.name!r} has shape {list(param.shape)} (put it in an AdamW param group)",
        )

    def init_tensor_state(self, piece: Piece, device: torch.device) -> State:
        """The projection (stored transposed, "projection_t") and the projected moments (zeros
        until the first refresh at k = 0)."""
        proj, moment = reduced_shape(piece.param.shape, self.hyper.rank)
        return {
            "step": torch.zeros((), dtype=torch.int64, device=device),
            "projection_t": torch.zeros(proj, device=device),
            "exp_avg": torch.zeros(moment, device=device),
            "exp_avg_sq": torch.zeros(moment, device=device),
        }

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """One GaLore AdamW step in place, matrix by matrix."""
        h = self.hyper
        b1, b2 = h.betas
        for piece, flat_p, flat_g in zip(step.pieces, params, grads, strict=True):
            p, g, st = shaped(flat_p, piece), shaped(flat_g, piece), step.tensor_state(piece)
            k = int(st["step"].item())
            wide = g.shape[0] < g.shape[1]
            # P is kept as its contiguous transpose: LAPACK returns U and Vh column-major, and
            # matmul rounds differently by layout, so P = P^T.t() has the reference's layout
            # (also after a snapshot is restored).
            proj_t = st["projection_t"]
            if k % h.update_proj_gap == 0:
                u, _, vh = torch.linalg.svd(g, full_matrices=False)
                proj_t.copy_(u[:, : proj_t.shape[0]].t() if wide else vh[: proj_t.shape[1], :].t())
            proj = proj_t.t()
            reduced = torch.matmul(proj.t(), g) if wide else torch.matmul(g, proj.t())
            st["step"].add_(1)
            t = k + 1
            exp_avg, exp_avg_sq = st["exp_avg"], st["exp_avg_sq"]
            exp_avg.mul_(b1).add_(reduced, alpha=1.0 - b1)
            exp_avg_sq.mul_(b2).addcmul_(reduced, reduced, value=1.0 - b2)
            denom = exp_avg_sq.sqrt().add_(h.eps)
            step_size = step.lr
            if h.correct_bias:
                step_size = step_size * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
            normalized = exp_avg / denom
            back = torch.matmul(proj, normalized) if wide else torch.matmul(normalized, proj)
            update = back * h.scale
            if h.cautious:  # C-GaLore: mask the projected-back update against the gradient
                apply_cautious(update, g, h)
            p.add_(update, alpha=-step_size)
            if h.weight_decay > 0.0:
                p.add_(p, alpha=-step.lr * h.weight_decay)
