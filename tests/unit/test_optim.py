"""Pure optimizer math against torch.optim, whole and split at odd offsets."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from paramserver.errors import ConfigError
from paramserver.optim import build
from paramserver.optim.base import views
from tests.helpers import pieces, step

CASES: list[tuple[str, dict[str, Any], type[torch.optim.Optimizer], dict[str, Any]]] = [
    ("sgd", {"lr": 0.1}, torch.optim.SGD, {"lr": 0.1}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}, torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1}, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.1}),
    ("adamw", {"lr": 1e-2, "betas": [0.8, 0.95]}, torch.optim.AdamW, {"lr": 1e-2, "betas": (0.8, 0.95)}),
    ("adamw", {"lr": 1e-2, "amsgrad": True, "eps": 1e-6}, torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True, "eps": 1e-6}),
]  # fmt: skip
IDS = ["sgd", "sgd-momentum-dampening-wd", "sgd-nesterov-wd", "adam-l2", "adamw-betas", "adamw-amsgrad"]


def _grads(n: int, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=g) * (1.0 + (s % 7)) for s in range(steps)]


@pytest.mark.parametrize(("name", "hyper", "ref_cls", "ref_kw"), CASES, ids=IDS)
@pytest.mark.parametrize("fused", [True, False], ids=["ref-fused", "ref-default"])
def test_matches_torch(name: str, hyper: dict[str, Any], ref_cls: type[torch.optim.Optimizer], ref_kw: dict[str, Any], fused: bool) -> None:
    n, steps = 1001, 100
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(0))
    opt = build(name, hyper)
    ours = p0.clone()
    state = opt.init_state(ours)
    ref = p0.clone().requires_grad_(True)
    ref_opt = ref_cls([ref], **ref_kw, **({"fused": True} if fused else {}))
    for s, g in enumerate(_grads(n, steps)):
        lr = ref_kw["lr"] * (0.5 + 0.5 * (s % 3))  # a changing (scheduled) lr
        for group in ref_opt.param_groups:
            group["lr"] = lr
        opt.update([ours], [g.clone()], state, step(lr, pieces([(n,)])))
        ref.grad = g.clone()
        ref_opt.step()
        if fused:
            assert torch.equal(ours, ref.detach()), f"step {s}: not bitwise equal to the fused reference"
    scale = ref.detach().abs().max()
    assert ((ours - ref.detach()).abs().max() / scale) <= 1e-6


@pytest.mark.parametrize(("name", "hyper", "ref_cls", "ref_kw"), CASES, ids=IDS)
def test_segments_aligned_to_the_tensor_start_are_bitwise_equal(name: str, hyper: dict[str, Any], ref_cls: Any, ref_kw: Any) -> None:
    """Two tensors, the second split in three at multiples of 16 from its start (placement.ALIGN),
    updated segment by segment as a shard does: bit-identical to torch.optim per tensor."""
    sizes, cuts = (37, 1001), (37 + 336, 37 + 784)
    segments = [(0, 37), (37, 336), (37 + 336, 448), (37 + 784, 1001 - 784)]
    p0 = torch.randn(sum(sizes), generator=torch.Generator().manual_seed(0))
    opt = build(name, hyper)
    flat = p0.clone()
    state = opt.init_state(flat)
    refs = [p0[:37].clone().requires_grad_(True), p0[37:].clone().requires_grad_(True)]
    ref_opt = ref_cls(refs, **ref_kw, fused=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a shard actor; torch's tail split differs across thread counts
    try:
        for g in _grads(sum(sizes), 60):
            g = g.clone()
            opt.update(views(flat, segments), views(g, segments), state, step(ref_kw["lr"], pieces([(37,), (1001,)], segments)))
            refs[0].grad, refs[1].grad = g[:37].clone(), g[37:].clone()
            ref_opt.step()
    finally:
        torch.set_num_threads(threads)
    assert cuts[0] < cuts[1]
    assert torch.equal(flat, torch.cat([r.detach() for r in refs]))


@pytest.mark.parametrize(("name", "hyper", "ref_cls", "ref_kw"), CASES, ids=IDS)
def test_split_at_unaligned_offsets_is_close(name: str, hyper: dict[str, Any], ref_cls: Any, ref_kw: Any) -> None:
    n, cut1, cut2 = 1001, 333, 777
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(0))
    whole_opt, part_opt = build(name, hyper), build(name, hyper)
    whole = p0.clone()
    ws = whole_opt.init_state(whole)
    parts = [p0[:cut1].clone(), p0[cut1:cut2].clone(), p0[cut2:].clone()]
    states = [part_opt.init_state(p) for p in parts]
    for g in _grads(n, 50):
        whole_opt.update([whole], [g.clone()], ws, step(0.01, pieces([(n,)])))
        for p, st, gp in zip(parts, states, (g[:cut1], g[cut1:cut2], g[cut2:]), strict=True):
            part_opt.update([p], [gp.clone()], st, step(0.01, pieces([(p.numel(),)])))
    # torch's fused CPU kernels run a vector loop and a scalar tail that may round
    # differently, so a piece that starts mid-vector can differ by an ulp.
    split_result = torch.cat(parts)
    assert ((split_result - whole).abs().max() / whole.abs().max()) <= 1e-6
    assert (split_result != whole).float().mean() < 0.05


@pytest.mark.parametrize(
    ("name", "hyper", "field"),
    [
        ("nope", {}, "spec.optimizer.name"),
        ("adamw", {"lr": "fast"}, "spec.optimizer.hyperparameters.lr"),
        ("adamw", {"betas": [0.9]}, "spec.optimizer.hyperparameters.betas"),
        ("adamw", {"betas": [0.9, 1.5]}, "spec.optimizer.hyperparameters.betas[1]"),
        ("adamw", {"momentum": 0.9}, "spec.optimizer.hyperparameters.momentum"),
        ("sgd", {"nesterov": True}, "spec.optimizer.hyperparameters.nesterov"),
        ("sgd", {"lr": -1.0}, "spec.optimizer.hyperparameters.lr"),
    ],
)
def test_bad_hyperparameters_name_the_field(name: str, hyper: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(name, hyper, "spec.optimizer")
    assert err.value.field == field


def test_sgd_state_from_a_snapshot_without_the_started_flag_counts_as_started() -> None:
    """Snapshots written before the momentum buffer was eager carry the buffer alone."""
    opt = build("sgd", {"lr": 0.1, "momentum": 0.9})
    state = opt.init_state(torch.zeros(3))
    assert int(state["momentum_started"]) == 0
    state["momentum_buffer"].fill_(1.0)
    opt.restored(state, {"momentum_buffer"})
    p = torch.zeros(3)
    opt.update([p], [torch.zeros(3)], state, step(0.1, pieces([(3,)])))
    assert torch.allclose(p, torch.full((3,), -0.09))  # buf = 0.9 * 1 + 0, not a copy of d = 0
