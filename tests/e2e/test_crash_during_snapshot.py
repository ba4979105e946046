"""A service killed (SIGKILL, with its Ray) in the middle of a save; the restarted one ignores and
removes the half-written snapshot, and brings the job back by itself (its journal remembers it)
from the previous snapshot."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from paramserver import snapshot_names as names
from paramserver.snapshot_store import DirectoryStore
from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, ServiceError, Worker
from tests.e2e.test_main_job import ROOT, _cli, _env


def start(env: dict[str, str], snapdir: Path) -> tuple[subprocess.Popen[str], str]:
    cmd = [*_cli(), "serve", "--port", "0", "--num-cpus", "2", "--snapshot-dir", str(snapdir), "--state-dir", str(snapdir.parent / "state")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        m = re.search(r"listening on (\S+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    raise AssertionError("".join(lines))


@pytest.mark.slow
def test_sigkill_mid_save_then_restart(tmp_path: Path) -> None:
    env = _env(tmp_path)
    snapdir = tmp_path / "snaps"
    faults = tmp_path / "faults.txt"
    env["PARAMSERVER_SNAPSHOT_FAULT_FILE"] = str(faults)
    proc, address = start(env, snapdir)
    try:
        with JobClient(address) as jc:
            jc.create_job([("w", (1000, 37))], job_id="crash", optimizer="adam", num_workers=1, num_shards=2)
            with Worker(address, "crash", "w") as w:
                w.upload(np.ones(37000, dtype=np.float32))
                w.push(0, np.full(37000, 0.5, dtype=np.float32), 1)
                w.pull(1)
                good = jc.create_snapshot("crash")
                w.push(1, np.full(37000, 0.25, dtype=np.float32), 1)
                w.pull(2)
            faults.write_text("crash 1 fsync:hang\n")  # shard 1 stalls before fsync: the save is half done
            errors: list[BaseException] = []

            def save() -> None:
                try:
                    jc.create_snapshot("crash")
                except BaseException as exc:  # noqa: BLE001 - expected: the service dies
                    errors.append(exc)

            t = threading.Thread(target=save, daemon=True)
            t.start()
            job_dir = snapdir / "crash"
            deadline = time.time() + 60
            partial: list[Path] = []
            while time.time() < deadline and not partial:
                partial = [d for d in job_dir.iterdir() if d.is_dir() and not (d / names.MANIFEST).exists() and any(d.iterdir())]
                time.sleep(0.05)
            assert partial, "the second save never started"
            os.killpg(proc.pid, signal.SIGKILL)  # the service and its whole Ray, mid-save
            proc.wait(timeout=30)
            t.join(timeout=60)
            assert errors and isinstance(errors[0], ServiceError)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert partial[0].exists()  # left behind by the crash
    store = DirectoryStore(snapdir)
    assert [store.path(r) for r in store.snapshots("crash")] == [good.path]
    assert (partial[0] / names.IN_PROGRESS).exists()  # marked: provably a save in progress

    faults.write_text("")
    proc, address = start(env, snapdir)
    try:
        assert not partial[0].exists()  # cleaned at start
        with JobClient(address) as jc:
            snaps = jc.list_snapshots("crash")
            assert [s.path for s in snaps] == [good.path]
            deadline = time.time() + 120  # the journal remembers the job: it is restored from the good snapshot
            while (job := jc.get_job("crash")).state != jpb.JOB_STATE_RUNNING and time.time() < deadline:
                time.sleep(0.2)
            assert (job.state, job.version, job.recoveries) == (jpb.JOB_STATE_RUNNING, 1, 1), job
            with Worker(address, "crash", "w") as w:
                _, params, _ = w.pull(1)
            assert np.allclose(params, 1.0 - 1e-3)  # one Adam step of lr 1e-3 from ones
            copy = jc.restore_job("crash:latest", job_id="crash-copy")  # and it can still be restored by hand
            assert copy.version == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
