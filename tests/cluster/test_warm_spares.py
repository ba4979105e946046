"""Warm spare shard actors on a real Ray: a job's shards and a lost shard's replacement come from
the coordinator's spares (torch already loaded), the pool refills, shards asking for CPUs start
cold, and a stopped service leaves no spare behind."""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from paramserver.cluster import COORDINATOR_NAME, WARM_SHARDS, shard_prefix
from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, JobRolledBack, Worker
from tests.cluster.test_recovery import wait_for

SHAPES = [("w", (40,)), ("b", (9,))]
P0 = np.linspace(-1, 1, 49, dtype=np.float32)


def named(prefix: str) -> set[str]:
    import ray

    return {n for n in ray.util.list_named_actors() if isinstance(n, str) and n.startswith(prefix)}


def shard_names(background: Any, job_id: str) -> list[str]:
    import ray

    return [h.name for h in ray.get(background.service.cluster.coordinator.shard_handles.remote(job_id))]


def idle_spares(background: Any, prefix: str) -> set[str]:
    """The spares no job uses."""
    with JobClient(background.address) as jc:
        used = {n for j in jc.list_jobs() for n in shard_names(background, j.job_id)}
    return named(prefix) - used


def ready_spares(background: Any, prefix: str) -> set[str]:
    """Idle spares that answer (the launcher takes one once it answered its first call)."""
    import ray

    idle = idle_spares(background, prefix)
    ray.get([ray.get_actor(n).node.remote() for n in idle], timeout=60)
    time.sleep(0.5)
    return idle


#: This module's service: the session's keeps no spares (tests/conftest.py).
NAME = f"warm-{uuid.uuid4().hex[:6]}"
PREFIX = f"{COORDINATOR_NAME}-{NAME}-spare-"


def own_service(name: str, warm: int) -> Any:
    """A front door on the session's Ray whose coordinator, `name`, keeps `warm` spares and stops
    its jobs (and spares) when it stops."""
    from paramserver.server import BackgroundService, ServiceConfig

    tmp = tempfile.mkdtemp(prefix="ps-warm-")
    return BackgroundService(
        ServiceConfig(host="127.0.0.1", port=0, snapshot_dir=f"{tmp}/s", spill_dir=f"{tmp}/sp", state_dir=f"{tmp}/st", name=name,
                      warm_shards=warm, keep_jobs_on_exit=False),
        own_ray=False,
    )  # fmt: skip


def one_spare_service() -> tuple[Any, str]:
    """A front door of its own keeping one spare; and its spares' name prefix."""
    name = f"spares-{uuid.uuid4().hex[:6]}"
    return own_service(name, 1), f"{COORDINATOR_NAME}-{name}-spare-"


def wait_restarted(coordinator: Any, before: Any) -> None:
    """Until Ray has started the killed `coordinator` again (a new incarnation than `before`)."""
    import ray

    def restarted() -> bool:
        try:
            return bool(ray.get(coordinator.incarnation.remote(), timeout=30) != before)
        except ray.exceptions.RayError:  # restarting
            return False

    wait_for(restarted, "the restarted coordinator")


@pytest.fixture(scope="module")
def service(ray_session: None) -> Iterator[Any]:
    """A front door whose coordinator keeps the default pool of spares (overrides conftest's)."""
    svc = own_service(NAME, WARM_SHARDS)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def address(service: Any) -> str:
    return str(service.address)


def create(address: str, jobs: list[str], **settings: Any) -> str:
    job_id = f"spare-{uuid.uuid4().hex[:6]}"
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=job_id, optimizer="sgd", num_workers=1, num_shards=2, hyperparameters={"lr": 0.5}, **settings)
    jobs.append(job_id)
    return job_id


def test_shards_and_a_lost_shards_replacement_start_from_spares_and_the_pool_refills(service: Any, address: str, jobs: list[str]) -> None:
    prefix = PREFIX
    create(address, jobs)  # (a first launch starts the pool if nothing has yet)
    wait_for(lambda: len(idle_spares(service, prefix)) == WARM_SHARDS, "a full pool of spares")
    ready = ready_spares(service, prefix)
    job_id = create(address, jobs, replica_every_steps=1)
    assert set(shard_names(service, job_id)) == ready  # both shards were spares
    wait_for(lambda: len(idle_spares(service, prefix)) == WARM_SHARDS, "the pool refilled")
    refilled = ready_spares(service, prefix)
    assert not refilled & ready
    grad = np.ones(49, dtype=np.float32)
    with Worker(address, job_id, "w") as w:
        w.upload(P0)
        for s in range(3):
            w.push(s, grad, 1)
            w.pull(s + 1)
        time.sleep(0.5)  # the replica of version 3
        import ray

        ray.kill(ray.get(service.service.cluster.coordinator.shard_handles.remote(job_id))[1].actor, no_restart=True)
        version = 3
        while True:
            try:
                w.push(version, grad, 1)
                got = w.pull(version + 1)[1]
                break
            except JobRolledBack as rolled:
                version = rolled.resume_version
                w.pull(version)
    replacement = shard_names(service, job_id)[1]
    assert replacement in refilled  # the lost shard came back on a spare
    want = P0.copy()
    for _ in range(version + 1):  # sgd, step by step in fp32: exact, the replica's steps and the rest
        want -= np.float32(0.5) * grad
    np.testing.assert_array_equal(got, want)


def test_shards_that_ask_for_cpus_start_cold(service: Any, address: str, jobs: list[str]) -> None:
    job_id = create(address, jobs, shard_num_cpus=0.01)
    assert all(n.startswith(shard_prefix(job_id)) for n in shard_names(service, job_id))


