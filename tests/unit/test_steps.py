"""The coordinator's step decision and the exactly-once ledger (pure logic)."""

from __future__ import annotations

import math

import pytest

from paramserver.errors import ParamServerError, Reason
from paramserver.gradnorm import NormPart
from paramserver.ledger import Ledger
from paramserver.steps import ShardStats, decide


def test_clip_coefficient_matches_torch_formula() -> None:
    stats = [ShardStats(0, NormPart.of(9.0), 10), ShardStats(1, NormPart.of(16.0), 10)]
    d = decide(3, stats, max_grad_norm=1.0)
    assert d.apply and d.grad_norm == 5.0
    assert d.clip_coef == pytest.approx(1.0 / (5.0 + 1e-6))
    assert decide(3, stats, max_grad_norm=0.0).clip_coef == 1.0
    assert decide(3, stats, max_grad_norm=100.0).clip_coef == 1.0


@pytest.mark.parametrize(
    ("stats", "reason"),
    [
        ([ShardStats(0, NormPart.of(math.inf), 4), ShardStats(1, NormPart.of(1.0), 4)], Reason.NON_FINITE_GRADIENT),
        ([ShardStats(0, NormPart.of(math.nan), 4), ShardStats(1, NormPart.of(1.0), 4)], Reason.NON_FINITE_GRADIENT),
        ([ShardStats(0, NormPart.of(0.0), 0), ShardStats(1, NormPart.of(0.0), 0)], Reason.NO_LOSS_TERMS),
        ([ShardStats(0, NormPart.of(1.0), 4), ShardStats(1, NormPart.of(1.0), 5)], Reason.INCONSISTENT_LOSS_TERMS),
        ([ShardStats(0, NormPart.of(1.0), 4, lrs=((0.1,), (0.2,))), ShardStats(1, NormPart.of(1.0), 4, lrs=((0.1,), (0.2,)))],
         Reason.LR_MISMATCH),  # two workers, two lrs
        ([ShardStats(0, NormPart.of(1.0), 4, lrs=((0.1,),)), ShardStats(1, NormPart.of(1.0), 4, lrs=((0.2,),))],
         Reason.LR_MISMATCH),  # shards that saw different lrs
        ([ShardStats(0, NormPart.of(1.0), 4, lrs=((), (0.1,))), ShardStats(1, NormPart.of(1.0), 4, lrs=((), (0.1,)))],
         Reason.LR_MISMATCH),  # one worker on the job's schedule, one driving the lr
    ],
)  # fmt: skip
def test_skips(stats: list[ShardStats], reason: str) -> None:
    d = decide(0, stats, 1.0)
    assert not d.apply and d.skip_reason == reason and d.lrs == ()


def test_the_lrs_every_worker_sent_become_the_decisions_and_none_keep_the_schedule() -> None:
    same = [ShardStats(i, NormPart.of(1.0), 4, lrs=((0.1, 0.05),)) for i in range(2)]
    assert decide(0, same, 0.0).lrs == (0.1, 0.05) and decide(0, same, 0.0).apply
    plain = [ShardStats(i, NormPart.of(1.0), 4, lrs=((),)) for i in range(2)]
    assert decide(0, plain, 0.0).lrs == () and decide(0, plain, 0.0).apply


def test_ledger_returns_first_answer_and_refuses_reuse() -> None:
    led: Ledger[str] = Ledger(capacity=2)
    assert led.lookup("a", 1) is None
    led.record("a", 1, "first")
    assert led.lookup("a", 1) == "first"
    with pytest.raises(ParamServerError) as err:
        led.lookup("a", 2)
    assert err.value.reason == Reason.REQUEST_ID_REUSED
    led.record("b", 1, "x")
    led.record("c", 1, "y")
    assert led.lookup("a", 1) is None and len(led) == 2


def test_spike_guard_waits_for_warmup_then_skips_spikes() -> None:
    from paramserver.steps import SpikeGuard

    guard = SpikeGuard(window=8, warmup=5, k=3.0)
    norms = [1.0, 1.1, 0.9, 1.05, 0.95]
    assert not any(guard.is_spike(n) for n in [50.0])  # nothing decided before the warmup
    guard = SpikeGuard(window=8, warmup=5, k=3.0)
    assert not any(guard.is_spike(n) for n in norms)
    assert guard.is_spike(10.0)
    assert not guard.is_spike(1.0)
    stats = [ShardStats(0, NormPart.of(4.0), 3), ShardStats(1, NormPart.of(12.0), 3)]  # norm 4
    d = decide(9, stats, 1.0, SpikeGuard(window=8, warmup=3, k=3.0, history=[1.0, 1.0, 1.1, 0.9]))
    assert not d.apply and d.skip_reason == Reason.GRADIENT_SPIKE and d.grad_norm == 4.0
    inf = decide(9, [ShardStats(0, NormPart.of(math.inf), 3)], 1.0, g := SpikeGuard(window=8, warmup=1, k=3.0))
    assert inf.skip_reason == Reason.NON_FINITE_GRADIENT and len(g.norms) == 0  # never enters the window
