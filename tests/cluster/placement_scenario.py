"""Shard placement on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``, every node
on 127.0.0.1), run as its own process by ``test_placement.py`` (a process holds one Ray).

Nodes: a head (2 CPUs), two CPU workers (1 CPU each) and one worker that declares one GPU (a
logical Ray resource: there is no CUDA here, so its shards compute on the CPU). The service runs
with ``placement="spread"``; the shards ask for little or nothing, so every node could hold them all.

Jobs, in order (each starts one node further along the round-robin):

- A: 3 CPU shards (0.01 CPU each), trained 2 workers x STEPS steps of AdamW;
- B: 4 CPU shards (0.01 CPU each);
- C: 2 shards asking for half a GPU each, trained like A;
- D: 4 shards asking for no resources at all (``shard_num_cpus`` 0, the default). Ray places an
  actor that asks for nothing on a random node whatever its soft node affinity (only a hard one
  binds it), so these, like the coordinator (0 CPUs, a soft affinity to the front door's node),
  may not land where the policy says: the test records that as an expected failure.

Prints one JSON line with the node ids, where each job's shards are (``GetJob`` shards[i].node, by
shard index), where the coordinator runs, and the trained parameters' agreement with torch; the
test asserts on it. Exit status 0 when the scenario ran to the end.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

STEPS = 5
HYPER = {"lr": 1e-2, "weight_decay": 0.1}
MIB = 1 << 20


def main() -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every Ray address on 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver_client import JobClient, Worker
    from tests.cluster.test_parity import SHAPES, TOTAL, reference, worker_grads

    tmp = Path(tempfile.mkdtemp(prefix="ps-placement-"))
    ip = "127.0.0.1"
    store = {"object_store_memory": 128 * MIB}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "node_ip_address": ip, "include_dashboard": False, **store})
    cpu_nodes = [cluster.add_node(num_cpus=1, node_ip_address=ip, **store) for _ in range(2)]
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1, node_ip_address=ip, **store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="paramserver-placement")
    config = ServiceConfig(
        host=ip,
        port=0,
        snapshot_dir=str(tmp / "snapshots"),
        spill_dir=str(tmp / "spill"),
        state_dir=str(tmp / "state"),
        placement="spread",
        keep_jobs_on_exit=False,
    )
    svc = BackgroundService(config, own_ray=False)
    out: dict[str, Any] = {
        "head": cluster.head_node.node_id,
        "cpu_nodes": [n.node_id for n in cpu_nodes],
        "gpu_node": gpu_node.node_id,
        "driver_node": ray.get_runtime_context().get_node_id(),
        "node_resources": {
            str(n["NodeID"]): {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU")} for n in ray.nodes() if n.get("Alive")
        },
    }
    address = svc.address
    tag = uuid.uuid4().hex[:6]
    #: key -> (job id, shards, CPUs per shard, GPUs per shard)
    jobs = {
        "A": (f"pl-a-{tag}", 3, 0.01, 0.0),
        "B": (f"pl-b-{tag}", 4, 0.01, 0.0),
        "C": (f"pl-c-{tag}", 2, 0.0, 0.5),
        "D": (f"pl-d-{tag}", 4, 0.0, 0.0),
    }
    created: list[str] = []
    try:
        out["coordinator_node"] = ray.get(svc.service.cluster.coordinator.node.remote())
        placements: dict[str, list[str]] = {}
        with JobClient(address, timeout=300) as jc:
            for key, (job_id, shards, cpus, gpus) in jobs.items():
                jc.create_job(SHAPES, job_id=job_id, optimizer="adamw", hyperparameters=HYPER, num_workers=2, num_shards=shards,
                              shard_num_cpus=cpus, shard_num_gpus=gpus)  # fmt: skip
                created.append(job_id)
                placements[key] = [s.node for s in sorted(jc.get_job(job_id).shards, key=lambda s: s.index)]
        out["placements"] = placements

        # Train A (CPU shards over three nodes) and C (GPU-asking shards) like test_parity's AdamW case
        p0 = np.random.default_rng(7).standard_normal(TOTAL).astype(np.float32)
        want = reference("adamw", HYPER, 0.0, "constant", {}, p0, STEPS)
        out["training"] = {}
        for key in ("A", "C"):
            job_id = jobs[key][0]
            with Worker(address, job_id, "a", timeout=300) as wa, Worker(address, job_id, "b", timeout=300) as wb:
                ws = sorted([wa, wb], key=lambda w: w.worker_id)
                ws[0].upload(p0)
                for s in range(STEPS):
                    for w in ws:
                        g, n = worker_grads(s, w.worker_id)
                        w.push(s, g, n)
                    ws[0].pull(s + 1)
                version, final, _ = ws[1].pull(STEPS)
            with JobClient(address, timeout=300) as jc:
                versions = [int(s.version) for s in jc.get_job(job_id).shards]
            out["training"][key] = {
                "version": int(version),
                "shard_versions": versions,
                "finite": bool(np.isfinite(final).all()),
                "changed": bool(not np.array_equal(final, p0)),
                "bit_identical": bool(np.array_equal(final, want)),
                "max_abs_diff": float(np.abs(final.astype(np.float64) - want).max()),
            }
        with JobClient(address, timeout=300) as jc:
            for job_id in list(created):
                jc.delete_job(job_id)
                created.remove(job_id)
        out["ok"] = True
    finally:
        print(json.dumps(out), flush=True)
        try:
            if created:
                with JobClient(address, timeout=60) as jc:
                    for job_id in created:
                        try:
                            jc.delete_job(job_id)
                        except Exception:  # noqa: BLE001 - best effort: the service stop takes them along
                            pass
        finally:
            svc.stop()
            ray.shutdown()
            cluster.shutdown()
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
