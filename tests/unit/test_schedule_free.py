"""Schedule-Free AdamW against schedulefree's AdamWScheduleFree: y and the evaluation point x."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from schedulefree import AdamWScheduleFree

from paramserver.optim import build
from paramserver.optim.base import BLOCK, views
from tests.helpers import pieces, step

SHAPES: list[tuple[int, ...]] = [(37, 11), (23,), (), (11, 5), (3 * BLOCK + 7,)]  # one of several blocks


@pytest.mark.parametrize("foreach", [True, False], ids=["ref-foreach", "ref-single-tensor"])
@pytest.mark.parametrize(
    "hyper",
    [{"lr": 0.0025}, {"lr": 1e-2, "warmup_steps": 10, "weight_decay": 0.05, "betas": [0.95, 0.99], "r": 0.5}],
    ids=["defaults", "warmup-decay-r"],
)
def test_bitwise_schedulefree(hyper: dict[str, Any], foreach: bool) -> None:
    total = sum(torch.Size(s).numel() for s in SHAPES)
    p0 = torch.randn(total, generator=torch.Generator().manual_seed(0))
    opt = build("adamw_schedulefree", hyper)
    ps = pieces(SHAPES)
    flat, state, segs = p0.clone(), opt.init_state(p0), step(0, ps).segments
    h = opt.hyper
    refs = [torch.nn.Parameter(v.view(s).clone()) for v, s in zip(views(p0, segs), SHAPES, strict=True)]
    ref = AdamWScheduleFree(
        refs, lr=h.lr, betas=h.betas, eps=h.eps, weight_decay=h.weight_decay, warmup_steps=h.warmup_steps, r=h.r, foreach=foreach
    )
    ref.train()
    x = flat.clone()
    opt.eval_point(views(x, segs), state, segs)
    assert torch.equal(x, flat)  # before the first update x = y
    gen = torch.Generator().manual_seed(1)
    for s in range(60):
        g = torch.randn(total, generator=gen) * (1 + s % 5)
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(h.lr, ps, s))
        for r, gv in zip(refs, views(g, segs), strict=True):
            r.grad = gv.view(r.shape).clone()
        ref.step()
        assert torch.equal(flat, torch.cat([r.detach().reshape(-1) for r in refs])), f"y, step {s}"
    x = flat.clone()
    opt.eval_point(views(x, segs), state, segs)
    ref.eval()
    assert torch.equal(x, torch.cat([r.detach().reshape(-1) for r in refs]))
    assert not torch.equal(x, flat)
