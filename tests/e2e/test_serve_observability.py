"""`paramserver serve --log-format json --metrics-port ... --shard-port-range ...` as a user runs it
(its own local Ray, a separate process): every line it logs is JSON and the shards' records are
among them with their job and shard; the metrics endpoint answers; the shards' ports come from the
range; `paramserver jobs` and `paramserver status` show the job as it trains."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from paramserver.cli import app
from paramserver_client import JobClient, Worker
from tests.e2e.test_main_job import _env
from tests.e2e.test_serve_killed import _serving


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow  # a `serve` process of its own with a local Ray (~35 s); tests/cluster/test_observability covers the parts in-process
def test_serve_logs_json_with_the_shards_records_and_serves_metrics(tmp_path: Path) -> None:
    port, metrics = _free_port(), _free_port()
    low = 21600 + (port % 200)
    address = f"127.0.0.1:{port}"
    dirs = ["--snapshot-dir", str(tmp_path / "snap"), "--spill-dir", str(tmp_path / "spill"), "--state-dir", str(tmp_path / "state")]
    cmd = [sys.executable, "-m", "paramserver.cli", "serve", "--port", str(port), "--num-cpus", "1", "--log-format", "json",
           "--metrics-port", str(metrics), "--shard-port-range", f"{low}-{low + 7}", *dirs]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=out)
    try:
        end = time.monotonic() + 180
        while not _serving(address):
            assert serve.poll() is None and time.monotonic() < end, "serve did not come up:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        with JobClient(address) as jc:
            job = jc.create_job([("w", (32, 32)), ("b", (32,))], job_id="obs-e2e", optimizer="sgd", num_shards=2, num_workers=1)
            assert all(low <= int(s.address.rsplit(":", 1)[1]) <= low + 7 for s in job.shards)
            with Worker(address, "obs-e2e", "a") as w:
                w.upload(np.zeros(32 * 33, np.float32))
                for step in range(3):
                    w.push(step, np.ones(32 * 33, np.float32), 1)
                    w.pull(step + 1)
            runner = CliRunner()
            listed = runner.invoke(app, ["jobs", "--address", address])
            assert listed.exit_code == 0 and "obs-e2e" in listed.output, listed.output
            shown = runner.invoke(app, ["status", "obs-e2e", "--address", address, "--json"])
            assert shown.exit_code == 0, shown.output
            progress = json.loads(shown.output)["progress"]
            assert int(progress["step"]) == 3 and progress["waiting"] == [0], progress
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as r:
                text = r.read().decode()
            assert 'paramserver_job_version{job_id="obs-e2e"} 3.0' in text
            assert 'paramserver_shard_version{job_id="obs-e2e",node=' in text
            time.sleep(2.5)  # the relay drains the actors once a second
    finally:
        serve.terminate()
        serve.wait(60)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:
        if line.startswith("{"):
            records.append(json.loads(line))
    # Ray's own start-up lines are not ours; every line of ours is one JSON object
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    shard = [r for r in records if r.get("job") == "obs-e2e" and "shard" in r]
    assert {r["shard"] for r in shard} == {0, 1}, records[-20:]
    assert all(r["source"] == "shard" and r["node"] for r in shard)
    assert any(r.get("source") == "coordinator" and r.get("job") == "obs-e2e" for r in records)
    assert serve.returncode == 0, log.read_text()[-3000:]
