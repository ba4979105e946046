"""The command line's own parsing (no service started)."""

from __future__ import annotations

import pytest
import typer

from paramserver.cli import _resources


def test_coordinator_resources_parse_name_amount_pairs() -> None:
    assert _resources(["head=0.01", "ctl=1"]) == {"head": 0.01, "ctl": 1.0}
    assert _resources([]) == {}


@pytest.mark.parametrize("bad", ["head", "=1", "head=lots", "head="])
def test_a_bad_coordinator_resource_is_a_usage_error_naming_the_option(bad: str) -> None:
    with pytest.raises(typer.BadParameter) as err:
        _resources([bad])
    assert "--coordinator-resource" in str(err.value.param_hint) and repr(bad) in str(err.value)
