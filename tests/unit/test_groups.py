"""Parameter groups: assignment rules, and a shard with several groups against torch.optim."""

from __future__ import annotations

import pytest
import torch

from paramserver.errors import ConfigError
from paramserver.jobconfig import GroupRule, JobConfig
from paramserver.shard import ShardState
from paramserver.steps import Decision
from tests.helpers import flat_params, load, set_gradient

PARAMS = (("emb", (11, 5), ""), ("blk.w", (5, 7), ""), ("blk.b", (7,), ""), ("norm.g", (7,), ""), ("head", (7, 3), "head"))
GROUPS = (
    GroupRule(name="no_decay", ndims=(0, 1), hyperparameters={"weight_decay": 0.0}),
    GroupRule(name="head", optimizer="sgd", hyperparameters={"lr": 0.05, "momentum": 0.9}),
    GroupRule(name="blocks", patterns=("blk.*",), hyperparameters={"lr": 3e-3}),
)


def config(shards: int = 1) -> JobConfig:
    return JobConfig(parameters=PARAMS, optimizer="adamw", hyperparameters={"lr": 1e-2, "weight_decay": 0.1}, groups=GROUPS,
                     num_shards=shards)  # fmt: skip


def test_assignment_rules() -> None:
    # explicit group > first matching rule > default; "blk.b" is 1-D so no_decay comes first
    assert config().assign() == [0, 3, 1, 1, 2]
    opts = config().build_optimizers()
    assert [o.name for o in opts] == ["adamw", "adamw", "sgd", "adamw"]
    assert opts[1].hyper.weight_decay == 0.0 and opts[1].hyper.lr == 1e-2  # overrides merge with the job's
    assert opts[3].hyper.lr == 3e-3 and opts[3].hyper.weight_decay == 0.1
    assert opts[2].hyper.lr == 0.05


@pytest.mark.parametrize(
    ("params", "groups", "field"),
    [
        ((("w", (3,), "nope"),), (), "spec.parameters[0].group"),
        ((("w", (3,), ""),), (GroupRule(name="a"), GroupRule(name="a")), "spec.param_groups[1].name"),
        ((("w", (3,), ""),), (GroupRule(name="x", optimizer="rmsprop"),), "spec.param_groups[0].optimizer.name"),
    ],
)
def test_bad_groups_name_the_field(params: tuple[tuple[str, tuple[int, ...], str], ...], groups: tuple[GroupRule, ...], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        JobConfig(parameters=params, optimizer="adamw", groups=groups).validate()
    assert err.value.field == field


@pytest.mark.parametrize("shards", [1, 3])
def test_shards_with_groups_match_torch_bitwise(shards: int) -> None:
    cfg = config(shards)
    torch.manual_seed(0)
    tensors = [torch.randn(*shape) for _, shape, _ in PARAMS]
    flat0 = torch.cat([t.reshape(-1) for t in tensors])
    states = []
    for i, spans in enumerate(cfg.plan()):
        st = ShardState(cfg, i, spans)
        load(st, flat0.numpy())
        states.append(st)
    ref = [t.clone().requires_grad_(True) for t in tensors]
    adamw = torch.optim.AdamW(
        [{"params": [ref[0]]}, {"params": [ref[2], ref[3]], "weight_decay": 0.0}, {"params": [ref[1]], "lr": 3e-3}],
        lr=1e-2, weight_decay=0.1, fused=True,
    )  # fmt: skip
    sgd = torch.optim.SGD([ref[4]], lr=0.05, momentum=0.9, fused=True)
    gen = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(20):
            grad = torch.randn(flat0.numel(), generator=gen)
            for st in states:
                pieces = [grad[s.start : s.end] for s in st.spans]
                set_gradient(st, torch.cat(pieces))
                st.apply(Decision(step, True, "", 1.0, 1.0, 1))
            off = 0
            for r in ref:
                r.grad = grad[off : off + r.numel()].view(r.shape).clone()
                off += r.numel()
            adamw.step()
            sgd.step()
    finally:
        torch.set_num_threads(threads)
    ours = torch.from_numpy(flat_params(states))
    assert torch.equal(ours, torch.cat([r.detach().reshape(-1) for r in ref]))
