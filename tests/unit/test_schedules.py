"""LR schedules: the documented formulas and torch LambdaLR's warmup convention."""

from __future__ import annotations

import math

import pytest
import torch

from paramserver.errors import ConfigError
from paramserver.optim import build_schedule


def test_constant_and_warmup() -> None:
    assert [build_schedule("", {})(s) for s in range(3)] == [1.0, 1.0, 1.0]
    f = build_schedule("linear_warmup", {"warmup_steps": 4})
    assert [f(s) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_warmup_cosine_formula() -> None:
    f = build_schedule("warmup_cosine", {"warmup_steps": 10, "total_steps": 110, "min_lr_ratio": 0.1})
    assert f(0) == 0.0 and f(5) == 0.5 and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_warmup_linear_formula() -> None:
    f = build_schedule("warmup_linear", {"warmup_steps": 2, "total_steps": 12})
    assert [f(s) for s in (0, 1, 2, 7, 12, 20)] == pytest.approx([0, 0.5, 1.0, 0.5, 0.0, 0.0])


def test_first_update_uses_f0_like_lambdalr() -> None:
    f = build_schedule("warmup_cosine", {"warmup_steps": 3, "total_steps": 10})
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for s in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(f(s))
        opt.step()
        sched.step()


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("cyclic", {}, "schedule.name"),
        ("warmup_cosine", {"warmup_steps": 3}, "schedule.parameters.total_steps"),
        ("linear_warmup", {"warmup_steps": 2.5}, "schedule.parameters.warmup_steps"),
        ("warmup_cosine", {"total_steps": 10, "min_lr_ratio": 2}, "schedule.parameters.min_lr_ratio"),
    ],
)
def test_bad_schedule_names_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_schedule(name, params)
    assert err.value.field == field


def test_wsd_shapes() -> None:
    base = {"warmup_steps": 2, "stable_steps": 3, "decay_steps": 4, "min_lr_ratio": 0.2}
    lin = build_schedule("wsd", base)
    assert [lin(s) for s in range(12)] == pytest.approx([0, 0.5, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2])
    cos = build_schedule("wsd", {**base, "decay_shape": "cosine"})
    assert cos(7) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    sq = build_schedule("wsd", {**base, "decay_shape": "sqrt"})
    assert sq(6) == pytest.approx(0.2 + 0.8 * (1 - math.sqrt(0.25)))


def test_inverse_sqrt_matches_the_spec_values() -> None:
    f = build_schedule("inverse_sqrt", {"warmup_steps": 10})
    assert [round(f(s), 4) for s in (0, 1, 5, 10, 11)] == [0.0, 0.1, 0.5, 1.0, 0.9535]
    g = build_schedule("inverse_sqrt", {})
    assert g(0) == 1.0 and g(30000) == pytest.approx(0.5)


def test_linear_decay_is_warmup_linear() -> None:
    a = build_schedule("linear_decay", {"warmup_steps": 3, "total_steps": 13})
    assert [a(s) for s in (0, 3, 8, 13, 20)] == pytest.approx([0, 1, 0.5, 0, 0])


def test_bad_wsd_names_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        build_schedule("wsd", {"decay_steps": 3, "decay_shape": "square"})
    assert err.value.field == "schedule.parameters.decay_shape"
