"""Node faults on a simulated 6-node Ray cluster (see multinode_scenario.py, which runs in its own
process because a process holds one Ray): the node holding a shard and the node holding the
coordinator are removed mid-training; the run ends bit-identical to a fault-free one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_removing_a_shard_node_and_the_coordinator_node_loses_nothing() -> None:
    ray_tmp = tempfile.mkdtemp(prefix="psmn-", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    out = subprocess.run([sys.executable, "-m", "tests.cluster.multinode_scenario"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=420)  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stdout[-3000:] + out.stderr[-5000:]
    result = json.loads(lines[-1])
    assert result.get("ok"), (result, out.stderr[-5000:])
    assert out.returncode == 0
    assert result["removed_shard_node"] in result["shard_nodes"]
    assert result["coordinator_node_after"] != result["coordinator_node_before"]  # restarted elsewhere
    assert result["recoveries"] == 1 and result["bit_identical"]
