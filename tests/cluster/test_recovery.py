"""Real faults on a real Ray: a shard actor killed mid-training is recovered from the latest
snapshot and the run ends bit-identical to a fault-free one; without a snapshot the job fails with
its reason; jobs that cannot be scheduled fail fast without blocking anyone."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import grpc
import numpy as np
import pytest

from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, JobRolledBack, Reason, ServiceError, Worker
from tests.cluster.test_parity import SHAPES, TOTAL, worker_grads
from tests.cluster.test_snapshots import SETTINGS, flat_state

END = 9
KILL_AT = 5
P0 = np.linspace(-1, 1, TOTAL, dtype=np.float32)


def kill_shard(service: Any, job_id: str, index: int) -> None:
    """SIGKILL-equivalent of one shard actor (ray.kill: no restart, no cleanup)."""
    import ray

    handles = ray.get(service.service.cluster.coordinator.shard_handles.remote(job_id))
    ray.kill(handles[index].actor, no_restart=True)


def create(address: str, jobs: list[str], tag: str, **settings: Any) -> str:
    job_id = f"rec-{tag}-{uuid.uuid4().hex[:6]}"
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=job_id, num_workers=2, num_shards=2, **{**SETTINGS, **settings})
    jobs.append(job_id)
    return job_id


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} never happened")


def run(address: str, job_id: str, kill: Any = None) -> list[int]:
    """Train steps 0..END with two workers; `kill()` before step KILL_AT. On a rollback every worker
    reconnects and the loop rewinds to the step the job resumes from. Returns the resume versions."""
    with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
        ws = sorted([wa, wb], key=lambda w: w.worker_id)
        ws[0].upload(P0)
        return train_rewinding(ws, END, {KILL_AT: kill} if kill is not None else {})


def train_rewinding(ws: list[Worker], end: int, faults: dict[int, Any]) -> list[int]:
    """Every worker pushes the seeded gradients of steps 0..end-1 (`faults[s]()` runs once before
    step s); on JobRolledBack every worker reconnects and the loop rewinds to the resume version.
    Returns the resume versions."""
    resumes: list[int] = []
    s = 0
    while s < end:
        fault = faults.pop(s, None)
        if fault is not None:
            fault()
        try:
            for w in ws:
                w.push(s, *worker_grads(s, w.worker_id))
            assert ws[-1].pull(s + 1)[0] == s + 1
            s += 1
        except JobRolledBack as rolled:
            resumes.append(rolled.resume_version)
            s = rolled.resume_version
            for w in ws:  # the other workers learn it on their next call
                try:
                    w.pull(s)
                except JobRolledBack:
                    assert w.pull(s)[0] == s
    return resumes


def test_a_killed_shard_is_restored_from_the_latest_snapshot_and_the_run_ends_bit_identical(
    service: Any, address: str, jobs: list[str]
) -> None:
    # Shards asking for a little CPU take no warm spare: the replacement starts cold (seconds), so
    # the watcher sees RECOVERING (from a spare the whole recovery can take less than its poll).
    faulty = create(address, jobs, "kill", snapshot_every_steps=2, shard_num_cpus=0.01)
    clean = create(address, jobs, "clean", snapshot_every_steps=2, shard_num_cpus=0.01)
    seen: list[jpb.Job] = []
    listed_ok = threading.Event()
    before: list[str] = []

    def kill() -> None:
        with JobClient(address) as jc:
            wait_for(lambda: jc.list_snapshots(faulty), "a snapshot")
            before.extend(s.address for s in jc.get_job(faulty).shards)
            kill_shard(service, faulty, 1)

            def watch() -> None:  # GetJob and ListJobs answer while the job recovers
                with JobClient(address) as watcher:
                    for _ in range(400):
                        job = watcher.get_job(faulty)
                        seen.append(job)
                        assert any(j.job_id == faulty for j in watcher.list_jobs())
                        if job.generation == 1 and job.state == jpb.JOB_STATE_RUNNING:
                            listed_ok.set()
                            return
                        time.sleep(0.02)

            threading.Thread(target=watch, daemon=True).start()

    resumes = run(address, faulty, kill)
    run(address, clean)
    with JobClient(address) as jc:  # rolled back once, to a committed snapshot (the newest when the shard died)
        assert len(resumes) == 1 and resumes[0] in {s.version for s in jc.list_snapshots(faulty)}, resumes
    assert listed_ok.wait(30)
    states = {j.state for j in seen}
    assert jpb.JOB_STATE_RECOVERING in states, states
    recovering = next(j for j in seen if j.state == jpb.JOB_STATE_RECOVERING)
    assert recovering.state_reason.startswith(Reason.SHARD_LOST)
    with JobClient(address) as jc:
        job = jc.get_job(faulty)
        ref = jc.get_job(clean)
    assert (job.state, job.generation, job.recoveries, job.version) == (jpb.JOB_STATE_RUNNING, 1, 1, END)
    after = [s.address for s in job.shards]
    assert after[0] == before[0] and after[1] != before[1]  # the survivor restored in place; the lost shard started anew
    got, want = flat_state(service, job), flat_state(service, ref)
    assert got.keys() == want.keys()
    for k in want:  # parameters and every moment: nothing applied twice, nothing half-applied
        assert np.array_equal(got[k], want[k]), k


def test_a_lost_shard_without_a_snapshot_fails_the_job_with_its_reason(service: Any, address: str, jobs: list[str]) -> None:
    job_id = create(address, jobs, "nosnap")
    with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
        ws = sorted([wa, wb], key=lambda w: w.worker_id)
        ws[0].upload(P0)
        for w in ws:
            w.push(0, *worker_grads(0, w.worker_id))
        kill_shard(service, job_id, 0)
        with JobClient(address) as jc:
            wait_for(lambda: jc.get_job(job_id).state == jpb.JOB_STATE_FAILED, "the job failing")
            job = jc.get_job(job_id)
        assert job.state_reason.startswith(Reason.SHARD_LOST) and "no snapshot" in job.state_reason
        with pytest.raises(ServiceError) as failed:
            ws[0].push(1, *worker_grads(1, ws[0].worker_id))
        assert (failed.value.code, failed.value.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.JOB_FAILED)


@pytest.mark.parametrize(("setting", "field"), [({"shard_num_cpus": 64.0}, "spec.shard_num_cpus"),
                                               ({"shard_num_gpus": 1.0}, "spec.shard_num_gpus")])  # fmt: skip
def test_a_job_no_node_can_hold_fails_fast_naming_the_setting(address: str, job_id: str, setting: dict[str, float], field: str) -> None:
    with JobClient(address) as jc:
        with pytest.raises(ServiceError) as err:
            jc.create_job(SHAPES, job_id=job_id, optimizer="sgd", num_shards=2, **setting)
        assert (err.value.code, err.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.SHARDS_UNSCHEDULABLE)
        assert err.value.metadata["field"] == field
        with pytest.raises(ServiceError) as nf:  # nothing was created
            jc.get_job(job_id)
        assert nf.value.code == grpc.StatusCode.NOT_FOUND
        jc.create_job(SHAPES, job_id=job_id, optimizer="sgd", num_shards=2)  # the id is free, the service serves


def test_a_job_waiting_for_resources_blocks_nobody_and_can_be_deleted(address: str, jobs: list[str]) -> None:
    hog = f"rec-hog-{uuid.uuid4().hex[:6]}"
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=hog, optimizer="sgd", shard_num_cpus=2.0)  # takes both CPUs of the test Ray
        jobs.append(hog)
        waiting = f"rec-wait-{uuid.uuid4().hex[:6]}"
        outcome: list[BaseException] = []

        def create_waiting() -> None:
            try:
                with JobClient(address) as other:
                    other.create_job(SHAPES, job_id=waiting, optimizer="sgd", shard_num_cpus=1.0)
            except ServiceError as exc:
                outcome.append(exc)

        t = threading.Thread(target=create_waiting)
        t.start()
        wait_for(lambda: any(j.job_id == waiting and j.state == jpb.JOB_STATE_CREATING for j in jc.list_jobs()), "CREATING")
        quick = create(address, jobs, "quick")  # other CreateJobs go on meanwhile
        assert jc.get_job(quick).state == jpb.JOB_STATE_AWAITING_PARAMETERS
        jc.delete_job(waiting)  # a job still waiting for its shards can be deleted
        t.join(60)
        assert not t.is_alive()
        (err,) = outcome
        assert isinstance(err, ServiceError) and err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED)
        with pytest.raises(ServiceError) as gone:
            jc.get_job(waiting)
        assert gone.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("mode", ["plain", pytest.param("overlap", marks=pytest.mark.slow)])  # overlap: make test-slow
def test_remote_optimizer_rolls_the_model_back_and_tells_the_loop(service: Any, address: str, jobs: list[str], mode: str) -> None:
    """Also with overlap(): the pushes started from the hooks meet the dead shard, step() rolls
    the model back to the restored version and the loop rewinds its data."""
    import torch

    from paramserver_client.torch_optim import RemoteOptimizer
    from tests.cluster.test_torch_optimizer import backward_and_step

    def train(job_id: str, kill_at: int | None) -> tuple[list[torch.Tensor], list[int]]:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 3)
        rollbacks: list[int] = []
        opt = RemoteOptimizer(model.named_parameters(), address, job_id, optimizer="adamw", hyperparameters={"lr": 0.05},
                              snapshot_every_steps=2, on_rollback=rollbacks.append, num_shards=2)  # fmt: skip
        jobs.append(job_id)
        try:
            while opt.version < END:
                if opt.version == kill_at and not rollbacks:
                    with JobClient(address) as jc:
                        wait_for(lambda: jc.list_snapshots(job_id), "a snapshot")
                    kill_shard(service, job_id, 0)
                gen = torch.Generator().manual_seed(opt.version)  # the data of step `version`: rewinds with it
                x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
                opt.zero_grad()
                backward_and_step(opt, torch.nn.functional.mse_loss(model(x), y, reduction="sum"), 8, mode)
        finally:
            opt.close()
        return [p.detach().clone() for p in model.parameters()], rollbacks

    got, rollbacks = train(f"rec-opt-{uuid.uuid4().hex[:6]}", KILL_AT)
    want, none = train(f"rec-opt-ref-{uuid.uuid4().hex[:6]}", None)
    assert len(rollbacks) == 1 and 0 < rollbacks[0] <= KILL_AT and none == []
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_a_killed_shard_is_restored_from_the_replica_in_memory_without_a_snapshot(service: Any, address: str, jobs: list[str]) -> None:
    faulty = create(address, jobs, "replica", replica_every_steps=1)  # no snapshot at all
    clean = create(address, jobs, "replica-clean", replica_every_steps=1)

    def kill() -> None:
        time.sleep(0.5)  # let the replica round of the version just published complete
        kill_shard(service, faulty, 0)

    resumes = run(address, faulty, kill)
    run(address, clean)
    assert len(resumes) == 1 and KILL_AT - 2 <= resumes[0] <= KILL_AT, resumes  # a step or two back, not to 0
    with JobClient(address) as jc:
        job = jc.get_job(faulty)
        assert jc.list_snapshots(faulty) == []
    assert job.recovered_from == f"replica at version {resumes[0]}" and (job.recoveries, job.version) == (1, END)
    got, want = flat_state(service, job), flat_state(service, jc_get(address, clean))
    for k in want:
        assert np.array_equal(got[k], want[k]), k


@pytest.mark.slow  # a coordinator restart and a cold shard start: in make test-slow (CI runs it)
def test_replicas_are_lost_with_the_coordinator_and_a_shard_lost_then_comes_back_from_the_snapshot(
    service: Any, address: str, jobs: list[str]
) -> None:
    """The replicas live in the coordinator: killed (Ray restarts it and it replays its journal),
    it has none until the next replica round, so a shard lost before that round is restored from
    the newest snapshot (which the journal kept), and the run still ends bit-identical."""
    import ray

    faulty = create(address, jobs, "coord", replica_every_steps=1, snapshot_every_steps=2)
    clean = create(address, jobs, "coord-clean", replica_every_steps=1, snapshot_every_steps=2)
    coordinator = service.service.cluster.coordinator

    def kill_both() -> None:
        with JobClient(address) as jc:
            wait_for(lambda: 4 in {s.version for s in jc.list_snapshots(faulty)}, "the snapshot of version 4")
        time.sleep(0.5)  # the replica round of version 5 completes: the old coordinator held a replica newer than any snapshot
        before = ray.get(coordinator.incarnation.remote())
        ray.kill(coordinator, no_restart=False)  # Ray restarts it; the replicas it held are gone
        wait_for(lambda: _incarnation(coordinator) not in (None, before), "the restarted coordinator")
        wait_for(lambda: len(ray.get(coordinator.shard_handles.remote(faulty))) == 2, "the job's shards reattached")
        kill_shard(service, faulty, 1)  # before any step: no replica round has run since the restart

    resumes = run(address, faulty, kill_both)
    run(address, clean)
    with JobClient(address) as jc:
        job = jc.get_job(faulty)
        snapshots = {s.version for s in jc.list_snapshots(faulty)}
    assert len(resumes) == 1 and resumes[0] == 4 and resumes[0] in snapshots, (resumes, snapshots)
    assert job.recovered_from.startswith("snapshot ") and (job.recoveries, job.version) == (1, END), job.recovered_from
    got, want = flat_state(service, job), flat_state(service, jc_get(address, clean))
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def _incarnation(coordinator: Any) -> Any:
    """The coordinator's incarnation, None while it does not answer."""
    import ray

    try:
        return ray.get(coordinator.incarnation.remote(), timeout=2)
    except Exception:  # noqa: BLE001 - restarting
        return None


