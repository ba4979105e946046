"""The Node.js client as a published package (clients/node, npm name "paramserver-client").

* The package's bundled protos (clients/node/protos/) are the repository's protos/ byte for byte.
* `npm pack` ships what package.json's "files" lists, and the tarball installs into a FRESH
  directory with `npm install <tarball>` (its dependencies from the registry or the npm cache).
* From that directory, with the package loaded by name through `require` and through `import`:
  a job is created with hyperparameters (read back through getJob), a worker joins, uploads,
  pulls, pushes one SGD step and pulls the new version, which is compared with numpy.
* Offline (fake grpc-js servers): Struct conversion, UNAVAILABLE retried under one request_id,
  tokens on the front door and the shards, ErrorInfo reasons, mutual TLS from the environment.
* Against a service that requires credentials (the `secure_service` fixture, and `tls_service`
  for mutual TLS, when tests/conftest.py has them): the admin token creates the job, the worker
  token from CreateJob does the worker's steps, a call without a token is UNAUTHENTICATED (16),
  the worker token cannot DeleteJob (PERMISSION_DENIED, 7), and RotateJobToken works.

Skipped when `node` or `npm` is not on PATH.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = REPO_ROOT / "clients" / "node"
REPO_PROTOS = REPO_ROOT / "protos" / "paramserver" / "v1"
BUNDLED_PROTOS = NODE_CLIENT / "protos" / "paramserver" / "v1"
PACKAGE_NAME = "paramserver-client"
NODE_TESTS = NODE_CLIENT / "test"

LR = 0.5
LOSS_TERMS = 3
HYPERPARAMETERS = {"lr": LR, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False}

#: Variables the package reads; cleared for the subprocesses unless a test sets them.
CREDENTIAL_ENV = ("PARAMSERVER_TOKEN", "PARAMSERVER_TLS_CA", "PARAMSERVER_TLS_CERT", "PARAMSERVER_TLS_KEY")


def _tools() -> tuple[str, str]:
    """node and npm, or skip."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node or npm is not on PATH")
    return node, npm


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIAL_ENV}
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or _env())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


# ---------------------------------------------------------------------------
# The bundled protos
# ---------------------------------------------------------------------------


def test_bundled_protos_match_repository() -> None:
    """clients/node/protos/paramserver/v1 holds exactly protos/paramserver/v1/*.proto, byte for byte
    (run `npm run sync-protos` in clients/node after changing protos/)."""
    repo = {p.name: p.read_bytes() for p in REPO_PROTOS.glob("*.proto")}
    bundled = {p.name: p.read_bytes() for p in BUNDLED_PROTOS.glob("*.proto")}
    assert repo, "no protos under protos/paramserver/v1"
    assert sorted(bundled) == sorted(repo), "the bundled protos are not the repository's: run `npm run sync-protos` in clients/node"
    stale = [name for name in repo if bundled[name] != repo[name]]
    assert not stale, f"bundled protos differ from protos/paramserver/v1: {stale}; run `npm run sync-protos` in clients/node"
    assert not (BUNDLED_PROTOS.parent.parent / "google").exists(), "the well-known types come from protobufjs, not from copies"


