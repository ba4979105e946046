"""Every rule gives the same bits whatever the memory alignment of its tensors: a shard's local
buffer puts a parameter at any offset (flat offsets may be odd), and another shard count or a
restored snapshot puts it elsewhere. (torch.dot through MKL, for one, is alignment-dependent.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from paramserver.optim import available, build
from paramserver.optim.base import BLOCK, views
from tests.helpers import pieces, step

SHAPES: list[tuple[int, ...]] = [(40, 24), (24, 40), (BLOCK // 64 + 3, 65)]
NAMES = ["blocks.0.attn.w", "blocks.1.mlp.w", "blocks.2.mlp.w"]
HYPER: dict[str, dict[str, Any]] = {
    "galore": {"rank": 4, "update_proj_gap": 3},
    "lisa": {"active_layers": 2, "interval_steps": 2},
    "sgd": {"momentum": 0.9, "nesterov": True},
}
CAUTIOUS = [("adamw", {"cautious": True}), ("sgd", {"momentum": 0.9, "cautious": True}), ("lion", {"cautious": True})]


def _run(name: str, hyper: dict[str, Any], offset: int) -> torch.Tensor:
    ps = pieces(SHAPES, names=NAMES)
    n = sum(p.length for p in ps)
    opt = build(name, hyper)
    opt.bind([p.param for p in ps], "spec.optimizer.hyperparameters")
    params = torch.empty(n + offset)[offset:]
    params.copy_(torch.randn(n, generator=torch.Generator().manual_seed(0)))
    state = opt.init_state(params)
    tensors = {p.param.index: opt.init_tensor_state(p, params.device) for p in ps}
    gen = torch.Generator().manual_seed(1)
    segs = step(0, ps).segments
    for s in range(6):
        grad = torch.empty(n + offset)[offset:]
        grad.copy_(torch.randn(n, generator=gen))
        opt.update(views(params, segs), views(grad, segs), state, step(1e-2, ps, s, tensors))
    return params.clone()


@pytest.mark.parametrize(("name", "hyper"), [(n, HYPER.get(n, {})) for n in available()] + CAUTIOUS,
                         ids=[*available(), "c-adamw", "c-sgd", "c-lion"])  # fmt: skip
def test_results_do_not_depend_on_memory_alignment(name: str, hyper: dict[str, Any]) -> None:
    assert torch.equal(_run(name, hyper, 0), _run(name, hyper, 3))
