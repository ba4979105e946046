"""The Cautious mask: C-Lion against lion-pytorch's cautious_lion (bitwise), C-AdamW and C-SGD
against the formula written out here, and the mask's properties."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from lion_pytorch.cautious_lion import Lion as RefCautiousLion

from paramserver.jobconfig import JobConfig
from paramserver.optim import build
from paramserver.optim.base import BLOCK, views
from paramserver.optim.cautious import CautiousOptions, apply_cautious
from tests.helpers import pieces, step
from tests.references import CautiousAdamW

SHAPES: list[tuple[int, ...]] = [(37, 11), (23,), (11, 5), (2 * BLOCK + 5,)]  # one of several blocks
TOTAL = sum(torch.Size(s).numel() for s in SHAPES)


def _grads(steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(TOTAL, generator=gen) * (1 + s % 5) for s in range(steps)]


def test_c_lion_is_bitwise_lion_pytorch_cautious() -> None:
    """lucidrains normalises by max(mean(phi), 1e-5): cautious_clamp 1e-5 reproduces it."""
    p0 = torch.randn(TOTAL, generator=torch.Generator().manual_seed(0))
    opt = build("lion", {"lr": 3e-4, "weight_decay": 0.1, "cautious": True, "cautious_clamp": 1e-5})
    ps = pieces(SHAPES)
    flat, state, segs = p0.clone(), opt.init_state(p0), step(0, ps).segments
    refs = [torch.nn.Parameter(v.clone()) for v in views(p0, segs)]
    ref = RefCautiousLion(refs, lr=3e-4, weight_decay=0.1, cautious_factor=0.0)
    for g in _grads(100):
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(3e-4, ps))
        for r, gv in zip(refs, views(g, segs), strict=True):
            r.grad = gv.clone()
        ref.step()
    assert torch.equal(flat, torch.cat([r.detach() for r in refs]))


@pytest.mark.parametrize("how", ["mean", "count"])
def test_c_adamw_matches_the_formula(how: str) -> None:
    """In float64 (the rule is dtype-agnostic): in fp32 a coordinate whose update is within rounding
    of 0 may flip its mask, which moves the whole tensor's normalisation by 1/numel."""
    p0 = torch.randn(TOTAL, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = [g.double() for g in _grads(100)]
    opt = build("adamw", {"lr": 1e-2, "weight_decay": 0.1, "cautious": True, "cautious_normalization": how})
    ps = pieces(SHAPES)
    flat, state, segs = p0.clone(), opt.init_state(p0), step(0, ps).segments
    for g in grads:
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(1e-2, ps))
    ref = CautiousAdamW([v.numpy() for v in views(p0, segs)], wd=0.1)
    for g in grads:
        ref.step([v.numpy() for v in views(g, segs)], 1e-2, how)
    expected = torch.from_numpy(np.concatenate([x.reshape(-1) for x in ref.p]))
    assert float((flat - expected).abs().max() / expected.abs().max()) <= 1e-10
    plain = build("adamw", {"lr": 1e-2, "weight_decay": 0.1})
    other, pstate = p0.clone(), plain.init_state(p0)
    for g in grads:
        plain.update(views(other, segs), views(g.clone(), segs), pstate, step(1e-2, ps))
    assert not torch.allclose(other, flat)  # the mask changed the trajectory


