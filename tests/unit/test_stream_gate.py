"""StreamGate's counting (pure) and the per-stream coverage map that bounds what a stream makes a
shard hold."""

from __future__ import annotations

import contextlib
import random

import pytest

from paramserver import stream_gate
from paramserver.errors import ParamServerError, Reason
from paramserver.shard_runtime import Coverage
from paramserver.stream_gate import StreamGate, StreamLimits

LIMITS = StreamLimits(per_shard=5, per_worker=3, pushes_per_worker=2, uploads=2)


def refusal(exc: pytest.ExceptionInfo[ParamServerError]) -> tuple[str, str, str, str, str]:
    e = exc.value
    return e.code, e.reason, e.metadata["scope"], e.metadata["limit"], e.metadata["kind"]


def test_the_shard_limit_counts_every_kind_and_a_refusal_counts_nothing() -> None:
    gate = StreamGate(LIMITS)
    with contextlib.ExitStack() as held:
        held.enter_context(gate.admit("upload"))
        held.enter_context(gate.admit("push", 0))
        held.enter_context(gate.admit("pull", 1))
        held.enter_context(gate.admit("pull", 2))
        held.enter_context(gate.admit("pull", 3))
        assert gate.open == 5
        for kind, worker in (("pull", 4), ("push", 4), ("upload", None)):
            with pytest.raises(ParamServerError) as exc, gate.admit(kind, worker):  # type: ignore[arg-type]
                pass
            assert refusal(exc) == ("RESOURCE_EXHAUSTED", Reason.TOO_MANY_STREAMS, "shard", "5", kind)
        assert (gate.open, gate.uploads, gate.open_for(4)) == (5, 1, 0)
    assert (gate.open, gate.uploads, gate.open_for(0)) == (0, 0, 0)


def test_the_roster_limit_replaces_the_default_and_is_read_at_each_admission() -> None:
    gate = StreamGate(LIMITS)
    assert gate.shard_limit(0) == 5 and gate.shard_limit(2) == 2 and gate.shard_limit(9) == 9
    with gate.admit("pull", 0, roster_max=2), gate.admit("pull", 1, roster_max=2):
        with pytest.raises(ParamServerError) as exc, gate.admit("pull", 2, roster_max=2):
            pass
        assert refusal(exc)[2:4] == ("shard", "2")
        with gate.admit("pull", 2, roster_max=3):  # the roster raised it
            assert gate.open == 3
        with gate.admit("pull", 2):  # 0: the default
            pass
        with pytest.raises(ParamServerError), gate.admit("pull", 2, roster_max=1):  # lowered below what is open
            pass
        assert gate.open == 2  # the open ones go on


def test_a_worker_is_limited_alone_and_pushes_more_tightly() -> None:
    gate = StreamGate(LIMITS)
    with gate.admit("push", 7), gate.admit("push", 7):
        with pytest.raises(ParamServerError) as exc, gate.admit("push", 7):
            pass
        assert refusal(exc) == ("RESOURCE_EXHAUSTED", Reason.TOO_MANY_STREAMS, "worker", "2", "push")
        with gate.admit("pull", 7):  # a pull still fits the worker's 3
            assert gate.open_for(7) == 3
            with pytest.raises(ParamServerError) as exc, gate.admit("pull", 7):
                pass
            assert refusal(exc) == ("RESOURCE_EXHAUSTED", Reason.TOO_MANY_STREAMS, "worker", "3", "pull")
            with gate.admit("push", 8):  # another worker is not affected
                assert gate.open == 4
    assert gate.open == 0 and gate.open_for(7) == 0 and gate.open_for(8) == 0


def test_uploads_have_their_own_limit() -> None:
    gate = StreamGate(LIMITS)
    with gate.admit("upload"), gate.admit("upload"):
        with pytest.raises(ParamServerError) as exc, gate.admit("upload"):
            pass
        assert refusal(exc) == ("RESOURCE_EXHAUSTED", Reason.TOO_MANY_STREAMS, "shard", "2", "upload")
        with gate.admit("push", 0):
            assert (gate.open, gate.uploads) == (3, 2)


