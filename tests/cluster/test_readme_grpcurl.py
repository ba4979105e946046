"""The README's grpcurl calls (health, create, status), run as written with the grpcurl binary
against a real service that requires credentials (reflection gives grpcurl the schema)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from paramserver_client import JobClient
from tests.conftest import SecuredService

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks() -> dict[str, str]:
    """The README's ```bash blocks that start with "# grpcurl: NAME", by name."""
    found = re.findall(r"```bash\n# grpcurl: (\w+)\n(.*?)```", README.read_text(), flags=re.S)
    return {name: body for name, body in found}


def grpcurl() -> str:
    exe = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    if exe is None:
        pytest.skip("grpcurl is not installed (make setup installs it)")
    return exe


def run(body: str, address: str, token: str, job_id: str) -> dict[str, object]:
    command = body.replace("localhost:50051", address).replace('"demo"', f'"{job_id}"').replace("grpcurl ", f"{grpcurl()} ", 1)
    env = {**os.environ, "PARAMSERVER_TOKEN": token}
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_readme_grpcurl_calls(secure_service: SecuredService) -> None:
    found = blocks()
    assert set(found) == {"health", "create", "status"}
    job_id = f"curl-{uuid.uuid4().hex[:8]}"
    assert run(found["health"], secure_service.address, "", job_id) == {"status": "SERVING"}
    try:
        created = run(found["create"], secure_service.address, secure_service.admin_token, job_id)
        assert created["job_id"] == job_id and str(created["worker_token"]).startswith(f"psj.{job_id}.")
        assert created["spec"]["optimizer"]["hyperparameters"] == {"lr": 0.001, "weight_decay": 0.01}  # type: ignore[index]
        status = run(found["status"], secure_service.address, secure_service.admin_token, job_id)
        assert status["job_id"] == job_id and len(status["shards"]) == 2  # type: ignore[arg-type]
        with pytest.raises(AssertionError, match="Unauthenticated"):  # the same call without the token
            run(found["status"], secure_service.address, "", job_id)
    finally:
        with JobClient(secure_service.address, token=secure_service.admin_token) as jc:
            jc.delete_job(job_id)