def test_a_stopped_service_leaves_no_spare(ray_session: None) -> None:
    svc, prefix = one_spare_service()
    try:
        with JobClient(svc.address) as jc:
            jc.create_job(SHAPES, job_id="j", optimizer="sgd", num_workers=1, num_shards=1)
        wait_for(lambda: len(idle_spares(svc, prefix)) == 1, "one spare (warm_shards=1)")
    finally:
        svc.stop()
    wait_for(lambda: not named(prefix), "the spares gone")


def test_a_spare_that_died_in_the_pool_is_replaced_by_a_cold_start(service: Any, address: str, jobs: list[str]) -> None:
    import ray

    prefix = PREFIX
    create(address, jobs)
    wait_for(lambda: len(idle_spares(service, prefix)) == WARM_SHARDS, "a full pool of spares")
    for name in ready_spares(service, prefix):  # dead, but still in the launcher's pool
        ray.kill(ray.get_actor(name), no_restart=True)
    job_id = create(address, jobs)  # CreateJob does not fail for it
    assert all(n.startswith(shard_prefix(job_id)) for n in shard_names(service, job_id))
    grad = np.ones(49, dtype=np.float32)
    with Worker(address, job_id, "w") as w:
        w.upload(P0)
        w.push(0, grad, 1)
        np.testing.assert_array_equal(w.pull(1)[1], P0 - np.float32(0.5) * grad)


def test_a_restarted_coordinator_kills_the_idle_spares_it_finds_and_keeps_the_adopted_ones(ray_session: None) -> None:
    import ray

    svc, prefix = one_spare_service()
    grad = np.ones(49, dtype=np.float32)
    try:
        with JobClient(svc.address) as jc:
            jc.create_job(SHAPES, job_id="a", optimizer="sgd", num_workers=1, num_shards=1)
            wait_for(lambda: len(idle_spares(svc, prefix)) == 1, "one spare")
            (adopted,) = ready_spares(svc, prefix)
            jc.create_job(SHAPES, job_id="b", optimizer="sgd", num_workers=1, num_shards=1, hyperparameters={"lr": 0.5})
            assert shard_names(svc, "b") == [adopted]
            wait_for(lambda: len(idle_spares(svc, prefix)) == 1, "the pool refilled")
            (idle,) = idle_spares(svc, prefix)
            coordinator = svc.service.cluster.coordinator
            before = ray.get(coordinator.incarnation.remote())
            ray.kill(coordinator, no_restart=False)  # Ray restarts it; it replays its journal
            wait_restarted(coordinator, before)
            jc.create_job(SHAPES, job_id="c", optimizer="sgd", num_workers=1, num_shards=1)  # its launch sweeps
            wait_for(lambda: idle not in named(prefix), "the old incarnation's idle spare killed")
            assert adopted in named(prefix) and shard_names(svc, "b") == [adopted]
        with Worker(svc.address, "b", "w") as w:  # the adopted spare serves job b as before
            w.upload(P0)
            w.push(0, grad, 1)
            np.testing.assert_array_equal(w.pull(1)[1], P0 - np.float32(0.5) * grad)
    finally:
        svc.stop()


def test_a_start_cut_short_by_the_coordinators_death_leaves_no_shard_behind(ray_session: None) -> None:
    """The coordinator dies while CreateJob starts the shards (one on a spare, one cold): the
    restarted coordinator starts the job again and stops what the cut-short start left, the spare
    it adopted included."""
    import threading

    import ray

    svc, prefix = one_spare_service()
    try:
        with JobClient(svc.address) as jc:
            jc.create_job(SHAPES, job_id="a", optimizer="sgd", num_workers=1, num_shards=1)
            wait_for(lambda: len(idle_spares(svc, prefix)) == 1, "one spare")
            (spare,) = ready_spares(svc, prefix)
            coordinator = svc.service.cluster.coordinator
            before = ray.get(coordinator.incarnation.remote())

            def create() -> None:
                with contextlib.suppress(Exception), JobClient(svc.address, timeout=120) as client:  # the answer may be lost
                    client.create_job(SHAPES, job_id="j", optimizer="sgd", num_workers=1, num_shards=2, hyperparameters={"lr": 0.5})

            creating = threading.Thread(target=create)
            creating.start()
            wait_for(lambda: ray.get(ray.get_actor(spare).adopted.remote()) == "j", "the spare adopted by job j", timeout=30)
            ray.kill(coordinator, no_restart=False)  # while shard 1 still starts cold
            creating.join()
            wait_restarted(coordinator, before)

            def started() -> bool:
                with contextlib.suppress(Exception):  # (not yet known to the new front door's call)
                    return jc.get_job("j").state in (jpb.JOB_STATE_AWAITING_PARAMETERS, jpb.JOB_STATE_RUNNING)
                return False

            wait_for(started, "job j started again", timeout=120)
            shards = set(shard_names(svc, "j"))
            assert spare not in shards
            wait_for(lambda: spare not in named(prefix), "the adopted spare of the cut-short start stopped")
            wait_for(lambda: named(shard_prefix("j")) == shards, "only the new start's shards left")
        with Worker(svc.address, "j", "w") as w:
            w.upload(P0)
            w.push(0, np.ones(49, dtype=np.float32), 1)
            np.testing.assert_array_equal(w.pull(1)[1], P0 - np.float32(0.5) * np.ones(49, dtype=np.float32))
    finally:
        svc.stop()
