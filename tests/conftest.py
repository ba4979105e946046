"""Shared fixtures: one real Ray and one real service per test session.

Ray is started once (num_cpus=2, shards reserve no CPU); the front door runs
on a background thread on a free loopback port. Tests create their own jobs
with unique ids and delete them.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray turns "127.0.0.1" in an address into this machine's interface IP unless its cluster mode is
# off: with this, every Ray address (the session's, a joined `serve --address`, cluster_utils'
# nodes) stays on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="ps-tests-"))
#: The test service's snapshot directory.
SNAPSHOT_DIR = _SESSION_TMP / "snapshots"
#: The test service's spill directory.
SPILL_DIR = _SESSION_TMP / "spill"
#: The test service's control-plane journal directory.
STATE_DIR = _SESSION_TMP / "state"
#: Lines "JOB_ID SHARD PHASE" here make shard snapshot writes fail (see shard_host.fault_from_env).
FAULT_FILE = _SESSION_TMP / "faults.txt"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Test credentials for the S3 server the tests start (moto accepts any); set before Ray starts,
# so shard actors inherit them (and the endpoint, set by s3_endpoint).
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP server (moto's server mode) on a free loopback port; AWS_ENDPOINT_URL_S3
    points at it for this process and the Ray started after it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL_S3"] = url
    yield url
    server.stop()


@pytest.fixture(scope="session")
def ray_session(s3_endpoint: str) -> Iterator[None]:
    """A real local Ray for the whole session."""
    import ray

    tmp = tempfile.mkdtemp(prefix="ps-ray-")
    os.environ["RAY_TMPDIR"] = tmp
    # shard actors inherit it: tests write "JOB SHARD PHASE" lines to inject snapshot failures
    os.environ["PARAMSERVER_SNAPSHOT_FAULT_FILE"] = str(FAULT_FILE)
    ray.init(num_cpus=2, include_dashboard=False, namespace="paramserver-tests", _temp_dir=tmp, logging_level="WARNING",
             _node_ip_address="127.0.0.1")  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def service(ray_session: None) -> Iterator[object]:
    """The front door on a free loopback port (a BackgroundService)."""
    from paramserver.server import BackgroundService, ServiceConfig

    svc = BackgroundService(
        # No warm spares (their background starts compete with the tests on 2 cores: the suite ran
        # ~2 min longer with them); tests/cluster/test_warm_spares.py has services that keep them.
        ServiceConfig(host="127.0.0.1", port=0, snapshot_dir=str(SNAPSHOT_DIR), spill_dir=str(SPILL_DIR), state_dir=str(STATE_DIR),
                      warm_shards=0),
        own_ray=False,
    )  # fmt: skip
    yield svc
    svc.stop()


#: The admin token of the secured test services (tenant "default").
ADMIN_TOKEN = f"test-admin-{uuid.uuid4().hex}"


@dataclass
class SecuredService:
    """A front door that requires credentials (and, with `ca_file`, mutual TLS on every port)."""

    background: Any
    address: str
    admin_token: str
    ca_file: str = ""
    """The CA that signed the service's and the client's certificates."""
    client_cert: str = ""
    client_key: str = ""


def _secured(name: str, tls: bool) -> SecuredService:
    from paramserver.access import AuthConfig
    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver.tls import TlsConfig
    from tests.certs import Authority

    ca, client, tls_config = None, None, None
    if tls:
        ca = Authority(_SESSION_TMP, name)
        server = ca.issue("server", server=True)
        client = ca.issue("client", server=False)
        tls_config = TlsConfig(server.cert, server.key, client_ca_file=ca.ca_file)
    svc = BackgroundService(
        ServiceConfig(host="127.0.0.1", port=0, snapshot_dir=str(SNAPSHOT_DIR), spill_dir=str(SPILL_DIR), state_dir=str(STATE_DIR),
                      name=name, auth=AuthConfig.single(ADMIN_TOKEN), tls=tls_config, metrics_port=0, warm_shards=0),
        own_ray=False,
    )  # fmt: skip
    return SecuredService(
        svc, svc.address, ADMIN_TOKEN, ca.ca_file if ca else "", client.cert if client else "", client.key if client else ""
    )


@pytest.fixture(scope="session")
def secure_service(ray_session: None) -> Iterator[SecuredService]:
    """A second front door on the session's Ray that requires tokens (plaintext): `.address`,
    `.admin_token`; its jobs get worker tokens."""
    svc = _secured("secure", tls=False)
    yield svc
    svc.background.stop()


@pytest.fixture(scope="session")
def tls_service(ray_session: None) -> Iterator[SecuredService]:
    """A front door on the session's Ray with tokens and mutual TLS on every port (certificates
    made for this session): `.address`, `.admin_token`, `.ca_file`, `.client_cert`, `.client_key`."""
    svc = _secured("tls", tls=True)
    yield svc
    svc.background.stop()


@pytest.fixture
def address(service: object) -> str:
    """The front door's "host:port"."""
    return service.address  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def job_id(service: object) -> Iterator[str]:
    """A unique job id, deleted after the test."""
    jid = f"t-{uuid.uuid4().hex[:10]}"
    yield jid
    from paramserver_client import JobClient, ServiceError

    with JobClient(service.address) as jc:  # type: ignore[attr-defined]
        try:
            jc.delete_job(jid)
        except ServiceError:
            pass


@pytest.fixture
def jobs(address: str) -> Iterator[list[str]]:
    """Job ids a test creates (it appends them); each is deleted after the test."""
    created: list[str] = []
    yield created
    from paramserver_client import JobClient, ServiceError

    with JobClient(address) as jc:
        for j in created:
            try:
                jc.delete_job(j)
            except ServiceError:
                pass


def shard_tensors(service: object, job_id: str) -> list[dict[str, np.ndarray]]:
    """Every shard's parameters and optimizer state, read straight from the actors."""
    svc = service
    return svc.run(svc.service.cluster.shard_tensors(job_id))  # type: ignore[attr-defined, no-any-return]
