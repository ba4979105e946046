"""Node faults on a simulated multi-node Ray cluster (``ray.cluster_utils.Cluster``, every node on
127.0.0.1), run as its own process by ``test_multinode.py`` (a process holds one Ray).

Nodes: a head with no CPU, two control nodes ("ctl" resource, no CPU) where the coordinator may
run, and three shard nodes with one CPU each (every shard asks for one CPU). Two jobs train the
same steps: one through the faults, one without. Faults, in order:

1. the node holding shard 0 is removed: the job is restored from its newest snapshot on the nodes
   left (the workers get JobRolledBack and rewind);
2. the node holding the coordinator is removed: Ray restarts the coordinator on the other control
   node; it replays its journal and reattaches to the shards, which did not die with it.

Then the faulty job's state is read and deleted, and a second job trains the same steps without a
fault on the nodes left: both must have the same parameters and optimizer state, bit for bit. Prints one JSON
line with the outcome (exit status 0 when everything held).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

STEPS = 10


def main() -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep every Ray address on 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver_client import JobClient, Worker
    from tests.cluster.test_parity import SHAPES, TOTAL
    from tests.cluster.test_recovery import train_rewinding
    from tests.cluster.test_snapshots import SETTINGS

    tmp = Path(tempfile.mkdtemp(prefix="ps-multinode-"))
    ip = "127.0.0.1"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": ip, "include_dashboard": False})
    ctl = [cluster.add_node(num_cpus=0, resources={"ctl": 1}, node_ip_address=ip) for _ in range(2)]
    data = [cluster.add_node(num_cpus=1, node_ip_address=ip) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace="paramserver-multinode")
    config = ServiceConfig(
        port=0,
        snapshot_dir=str(tmp / "snapshots"),
        spill_dir=str(tmp / "spill"),
        state_dir=str(tmp / "state"),
        coordinator_resources={"ctl": 0.01},
        keep_jobs_on_exit=False,
    )
    svc = BackgroundService(config, own_ray=False)
    out: dict[str, Any] = {}
    try:
        address = svc.address
        faulty, clean = f"mn-{uuid.uuid4().hex[:6]}", f"mn-ref-{uuid.uuid4().hex[:6]}"
        settings = {"num_workers": 2, "num_shards": 2, "shard_num_cpus": 1.0, "snapshot_every_steps": 2, **SETTINGS}
        with JobClient(address, timeout=300) as jc:
            jc.create_job(SHAPES, job_id=faulty, **settings)
            out["shard_nodes"] = sorted({s.node for s in jc.get_job(faulty).shards})
        p0 = np.linspace(-1, 1, TOTAL, dtype=np.float32)
        node_of = {n.node_id: n for n in [*ctl, *data]}

        def remove_shard_node() -> None:
            with JobClient(address) as jc:
                while not jc.list_snapshots(faulty):
                    time.sleep(0.05)
                node = jc.get_job(faulty).shards[0].node
            cluster.remove_node(node_of[node])
            out["removed_shard_node"] = node

        def remove_coordinator_node() -> None:
            node = ray.get(svc.service.cluster.coordinator.node.remote())
            out["coordinator_node_before"] = node
            cluster.remove_node(node_of[node])

        faults = {3: remove_shard_node, 7: remove_coordinator_node}
        resumes: list[int] = []
        states: dict[str, list[np.ndarray]] = {}
        for job_id, plan in ((faulty, faults), (clean, {})):
            if job_id == clean:
                with JobClient(address, timeout=300) as jc:
                    job = jc.get_job(faulty)
                    out["recoveries"], out["generation"], out["version"] = job.recoveries, job.generation, job.version
                    jc.delete_job(faulty)  # frees the CPUs of the nodes left
                    jc.create_job(SHAPES, job_id=clean, **settings)
            with Worker(address, job_id, "a", timeout=300) as wa, Worker(address, job_id, "b", timeout=300) as wb:
                ws = sorted([wa, wb], key=lambda w: w.worker_id)
                ws[0].upload(p0)
                resumes += train_rewinding(ws, STEPS, plan)
            states[job_id] = [
                np.concatenate([a.reshape(-1) for _, a in sorted(t.items())]) for t in svc.run(svc.service.cluster.shard_tensors(job_id))
            ]
            if job_id == faulty:
                out["coordinator_node_after"] = ray.get(svc.service.cluster.coordinator.node.remote())
        out["resumes"] = resumes
        got, want = states[faulty], states[clean]
        out["bit_identical"] = len(got) == len(want) and all(np.array_equal(g, w) for g, w in zip(got, want, strict=True))
        ok = (
            out["bit_identical"]
            and len(resumes) == 1
            and out["recoveries"] == 1
            and out["version"] == STEPS
            and out["coordinator_node_after"] != out["coordinator_node_before"]
        )
        out["ok"] = bool(ok)
    finally:
        print(json.dumps(out), flush=True)
        svc.stop()
        ray.shutdown()
        cluster.shutdown()
    return 0 if out.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
