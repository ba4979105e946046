"""The Cautious mask (Liang et al. 2024, arXiv 2411.16085), an option of the momentum rules.

optimizers.md section 8. With u the base update direction (what gets multiplied by -lr) and g the
current gradient, only coordinates where they agree are kept, rescaled per tensor:

    phi = 1[u * g > 0]
    "mean":  s = phi / max(mean(phi), cautious_clamp)        (C-AdamW today, timm; lucidrains 1e-5)
    "count": s = phi * numel / (sum(phi) + 1)                  (the original form; C-Lion)
    u = u * s

The normalisation is per tensor, so a cautious rule needs whole tensors (the placement keeps
them on one shard) and the result does not depend on the shard count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paramserver.optim.base import require, require_one_of

NORMALIZATIONS = ("mean", "count")


@dataclass(frozen=True, kw_only=True)
class CautiousOptions:
    """Hyperparameters of the Cautious mask (mixed into the hyperparameters of momentum rules)."""

    cautious: bool = False
    """Mask the update where its sign disagrees with the gradient's (C-AdamW, C-Lion, ...)."""
    cautious_normalization: str = "mean"
    """"mean" (phi / max(mean(phi), cautious_clamp)) or "count" (phi * numel / (sum(phi) + 1))."""
    cautious_clamp: float = 1e-3
    """Floor of mean(phi) in the "mean" normalisation."""


def check_cautious(h: CautiousOptions, field: str) -> None:
    """Validate the Cautious options."""
    require_one_of(h.cautious_normalization, NORMALIZATIONS, f"{field}.cautious_normalization")
    require(h.cautious_clamp > 0, f"{field}.cautious_clamp", "must be > 0")


def apply_cautious(update: torch.Tensor, grad: torch.Tensor, h: CautiousOptions) -> None:
    """Mask and rescale one whole tensor's update in place."""
    mask = (update * grad > 0).to(update.dtype)
    if h.cautious_normalization == "count":
        mask.mul_(mask.numel() / (mask.sum() + 1))
    else:
        mask.div_(mask.mean().clamp(min=h.cautious_clamp))
    update.mul_(mask)


def cautious_scale(kept: int, numel: int, h: CautiousOptions) -> float:
    """The factor of the kept coordinates of a tensor of `numel` elements where `kept` agree."""
    if h.cautious_normalization == "count":
        return numel / (kept + 1)
    return 1.0 / max(kept / numel, h.cautious_clamp)


def mask_disagreeing_(update: torch.Tensor, grad: torch.Tensor) -> int:
    """Zero the coordinates where update and gradient disagree in sign, in place; return how
    many were kept (for :func:`cautious_scale`, once every block of the tensor is masked)."""
    keep = update * grad > 0
    update.mul_(keep)
    return int(keep.sum())