def jc_get(address: str, job_id: str) -> jpb.Job:
    with JobClient(address) as jc:
        return jc.get_job(job_id)


def test_a_replica_file_is_resolved_from_the_object_store_or_reported_lost(ray_session: None) -> None:
    """What a shard restoring from a replica does with the handles the coordinator kept: a live
    file is fetched as it was; one whose objects are gone (their owner died) is FAILED_PRECONDITION
    with replica=lost (the coordinator then restores from the snapshot)."""
    import asyncio

    import ray

    from paramserver.cluster import _resolved
    from paramserver.errors import ParamServerError
    from paramserver.shard_types import Restore

    @ray.remote(num_cpus=0)
    class Owner:
        def make(self) -> list[Any]:
            return [ray.put(np.arange(1 << 18, dtype=np.float32))]  # owned by this actor

    data = np.arange(1 << 18, dtype=np.float32)
    kept = Restore("memory:", "j", "replica-0000000001", 1, 1, {"shard-00000.safetensors": ray.put(data)}, b"{}")
    resolved = asyncio.run(_resolved(kept))
    assert resolved is not None
    np.testing.assert_array_equal(resolved.replica["shard-00000.safetensors"], data)
    owner = Owner.remote()  # type: ignore[attr-defined]
    (orphan,) = ray.get(owner.make.remote())
    ray.kill(owner, no_restart=True)
    with pytest.raises(ray.exceptions.RayActorError):  # dead now
        ray.get(owner.make.remote(), timeout=60)
    lost = Restore("memory:", "j", "replica-0000000001", 1, 1, {"shard-00000.safetensors": orphan}, b"{}")
    errors: list[ParamServerError] = []

    def reported_lost() -> bool:  # once Ray has unpinned the dead owner's object
        try:
            asyncio.run(_resolved(lost))
        except ParamServerError as exc:
            errors.append(exc)
            return True
        return False

    wait_for(reported_lost, "the orphaned file reported lost", timeout=60)
    assert (errors[0].code, errors[0].metadata) == ("FAILED_PRECONDITION", {"replica": "lost"})
    assert asyncio.run(_resolved(None)) is None
