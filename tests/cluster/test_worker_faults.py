"""A worker process SIGKILLed in the middle of a step, under each loss policy (real processes, real
Ray): CONTINUE closes the step without it and goes on; WAIT waits until it is started again under
its name and loses nothing; FAIL fails the job naming it. Parameters are compared bit for bit with
torch.optim.AdamW fed the gradients that each step really averaged."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, Reason, ServiceError, Worker
from tests.cluster.test_parity import SHAPES, TOTAL, worker_grads
from tests.cluster.test_recovery import wait_for
from tests.service.harness import torch_adamw

ROOT = Path(__file__).resolve().parents[2]
HYPER: dict[str, Any] = {"lr": 1e-2, "weight_decay": 0.1}
P0 = np.linspace(-1, 1, TOTAL, dtype=np.float32)
END, KILL_AFTER = 6, 3
WAIT, CONTINUE, FAIL = 1, 2, 3


class Proc:
    """A worker process and its stdout lines."""

    def __init__(self, address: str, job_id: str, name: str, start: int, end: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "tests.cluster.worker_process", address, job_id, name, str(start), str(end), *extra]
        self.p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def until(self, line: str) -> None:
        assert self.p.stdout is not None
        for got in self.p.stdout:
            if got.strip() == line:
                return
        raise AssertionError(f"the worker ended before {line!r}: {self.p.stderr.read() if self.p.stderr else ''}")

    def kill(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(30)


@pytest.fixture
def job(address: str) -> Iterator[str]:
    job_id = f"wf-{uuid.uuid4().hex[:6]}"
    yield job_id
    with JobClient(address) as jc:
        try:
            jc.delete_job(job_id)
        except ServiceError:
            pass


def start(address: str, job_id: str, policy: int, **settings: Any) -> Worker:
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=job_id, optimizer="adamw", hyperparameters=HYPER, num_workers=2, num_shards=2,
                      worker_timeout_s=2.0, on_worker_lost=policy, **settings)  # fmt: skip
    a = Worker(address, job_id, "a")
    assert a.upload_parameters
    a.upload(P0)
    return a


def steps(a: Worker, start: int, end: int) -> None:
    for s in range(start, end):
        a.push(s, *worker_grads(s, a.worker_id))
        assert a.pull(s + 1)[0] == s + 1


def test_continue_closes_the_step_without_the_killed_worker(address: str, job: str) -> None:
    with start(address, job, CONTINUE, min_workers=1) as a:
        b = Proc(address, job, "b", 0, END)
        b.until("joined 1")  # a member before step 0: every step waits for both
        steps(a, 0, KILL_AFTER)
        b.until(f"pushed {KILL_AFTER}")
        b.kill()  # its push for step KILL_AFTER is in, the step still open (a has not pushed it)
        with JobClient(address) as jc:  # its lease expires: it is removed, and its push dropped on every shard
            wait_for(lambda: [m.name for m in jc.get_job(job).members] == ["a"], "b's removal")
        a.push(KILL_AFTER, *worker_grads(KILL_AFTER, a.worker_id))
        _, values, report = a.pull(KILL_AFTER + 1)
        assert report is not None and list(report.workers) == [a.worker_id] and list(report.missing_workers) == [1 - a.worker_id]
        steps(a, KILL_AFTER + 1, END)
        _, values, _ = a.pull(END)
    grads = [[worker_grads(s, 0), worker_grads(s, 1)] for s in range(KILL_AFTER)]
    grads += [[worker_grads(s, 0)] for s in range(KILL_AFTER, END)]  # a is worker 0 (it joined first)
    assert np.array_equal(values, torch_adamw(SHAPES, P0, HYPER, grads))


def test_wait_holds_the_step_until_the_killed_worker_is_back_under_its_name(address: str, job: str) -> None:
    with start(address, job, WAIT) as a:
        b = Proc(address, job, "b", 0, KILL_AFTER, "hang")
        b.until("joined 1")  # a member before step 0: every step waits for both
        steps(a, 0, KILL_AFTER)
        b.until("hanging")
        b.kill()  # dead before pushing step KILL_AFTER
        a.push(KILL_AFTER, *worker_grads(KILL_AFTER, a.worker_id))
        with JobClient(address) as jc:
            wait_for(lambda: any(m.lost for m in jc.get_job(job).members), "b's lease expiring")
            assert jc.get_job(job).version == KILL_AFTER  # the step waits
        again = Proc(address, job, "b", KILL_AFTER, END)  # started again: same id, new lease
        again.until(f"pushed {KILL_AFTER}")
        assert a.pull(KILL_AFTER + 1)[0] == KILL_AFTER + 1
        steps(a, KILL_AFTER + 1, END)
        _, values, _ = a.pull(END)
        again.p.wait(60)
    grads = [[worker_grads(s, 0), worker_grads(s, 1)] for s in range(END)]
    assert np.array_equal(values, torch_adamw(SHAPES, P0, HYPER, grads))  # the dead incarnation's push was dropped, nothing lost


def test_fail_fails_the_job_naming_the_killed_worker(address: str, job: str) -> None:
    with start(address, job, FAIL) as a:
        b = Proc(address, job, "b", 0, KILL_AFTER, "hang")
        b.until("joined 1")  # a member before step 0: every step waits for both
        steps(a, 0, KILL_AFTER)
        b.until("hanging")
        b.kill()
        with pytest.raises(ServiceError) as failed:
            a.push(KILL_AFTER, *worker_grads(KILL_AFTER, a.worker_id))
            a.pull(KILL_AFTER + 1)
        assert (failed.value.code, failed.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.JOB_FAILED)
        with JobClient(address) as jc:
            j = jc.get_job(job)
        assert j.state == jpb.JOB_STATE_FAILED and j.state_reason.startswith(Reason.WORKER_LOST) and "(b)" in j.state_reason
