#!/usr/bin/env python
"""Recovery benchmark: how long a job that lost a shard takes to train again, from its snapshot and
from its in-memory replica, next to a plain snapshot restore of the same job, and what keeping
replicas costs per step, measured in the same run (see bench/README.md).

    RAY_AUTH_MODE=disabled python bench/bench_recovery.py            # 25M and 100M params
    RAY_AUTH_MODE=disabled python bench/bench_recovery.py --quick    # 1M params (CI smoke test)
    RAY_AUTH_MODE=disabled python bench/bench_recovery.py --params 25000000 --replica-every 1

For each size, two AdamW jobs (1 worker, 2 shards each):

snapshot job: a few steps; a snapshot (CreateSnapshot); one more step; then
(a) recovery: shard 1's actor is killed (ray.kill, as a crash) right after a step; the clock runs
    from the kill to the end of the first step completed after it (the worker's push finds the
    shard gone, reconnects to the restored job, JobRolledBack, pulls the resume version, pushes,
    pulls the next version). Detection, relaunch and loading are all inside.
(b) plain restore: CreateJob(restore_from=that snapshot) into a new job id; the clock runs from the
    request to the end of its first step (join, pull, push, pull).
(c) one ordinary step of that job (median), for scale.

replica job (replica_every_steps = R, no snapshot): the same steps (rounded up to whole periods of
R), timed: (d) its mean step next to the snapshot job's mean step is the per-step cost of keeping
replicas; then (e) recovery as in (a), from the replica.

Printed: (a)/(b), (a)/(c), (e)/(c) and (d) as a ratio. Aims (issue 10): recovery from a replica within a
few steps' time; replicas costing <= 1.2x a step. It reports; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from idle import wait_until_idle

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(f"[bench_recovery] {msg}", file=sys.stderr, flush=True)


def one_size(svc: object, n: int, steps: int, replica_every: int = 0) -> dict[str, float]:
    import ray

    from paramserver.cluster import REFILL_DELAY_S
    from paramserver_client import JobClient, JobRolledBack, Worker

    address = svc.address  # type: ignore[attr-defined]
    job_id = f"rec-{uuid.uuid4().hex[:6]}"
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    grad = rng.standard_normal(n).astype(np.float32)
    out: dict[str, float] = {}
    with JobClient(address, timeout=600) as jc:
        jc.create_job([("w", (n,))], job_id=job_id, optimizer="adamw", num_workers=1, num_shards=2, replica_every_steps=replica_every)
        with Worker(address, job_id, "w", timeout=600, pull_timeout=600) as w:
            w.upload(p0)
            times = []
            # untimed: the first steps and replica rounds allocate their buffers (the object store's
            # pages fault in over the first rounds: a long run's steady state is what is timed)
            warm = 3 * max(replica_every, 1)
            if replica_every:  # whole replica periods, so the mean carries their share
                steps = -(-steps // replica_every) * replica_every
            for s in range(warm + steps):
                if s == warm:
                    wait_until_idle(settle_s=REFILL_DELAY_S + 0.5)  # the spares this job took are replaced first, not in the timed steps
                t0 = time.perf_counter()
                w.push(s, grad, 1)
                w.pull(s + 1)
                if s >= warm:
                    times.append(time.perf_counter() - t0)
            steps += warm
            log(f"step times: {[round(t, 3) for t in times]}")
            out["step_s"] = statistics.median(times)
            out["mean_step_s"] = statistics.fmean(times)  # every step, replica rounds included
            if not replica_every:
                snap = jc.create_snapshot(job_id)
                log(f"{n:,} params: snapshot at version {snap.version} ({snap.bytes / 1e6:.0f} MB)")
            else:
                time.sleep(1.0 + n / 25e6)  # the last replica round completes
            version = steps
            w.push(version, grad, 1)
            w.pull(version + 1)
            version += 1
            handles = ray.get(svc.service.cluster.coordinator.shard_handles.remote(job_id))  # type: ignore[attr-defined]
            wait_until_idle()  # a steady service: its spares ready, nothing else running
            t0 = time.perf_counter()
            ray.kill(handles[1].actor, no_restart=True)
            while True:
                try:
                    w.push(version, grad, 1)
                    w.pull(version + 1)
                    break
                except JobRolledBack as rolled:
                    version = rolled.resume_version
                    w.pull(version)
            out["recovery_s"] = time.perf_counter() - t0
            out["rolled_back_to"] = float(version)
            log(f"{n:,} params: recovered from {jc.get_job(job_id).recovered_from} in {out['recovery_s']:.2f} s")
        jc.delete_job(job_id)
        if replica_every:
            return out
        wait_until_idle(settle_s=REFILL_DELAY_S + 0.5)  # the spare the recovery took is replaced first
        t0 = time.perf_counter()
        restored = jc.restore_job(snap.path, job_id=f"{job_id}-restored")
        with Worker(address, restored.job_id, "w", timeout=600, pull_timeout=600) as w:
            v = int(restored.version)
            w.pull(v)
            w.push(v, grad, 1)
            w.pull(v + 1)
        out["restore_s"] = time.perf_counter() - t0
        jc.delete_job(restored.job_id)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 1M params")
    ap.add_argument("--params", type=int, action="append", help="parameter counts (default 25M and 100M; 1M with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps before the fault (default 8; 3 with --quick)")
    ap.add_argument("--replica-every", type=int, default=1, help="replica_every_steps of the replica job (default 1)")
    args = ap.parse_args()
    sizes = args.params or ([1_000_000] if args.quick else [25_000_000, 100_000_000])
    steps = args.steps or (3 if args.quick else 8)

    from paramserver.server import BackgroundService, ServiceConfig

    tmp = Path(tempfile.mkdtemp(prefix="ps-bench-rec-"))
    svc = BackgroundService(
        ServiceConfig(port=0, num_cpus=2, snapshot_dir=str(tmp / "snap"), spill_dir=str(tmp / "spill"), state_dir=str(tmp / "state"))
    )
    rows = []
    try:
        for n in sizes:
            log(f"{n:,} params")
            rows.append((n, one_size(svc, n, steps), one_size(svc, n, steps, args.replica_every)))
    finally:
        svc.stop()
    print()
    print(f"recovery of a lost shard (1 worker, 2 shards, adamw; replica every {args.replica_every} step(s))")
    head = ("params", "step s", "snap rec s", "restore s", "snap/restore", "snap/step", "repl rec s", "repl/step", "step w/ repl")
    print(f"{head[0]:>12} {head[1]:>7} {head[2]:>10} {head[3]:>9} {head[4]:>12} {head[5]:>9} {head[6]:>10} {head[7]:>9} {head[8]:>12}")
    for n, r, q in rows:
        print(
            f"{n:>12,} {r['step_s']:>7.3f} {r['recovery_s']:>10.2f} {r['restore_s']:>9.2f} {r['recovery_s'] / r['restore_s']:>12.2f} "
            f"{r['recovery_s'] / r['step_s']:>9.1f} {q['recovery_s']:>10.2f} {q['recovery_s'] / r['step_s']:>9.1f} "
            f"{q['mean_step_s'] / r['mean_step_s']:>11.2f}x"
        )
    print()
    print("snap rec = kill -> first completed step, restored from the snapshot (detection + relaunch + load + one step);")
    print("restore = CreateJob(restore_from) -> first completed step; repl rec = the same kill, restored from the replica in")
    print("memory; step w/ repl = mean step with replicas / without, over whole replica periods")
    print("(aims: repl/step a few; step w/ repl <= 1.2x).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
