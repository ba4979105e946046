"""The Node.js client (clients/node) against a real service.

A job is created with the Python client; `node clients/node/demo_step.js`
joins it, uploads the initial parameters, pulls version 0, pushes one SGD
step's gradient and pulls version 1. The test checks both versions against
numpy float32 arithmetic and that the service published version 1.

Skipped when `node` is not on PATH or `npm ci` has not been run in
clients/node (no node_modules).
"""

from __future__ import annotations

import json
import shutil
import subprocess
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
