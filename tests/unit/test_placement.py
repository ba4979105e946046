"""The placement plan tiles the flat space, balances bytes, and keeps whole tensors whole."""

from __future__ import annotations

import pytest

from paramserver.errors import ConfigError
from paramserver.placement import ALIGN, layout, plan


def _tiles(spans: list[list[object]], total: int) -> bool:
    flat = sorted((s.start, s.end) for shard in spans for s in shard)  # type: ignore[attr-defined]
    pos = 0
    for a, b in flat:
        if a != pos:
            return False
        pos = b
    return pos == total


def test_layout_offsets() -> None:
    lay = layout([("a", (3, 4)), ("b", ()), ("c", (5,))])
    assert [(p.offset, p.numel) for p in lay] == [(0, 12), (12, 1), (13, 5)]


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7])
def test_flat_plan_is_balanced_and_tiles(shards: int) -> None:
    lay = layout([("a", (37, 11)), ("b", (11,)), ("c", (101,))])
    total = sum(p.numel for p in lay)
    spans = plan(lay, shards)
    assert _tiles(spans, total)  # type: ignore[arg-type]
    sizes = [sum(s.length for s in shard) for shard in spans]
    assert max(sizes) - min(sizes) <= 2 * ALIGN
    exact = [sum(s.length for s in shard) for shard in plan(lay, shards, align=1)]
    assert max(exact) - min(exact) <= 1


def test_cuts_inside_tensors_are_aligned_to_the_tensor_start_at_odd_flat_offsets() -> None:
    lay = layout([("bias", (7,)), ("w", (37, 11)), ("c", (101,))])
    bounds = [shard[0].start for shard in plan(lay, 3)][1:]
    inside = [(b, p) for b in bounds for p in lay if p.offset < b < p.offset + p.numel]
    assert inside and all((b - p.offset) % ALIGN == 0 for b, p in inside)
    assert any(b % 2 == 1 for b, _ in inside)  # "w" starts at 7: its cuts are odd in the flat space


def test_unalignable_cuts_fall_back_to_exact_ones() -> None:
    lay = layout([("a", (20,))])
    spans = plan(lay, 5)
    assert [s[0].length for s in spans] == [4, 4, 4, 4, 4]


def test_whole_tensors_stay_on_one_shard_and_balance() -> None:
    lay = layout([("big", (64, 64)), ("mid", (32, 64)), ("v1", (500,)), ("v2", (300,))])
    total = sum(p.numel for p in lay)
    spans = plan(lay, 3, whole=[True, True, False, False])
    assert _tiles(spans, total)  # type: ignore[arg-type]
    for p in lay[:2]:
        owners = [k for k, shard in enumerate(spans) if any(s.start <= p.offset and p.offset + p.numel <= s.end for s in shard)]
        assert len(owners) == 1
    sizes = [sum(s.length for s in shard) for shard in spans]
    assert max(sizes) <= 4096 + 1  # the biggest whole tensor bounds the imbalance
    for p in lay[2:]:  # split tensors are cut on multiples of ALIGN from their start
        cuts = [s.start - p.offset for shard in spans for s in shard if p.offset < s.start < p.offset + p.numel]
        assert all(c % ALIGN == 0 for c in cuts)
    # "w" whole on shard 0 (1600), then "v" fills it to the target 2300: cut at 700 -> 704
    cut_plan = plan(layout([("w", (40, 40)), ("v", (3000,))]), 2, whole=[True, False])
    assert [[(s.start, s.length) for s in shard] for shard in cut_plan] == [[(0, 2304)], [(2304, 2296)]]


@pytest.mark.parametrize(
    ("params", "shards", "field"),
    [
        ([("a", (2,))], 3, "spec.num_shards"),
        ([("a", (2,)), ("a", (3,))], 1, "spec.parameters[1].name"),
        ([("a", (0, 3))], 1, "spec.parameters[0].shape"),
        ([], 1, "spec.parameters"),
    ],
)
def test_bad_layouts_name_the_field(params: list[tuple[str, tuple[int, ...]]], shards: int, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        plan(layout(params), shards)
    assert err.value.field == field
