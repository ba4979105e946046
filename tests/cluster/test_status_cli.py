"""`paramserver jobs` and `paramserver status JOB` end to end: the registered typer commands against
the real service (Ray shard actors and the gRPC front door of tests/conftest.py), on a job two
workers train.

Unlike the rest of this tier these tests use the session's Ray service: a shard's node is Ray's
node id, which the in-process harness does not have."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from paramserver import status_cli
from paramserver.cli import app
from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, Worker
from tests.conftest import SecuredService

SHAPES = [("w", (16, 8)), ("b", (8,))]
TOTAL = 136
#: Wide enough that no cell wraps.
ENV: dict[str, str | None] = {"COLUMNS": "300", "PARAMSERVER_TOKEN": None, "PARAMSERVER_ADDRESS": None}


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(app, list(args), env={**ENV, **(env or {})})


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


def row_of(out: str, needle: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if needle in line]
    return cells(line)


def grad(step: int, worker: int) -> np.ndarray:
    return np.random.default_rng(100 * step + worker).standard_normal(TOTAL).astype(np.float32)


@dataclass
class Trained:
    job_id: str
    workers: list[Worker]
    """By worker id."""
    names: list[str]


@pytest.fixture
def trained(address: str, jobs: list[str]) -> Iterator[Trained]:
    """A 2-worker, 2-shard SGD job that trained steps 0 and 1 (version 2); in step 2 worker 0 has
    pushed and worker 1 not yet."""
    job_id = f"st-{uuid.uuid4().hex[:8]}"
    jobs.append(job_id)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=job_id, optimizer="sgd", hyperparameters={"lr": 0.1}, num_workers=2, num_shards=2)
    suffix = uuid.uuid4().hex[:6]
    named: dict[str, Worker] = {}
    try:
        for name in (f"alpha-{suffix}", f"beta-{suffix}"):
            named[name] = Worker(address, job_id, name)
        names = sorted(named, key=lambda n: named[n].worker_id)
        ws = [named[n] for n in names]
        assert [w.worker_id for w in ws] == [0, 1]
        uploader = next(w for w in ws if w.upload_parameters)
        uploader.upload(np.linspace(-1, 1, TOTAL, dtype=np.float32))
        for step in range(2):
            for w in ws:
                w.push(step, grad(step, w.worker_id), 4)
            assert ws[0].pull(step + 1)[0] == step + 1
        ws[0].push(2, grad(2, 0), 4)
        yield Trained(job_id, ws, names)
    finally:
        for w in named.values():
            w.close()


def get_job(address: str, job_id: str, **kwargs: Any) -> jpb.Job:
    with JobClient(address, **kwargs) as jc:
        return jc.get_job(job_id)


def test_jobs_lists_the_job_with_its_version_workers_and_shards(address: str, trained: Trained) -> None:
    r = invoke("jobs", "--address", address)
    assert r.exit_code == 0, r.output
    row = row_of(r.stdout, trained.job_id)
    # job, tenant, state, version, steps/s, workers, shards, pushed/waiting/missing, last snapshot
    assert row[1:4] == ["-", "RUNNING", "2"]
    assert row[5:7] == ["2 live", "2"]
    assert row[8] == "-"  # no snapshot taken


def test_the_address_comes_from_the_environment_too(address: str, trained: Trained) -> None:
    r = invoke("jobs", env={"PARAMSERVER_ADDRESS": address})
    assert r.exit_code == 0, r.output
    assert trained.job_id in r.stdout


def test_status_shows_the_shards_nodes_and_the_workers(address: str, trained: Trained) -> None:
    job = get_job(address, trained.job_id)
    r = invoke("status", trained.job_id, "--address", address)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert trained.job_id in out and "RUNNING" in out
    (version,) = [line for line in out.splitlines() if line.startswith("│ version ")]
    assert version.split()[1:3] == ["version", "2"]
    for shard in job.shards:
        assert len(shard.node) == 56  # a Ray node id
        row = row_of(out, shard.address)
        # shard, address, node, version, resident, spilled, buffer, budget, status
        assert row[0] == str(shard.index) and row[2] == shard.node[:12] and row[3] == "2"
        assert row[4].endswith("B") and row[5] == "0 B" and row[7] == "unlimited" and row[8] == "ok"
        assert shard.node not in out  # cut to 12 characters
    for wid, name in enumerate(trained.names):
        row = row_of(out, name)
        assert row[0] == str(wid) and row[1] == name
    assert "skipped steps: none" in out


def test_status_shows_who_the_open_step_waits_for(address: str, trained: Trained) -> None:
    job = get_job(address, trained.job_id)
    p = job.progress
    assert p.step == 2 and list(p.pushed) == [0] and list(p.waiting) == [1]
    out = invoke("status", trained.job_id, "--address", address).stdout
    assert row_of(out, trained.names[0])[3] == "pushed"
    assert row_of(out, trained.names[1])[3] == "waiting"
    assert "workers (step 2)" in out
    assert row_of(invoke("jobs", "--address", address).stdout, trained.job_id)[7] == "1/1/0"


def test_the_last_snapshot_and_the_pace_are_shown(address: str, trained: Trained) -> None:
    with JobClient(address) as jc:
        snap = jc.create_snapshot(trained.job_id)
    row = row_of(invoke("jobs", "--address", address).stdout, trained.job_id)
    assert float(row[4]) > 0  # steps/s
    assert row[8].startswith("v2, ") and row[8].endswith(" ago")
    out = invoke("status", trained.job_id, "--address", address).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("│ last snapshot ")]
    assert "v2, " in line and snap.path in line
    (line,) = [line for line in out.splitlines() if line.startswith("│ last step ")]
    assert line.split()[3].endswith("s") and "ago" in line


def test_status_of_a_job_that_does_not_exist_is_one_red_line_and_exit_2(address: str) -> None:
    r = invoke("status", "nope", "--address", address)
    assert r.exit_code == 2
    assert r.stdout == ""
    (line,) = r.stderr.splitlines()
    assert line.startswith("NOT_FOUND JOB_NOT_FOUND: ")
    assert "Traceback" not in r.output


def test_a_service_that_is_not_there_is_unavailable_and_exit_2() -> None:
    with socket.socket() as s:  # a free port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = invoke("jobs", "--address", f"127.0.0.1:{port}")
    assert r.exit_code == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("UNAVAILABLE")
    assert "Traceback" not in r.output


def test_json_parses_for_scripts(address: str, trained: Trained) -> None:
    r = invoke("jobs", "--address", address, "--json")
    assert r.exit_code == 0, r.output
    listed = {j["jobId"]: j for j in json.loads(r.stdout)["jobs"]}
    assert listed[trained.job_id]["version"] == "2" and listed[trained.job_id]["state"] == "JOB_STATE_RUNNING"
    r = invoke("status", trained.job_id, "--address", address, "--json")
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert job["jobId"] == trained.job_id and job["version"] == "2" and job["workerToken"] == ""
    assert {m["name"] for m in job["members"]} == set(trained.names)
    assert all(len(s["node"]) == 56 for s in job["shards"])


def test_json_and_watch_do_not_go_together(address: str) -> None:
    r = invoke("jobs", "--address", address, "--json", "--watch")
    assert r.exit_code == 2 and "--json" in r.output


def test_watch_redraws_until_ctrl_c_and_exits_0(address: str, trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_cli, "sleep", nap)
    r = invoke("status", trained.job_id, "--address", address, "--watch", "--interval", "0.5")
    assert r.exit_code == 0, r.output
    assert naps == [0.5, 0.5, 0.5]
    assert trained.job_id in r.stdout and "every 0.5s" in r.stdout and "Ctrl-C to quit" in r.stdout
    naps.clear()
    r = invoke("jobs", "--address", address, "-w")
    assert r.exit_code == 0, r.output
    assert naps == [2.0, 2.0, 2.0] and trained.job_id in r.stdout


def test_watch_keeps_the_last_view_when_the_job_goes_away(address: str, trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 1:
            with JobClient(address) as jc:
                jc.delete_job(trained.job_id)
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(status_cli, "sleep", nap)
    r = invoke("status", trained.job_id, "--address", address, "--watch")
    assert r.exit_code == 0, r.output
    assert trained.job_id in r.stdout  # the last good view
    assert "NOT_FOUND JOB_NOT_FOUND" in r.stdout and "retrying" in r.stdout


def test_watch_of_a_job_that_does_not_exist_exits_2(address: str) -> None:
    r = invoke("status", "nope", "--address", address, "--watch")
    assert r.exit_code == 2 and r.stderr.startswith("NOT_FOUND JOB_NOT_FOUND")


def test_a_secured_service_needs_the_token_from_the_option_or_the_environment(secure_service: SecuredService) -> None:
    job_id = f"st-sec-{uuid.uuid4().hex[:6]}"
    addr, admin = secure_service.address, secure_service.admin_token
    with JobClient(addr, token=admin) as jc:
        job = jc.create_job(SHAPES, job_id=job_id, optimizer="sgd", hyperparameters={"lr": 0.1}, num_workers=1, num_shards=1)
        try:
            assert job.worker_token.startswith(f"psj.{job_id}.")
            r = invoke("jobs", "--address", addr)
            assert r.exit_code == 2 and r.stderr.startswith("UNAUTHENTICATED UNAUTHENTICATED")
            r = invoke("jobs", "--address", addr, "--token", admin)
            assert r.exit_code == 0, r.output
            # the tenant as the service reports it (GetJob and ListJobs leave Job.tenant empty so far)
            tenant = get_job(addr, job_id, token=admin).tenant
            assert row_of(r.stdout, job_id)[1] == (tenant or "-")
            r = invoke("status", job_id, "--address", addr, "--json", env={"PARAMSERVER_TOKEN": job.worker_token})
            assert r.exit_code == 0, r.output
            assert json.loads(r.stdout)["jobId"] == job_id and job.worker_token not in r.stdout
            r = invoke("status", job_id, "--address", addr, "--token", "psj.nope.wrong")
            assert r.exit_code == 2 and r.stderr.startswith("UNAUTHENTICATED")
        finally:
            jc.delete_job(job_id)
