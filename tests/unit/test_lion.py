"""Lion and plain Tiger against lucidrains' lion-pytorch (the spec's pip reference), bit for bit."""

from __future__ import annotations

import pytest
import torch
from lion_pytorch import Lion as RefLion

from paramserver.optim import build
from paramserver.optim.base import views
from tests.helpers import pieces, step


def _run(name: str, hyper: dict[str, object], ref_kw: dict[str, object], segments: list[tuple[int, int]] | None) -> None:
    sizes = (37, 1001)
    p0 = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    opt = build(name, hyper)
    flat = p0.clone()
    state = opt.init_state(flat)
    refs = [p0[:37].clone().requires_grad_(True), p0[37:].clone().requires_grad_(True)]
    ref = RefLion(refs, **ref_kw)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(1)
    segs = segments or [(0, 37), (37, 1001)]
    for s in range(100):
        grad = torch.randn(sum(sizes), generator=g) * (1 + s % 5)
        grad[::97] = 0.0  # sign(0) = 0 paths
        lr = float(ref_kw["lr"]) * (0.5 + 0.5 * (s % 3))  # type: ignore[arg-type]
        for group in ref.param_groups:
            group["lr"] = lr
        g2 = grad.clone()
        opt.update(views(flat, segs), views(g2, segs), state, step(lr, pieces([(37,), (1001,)], segs)))
        refs[0].grad, refs[1].grad = grad[:37].clone(), grad[37:].clone()
        ref.step()
        assert torch.equal(flat, torch.cat([r.detach() for r in refs])), f"step {s}"
    assert torch.equal(state["exp_avg"], torch.cat([ref.state[r]["exp_avg"] for r in refs]))


@pytest.mark.parametrize("segments", [None, [(0, 37), (37, 336), (373, 665)]], ids=["per-tensor", "split-at-aligned-cut"])
def test_lion_is_bitwise_lion_pytorch(segments: list[tuple[int, int]] | None) -> None:
    _run("lion", {"lr": 3e-4, "betas": [0.9, 0.99], "weight_decay": 0.1}, {"lr": 3e-4, "betas": (0.9, 0.99), "weight_decay": 0.1}, segments)


def test_plain_tiger_is_lion_with_equal_betas() -> None:
    _run("tiger", {"lr": 1e-3, "beta": 0.965, "weight_decay": 0.01}, {"lr": 1e-3, "betas": (0.965, 0.965), "weight_decay": 0.01}, None)


def test_lion_bad_beta_names_the_field() -> None:
    from paramserver.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build("lion", {"betas": [0.9, 1.5]}, "spec.optimizer")
    assert err.value.field == "spec.optimizer.hyperparameters.betas[1]"


def test_tensors_larger_than_a_block_stay_bitwise() -> None:
    """Lion runs block by block (cache reuse); over tensors of several blocks it is still lion-pytorch."""
    from paramserver.optim.base import BLOCK

    n = 3 * BLOCK + 1001
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(0))
    opt = build("lion", {"lr": 3e-4, "weight_decay": 0.1})
    flat, state = p0.clone(), opt.init_state(p0)
    ref_p = p0.clone().requires_grad_(True)
    ref = RefLion([ref_p], lr=3e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        g = torch.randn(n, generator=gen)
        opt.update([flat], [g.clone()], state, step(3e-4, pieces([(n,)])))
        ref_p.grad = g.clone()
        ref.step()
    assert torch.equal(flat, ref_p.detach())