def test_sync_protos_script_repairs_and_checks(tmp_path: Path) -> None:
    """`npm run sync-protos` rewrites stale copies and removes extra ones; `--check` (also the
    package's prepack step) fails while they differ. Run on a copy of the layout."""
    node, _ = _tools()
    pkg = tmp_path / "clients" / "node"
    shutil.copytree(NODE_CLIENT / "scripts", pkg / "scripts")
    shutil.copytree(NODE_CLIENT / "protos", pkg / "protos")
    shutil.copytree(REPO_PROTOS, tmp_path / "protos" / "paramserver" / "v1")
    script = str(pkg / "scripts" / "sync-protos.js")
    _run([node, script, "--check"], cwd=pkg)

    bundled = pkg / "protos" / "paramserver" / "v1"
    (bundled / "tensor.proto").write_text("// stale\n")
    (bundled / "extra.proto").write_text("// gone upstream\n")
    proc = subprocess.run([node, script, "--check"], cwd=pkg, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "tensor.proto" in proc.stderr and "extra.proto" in proc.stderr, proc.stderr

    _run([node, script], cwd=pkg)
    assert (bundled / "tensor.proto").read_bytes() == (REPO_PROTOS / "tensor.proto").read_bytes()
    assert not (bundled / "extra.proto").exists()
    _run([node, script, "--check"], cwd=pkg)


# ---------------------------------------------------------------------------
# Packing and installing
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`npm pack` of clients/node: {"tarball": Path, "files": [paths in the tarball], "meta": ...}."""
    _, npm = _tools()
    dest = tmp_path_factory.mktemp("npm-pack")
    proc = _run([npm, "pack", "--json", "--pack-destination", str(dest), "--loglevel=error"], cwd=NODE_CLIENT)
    meta = json.loads(proc.stdout[proc.stdout.index("[") :])[0]
    tarball = dest / meta["filename"]
    assert tarball.is_file()
    return {"tarball": tarball, "files": sorted(f["path"] for f in meta["files"]), "meta": meta}


@pytest.fixture(scope="module")
def installed(packed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh directory with the tarball installed by `npm install` and the Node test scripts
    (clients/node/test) copied into t/, so that they load the package by name from there."""
    _, npm = _tools()
    app = tmp_path_factory.mktemp("npm-consumer")
    (app / "package.json").write_text(json.dumps({"name": "paramserver-consumer", "version": "1.0.0", "private": True}))
    _run(
        [npm, "install", str(packed["tarball"]), "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=app,
        timeout=600,
    )
    pkg = app / "node_modules" / PACKAGE_NAME
    assert (pkg / "package.json").is_file()
    assert (app / "node_modules" / "@grpc" / "grpc-js").is_dir()
    shutil.copytree(NODE_TESTS, app / "t")
    return app


def test_packed_contents(packed: dict[str, Any]) -> None:
    """The tarball is the public package: its entry points, sources, types and bundled protos;
    no demo, tests, scripts or node_modules."""
    files = packed["files"]
    for must in ("package.json", "README.md", "index.js", "index.mjs", "index.d.ts", "index.d.mts"):
        assert must in files, files
    for proto in REPO_PROTOS.glob("*.proto"):
        assert f"protos/paramserver/v1/{proto.name}" in files, files
    assert any(f.startswith("src/") for f in files)
    shipped = {"package.json", "README.md", "index.js", "index.mjs", "index.d.ts", "index.d.mts", "src", "protos"}
    for path in files:
        assert path.split("/")[0] in shipped, path
    manifest = json.loads((NODE_CLIENT / "package.json").read_text())
    assert manifest["name"] == PACKAGE_NAME
    assert manifest["version"] == "0.1.0"
    assert not manifest.get("private", False)
    assert manifest["engines"]["node"]
    assert manifest["exports"]["."]["require"]["default"] == "./index.js"
    assert manifest["exports"]["."]["import"]["default"] == "./index.mjs"
    assert manifest["types"] == "./index.d.ts"
    for dep, version in {**manifest["dependencies"], **manifest.get("devDependencies", {})}.items():
        assert version[0].isdigit(), f"{dep} is not pinned to an exact version: {version}"


def test_packed_package_loads_only_its_own_protos(installed: Path) -> None:
    """Installed elsewhere, the package reads the protos inside its own folder."""
    node, _ = _tools()
    script = (
        "const ps = require('paramserver-client');"
        "const path = require('node:path');"
        "console.log(JSON.stringify({root: ps.PROTO_ROOT, reasons: Object.keys(ps.Reason),"
        " proto: require.resolve('paramserver-client/protos/paramserver/v1/job_service.proto')}));"
    )
    out = json.loads(_run([node, "-e", script], cwd=installed).stdout)
    pkg = (installed / "node_modules" / PACKAGE_NAME).resolve()
    assert Path(out["root"]).resolve() == pkg / "protos"
    assert Path(out["proto"]).resolve() == pkg / "protos" / "paramserver" / "v1" / "job_service.proto"
    for reason in ("JOB_NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "QUOTA_EXCEEDED", "TOO_MANY_STREAMS"):
        assert reason in out["reasons"]


def _make_certs(directory: Path) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> Any:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: Any, key: Any) -> None:
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if stem != "ca":
            pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            (directory / f"{stem}.key").write_bytes(pem)

    def builder(subject: str, issuer: str, public_key: Any) -> Any:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name(issuer))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        builder("paramserver-test-ca", "paramserver-test-ca", ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("ca", ca, ca_key)
    for stem, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        b = builder(f"paramserver-test-{stem}", "paramserver-test-ca", key.public_key())
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if stem == "server":
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        write(stem, b.sign(ca_key, hashes.SHA256()), key)
    return directory


def test_packed_package_offline_retries_tokens_struct_tls(installed: Path, tmp_path: Path) -> None:
    """clients/node/test/offline.js from the fresh directory, against fake grpc-js servers:
    Struct values of every kind, UNAVAILABLE retried (bounded) under one request_id for unary
    calls, uploads and pushes, pulls started over, the token metadata on the front door and the
    shards (option and $PARAMSERVER_TOKEN), ErrorInfo reasons, and mutual TLS from
    $PARAMSERVER_TLS_CA/CERT/KEY on both channels."""
    node, _ = _tools()
    certs = _make_certs(tmp_path / "certs")
    proc = _run([node, "t/offline.js", str(certs)], cwd=installed, timeout=120)
    assert "offline: mutual TLS ok" in proc.stdout
    assert "offline: ok" in proc.stdout


def test_packed_package_types(installed: Path, tmp_path: Path) -> None:
    """index.d.ts / index.d.mts type-check from the fresh directory (require and import by name),
    with the typescript pinned in clients/node's devDependencies."""
    node, _ = _tools()
    tsc = NODE_CLIENT / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.is_file():
        pytest.skip("typescript is not installed in clients/node (npm ci)")
    types_dir = installed / "types-check"
    shutil.copytree(NODE_CLIENT / "types-test", types_dir, dirs_exist_ok=True)
    config = {
        "compilerOptions": {
            "target": "es2022",
            "module": "node16",
            "moduleResolution": "node16",
            "strict": True,
            "noEmit": True,
            "types": ["node"],
        },
        "files": ["usage.cts", "usage.mts"],
    }
    (types_dir / "tsconfig.json").write_text(json.dumps(config))
    _run([node, str(tsc), "-p", str(types_dir / "tsconfig.json")], cwd=installed, timeout=180)


# ---------------------------------------------------------------------------
# Against the real service
# ---------------------------------------------------------------------------


def _step(node: str, installed: Path, entry: str, address: str, job_id: str, tmp_path: Path, **kwargs: Any) -> tuple[dict, Any, Any]:
    """Runs t/<entry> (one SGD step through the installed package); returns (out, params, grad)."""
    rng = np.random.default_rng(4321)
    total = 33 * 5 + 5
    # Parameters in [1, 2) and a small update keep every result far from 0, so a relative
    # tolerance of 1e-6 means "equal up to about one ulp". float32 values survive JSON exactly.
    params = rng.uniform(1.0, 2.0, total).astype(np.float32)
    grad = rng.uniform(-1.0, 1.0, total).astype(np.float32)
    auth = kwargs.pop("auth", None)
    config = {
        "address": address,
        "job_id": job_id,
        "params": params.tolist(),
        "grad": grad.tolist(),
        "loss_terms": LOSS_TERMS,
        "hyperparameters": HYPERPARAMETERS,
        "auth": auth,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    out_path = tmp_path / "out.json"
    env = kwargs.pop("env", _env())
    proc = subprocess.run(
        [node, f"t/{entry}", str(tmp_path / "config.json"), str(out_path)],
        cwd=installed,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, f"{entry} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out_path.read_text()), params, grad


def _check_step(out: dict, params: Any, grad: Any) -> None:
    """The step's numbers: version 0 = the uploaded parameters; version 1 = torch.optim.SGD on the
    averaged gradient (sum over workers / sum of loss_terms), in float32."""
    assert out["hyperparameters"] == HYPERPARAMETERS, out["hyperparameters"]
    assert out["created_hyperparameters"] == HYPERPARAMETERS
    assert out["group_hyperparameters"]["lr"] == LR
    assert out["group_hyperparameters"]["nesterov"] is False
    assert out["worker_id"] == 0
    assert out["upload"] is True
    np.testing.assert_array_equal(np.asarray(out["version0"], dtype=np.float32), params)
    assert out["push_outcome"] == "APPLIED"
    assert out["version"] == 1
    expected = params - np.float32(LR) * (grad / np.float32(LOSS_TERMS))
    assert expected.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out["version1"], dtype=np.float32), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("entry", ["step_require.cjs", "step_import.mjs"])
def test_packed_package_one_sgd_step(installed: Path, address: str, job_id: str, tmp_path: Path, entry: str) -> None:
    """The installed package, loaded by name with require / import, creates a job with
    hyperparameters (Struct values read back through getJob), joins, uploads, pulls, pushes one
    SGD step and pulls version 1; the service agrees."""
    node, _ = _tools()
    out, params, grad = _step(node, installed, entry, address, job_id, tmp_path)
    _check_step(out, params, grad)
    assert out["worker_token_prefix"] == ""  # no credentials, no worker token

    from google.protobuf import json_format

    from paramserver_client import JobClient

    with JobClient(address) as jc:
        after = jc.get_job(job_id)
    assert after.version == 1
    assert list(after.workers) == []
    assert json_format.MessageToDict(after.spec.optimizer.hyperparameters) == HYPERPARAMETERS


def _service_fixture(request: pytest.FixtureRequest, name: str) -> Any:
    """The session fixture `name` of tests/conftest.py, or skip while it does not exist."""
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        pytest.skip(f"tests/conftest.py has no `{name}` fixture")


@pytest.mark.parametrize("fixture", ["secure_service", "tls_service"])
def test_packed_package_with_credentials(installed: Path, request: pytest.FixtureRequest, tmp_path: Path, fixture: str) -> None:
    """Against a service that requires credentials (and, for tls_service, mutual TLS): the admin
    token ($PARAMSERVER_TOKEN) creates the job, the worker token from CreateJob does the worker's
    steps; no token is UNAUTHENTICATED on the front door and on a shard, the worker token cannot
    DeleteJob (PERMISSION_DENIED), and after RotateJobToken(previous_valid_s=0) the old token is
    refused while the worker goes on with the new one."""
    node, _ = _tools()
    svc = _service_fixture(request, fixture)
    env = _env(PARAMSERVER_TOKEN=svc.admin_token)
    if fixture == "tls_service":
        env.update(PARAMSERVER_TLS_CA=str(svc.ca_file), PARAMSERVER_TLS_CERT=str(svc.client_cert), PARAMSERVER_TLS_KEY=str(svc.client_key))
    job_id = f"t-node-{os.urandom(5).hex()}"
    out, params, grad = _step(
        node, installed, "step_require.cjs", svc.address, job_id, tmp_path, auth={"admin_token": svc.admin_token}, env=env
    )
    _check_step(out, params, grad)
    assert out["worker_token_prefix"] == f"psj.{job_id}"
    assert out["worker_token_echoed"] == ""  # only CreateJob's answer carries it

    unauthenticated, permission_denied = 16, 7
    assert out["no_token"]["code"] == unauthenticated, out["no_token"]
    assert out["no_token"]["reason"] == "UNAUTHENTICATED", out["no_token"]
    assert out["shard_no_token"]["code"] == unauthenticated, out["shard_no_token"]
    assert out["worker_delete"]["code"] == permission_denied, out["worker_delete"]
    assert out["worker_delete"]["reason"] == "PERMISSION_DENIED", out["worker_delete"]
    assert out["old_token_after_rotation"]["code"] == unauthenticated, out["old_token_after_rotation"]
    assert out["previous_expire_at"] > 0
    assert out["deleted"] is True
