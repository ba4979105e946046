"""Fuzzing JobService: every method with requests built field by field from its descriptor (biased
toward the reference job, live leases, the newest snapshot, valid specs with a field or two spoiled)
and with byte mutations of valid requests (bit flips, truncation, insertion, deletion, random bytes).
The properties each case checks are in conftest.py."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import assume, given
from hypothesis import strategies as st

from paramserver.jobconfig import MAX_WORKERS
from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client.aio import make_spec
from tests.fuzz.conftest import CALL_S, FUZZ, JOB_SERVICE, SLOW_S, TIMEOUT, FuzzService, method_path, too_big_to_create
from tests.fuzz.strategies import VALID, build, byte_mutations, mutate, mutation_kind, request_plans

METHODS = [m.name for m in JOB_SERVICE.methods]
CREATE = JOB_SERVICE.methods_by_name["CreateJob"]
#: Methods whose success changes nothing a case observes (a heartbeat only renews a lease).
READ_ONLY = {"GetJob", "ListJobs", "ListSnapshots", "Heartbeat"}
#: Methods that may start shards or write snapshots.
SLOW = {"CreateJob", "CreateSnapshot", "RollbackJob", "ReadOptimizerState", "DeleteJob"}


def read_only(method: str, raw: bytes) -> bool:
    """Whether a success of this request must leave the state as it was."""
    if method in READ_ONLY:
        return True
    if method == "ReadOptimizerState":  # a named snapshot is only read; none = a new one is taken
        try:
            return bool(jpb.ReadOptimizerStateRequest.FromString(raw).snapshot)
        except Exception:  # noqa: BLE001 - refused anyway
            return True
    return False


def send(fuzz: FuzzService, m: MethodDescriptor, raw: bytes, kind: str) -> None:
    if m.name == "CreateJob":
        assume(not too_big_to_create(raw))
    timeout = SLOW_S if m.name in SLOW else CALL_S
    fuzz.case(
        f"JobService.{m.name}",
        kind,
        lambda: fuzz.unary(fuzz.svc.address, method_path(m), raw, timeout, m.server_streaming),
        read_only=read_only(m.name, raw),
    )


@TIMEOUT
@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_job_service_requests_field_by_field(fuzz: FuzzService, method: str, data: st.DataObject) -> None:
    m = JOB_SERVICE.methods_by_name[method]
    plan = data.draw(request_plans(m.input_type), label="request")
    send(fuzz, m, build(m.input_type, plan, fuzz.case_ctx()).SerializeToString(), "structured")


@TIMEOUT
@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_job_service_requests_byte_mutations(fuzz: FuzzService, method: str, data: st.DataObject) -> None:
    m = JOB_SERVICE.methods_by_name[method]
    plan = data.draw(VALID.get(m.input_type.name, st.just([])), label="valid request")
    ops = data.draw(byte_mutations, label="mutations")
    raw = mutate(build(m.input_type, plan, fuzz.case_ctx()).SerializeToString(), ops)
    send(fuzz, m, raw, mutation_kind(ops))


def test_the_service_still_trains_after_fuzzing_job_service(fuzz: FuzzService) -> None:
    fuzz.run(fuzz.still_trains())


@pytest.mark.parametrize("setting", ["num_workers", "min_workers", "max_workers"])
def test_a_worker_count_over_the_limit_is_refused(fuzz: FuzzService, setting: str) -> None:
    """Found by this tier: max_workers up to 2^32 - 1 was accepted, and a JoinJob then listed every
    free slot (minutes, gigabytes) and a spilled shard preallocated a gradient file per slot."""
    spec = make_spec([("w", (4,))], optimizer="sgd", hyperparameters={"lr": 0.1}, **{"num_workers": 1, setting: 2**32 - 1})
    raw = jpb.CreateJobRequest(request_id="too-many-workers-" + setting, job_id="many", spec=spec).SerializeToString()
    out = fuzz.case("JobService.CreateJob", "regression", lambda: fuzz.unary(fuzz.svc.address, method_path(CREATE), raw, CALL_S),
                    read_only=False)  # fmt: skip
    assert (out.code, out.reason, out.metadata.get("field")) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", f"spec.{setting}")
    assert out.metadata["limit"] == str(MAX_WORKERS)
