"""The Node.js client (clients/node) against a real service.

A job is created with the Python client; `node clients/node/demo_step.js`
joins it, uploads the initial parameters, pulls version 0, pushes one SGD
step's gradient and pulls version 1. The test checks both versions against
numpy float32 arithmetic and that the service published version 1.

A second test drives a Node worker (an inline script) through worker leases:
heartbeats keep it a member while it idles, and a rejoin under its name
supersedes its lease (LEASE_SUPERSEDED).

Skipped when `node` is not on PATH or `npm ci` has not been run in
clients/node (no node_modules).
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO_ROOT / "clients" / "node"
DEMO = NODE_CLIENT / "demo_step.js"

LR = 0.5
LOSS_TERMS = 3


def _node() -> str:
    """The node executable, or skip."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not on PATH")
    if not (NODE_CLIENT / "node_modules").is_dir():
        pytest.skip("clients/node/node_modules is missing (run `npm ci` in clients/node)")
    return node


def test_node_client_one_sgd_step(address: str, job_id: str, tmp_path: Path) -> None:
    node = _node()
    from paramserver_client import JobClient

    with JobClient(address) as jc:
        job = jc.create_job(
            [("w", (33, 5)), ("b", (5,))],
            job_id=job_id,
            optimizer="sgd",
            hyperparameters={"lr": LR},
            num_workers=1,
            num_shards=2,
        )
    total = int(job.total_elements)
    assert total == 33 * 5 + 5

    # Parameters in [1, 2) and a small update keep every result far from 0,
    # so a relative tolerance of 1e-6 means "equal up to about one ulp".
    rng = np.random.default_rng(1234)
    params = rng.uniform(1.0, 2.0, total).astype(np.float32)
    grad = rng.uniform(-1.0, 1.0, total).astype(np.float32)
    # float32 values survive the trip through JSON exactly (as doubles).
    (tmp_path / "params.json").write_text(json.dumps(params.tolist()))
    (tmp_path / "grad.json").write_text(json.dumps({"loss_terms": LOSS_TERMS, "grad": grad.tolist()}))
    out_path = tmp_path / "out.json"

    proc = subprocess.run(
        [node, str(DEMO), address, job_id, str(tmp_path / "params.json"), str(tmp_path / "grad.json"), str(out_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"demo_step.js failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"

    out = json.loads(out_path.read_text())
    assert out["worker_id"] == 0
    assert out["version"] == 1

    version0 = np.asarray(out["version0"], dtype=np.float32)
    np.testing.assert_array_equal(version0, params)

    # torch.optim.SGD on the averaged gradient (sum over workers / sum of loss_terms).
    expected = params - np.float32(LR) * (grad / np.float32(LOSS_TERMS))
    assert expected.dtype == np.float32
    version1 = np.asarray(out["version1"], dtype=np.float32)
    np.testing.assert_allclose(version1, expected, rtol=1e-6, atol=0)

    # The service agrees: version 1 is published and the Node worker has left.
    with JobClient(address) as jc:
        after = jc.get_job(job_id)
    assert after.version == 1
    assert list(after.workers) == []


# A Node worker that idles on its heartbeats, then is superseded by a rejoin under its name. It
# prints one JSON object per line and, after the idle spell, waits for a line on stdin (the test
# checks the job's members meanwhile).
LEASE_SCRIPT = r"""
'use strict';
const readline = require('node:readline');
const { once } = require('node:events');
const [clientPath, address, jobId, workerName, idleMs] = process.argv.slice(2);
const { Worker, StepOutcome } = require(clientPath);

const say = (obj) => console.log(JSON.stringify(obj));
const outcomeName = (o) => Object.keys(StepOutcome).find((k) => StepOutcome[k] === o) || String(o);

async function main() {
  const lines = readline.createInterface({ input: process.stdin });
  const w1 = await Worker.join(address, jobId, workerName);
  say({ event: 'joined', worker_id: w1.workerId, lease: String(w1.lease), lease_timeout_s: w1.leaseTimeoutS,
        upload: w1.uploadParameters, heartbeating: w1.heartbeatTimer !== null });
  const total = w1.totalElements;
  if (w1.uploadParameters) await w1.upload(new Float32Array(total).fill(1));
  await new Promise((resolve) => setTimeout(resolve, Number(idleMs)));  // no push, no pull
  say({ event: 'idle_done' });
  await once(lines, 'line');                                              // the test checked the members
  lines.close();

  const pushed = await w1.push(0, new Float32Array(total).fill(0.5), 1);
  say({ event: 'pushed', outcome: outcomeName(pushed.outcome), version: pushed.version });

  const w2 = await Worker.join(address, jobId, workerName);
  say({ event: 'rejoined', worker_id: w2.workerId, lease: String(w2.lease) });

  let err = null;
  try {
    await w1.pull(1);
  } catch (e) {
    err = e;
  }
  say({ event: 'old_pull', ok: err === null, reason: err?.reason ?? '', code: err?.codeName ?? '',
        message: err ? String(err.message) : '' });
  const { version } = await w2.pull(1);                                   // the new lease works
  say({ event: 'new_pull', version });
  await w2.leave();
  w1.close();
  w2.close();
  say({ event: 'done' });
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exitCode = 1;
});
"""

IDLE_S = 5.0
WORKER_TIMEOUT_S = 1.5


def test_node_worker_heartbeats_keep_lease_and_rejoin_supersedes(address: str, job_id: str, tmp_path: Path) -> None:
    """Heartbeats alone keep an idle Node worker a member (policy CONTINUE would remove it after
    worker_timeout_s); a rejoin under its name takes its id with a larger lease, and the old
    incarnation's next pull is ABORTED with LEASE_SUPERSEDED."""
    node = _node()
    from paramserver_client import JobClient

    with JobClient(address) as jc:
        job = jc.create_job(
            [("w", (4, 3))],
            job_id=job_id,
            optimizer="sgd",
            hyperparameters={"lr": 0.1},
            num_workers=1,
            num_shards=1,
            worker_timeout_s=WORKER_TIMEOUT_S,
            on_worker_lost=2,  # WORKER_LOSS_POLICY_CONTINUE: an expired member is removed
        )
    assert job.spec.worker_timeout_s == WORKER_TIMEOUT_S
    assert job.spec.on_worker_lost == 2

    script = tmp_path / "lease.js"
    script.write_text(LEASE_SCRIPT)
    name = "node-lease"
    stderr_path = tmp_path / "lease.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [node, str(script), str(NODE_CLIENT), address, job_id, name, str(int(IDLE_S * 1000))],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def event(expected: str) -> dict:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"node gave no {expected!r} event (rc {proc.returncode}):\n{stderr_path.read_text()}")
        got = json.loads(line)
        assert got["event"] == expected, got
        return got

    try:
        joined = event("joined")
        assert joined["worker_id"] == 0
        assert joined["upload"] is True
        assert joined["lease_timeout_s"] == WORKER_TIMEOUT_S
        assert joined["heartbeating"] is True
        first_lease = int(joined["lease"])
        assert first_lease > 0

        # 5 s without a push or pull, more than three worker_timeout_s: only heartbeats renewed it.
        event("idle_done")
        with JobClient(address) as jc:
            members = {m.worker_id: m for m in jc.get_job(job_id).members}
        assert 0 in members, f"the idle worker was removed: {members}"
        assert members[0].name == name
        assert members[0].lease == first_lease
        assert not members[0].lost
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()

        pushed = event("pushed")
        assert pushed["outcome"] == "APPLIED"
        assert pushed["version"] == 1

        rejoined = event("rejoined")
        assert rejoined["worker_id"] == 0
        assert int(rejoined["lease"]) > first_lease

        old = event("old_pull")
        assert old["ok"] is False
        assert old["code"] == "ABORTED", old
        assert old["reason"] == "LEASE_SUPERSEDED", old

        assert event("new_pull")["version"] == 1
        event("done")
        assert proc.wait(timeout=30) == 0, f"lease.js failed ({proc.returncode}):\n{stderr_path.read_text()}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The new incarnation left: no member holds worker 0 any more.
    with JobClient(address) as jc:
        after = jc.get_job(job_id)
    assert after.version == 1
    assert [m.worker_id for m in after.members] == []
