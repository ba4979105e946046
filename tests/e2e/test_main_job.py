"""The README's main command in quick mode, and `paramserver serve` shutting down cleanly."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from paramserver_client import JobClient

ROOT = Path(__file__).resolve().parents[2]


def _cli() -> list[str]:
    exe = shutil.which("paramserver", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "paramserver.cli"]


def _env(tmp: Path) -> dict[str, str]:
    # Ray's socket paths must stay under 107 bytes: use a short temp dir, not pytest's.
    ray_tmp = Path(tempfile.mkdtemp(prefix="psr-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp))


def test_demo_quick_mode(tmp_path: Path) -> None:
    out = subprocess.run([*_cli(), "demo", "--steps", "25"], capture_output=True, text=True, timeout=400, env=_env(tmp_path), cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "steps/s" in text and "loss/token" in text
    m = re.search(r"final loss\s+service ([0-9.]+)\s+local torch.optim ([0-9.]+)", text)
    assert m, text
    service_loss, local_loss = float(m.group(1)), float(m.group(2))
    assert abs(service_loss - local_loss) <= 1e-4 * max(1.0, local_loss)
    first = float(re.search(r"first step ([0-9.]+)", text).group(1))  # type: ignore[union-attr]
    assert service_loss < first  # it trained
    rel = float(re.search(r"\|\|diff\|\| / \|\|params\|\| ([0-9.e+-]+)", text).group(1))  # type: ignore[union-attr]
    assert rel < 1e-3


def test_serve_shuts_down_on_sigterm_leaving_no_processes(tmp_path: Path) -> None:
    cmd = [
        *_cli(),
        "serve",
        "--port",
        "0",
        "--num-cpus",
        "2",
        "--state-dir",
        str(tmp_path / "state"),
        "--snapshot-dir",
        str(tmp_path / "snaps"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=_env(tmp_path), cwd=ROOT)  # fmt: skip
    try:
        assert proc.stdout is not None
        address = None
        deadline = time.time() + 120
        lines = []
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            m = re.search(r"listening on (\S+)", line)
            if m:
                address = m.group(1)
                break
            if proc.poll() is not None:
                break
        assert address, "".join(lines)
        with JobClient(address) as jc:
            jc.create_job([("w", (8,))], job_id="sig", optimizer="adamw", num_workers=1, num_shards=2)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert tree, "a local Ray with shard actors should be running"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
        assert rc == 0
        _gone, alive = psutil.wait_procs(tree, timeout=30)
        assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        if proc.poll() is None:
            proc.kill()
            pytest.fail("serve did not exit on SIGTERM")
