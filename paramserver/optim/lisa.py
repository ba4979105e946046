"""LISA: layerwise importance sampling with AdamW (Pan et al. 2024, arXiv 2403.17919; LMFlow's
DynamicLayerActivationCallback; optimizers.md section 9).

Parameters whose name matches ``layer_pattern`` belong to the layer its first group captures
(e.g. ``model.layers.7.mlp.up_proj.weight`` -> 7); the rest (embeddings, head, final norm) are
always active. Every ``interval_steps`` updates, from update 0, ``active_layers`` of the layers
are drawn without replacement, seeded and reproducible anywhere:

    window = s // interval_steps          (s = updates applied so far, the schedule position)
    chosen = numpy.random.default_rng([seed, window]).choice(L, active_layers, replace=False)
    active = {sorted_layer_ids[i] for i in chosen}

Active parameters get torch's AdamW update with their own step counter (as torch.optim.AdamW
keeps per tensor); inactive ones are not touched at all: parameters, moments and step count stay
as they were, as when LMFlow freezes them, and their gradients (workers may send zeros) are left
out of the global clip norm and the non-finite check, as frozen torch parameters' are. Element-wise, so tensors may be split across shards.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from paramserver.optim.adam import AdamWHyper, adam_moments, check_adam, fused_adam
from paramserver.optim.base import Optimizer, Param, Piece, State, Step, register, require


@dataclass(frozen=True, kw_only=True)
class LisaHyper(AdamWHyper):
    """AdamW's hyperparameters plus the layer sampling (LMFlow's defaults)."""

    active_layers: int = 2
    """Layers active in each window (gamma)."""
    interval_steps: int = 20
    """Updates per window (K)."""
    seed: int = 0
    """Seed of the sampling."""
    layer_pattern: str = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\."
    """A regular expression (re.search) whose one group captures a parameter's layer number."""


def sample_layers(layers: Sequence[int], active: int, seed: int, window: int) -> set[int]:
    """The layers active in a window (the documented, reproducible draw)."""
    if not layers:
        return set()
    chosen = np.random.default_rng([seed, window]).choice(len(layers), size=min(active, len(layers)), replace=False)
    return {layers[int(i)] for i in chosen}


@register
class Lisa(Optimizer):
    """AdamW on the layers sampled for the current window."""

    name = "lisa"
    Hyper: ClassVar[type[Any]] = LisaHyper
    hyper: LisaHyper
    freezes: ClassVar[bool] = True

    def __init__(self, hyper: Any) -> None:
        super().__init__(hyper)
        self.layer_of: dict[int, int] = {}
        self.layers: list[int] = []
        self._drawn: tuple[int, set[int]] = (-1, set())

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges and the layer pattern."""
        h = self.hyper
        check_adam(h, field)
        require(not h.cautious, f"{field}.cautious", "not supported with lisa")
        require(h.active_layers >= 1, f"{field}.active_layers", "must be >= 1")
        require(h.interval_steps >= 1, f"{field}.interval_steps", "must be >= 1")
        require(h.seed >= 0, f"{field}.seed", "must be >= 0")
        try:
            groups = re.compile(h.layer_pattern).groups
        except re.error as exc:
            groups = -1
            require(False, f"{field}.layer_pattern", f"not a regular expression ({exc})")
        require(groups == 1, f"{field}.layer_pattern", "must have exactly one group (the layer number)")

    def bind(self, params: Sequence[Param], field: str) -> None:
        """Map every parameter of the group to its layer (if any); at least one must have one."""
        pattern = re.compile(self.hyper.layer_pattern)
        self.layer_of = {}
        for p in params:
            m = pattern.search(p.name)
            if m is not None and m.group(1).isdigit():
                self.layer_of[p.index] = int(m.group(1))
        self.layers = sorted(set(self.layer_of.values()))
        self._drawn = (-1, set())
        require(bool(self.layers) or not params, f"{field}.layer_pattern", "matches no parameter name of the group (no layers to sample)")

    def active(self, count: int) -> set[int]:
        """The layers active for the update with index `count`."""
        window = count // self.hyper.interval_steps
        if self._drawn[0] != window:
            self._drawn = (window, sample_layers(self.layers, self.hyper.active_layers, self.hyper.seed, window))
        return self._drawn[1]

    def is_active(self, param: Param, active: set[int]) -> bool:
        """Whether a parameter is updated in a window with these active layers."""
        layer = self.layer_of.get(param.index)
        return layer is None or layer in active

    def trains(self, param: Param, count: int) -> bool:
        """Whether the update with index `count` trains this parameter."""
        return self.is_active(param, self.active(count))

    def init_state(self, params: torch.Tensor) -> State:
        """Zero moments (step counters are per tensor)."""
        return adam_moments(params, self.hyper.amsgrad)

    def init_tensor_state(self, piece: Piece, device: torch.device) -> State:
        """The tensor's own AdamW step counter."""
        return {"step": torch.zeros((), dtype=torch.float32, device=device)}

    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """AdamW on the active pieces only."""
        active = self.active(step.count)
        chosen = [i for i, piece in enumerate(step.pieces) if self.is_active(piece.param, active)]
        if not chosen:
            return
        pieces = [step.pieces[i] for i in chosen]
        counters = [step.tensor_state(p)["step"] for p in pieces]
        segments = [(p.segment, p.length) for p in pieces]
        fused_adam([params[i] for i in chosen], [grads[i] for i in chosen], state, segments, counters, self.hyper, step.lr, True)
