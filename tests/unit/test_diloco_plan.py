"""The pure parts of paramserver_client.diloco: fragments and their staggered schedules."""

from __future__ import annotations

import pytest
import torch

from paramserver_client.diloco import due, fragment_ids, split


def test_split_and_schedules() -> None:
    named = [(f"p{i}", torch.zeros(n)) for i, n in enumerate([100, 1, 1, 50, 50, 200])]
    assert [[n for n, _ in g] for g in split(named, 2)] == [["p0", "p1", "p2", "p3", "p4"], ["p5"]]
    assert [[n for n, _ in g] for g in split(named, 6)] == [[f"p{i}"] for i in range(6)]
    with pytest.raises(ValueError):
        split(named, 7)
    assert [t for t in range(1, 41) if due(t, 0, 2, 20)] == [10, 30]
    assert [t for t in range(1, 41) if due(t, 1, 2, 20)] == [20, 40]
    assert [t for t in range(1, 41) if due(t, 0, 1, 20)] == [20, 40]
    assert fragment_ids("j", 1) == ["j"] and fragment_ids("j", 3) == ["j.f0", "j.f1", "j.f2"]
