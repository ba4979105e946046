"""The global gradient norm has the same bits on any split of the flat space, and so do clipped and
spike-guarded training runs on 1, 2, 3 and 5 shards (no Ray: shard states fed directly)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

from paramserver.gradnorm import BLOCK, NormPart, block_sums, sum_of_squares
from paramserver.gradnorm_kernel import norm_part
from paramserver.jobconfig import GroupRule, JobConfig
from paramserver.placement import Span
from paramserver.shard import Contribution, ShardState
from paramserver.steps import SpikeGuard, decide
from tests.helpers import flat_params
from tests.unit.test_spilled_shard import CASES, IDS, feed


def wide(n: int, seed: int = 0) -> np.ndarray:
    """Gradient-like values over many orders of magnitude (where summation order shows)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 10.0 ** rng.integers(-8, 4, n)).astype(np.float32)


def part(values: np.ndarray, spans: list[Span], outside: tuple[tuple[int, int], ...] = ()) -> NormPart:
    local = torch.from_numpy(np.concatenate([values[s.start : s.end] for s in spans]))
    return norm_part(lambda a, n: local[a : a + n], [(s.start, s.length) for s in spans], values.size, outside)


def random_split(total: int, shards: int, rng: np.random.Generator) -> list[list[Span]]:
    """Contiguous cuts at arbitrary (odd) offsets, ranges dealt round-robin so that shards hold
    several non-adjacent spans."""
    cuts = sorted({0, total, *(int(c) for c in rng.integers(1, total, 3 * shards))})
    out: list[list[Span]] = [[] for _ in range(shards)]
    for k, (a, b) in enumerate(itertools.pairwise(cuts)):
        out[k % shards].append(Span(a, b - a))
    return [s for s in out if s]


def test_the_torch_kernel_has_the_bits_of_the_reference() -> None:
    x = wide(5 * BLOCK, seed=1)
    y = torch.from_numpy(x).double()
    y.mul_(y)
    from paramserver.gradnorm_kernel import block_sums as torch_block_sums

    assert np.array_equal(torch_block_sums(y).numpy(), block_sums(x))


@pytest.mark.parametrize("total", [2, 77, BLOCK, 3 * BLOCK + 1235])
def test_the_norm_does_not_depend_on_the_split(total: int) -> None:
    g = wide(total)
    rng = np.random.default_rng(total)
    one = sum_of_squares([part(g, [Span(0, total)])])
    exact = math.fsum((g.astype(np.float64) ** 2).tolist())
    assert one == pytest.approx(exact, rel=1e-13)
    for shards in (2, 3, 5, 8):
        plan = random_split(total, shards, rng)
        assert sum_of_squares(part(g, spans) for spans in plan) == one, shards
        assert sum_of_squares(reversed([part(g, spans) for spans in plan])) == one  # arrival order is free


def test_frozen_elements_count_as_zeros_on_any_split() -> None:
    total = 2 * BLOCK + 500
    g = wide(total, seed=3)
    frozen = (100, BLOCK + 30)  # flat [100, BLOCK + 30) is outside the norm
    masked = g.copy()
    masked[frozen[0] : frozen[1]] = np.nan  # whatever it holds
    expect = g.copy()
    expect[frozen[0] : frozen[1]] = 0
    want = sum_of_squares([part(expect, [Span(0, total)])])
    for cut in (50, 101, BLOCK, BLOCK + 7):
        a, b = Span(0, cut), Span(cut, total - cut)
        pa = part(masked, [a], ((max(frozen[0], 0), min(frozen[1], cut)),) if frozen[0] < cut else ())
        lo, hi = max(frozen[0], cut) - cut, frozen[1] - cut
        pb = part(masked, [b], ((lo, hi),) if lo < hi else ())
        assert sum_of_squares([pa, pb]) == want


def test_non_finite_values_reach_the_decision() -> None:
    g = wide(3 * BLOCK)
    for bad, want in ((np.inf, math.inf), (np.nan, math.nan)):
        x = g.copy()
        x[BLOCK + 3] = bad
        for plan in ([[Span(0, x.size)]], [[Span(0, BLOCK + 3)], [Span(BLOCK + 3, 2 * BLOCK - 3)]]):
            got = sum_of_squares(part(x, spans) for spans in plan)
            assert (math.isnan(got) and math.isnan(want)) or got == want


def _train(cfg: JobConfig, shards: int, steps: int, spike: bool) -> dict[str, np.ndarray]:
    """Train a job split over `shards` shards (states fed directly); the flat parameters and state."""
    cfg = JobConfig(**{**cfg.__dict__, "num_shards": shards})
    states = [ShardState(cfg, i, spans) for i, spans in enumerate(cfg.plan())]
    total = cfg.total_elements
    for st in states:
        st.load(feed(st, np.linspace(-1, 1, total, dtype=np.float32)))
    guard = SpikeGuard(window=4, warmup=2, k=1.0) if spike else None
    decisions = []
    for step in range(steps):
        g = wide(total, seed=100 + step) * (50.0 if step == 4 else 1.0)
        stats = [st.reduce([Contribution(w, 3, feed(st, g * (w + 1), seed=w)) for w in (0, 1)]) for st in states]
        d = decide(step, stats, cfg.max_grad_norm, guard)
        decisions.append(d)
        for st in states:
            st.apply(d)
    return {"decisions": decisions, "params": flat_params(states)}


@pytest.mark.parametrize(
    ("name", "hyper", "groups", "clip"), [c for c in CASES if c[3]], ids=[i for i, c in zip(IDS, CASES, strict=True) if c[3]]
)
def test_clipped_and_spike_guarded_training_is_bitwise_equal_on_1_2_3_and_5_shards(
    name: str, hyper: dict[str, Any], groups: tuple[GroupRule, ...], clip: float
) -> None:
    from tests.unit.test_spilled_shard import PARAMS

    cfg = JobConfig(parameters=PARAMS, optimizer=name, hyperparameters=hyper, groups=groups, num_workers=2, max_grad_norm=clip)
    runs = {n: _train(cfg, n, 7, spike=True) for n in (1, 2, 3, 5)}
    ref = runs[1]
    assert any(d.clip_coef < 1.0 for d in ref["decisions"])  # clipping really happened
    assert any(not d.apply for d in ref["decisions"])  # and the guard skipped the spike
    for n, run in runs.items():
        assert run["decisions"] == ref["decisions"], n
        assert np.array_equal(run["params"], ref["params"]), n
