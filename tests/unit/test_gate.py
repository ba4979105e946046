"""The front door's token cache (pure logic, a fake coordinator lookup): a token retired by a
rotation made through another front door is refused here within TOKEN_CACHE_S."""

from __future__ import annotations

import asyncio

import pytest

from paramserver import gate
from paramserver.access import AuthConfig, Tokens, hash_token
from paramserver.errors import ParamServerError


def test_a_token_retired_elsewhere_is_refused_within_the_cache_time(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "psj.j.secret"
    held: dict[str, Tokens] = {"j": ((hash_token(token), 0.0),)}
    calls: list[str] = []

    async def lookup(job_id: str) -> tuple[str, Tokens]:
        calls.append(job_id)
        return "default", held[job_id]

    now = [100.0]
    monkeypatch.setattr(gate.time, "monotonic", lambda: now[0])
    g = gate.FrontDoorGate(AuthConfig.single("an-admin-token-0123456789"), lookup)
    meta = (("authorization", f"Bearer {token}"),)
    assert asyncio.run(g.authenticate(meta)).job_id == "j"
    held["j"] = ()  # retired by a rotation through another front door
    now[0] += gate.TOKEN_CACHE_S / 2
    assert asyncio.run(g.authenticate(meta)).job_id == "j"  # still cached here
    now[0] += gate.TOKEN_CACHE_S
    with pytest.raises(ParamServerError) as info:
        asyncio.run(g.authenticate(meta))
    assert info.value.code == "UNAUTHENTICATED"
    assert len(calls) == 3  # the first lookup, a refresh at expiry, the re-check of a refused token
