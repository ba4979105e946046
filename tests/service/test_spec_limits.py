"""A job description outside the stated limits (shapes, sizes, names, counts, non-finite numbers) is
refused with INVALID_ARGUMENT naming the field, or RESOURCE_EXHAUSTED LIMIT_EXCEEDED for a size,
creates nothing, and leaves GetJob/ListJobs working (raw JobSpec messages, no client-side checks)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from paramserver.jobconfig import MAX_GROUPS, MAX_NAME_BYTES, MAX_PARAMETERS
from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import Reason, ServiceError
from tests.service.harness import InProcessService


def spec(*shapes: tuple[int, ...], **hyper: object) -> jpb.JobSpec:
    s = jpb.JobSpec(num_workers=1, num_shards=1)
    for i, shape in enumerate(shapes):
        s.parameters.add(name=f"p{i}", shape=list(shape))
    s.optimizer.name = "adamw"
    s.optimizer.hyperparameters.update({"lr": 0.01, **hyper})
    return s


def with_(base: jpb.JobSpec, change: Callable[[jpb.JobSpec], object]) -> jpb.JobSpec:
    change(base)
    return base


INVALID, TOO_BIG = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
CASES: dict[str, tuple[jpb.JobSpec, grpc.StatusCode, str, str]] = {
    "dimension 2^64-1": (spec((2**64 - 1,)), INVALID, Reason.INVALID_FIELD, "spec.parameters[0].shape"),
    "element count overflows": (spec((2**40, 2**40)), INVALID, Reason.INVALID_FIELD, "spec.parameters[0].shape"),
    "zero dimension": (spec((4, 0)), INVALID, Reason.INVALID_FIELD, "spec.parameters[0].shape"),
    "nine dimensions": (spec((1,) * 9), INVALID, Reason.INVALID_FIELD, "spec.parameters[0].shape"),
    "2^40 elements": (spec((2**20, 2**20)), TOO_BIG, Reason.LIMIT_EXCEEDED, "spec.parameters[0].shape"),
    "over 2^36 elements in all": (spec(*[(2**17, 2**16)] * 9), TOO_BIG, Reason.LIMIT_EXCEEDED, "spec.parameters"),
    "too many parameters": (spec(*[(1,)] * (MAX_PARAMETERS + 1)), TOO_BIG, Reason.LIMIT_EXCEEDED, "spec.parameters"),
    "long name": (with_(spec((4,)), lambda s: setattr(s.parameters[0], "name", "x" * (MAX_NAME_BYTES + 1))),
                  INVALID, Reason.INVALID_FIELD, "spec.parameters[0].name"),
    "empty name": (with_(spec((4,)), lambda s: setattr(s.parameters[0], "name", "")), INVALID, Reason.INVALID_FIELD,
                   "spec.parameters[0].name"),
    "nan lr": (spec((4,), lr=float("nan")), INVALID, Reason.INVALID_FIELD, "spec.optimizer.hyperparameters.lr"),
    "infinite weight decay": (spec((4,), weight_decay=float("inf")), INVALID, Reason.INVALID_FIELD,
                              "spec.optimizer.hyperparameters.weight_decay"),
    "nan in betas": (spec((4,), betas=[0.9, float("nan")]), INVALID, Reason.INVALID_FIELD, "spec.optimizer.hyperparameters.betas[1]"),
    "nan schedule parameter": (with_(spec((4,)), lambda s: s.schedule.parameters.update({"warmup_steps": float("nan")})),
                               INVALID, Reason.INVALID_FIELD, "spec.schedule.parameters.warmup_steps"),
    "infinite max_grad_norm": (with_(spec((4,)), lambda s: setattr(s, "max_grad_norm", float("inf"))), INVALID,
                               Reason.INVALID_FIELD, "spec.max_grad_norm"),
    "nan worker timeout": (with_(spec((4,)), lambda s: setattr(s, "worker_timeout_s", float("nan"))), INVALID,
                           Reason.INVALID_FIELD, "spec.worker_timeout_s"),
    "too many groups": (with_(spec((4,)), lambda s: [s.param_groups.add(name=f"g{i}") for i in range(MAX_GROUPS + 1)]), TOO_BIG,
                        Reason.LIMIT_EXCEEDED, "spec.param_groups"),
}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_description_out_of_limits_is_refused_and_creates_nothing(svc: InProcessService, case: str) -> None:
    bad, code, reason, field = CASES[case]
    jc = svc.jobs()
    with pytest.raises(ServiceError) as err:
        await jc.create_job(bad, job_id="bad")
    assert (err.value.code, err.value.reason, err.value.metadata.get("field")) == (code, reason, field), err.value
    with pytest.raises(ServiceError) as missing:
        await jc.get_job("bad")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert await jc.list_jobs() == []  # and ListJobs answers
    good = await jc.create_job(spec((4,)), job_id="good")  # the service still creates jobs
    assert good.job_id == "good"


@pytest.mark.asyncio
async def test_a_spilled_job_of_many_members_opens_few_files(svc: InProcessService) -> None:
    """A spilled shard makes its members' gradient files as they are needed (it used to create
    max_workers + 1 of them at once and run out of file descriptors: INTERNAL)."""
    s = spec((2048,))
    s.max_workers, s.shard_memory_budget_bytes = 65_536, 200 << 20
    job = await svc.jobs()._unary(svc.jobs()._stub.CreateJob, jpb.CreateJobRequest(request_id="many", job_id="many", spec=s), "CreateJob")
    assert job.job_id == "many"
    files = list(svc.launcher.spill_dir.rglob("*grad*.spill"))
    assert 0 < len(files) <= 8
    w = await svc.worker("many", "w0")
    import numpy as np

    await w.upload(np.zeros(2048, np.float32))
    await w.push(0, np.ones(2048, np.float32), 1)
    assert (await w.pull(1))[0] == 1
