"""LAMB against an fp64 port of tensorflow-addons' lamb.py (there is no faithful pip PyTorch one)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from paramserver.optim import build
from paramserver.optim.base import BLOCK, views
from tests.helpers import pieces, step
from tests.references import TfaLamb

SHAPES: list[tuple[int, ...]] = [(37, 11), (23,), (11, 5), (2 * BLOCK + 5,)]  # one of several blocks


@pytest.mark.parametrize(
    "hyper",
    [
        {"lr": 1e-2, "weight_decay": 0.01},
        {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.8, 0.99], "eps": 1e-8},
        {"lr": 1e-3, "adapt": False},
    ],
    ids=["paper-decay", "no-decay", "no-adaptation"],
)
def test_matches_the_tfa_formula(hyper: dict[str, Any]) -> None:
    total = sum(int(np.prod(s)) for s in SHAPES)
    p0 = torch.randn(total, generator=torch.Generator().manual_seed(0))
    opt = build("lamb", hyper)
    flat, ps = p0.clone(), pieces(SHAPES)
    state, segs = opt.init_state(flat), step(0, ps).segments
    h = opt.hyper
    ref = TfaLamb([v.numpy() for v in views(p0, segs)], h.betas[0], h.betas[1], h.eps, h.weight_decay, h.adapt)
    gen = torch.Generator().manual_seed(1)
    for s in range(100):
        lr = h.lr * (0.5 + 0.5 * (s % 3))
        g = torch.randn(total, generator=gen) * (1 + s % 5)
        before = flat.clone()
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(lr, ps))
        ref.step([v.numpy() for v in views(g, segs)], lr)
        if h.adapt:  # the trust ratio makes every tensor move by exactly lr * ||p||
            for a, b in zip(views(before, segs), views(flat, segs), strict=True):
                assert float((b.double() - a.double()).norm()) == pytest.approx(lr * float(a.double().norm()), rel=1e-5)
    ours = flat.double().numpy()
    expected = np.concatenate([x.reshape(-1) for x in ref.p])
    assert np.abs(ours - expected).max() / np.abs(expected).max() <= 1e-5


def test_zero_parameters_take_an_unscaled_step() -> None:
    """trust = 1 when ||p|| = 0 (tfa's where)."""
    opt = build("lamb", {"lr": 0.1})
    flat = torch.zeros(8)
    opt.update([flat], [torch.ones(8)], opt.init_state(flat), step(0.1, pieces([(8,)])))
    assert torch.allclose(flat, torch.full((8,), -0.1), rtol=1e-5)