def test_a_slot_is_released_however_the_stream_ends() -> None:
    gate = StreamGate(LIMITS)
    for exc in (RuntimeError(), ParamServerError("DEADLINE_EXCEEDED", Reason.LIMIT_EXCEEDED, "idle"), KeyboardInterrupt()):
        with pytest.raises(type(exc)), gate.admit("push", 1):
            raise exc
        assert gate.open == 0 and gate.open_for(1) == 0


def test_an_upload_names_no_worker_and_the_others_one() -> None:
    gate = StreamGate(LIMITS)
    for kind, worker in (("upload", 0), ("push", None), ("pull", None)):
        with pytest.raises(ValueError), gate.admit(kind, worker):  # type: ignore[arg-type]
            pass
    assert gate.open == 0


def test_limits_take_the_module_defaults_when_made(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StreamLimits().per_shard == stream_gate.DEFAULT_MAX_STREAMS_PER_SHARD
    monkeypatch.setattr(stream_gate, "DEFAULT_STREAM_IDLE_S", 0.25)
    monkeypatch.setattr(stream_gate, "DEFAULT_MAX_STREAMS_PER_WORKER", 1)
    limits = StreamGate().limits
    assert (limits.idle_s, limits.per_worker) == (0.25, 1)


@pytest.mark.parametrize(
    "bad", [{"per_shard": 0}, {"per_worker": 0}, {"pushes_per_worker": -1}, {"uploads": 0}, {"idle_s": 0.0}, {"max_stream_s": -1.0},
            {"max_pull_wait_s": float("nan")}],
)  # fmt: skip
def test_limits_must_be_positive(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        StreamLimits(**bad)  # type: ignore[arg-type]


# ---- the coverage map of a stream -----------------------------------------------------------


def overlap(cov: Coverage, local: int, count: int) -> bool:
    try:
        cov.add(local, count)
    except ParamServerError as e:
        assert (e.code, e.reason, e.metadata["field"]) == ("INVALID_ARGUMENT", Reason.LAYOUT_MISMATCH, "chunks")
        return True
    return False


def test_coverage_accepts_any_order_and_chunk_size_once() -> None:
    cov = Coverage(37)
    for local, count in [(20, 17), (0, 1), (1, 7), (8, 1), (9, 11)]:
        assert not overlap(cov, local, count)
    assert cov.covered == 37
    cov.check_complete()
    for local, count in [(0, 1), (36, 1), (5, 10), (19, 2), (0, 37)]:
        assert overlap(cov, local, count)
    assert cov.covered == 37


def test_coverage_names_the_first_gap() -> None:
    cov = Coverage(40)
    cov.add(0, 13)
    cov.add(14, 26)
    with pytest.raises(ParamServerError) as exc:
        cov.check_complete()
    assert "gap at local element 13" in exc.value.message and "39 of" in exc.value.message
    empty = Coverage(5)
    with pytest.raises(ParamServerError) as exc:
        empty.check_complete()
    assert "gap at local element 0" in exc.value.message


@pytest.mark.parametrize("seed", range(20))
def test_coverage_agrees_with_a_set_of_elements(seed: int) -> None:
    rng = random.Random(seed)
    numel = rng.randint(1, 200)
    cov, seen = Coverage(numel), set[int]()
    for _ in range(60):
        local = rng.randrange(numel)
        count = rng.randint(1, min(numel - local, rng.choice([1, 3, 8, 9, 17, 64])))
        span = set(range(local, local + count))
        assert overlap(cov, local, count) == bool(span & seen)
        if not span & seen:
            seen |= span
        assert cov.covered == len(seen)
    if len(seen) == numel:
        cov.check_complete()
    else:
        with pytest.raises(ParamServerError) as exc:
            cov.check_complete()
        assert f"gap at local element {min(set(range(numel)) - seen)})" in exc.value.message