def test_c_sgd_nesterov_matches_the_formula() -> None:
    """In float64, as C-AdamW's test."""
    p0 = torch.randn(TOTAL, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grads = [g.double() for g in _grads(60)]
    opt = build("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01, "cautious": True})
    ps = pieces(SHAPES)
    flat, state, segs = p0.clone(), opt.init_state(p0), step(0, ps).segments
    for g in grads:
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(0.05, ps))
    refs = [v.double().clone() for v in views(p0, segs)]
    bufs: list[torch.Tensor | None] = [None] * len(refs)
    for g in grads:
        for i, (p, gv) in enumerate(zip(refs, views(g.double(), segs), strict=True)):
            d = gv + 0.01 * p
            bufs[i] = d.clone() if bufs[i] is None else bufs[i] * 0.9 + d  # type: ignore[operator]
            u = d + 0.9 * bufs[i]  # type: ignore[operator]
            phi = (u * gv > 0).double()
            p.sub_(0.05 * u * phi / max(float(phi.mean()), 1e-3))
    ref = torch.cat(refs)
    assert float((flat - ref).abs().max() / ref.abs().max()) <= 1e-10


def test_the_mask_drops_disagreeing_coordinates_and_rescales() -> None:
    u = torch.tensor([1.0, -2.0, 3.0, -4.0])
    g = torch.tensor([1.0, 1.0, -1.0, -1.0])  # agree on 0 and 3
    mean = u.clone()
    apply_cautious(mean, g, CautiousOptions(cautious=True))
    assert mean.tolist() == [2.0, 0.0, 0.0, -8.0]  # phi / mean(phi) = 2
    count = u.clone()
    apply_cautious(count, g, CautiousOptions(cautious=True, cautious_normalization="count"))
    assert torch.allclose(count, torch.tensor([4 / 3, 0.0, 0.0, -16 / 3]))  # phi * 4 / (2 + 1)


@pytest.mark.parametrize(
    ("name", "hyper", "field"),
    [
        ("adamw", {"cautious": True, "cautious_normalization": "median"}, "spec.optimizer.hyperparameters.cautious_normalization"),
        ("sgd", {"cautious": True}, "spec.optimizer.hyperparameters.cautious"),
        ("lion", {"cautious": True, "cautious_clamp": 0.0}, "spec.optimizer.hyperparameters.cautious_clamp"),
    ],
)
def test_bad_cautious_options_name_the_field(name: str, hyper: dict[str, Any], field: str) -> None:
    from paramserver.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build(name, hyper, "spec.optimizer")
    assert err.value.field == field


def test_cautious_keeps_tensors_whole_in_the_placement() -> None:
    params = (("a", (160,), ""), ("b", (40,), ""))
    split = JobConfig(parameters=params, optimizer="adamw", num_shards=2).plan()
    whole = JobConfig(parameters=params, optimizer="adamw", hyperparameters={"cautious": True}, num_shards=2).plan()
    assert [(s.start, s.length) for spans in split for s in spans] == [(0, 96), (96, 104)]  # "a" cut at an aligned 96
    assert sorted((s.start, s.length) for spans in whole for s in spans) == [(0, 160), (160, 40)]


MOMENTUM_RULES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {"momentum": 0.9, "nesterov": True}),
    ("adam", {}),
    ("adamw", {"weight_decay": 0.0, "amsgrad": True}),
    ("lion", {}),
    ("tiger", {"weight_decay": 0.0}),
    ("tiger_full", {"weight_decay": 0.0}),
    ("muon", {"weight_decay": 0.0, "ns_dtype": "float32"}),
    ("galore", {"rank": 4, "update_proj_gap": 2}),
    ("adafactor", {"beta1": 0.9}),
    ("lamb", {}),
]


@pytest.mark.parametrize(("name", "hyper"), MOMENTUM_RULES, ids=[n for n, _ in MOMENTUM_RULES])
def test_every_momentum_rule_takes_the_cautious_mask(name: str, hyper: dict[str, Any]) -> None:
    """From the same parameters and state, the cautious step is the plain step kept only where it
    moves against the gradient, rescaled per tensor by 1 / mean(mask) (LAMB: its trust ratio is
    taken after the mask, so only the kept coordinates and their direction are checked)."""
    import copy

    shapes: list[tuple[int, ...]] = [(24, 16), (16, 40)]
    ps = pieces(shapes, names=["blocks.0.attn.w", "blocks.0.mlp.w"])
    total = sum(p.length for p in ps)
    plain, caut = build(name, {"lr": 1e-2, **hyper}), build(name, {"lr": 1e-2, **hyper, "cautious": True})
    for opt in (plain, caut):
        opt.bind([p.param for p in ps], "spec.optimizer.hyperparameters")
    params = torch.randn(total, generator=torch.Generator().manual_seed(0))
    state = plain.init_state(params)
    tensors = {p.param.index: plain.init_tensor_state(p, params.device) for p in ps}
    segs = step(0, ps).segments
    gen = torch.Generator().manual_seed(1)
    for s in range(3):
        plain.update(views(params, segs), views(torch.randn(total, generator=gen), segs), state, step(1e-2, ps, s, tensors))
    g = torch.randn(total, generator=gen)
    results = []
    for opt in (plain, caut):
        p, st, ts = params.clone(), copy.deepcopy(state), copy.deepcopy(tensors)
        opt.update(views(p, segs), views(g.clone(), segs), st, step(1e-2, ps, 3, ts))
        results.append(p - params)
    for d_plain, d_caut, gv in zip(views(results[0], segs), views(results[1], segs), views(g, segs), strict=True):
        phi = (d_plain * gv < 0).float()
        assert 0 < float(phi.mean()) < 1
        assert torch.all(d_caut[phi == 0] == 0) and torch.all(d_caut * gv <= 0)
        if name != "lamb":
            expected = d_plain * phi / max(float(phi.mean()), 1e-3)
            assert torch.allclose(d_caut, expected, rtol=1e-4, atol=1e-6)  # (d = p1 - p0 carries ulp(p0))
