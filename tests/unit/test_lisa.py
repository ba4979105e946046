"""LISA: the seeded layer draw, and AdamW on the active parameters against torch.optim.AdamW with
the inactive ones frozen (grad None), as LMFlow's callback leaves them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paramserver.errors import ConfigError
from paramserver.jobconfig import JobConfig
from paramserver.optim import build
from paramserver.optim.base import views
from paramserver.optim.lisa import Lisa, sample_layers
from tests.helpers import pieces, step

NAMES = ["embed.weight", "layers.0.w", "layers.0.b", "layers.1.w", "layers.2.w", "layers.3.w", "norm.weight", "head.weight"]
SHAPES: list[tuple[int, ...]] = [(13, 4), (4, 4), (4,), (4, 4), (4, 4), (4, 4), (4,), (4, 13)]
LAYER = [None, 0, 0, 1, 2, 3, None, None]


def test_the_draw_is_documented_seeded_and_varies() -> None:
    layers = [0, 1, 2, 3, 4, 5]
    draws = [sample_layers(layers, 2, seed=7, window=w) for w in range(8)]
    assert all(len(d) == 2 and d <= set(layers) for d in draws)
    assert len({frozenset(d) for d in draws}) > 1
    assert draws == [sample_layers(layers, 2, seed=7, window=w) for w in range(8)]
    assert draws != [sample_layers(layers, 2, seed=8, window=w) for w in range(8)]
    manual = {layers[int(i)] for i in np.random.default_rng([7, 3]).choice(6, size=2, replace=False)}
    assert draws[3] == manual


def test_active_layers_match_torch_adamw_and_frozen_ones_are_untouched() -> None:
    hyper = {"lr": 1e-2, "weight_decay": 0.1, "active_layers": 2, "interval_steps": 5, "seed": 3}
    opt = build("lisa", hyper)
    assert isinstance(opt, Lisa)
    ps = pieces(SHAPES, names=NAMES)
    opt.bind([p.param for p in ps], "spec.optimizer.hyperparameters")
    assert opt.layers == [0, 1, 2, 3]
    total = sum(torch.Size(s).numel() for s in SHAPES)
    p0 = torch.randn(total, generator=torch.Generator().manual_seed(0))
    flat, state, segs = p0.clone(), opt.init_state(p0), step(0, ps).segments
    tensors = {p.param.index: opt.init_tensor_state(p, flat.device) for p in ps}
    refs = [torch.nn.Parameter(v.clone()) for v in views(p0, segs)]
    ref = torch.optim.AdamW(refs, lr=1e-2, weight_decay=0.1, fused=True)
    gen = torch.Generator().manual_seed(1)
    counts = [0] * len(SHAPES)
    for s in range(30):
        active = sample_layers([0, 1, 2, 3], 2, 3, s // 5)
        g = torch.randn(total, generator=gen)
        before = flat.clone()
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(1e-2, ps, s, tensors))
        for i, (r, gv) in enumerate(zip(refs, views(g, segs), strict=True)):
            on = LAYER[i] is None or LAYER[i] in active
            r.grad = gv.clone() if on else None
            counts[i] += on
            if not on:
                assert torch.equal(views(flat, segs)[i], views(before, segs)[i])
        ref.step()
        assert torch.equal(flat, torch.cat([r.detach() for r in refs])), f"step {s}"
    for i, r in enumerate(refs):
        assert float(tensors[i]["step"]) == counts[i] == (float(ref.state[r]["step"]) if ref.state[r] else 0)
    assert counts[0] == 30 and min(counts[1:6]) < 30  # embeddings always, layers sometimes


def test_a_pattern_that_matches_nothing_is_rejected() -> None:
    cfg = JobConfig(parameters=(("a", (4,), ""), ("b", (4,), "")), optimizer="lisa")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.field == "spec.optimizer.hyperparameters.layer_pattern"
    with pytest.raises(ConfigError) as err:
        build("lisa", {"layer_pattern": "layers"}, "spec.optimizer")
    assert err.value.field == "spec.optimizer.hyperparameters.layer_pattern"
