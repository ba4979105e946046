"""GaLore AdamW against galore-torch's GaLoreAdamW (the spec's pip reference), bit for bit."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from galore_torch import GaLoreAdamW

from paramserver.errors import ConfigError
from paramserver.jobconfig import JobConfig
from paramserver.optim import build
from paramserver.optim.base import views
from tests.helpers import pieces, step

SHAPES: list[tuple[int, ...]] = [(40, 12), (12, 40), (16, 16)]


@pytest.mark.parametrize(
    "hyper",
    [
        {"rank": 4, "update_proj_gap": 10, "scale": 0.25, "lr": 1e-2},
        {"rank": 8, "update_proj_gap": 7, "scale": 1.0, "lr": 5e-3, "weight_decay": 0.1},
    ],
    ids=["rank4-gap10", "rank8-gap7-decay"],
)
def test_bitwise_galore_torch(hyper: dict[str, Any]) -> None:
    """A tall, a wide and a square matrix, SVD refreshes at k = 0, gap, 2 gap, ... (30 steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one LAPACK/BLAS path for both (a shard actor runs on one thread)
    try:
        total = sum(torch.Size(s).numel() for s in SHAPES)
        p0 = torch.randn(total, generator=torch.Generator().manual_seed(0))
        opt = build("galore", hyper)
        ps = pieces(SHAPES)
        flat, state, segs = p0.clone(), opt.init_state(p0), step(0, ps).segments
        tensors = {p.param.index: opt.init_tensor_state(p, flat.device) for p in ps}
        refs = [torch.nn.Parameter(v.view(s).clone()) for v, s in zip(views(p0, segs), SHAPES, strict=True)]
        h = opt.hyper
        group = {"params": refs, "rank": h.rank, "update_proj_gap": h.update_proj_gap, "scale": h.scale, "proj_type": "std"}
        ref = GaLoreAdamW([group], lr=h.lr, weight_decay=h.weight_decay, no_deprecation_warning=True)
        gen = torch.Generator().manual_seed(1)
        for s in range(30):
            g = torch.randn(total, generator=gen) * (1 + s % 4)
            opt.update(views(flat, segs), views(g.clone(), segs), state, step(h.lr, ps, s, tensors))
            for r, gv in zip(refs, views(g, segs), strict=True):
                r.grad = gv.view(r.shape).clone()
            ref.step()
            assert torch.equal(flat, torch.cat([r.detach().reshape(-1) for r in refs])), f"step {s}"
        for p, r in zip(ps, refs, strict=True):
            assert torch.equal(tensors[p.param.index]["exp_avg"], ref.state[r]["exp_avg"])
    finally:
        torch.set_num_threads(threads)


def test_state_is_the_reduced_size() -> None:
    opt = build("galore", {"rank": 4})
    tall, wide = pieces([(40, 12), (12, 40)])
    st_tall, st_wide = (opt.init_tensor_state(p, torch.device("cpu")) for p in (tall, wide))
    assert st_tall["projection_t"].shape == (12, 4) and st_tall["exp_avg"].shape == (40, 4)
    assert st_wide["projection_t"].shape == (4, 12) and st_wide["exp_avg"].shape == (4, 40)


def test_galore_rejects_non_matrices_naming_the_parameter() -> None:
    cfg = JobConfig(parameters=(("w", (4, 4), ""), ("conv", (2, 2, 3, 3), "")), optimizer="galore")
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    assert err.value.field == "spec.parameters[1].shape"
