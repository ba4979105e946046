"""`paramserver serve` with its own local Ray, killed with SIGKILL: none of the processes it started
(Ray's GCS, raylet, agents, the shards' workers) outlives it."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramserver.reaper import alive, descendants
from paramserver_client import JobClient
from tests.e2e.test_main_job import _env


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        try:
            req = health_pb2.HealthCheckRequest(service="paramserver.v1.JobService")
            return health_pb2_grpc.HealthStub(ch).Check(req, timeout=2).status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False


@pytest.mark.slow
def test_a_killed_serve_takes_its_local_ray_along(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    env = _env(tmp_path)  # a short Ray temp dir (socket paths)
    dirs = ["--snapshot-dir", str(tmp_path / "snap"), "--spill-dir", str(tmp_path / "spill"), "--state-dir", str(tmp_path / "state")]
    cmd = [sys.executable, "-m", "paramserver.cli", "serve", "--port", str(port), "--num-cpus", "1", *dirs]
    serve = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 180
        while not _serving(address):
            assert serve.poll() is None and time.monotonic() < end, "serve did not come up"
            time.sleep(0.5)
        with JobClient(address) as jc:
            jc.create_job([("w", (64,))], optimizer="sgd", num_shards=2)  # shard workers: more processes
        time.sleep(2)  # the reaper records descendants every second
        started = descendants(serve.pid)
        assert len(started) >= 4, started  # GCS, raylet, agents, workers, the reaper
        serve.send_signal(signal.SIGKILL)
        serve.wait(30)
        end = time.monotonic() + 60
        while any(alive(p) for p in started) and time.monotonic() < end:
            time.sleep(0.5)
        left = [p for p in started if alive(p)]
        assert not left, f"still running after serve was killed: {[Path(f'/proc/{p}/comm').read_text().strip() for p, _ in left]}"
    finally:
        if serve.poll() is None:
            serve.kill()
