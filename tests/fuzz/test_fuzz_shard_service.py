"""Fuzzing ShardService: UploadParameters and PushGradients streams (a header, then chunks) built
from the descriptors and from covers of the target shard's ranges, edited (messages dropped,
duplicated, swapped, a second header, chunk fields changed, bytes of a header or chunk mutated);
PullParameters requests field by field and as byte mutations. The properties each case checks are
in conftest.py."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from paramserver.v1 import shard_service_pb2 as spb
from tests.fuzz.conftest import CALL_S, FUZZ, REF, SHARD_SERVICE, TIMEOUT, UPL, WAIT_S, FuzzService, method_path
from tests.fuzz.strategies import (
    VALID,
    StreamCase,
    build,
    byte_mutations,
    covers,
    materialize,
    mutate,
    mutation_kind,
    request_plans,
    stream_cases,
)

UPLOAD = SHARD_SERVICE.methods_by_name["UploadParameters"]
PUSH = SHARD_SERVICE.methods_by_name["PushGradients"]
PULL = SHARD_SERVICE.methods_by_name["PullParameters"]
UPLOAD_STREAM = (spb.UploadParametersRequest.DESCRIPTOR, spb.UploadHeader.DESCRIPTOR)
PUSH_STREAM = (spb.PushGradientsRequest.DESCRIPTOR, spb.PushHeader.DESCRIPTOR)

shards = st.integers(0, 3)


def stream(fuzz: FuzzService, method: Any, descs: tuple[Any, Any], job: str, shard: int, case: StreamCase, kind: str) -> None:
    ctx = fuzz.case_ctx(job, shard)
    messages = materialize(case, descs[0], descs[1], ctx, ctx["spans"])
    first = materialize(case.primer(), descs[0], descs[1], ctx, ctx["spans"]) if case.prime else []
    fuzz.case(
        f"ShardService.{method.name}",
        kind,
        lambda: fuzz.client_stream(ctx["address"], method_path(method), messages, CALL_S),
        read_only=False,
        prime=(lambda: fuzz.client_stream(ctx["address"], method_path(method), first, CALL_S)) if case.prime else None,
    )


def pull(fuzz: FuzzService, job: str, shard: int, plan: Any, ops: Any, kind: str) -> None:
    ctx = fuzz.case_ctx(job, shard)
    raw = build(PULL.input_type, plan, ctx).SerializeToString()
    if ops:
        raw = mutate(raw, ops)
    try:
        req = spb.PullParametersRequest.FromString(raw)
        may_wait = not ctx["shard_initialized"] or req.min_version > ctx["shard_version"]
    except Exception:  # noqa: BLE001 - refused at once
        may_wait = False
    timeout = WAIT_S if may_wait else CALL_S
    fuzz.case(
        "ShardService.PullParameters",
        kind,
        lambda: fuzz.unary(ctx["address"], method_path(PULL), raw, timeout, server_stream=True),
        read_only=True,
        may_wait=may_wait,
    )


@TIMEOUT
@FUZZ
@given(job=st.sampled_from([UPL, UPL, REF]), shard=shards, case=stream_cases(*UPLOAD_STREAM))
def test_upload_streams(fuzz: FuzzService, job: str, shard: int, case: StreamCase) -> None:
    stream(fuzz, UPLOAD, UPLOAD_STREAM, job, shard, case, case.kind())


@TIMEOUT
@FUZZ
@given(job=st.sampled_from([UPL, REF]), shard=shards, header=VALID["UploadHeader"], cover=covers,
       edits=st.lists(st.tuples(st.just("bytes"), st.integers(0, 64), byte_mutations), min_size=1, max_size=2))  # fmt: skip
def test_upload_streams_byte_mutations(fuzz: FuzzService, job: str, shard: int, header: Any, cover: Any, edits: Any) -> None:
    case = StreamCase(header, cover, [], edits)
    stream(fuzz, UPLOAD, UPLOAD_STREAM, job, shard, case, mutation_kind([op for e in edits for op in e[2]]))


@TIMEOUT
@FUZZ
@given(job=st.sampled_from([REF, REF, REF, UPL]), shard=shards, case=stream_cases(*PUSH_STREAM))
def test_push_streams(fuzz: FuzzService, job: str, shard: int, case: StreamCase) -> None:
    stream(fuzz, PUSH, PUSH_STREAM, job, shard, case, case.kind())


@TIMEOUT
@FUZZ
@given(job=st.sampled_from([REF, REF, UPL]), shard=shards, header=VALID["PushHeader"], cover=covers,
       edits=st.lists(st.tuples(st.just("bytes"), st.integers(0, 64), byte_mutations), min_size=1, max_size=2))  # fmt: skip
def test_push_streams_byte_mutations(fuzz: FuzzService, job: str, shard: int, header: Any, cover: Any, edits: Any) -> None:
    case = StreamCase(header, cover, [], edits)
    stream(fuzz, PUSH, PUSH_STREAM, job, shard, case, mutation_kind([op for e in edits for op in e[2]]))


@TIMEOUT
@FUZZ
@given(job=st.sampled_from([REF, REF, REF, UPL]), shard=shards, plan=request_plans(PULL.input_type))
def test_pull_requests_field_by_field(fuzz: FuzzService, job: str, shard: int, plan: Any) -> None:
    pull(fuzz, job, shard, plan, None, "structured")


@TIMEOUT
@FUZZ
@given(job=st.sampled_from([REF, REF, UPL]), shard=shards, plan=VALID["PullParametersRequest"], ops=byte_mutations)
def test_pull_requests_byte_mutations(fuzz: FuzzService, job: str, shard: int, plan: Any, ops: Any) -> None:
    pull(fuzz, job, shard, plan, ops, mutation_kind(ops))


def test_the_service_still_trains_after_fuzzing_shard_service(fuzz: FuzzService) -> None:
    fuzz.run(fuzz.still_trains())
