"""The "spread" placement policy on a simulated 4-node Ray cluster (see placement_scenario.py, which
runs in its own process because a process holds one Ray): a head, two CPU workers and a worker with
one (logical) GPU, all on 127.0.0.1.

The policy (paramserver/spread.py): a job's shards go round-robin over the alive nodes that could
hold one, head first, then by address and id; each job starts one node further along; GPU shards
only on GPU nodes; shards without GPUs prefer nodes without GPUs. The coordinator runs on the front
door's node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Ray schedules an actor that asks for no resource at all on a random node, whatever its soft node
# affinity (ray-project/ray#37732): paramserver/cluster.py asks for 1 byte of Ray's "memory"
# resource with each affinity (AFFINITY_MEMORY), so that shards with shard_num_cpus 0 and
# shard_num_gpus 0 (the defaults), and the coordinator (num_cpus 0), go where the policy says.


#: A simulated 4-node cluster of its own (~70 s): in `make test-slow` (CI runs it) with the other multi-node tests.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    ray_tmp = tempfile.mkdtemp(prefix="pspl-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run([sys.executable, "-m", "tests.cluster.placement_scenario"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=270)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stdout[-3000:] + out.stderr[-5000:]
    res: dict[str, Any] = json.loads(lines[-1])
    assert res.get("ok") and out.returncode == 0, (res, out.stderr[-5000:])
    return res


def plain_order(res: dict[str, Any]) -> list[str]:
    """The nodes without GPUs in placement order: head first, then by address (all 127.0.0.1) and id."""
    return [res["head"], *sorted(res["cpu_nodes"])]


def expected(res: dict[str, Any], start: int, shards: int) -> list[str]:
    pool = plain_order(res)
    return [pool[(start + k) % len(pool)] for k in range(shards)]


def test_the_cluster_is_as_declared(result: dict[str, Any]) -> None:
    nodes = result["node_resources"]
    assert len(nodes) == 4
    assert nodes[result["head"]].get("GPU", 0) == 0 and nodes[result["head"]]["CPU"] == 2
    assert nodes[result["gpu_node"]]["GPU"] == 1
    assert all(nodes[n].get("GPU", 0) == 0 for n in result["cpu_nodes"])
    assert result["driver_node"] == result["head"]  # the front door runs on the head


def test_a_job_puts_one_shard_on_each_node_without_gpus(result: dict[str, Any]) -> None:
    a = result["placements"]["A"]
    assert Counter(a) == Counter(plain_order(result))  # one each on head and the CPU workers
    assert result["gpu_node"] not in a
    assert a == expected(result, 0, 3)


def test_the_next_job_starts_one_node_further_along(result: dict[str, Any]) -> None:
    a, b = result["placements"]["A"], result["placements"]["B"]
    assert sorted(Counter(b).values()) == [1, 1, 2]
    assert result["gpu_node"] not in b
    assert b[0] != a[0]
    assert b == expected(result, 1, 4)


def test_gpu_shards_go_only_to_the_gpu_node(result: dict[str, Any]) -> None:
    assert result["placements"]["C"] == [result["gpu_node"]] * 2


@pytest.mark.parametrize("job", ["A", "C"])
def test_training_on_spread_shards_matches_torch_bit_for_bit(result: dict[str, Any], job: str) -> None:
    t = result["training"][job]
    steps = t["version"]
    assert steps == 5 and t["shard_versions"] == [steps] * len(result["placements"][job])
    assert t["finite"] and t["changed"]
    assert t["bit_identical"], t["max_abs_diff"]


def test_shards_asking_for_no_resources_follow_the_policy(result: dict[str, Any]) -> None:
    d = result["placements"]["D"]  # the 4th job (after the GPU job C): starts at the 4th position
    assert d == expected(result, 3, 4), d


def test_the_coordinator_runs_on_the_front_doors_node(result: dict[str, Any]) -> None:
    assert result["coordinator_node"] == result["driver_node"] == result["head"]
