"""The control plane outlives its process: the coordinator actor killed mid-training is restarted by
Ray, replays its journal and reattaches to the shards (which did not die with it); a front door
process killed with SIGKILL is started again and finds the running jobs; health follows the
coordinator."""

from __future__ import annotations

import os
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
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, Worker
from tests.cluster.test_parity import SHAPES, worker_grads
from tests.cluster.test_recovery import P0, jc_get, wait_for
from tests.cluster.test_snapshots import SETTINGS, flat_state
from tests.conftest import SNAPSHOT_DIR, SPILL_DIR, STATE_DIR

STEPS = 6


def train(address: str, job_id: str, start: int, end: int, upload: bool, between: Any = None) -> None:
    """Two workers push steps start..end-1 (`between(s)` runs before step s)."""
    with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
        ws = sorted([wa, wb], key=lambda w: w.worker_id)
        if upload:
            ws[0].upload(P0)
        for s in range(start, end):
            if between is not None:
                between(s)
            for w in ws:
                w.push(s, *worker_grads(s, w.worker_id))
            assert ws[1].pull(s + 1)[0] == s + 1


@pytest.fixture
def two_jobs(address: str) -> Iterator[tuple[str, str]]:
    ids = (f"cp-{uuid.uuid4().hex[:6]}", f"cp-ref-{uuid.uuid4().hex[:6]}")
    with JobClient(address) as jc:
        for j in ids:
            jc.create_job(SHAPES, job_id=j, num_workers=2, num_shards=2, **SETTINGS)
    yield ids
    with JobClient(address) as jc:
        for j in ids:
            jc.delete_job(j)


def test_a_killed_coordinator_is_restarted_and_the_run_goes_on_bit_identical(service: Any, address: str, two_jobs: tuple[str, str]) -> None:
    import ray

    job_id, ref_id = two_jobs
    coordinator = service.service.cluster.coordinator
    before = ray.get(coordinator.incarnation.remote())

    def kill(s: int) -> None:
        if s == 3:  # mid-training; Ray restarts it (max_restarts), it replays the journal
            ray.kill(coordinator, no_restart=False)

    train(address, job_id, 0, STEPS, upload=True, between=kill)
    assert ray.get(coordinator.incarnation.remote()) != before  # it really was restarted
    train(address, ref_id, 0, STEPS, upload=True)
    with JobClient(address) as jc:
        job = jc.get_job(job_id)
        assert (job.state, job.version, job.generation, job.recoveries) == (jpb.JOB_STATE_RUNNING, STEPS, 0, 0)
        assert sorted(m.name for m in job.members) == ["a", "b"]  # the members were journaled: the restart kept them
    got, want = flat_state(service, job), flat_state(service, jc_get(address, ref_id))
    for k in want:  # the shards kept their state: nothing was restored, nothing replayed twice
        assert np.array_equal(got[k], want[k]), k


def health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="paramserver.v1.JobService"), timeout=5)
        except grpc.RpcError:
            return -1
        return int(resp.status)


def test_health_is_not_serving_while_the_coordinator_is_gone(ray_session: None, tmp_path: Path) -> None:
    import ray

    from paramserver.server import BackgroundService, ServiceConfig

    name = f"hc-{uuid.uuid4().hex[:6]}"
    config = ServiceConfig(port=0, snapshot_dir=str(SNAPSHOT_DIR), spill_dir=str(SPILL_DIR), state_dir=str(tmp_path), name=name)
    svc = BackgroundService(config, own_ray=False)
    try:
        assert health(svc.address) == health_pb2.HealthCheckResponse.SERVING
        ray.kill(svc.service.cluster.coordinator, no_restart=True)  # gone for good
        wait_for(lambda: health(svc.address) == health_pb2.HealthCheckResponse.NOT_SERVING, "NOT_SERVING", 20)
    finally:
        svc.stop()


def serve(gcs: str, port: int, name: str) -> subprocess.Popen[bytes]:
    """`paramserver serve` as its own process, joined to the session's Ray."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "paramserver.cli", "serve", "--address", gcs, "--port", str(port), "--name", name,
           "--snapshot-dir", str(SNAPSHOT_DIR), "--spill-dir", str(SPILL_DIR), "--state-dir", str(STATE_DIR)]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_a_front_door_killed_with_sigkill_is_started_again_and_finds_the_running_job(ray_session: None) -> None:
    import ray

    gcs = ray.get_runtime_context().gcs_address
    name = f"fd-{uuid.uuid4().hex[:6]}"
    port = free_port()
    address = f"127.0.0.1:{port}"
    first = serve(gcs, port, name)
    second: subprocess.Popen[bytes] | None = None
    job_id = f"fd-{uuid.uuid4().hex[:6]}"
    try:
        wait_for(lambda: health(address) == health_pb2.HealthCheckResponse.SERVING, "the first front door", 120)
        with JobClient(address) as jc:
            jc.create_job(SHAPES, job_id=job_id, num_workers=2, num_shards=2, **SETTINGS)
        with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
            ws = sorted([wa, wb], key=lambda w: w.worker_id)
            ws[0].upload(P0)
            for s in range(STEPS):
                if s == 2:
                    first.send_signal(signal.SIGKILL)  # the front door dies; the data plane goes on
                    first.wait(30)
                    second = serve(gcs, port, name)
                for w in ws:
                    w.push(s, *worker_grads(s, w.worker_id))
                assert ws[1].pull(s + 1)[0] == s + 1
            wait_for(lambda: health(address) == health_pb2.HealthCheckResponse.SERVING, "the second front door", 120)
            with JobClient(address) as jc:
                job = jc.get_job(job_id)  # the new front door knows the job, its version and its members
                assert (job.state, job.version) == (jpb.JOB_STATE_RUNNING, STEPS)
                assert sorted(m.name for m in job.members) == ["a", "b"]
        assert second is not None
        second.send_signal(signal.SIGTERM)  # a clean exit of a front door joined to a cluster keeps the jobs
        assert second.wait(60) == 0
        second = serve(gcs, port, name)
        wait_for(lambda: health(address) == health_pb2.HealthCheckResponse.SERVING, "the third front door", 120)
        with JobClient(address) as jc:
            assert jc.get_job(job_id).version == STEPS
            jc.delete_job(job_id)
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        try:  # the coordinator of that front door is detached: stop it with the session
            ray.kill(ray.get_actor(f"paramserver-coordinator-{name}", namespace="paramserver"), no_restart=True)
        except ValueError:
            pass


def test_a_front_door_told_to_stop_jobs_stops_them_and_its_coordinator(ray_session: None, tmp_path: Path) -> None:
    import ray

    from paramserver.server import BackgroundService, ServiceConfig

    name = f"stop-{uuid.uuid4().hex[:6]}"
    config = ServiceConfig(port=0, snapshot_dir=str(SNAPSHOT_DIR), spill_dir=str(SPILL_DIR), state_dir=str(tmp_path), name=name,
                           keep_jobs_on_exit=False)  # fmt: skip
    svc = BackgroundService(config, own_ray=False)  # joined to a running Ray: would keep its jobs by default
    try:
        with JobClient(svc.address) as jc:
            jc.create_job(SHAPES, job_id="stopped", num_workers=1, num_shards=2, **SETTINGS)
        handles = ray.get(svc.service.cluster.coordinator.shard_handles.remote("stopped"))
    finally:
        svc.stop()
    with pytest.raises(ValueError):  # the coordinator is gone ...
        ray.get_actor(f"paramserver-coordinator-{name}")
    for h in handles:  # ... and so are the job's shards
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(h.actor.status.remote(), timeout=30)
