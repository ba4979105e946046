"""Adafactor against torch.optim.Adafactor (bitwise) and transformers' Adafactor (its options)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor

from paramserver.optim import build
from paramserver.optim.base import views
from tests.helpers import pieces, step

SHAPES: list[tuple[int, ...]] = [(37, 11), (11, 23), (23,), (), (3, 5, 7)]


def _run(opt_hyper: dict[str, Any], make_ref: Any, steps: int, lr_of: Any) -> tuple[torch.Tensor, torch.Tensor]:
    total = sum(torch.Size(s).numel() for s in SHAPES)
    p0 = torch.randn(total, generator=torch.Generator().manual_seed(0))
    flat = p0.clone()
    opt = build("adafactor", opt_hyper)
    ps = pieces(SHAPES)
    tensors = {p.param.index: opt.init_tensor_state(p, flat.device) for p in ps}
    state = opt.init_state(flat)
    segs = step(0, ps).segments
    refs, off = [], 0
    for s in SHAPES:
        n = torch.Size(s).numel()
        refs.append(torch.nn.Parameter(p0[off : off + n].view(s).clone()))
        off += n
    ref = make_ref(refs)
    gen = torch.Generator().manual_seed(1)
    for s in range(steps):
        lr = lr_of(s)
        for group in ref.param_groups:
            group["lr"] = lr
        g = torch.randn(total, generator=gen) * (1 + s % 5)
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(lr, ps, s, tensors))
        off = 0
        for r in refs:
            r.grad = g[off : off + r.numel()].view(r.shape).clone()
            off += r.numel()
        ref.step()
    return flat, torch.cat([r.detach().reshape(-1) for r in refs])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_defaults_are_bitwise_torch_adafactor(weight_decay: float) -> None:
    ours, ref = _run(
        {"lr": 1e-2, "weight_decay": weight_decay},
        lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=weight_decay, foreach=False),
        100,
        lambda s: 1e-2 * (0.5 + 0.5 * (s % 3)),
    )
    assert torch.equal(ours, ref)


EXTERNAL = {"relative_step": False, "scale_parameter": False, "beta1": 0.9}
CASES = [
    # HF's defaults (relative step with rho_max 1e-2, parameter scale)
    ({"lr": 1e-2}, {"lr": None}),
    # an external schedule: HF relative_step=False, no parameter scale, with a first moment
    ({"lr": 1e-3, **EXTERNAL}, {"lr": 1e-3, **EXTERNAL}),
    # HF's decay (relative to the step size), with a clip threshold
    ({"lr": 1e-2, "weight_decay": 0.1, "relative_weight_decay": True, "d": 0.5}, {"lr": None, "weight_decay": 0.1, "clip_threshold": 0.5}),
]  # fmt: skip


@pytest.mark.parametrize(("hyper", "hf"), CASES, ids=["hf-defaults", "external-lr-beta1", "relative-decay-clip"])
def test_hf_options_match_transformers(hyper: dict[str, Any], hf: dict[str, Any]) -> None:
    """HF adds eps1 = 1e-30 to g^2 where torch clamps at fp32's eps: 1e-5 relative (optimizers.md 3)."""
    constant = hyper["lr"]
    hf_kw = {"relative_step": True, "scale_parameter": True, "warmup_init": False, **hf}
    ours, ref = _run(hyper, lambda ps: HFAdafactor(ps, **hf_kw), 100, lambda s: constant)
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err <= 1e-5


def test_factored_state_is_tiny() -> None:
    opt = build("adafactor", {})
    (p,) = pieces([(1000, 500)])
    st = opt.init_tensor_state(p, torch.device("cpu"))
    assert sorted(st) == ["col_var", "row_var"]
    assert st["row_var"].shape == (1000, 1) and st["col_var"].shape == (1, 500)
