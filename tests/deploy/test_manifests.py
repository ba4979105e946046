"""The deployments under deploy/ against the schemas kept in deploy/schemas (see SOURCE.md there):
every YAML document is validated (RayCluster and RayJob against KubeRay's CRD schema, Service,
NetworkPolicy and PersistentVolumeClaim against Kubernetes' own, the `ray up` config against
Ray's), unknown fields are errors as with `kubectl apply --validate=strict`, and the manifests
agree with each other and with the Dockerfile: front door and coordinator on the head, CPU and
GPU shard groups, gRPC probes on the front door's port, one shard port range everywhere."""

from __future__ import annotations

import ast
import copy
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from importlib import metadata, util
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7, DRAFT202012

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
SCHEMA_BASE = "https://paramserver.example/deploy/schemas/"
K8S = "kubernetes-v1.25.0-strict.json"
RAYCLUSTER = "kuberay-rayclusters.ray.io-v1.yaml"
RAYJOB = "kuberay-rayjobs.ray.io-v1.yaml"
RAY_SCHEMA = "ray-2.60.0-ray-schema.json"

#: (apiVersion, kind) -> the schema a manifest of that kind is validated against.
KINDS: dict[tuple[str, str], dict[str, Any]] = {
    ("ray.io/v1", "RayCluster"): {"$ref": SCHEMA_BASE + RAYCLUSTER},
    ("ray.io/v1", "RayJob"): {"$ref": SCHEMA_BASE + RAYJOB},
    ("v1", "Service"): {"$ref": f"{SCHEMA_BASE}{K8S}#/$defs/io.k8s.api.core.v1.Service"},
    ("v1", "PersistentVolumeClaim"): {"$ref": f"{SCHEMA_BASE}{K8S}#/$defs/io.k8s.api.core.v1.PersistentVolumeClaim"},
    ("networking.k8s.io/v1", "NetworkPolicy"): {"$ref": f"{SCHEMA_BASE}{K8S}#/$defs/io.k8s.api.networking.v1.NetworkPolicy"},
}
OBJECT_META = f"{SCHEMA_BASE}{K8S}#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


# --- schemas -------------------------------------------------------------------------------------


def strict(schema: Any, *, root: bool = True) -> Any:
    """A CRD's structural schema with the API server's treatment of unknown fields made errors.

    The API server prunes (or, with `kubectl apply --validate=strict`, rejects) every field a
    structural schema does not declare: an object schema with `properties` and no
    `additionalProperties` is closed, unless it says x-kubernetes-preserve-unknown-fields. Here
    such objects get `additionalProperties: false`; `nullable: true` admits null; the root's
    `metadata` is validated as a Kubernetes ObjectMeta, as the API server does."""
    if isinstance(schema, list):
        return [strict(s, root=False) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v, root=False) if k not in ("enum", "required", "default") else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {name: strict(s, root=False) for name, s in schema["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if root and out.get("properties", {}).get("metadata") == {"type": "object"}:
        out["properties"]["metadata"] = {"$ref": OBJECT_META}
    return out


@cache
def _yaml_schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((SCHEMAS / name).read_text())
    return loaded


@cache
def registry(strict_crds: bool = True) -> Registry:
    """Every schema of deploy/schemas under its $id (the CRD schemas strict, or as written)."""
    resources = [DRAFT202012.create_resource(strict(_yaml_schema(n)) if strict_crds else _yaml_schema(n)) for n in (RAYCLUSTER, RAYJOB)]
    resources.append(Resource.from_contents(json.loads((SCHEMAS / K8S).read_text())))
    out: Registry = Registry().with_resources((r.id() or "", r) for r in resources)
    return out


def validator(kind: tuple[str, str], *, strict_crds: bool = True) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(KINDS[kind], registry=registry(strict_crds))


def ray_up_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / RAY_SCHEMA).read_text())
    return jsonschema.Draft7Validator(schema, registry=Registry().with_resource(schema["$id"], DRAFT7.create_resource(schema)))


def errors(doc: dict[str, Any], *, strict_crds: bool = True) -> list[str]:
    """Why `doc` is not valid ([] when it is)."""
    if "cluster_name" in doc and "provider" in doc:
        found = ray_up_validator().iter_errors(doc)
    else:
        found = validator((doc.get("apiVersion", ""), doc.get("kind", "")), strict_crds=strict_crds).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]


# --- the manifests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def name(self) -> str:
        kind = self.body.get("kind", "ray-up")
        name = self.body.get("metadata", {}).get("name", self.body.get("cluster_name", "?"))
        return f"{self.path.relative_to(DEPLOY)}#{self.index}:{kind}/{name}"


def _documents() -> Iterator[Doc]:
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        if SCHEMAS in path.parents:
            continue  # the schemas themselves
        for i, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is not None:
                yield Doc(path, i, body)


DOCS = list(_documents())


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d.body for d in DOCS if d.body.get("kind") == kind and (name is None or d.body["metadata"]["name"] == name)]
    return found


def ray_up() -> dict[str, Any]:
    (found,) = [d.body for d in DOCS if "cluster_name" in d.body]
    return found


def head_container(cluster: dict[str, Any]) -> dict[str, Any]:
    containers = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert containers[0]["name"] == "ray-head"  # KubeRay's Ray container is the first one
    head: dict[str, Any] = containers[0]
    return head


SHELL_OPERATORS = {">", ">>", "<", "2>&1", "&", "&&", "||", ";", "|"}


def command_argv(command: str, program: tuple[str, str] = ("paramserver", "serve")) -> list[str]:
    """The arguments of `paramserver serve` (or `program`) in a shell command line."""
    words = shlex.split(command)
    start = next(i for i in range(len(words) - 1) if tuple(words[i : i + 2]) == program) + 2
    end = next((i for i in range(start, len(words)) if words[i] in SHELL_OPERATORS), len(words))
    return words[start:end]


def serve_args(command: str) -> dict[str, str]:
    """The options of the `paramserver serve` in a shell command line (flags map to "")."""
    argv = command_argv(command)
    return {
        w: (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "") for i, w in enumerate(argv) if w.startswith("--")
    }


def kuberay_resources(value: str) -> dict[str, float]:
    """KubeRay's rayStartParams `resources`: a JSON object, quoted for the shell it runs in."""
    inner = shlex.split(value)
    assert len(inner) == 1, value
    parsed: dict[str, float] = json.loads(inner[0])
    return parsed


def shard_range() -> tuple[int, int]:
    """The shard port range of the image (EXPOSE)."""
    exposed = [p for i in DockerfileParser(str(ROOT / "Dockerfile")).structure if i["instruction"] == "EXPOSE" for p in i["value"].split()]
    (rng,) = [p for p in exposed if "-" in p]
    low, high = rng.split("-")
    return int(low), int(high)


# --- validation ----------------------------------------------------------------------------------


def test_every_document_is_one_the_tests_know() -> None:
    kinds = {(d.body.get("apiVersion"), d.body.get("kind")) for d in DOCS if "kind" in d.body}
    assert kinds == set(KINDS), kinds ^ set(KINDS)
    assert all("kind" in d.body or "cluster_name" in d.body for d in DOCS)
    assert [d.body["cluster_name"] for d in DOCS if "cluster_name" in d.body] == ["paramserver"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.name)
def test_manifest_is_valid(doc: Doc) -> None:
    assert errors(doc.body) == []


def test_strict_wrapper_closes_structural_objects_only() -> None:
    schema = strict(_yaml_schema(RAYCLUSTER))
    spec = schema["properties"]["spec"]
    assert spec["additionalProperties"] is False
    assert spec["properties"]["headGroupSpec"]["additionalProperties"] is False
    # maps keep their declared value schema: rayStartParams takes any ray start option
    assert spec["properties"]["headGroupSpec"]["properties"]["rayStartParams"]["additionalProperties"] == {"type": "string"}
    assert schema["properties"]["status"]["properties"]["lastUpdateTime"]["type"] == ["string", "null"]


def _misspelled(doc: dict[str, Any], path: tuple[str | int, ...], new_key: str) -> dict[str, Any]:
    """`doc` with the last key of `path` renamed to `new_key`."""
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    node[new_key] = node.pop(path[-1])
    return out


@pytest.mark.parametrize(
    ("kind", "path", "typo"),
    [
        ("RayCluster", ("spec", "workerGroupSpecs"), "workerGroupSpec"),
        ("RayCluster", ("spec", "headGroupSpec", "serviceType"), "servicetype"),
        ("RayCluster", ("spec", "workerGroupSpecs", 0, "rayStartParams"), "rayStartParam"),
        ("RayCluster", ("spec", "headGroupSpec", "template", "spec", "containers", 0, "readinessProbe"), "readinesProbe"),
        ("RayCluster", ("metadata", "annotations"), "anotations"),
        ("RayJob", ("spec", "entrypoint"), "entryPoint"),
        ("RayJob", ("spec", "clusterSelector"), "clusterselector"),
        ("Service", ("spec", "selector"), "selecter"),
        ("NetworkPolicy", ("spec", "ingress", 1, "ports", 1, "endPort"), "endport"),
    ],
)
def test_a_misspelled_field_fails(kind: str, path: tuple[str | int, ...], typo: str) -> None:
    bad = _misspelled(one(kind), path, typo)
    found = errors(bad)
    assert found, f"{kind} with {typo!r} passed"
    assert any(typo in e for e in found), found


def test_only_the_strict_wrapper_rejects_unknown_crd_fields() -> None:
    """CRD schemas leave unknown fields to the API server's pruning: as written, the typo passes."""
    bad = _misspelled(one("RayCluster"), ("spec", "workerGroupSpecs"), "workerGroupSpec")
    assert errors(bad, strict_crds=False) == []
    assert errors(bad) != []


def test_a_misspelled_ray_up_field_fails() -> None:
    bad = _misspelled(ray_up(), ("head_start_ray_commands",), "head_start_ray_command")
    assert any("head_start_ray_command" in e for e in errors(bad))


def test_ray_up_config_loads_with_rays_own_checks() -> None:
    """Ray's cluster launcher fills in the local provider's defaults and validates the result."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(ray_up()))
    validate_config(prepared)
    assert prepared["max_workers"] == len(ray_up()["provider"]["worker_ips"])


def test_vendored_ray_schema_is_the_installed_rays() -> None:
    version = metadata.version("ray")
    assert RAY_SCHEMA == f"ray-{version}-ray-schema.json", f"ray {version} installed: copy its schema (SOURCE.md)"
    spec = util.find_spec("ray")
    assert spec and spec.submodule_search_locations
    installed = Path(next(iter(spec.submodule_search_locations))) / "autoscaler" / "ray-schema.json"
    assert (SCHEMAS / RAY_SCHEMA).read_bytes() == installed.read_bytes()


def test_source_md_records_every_schema() -> None:
    source = (SCHEMAS / "SOURCE.md").read_text()
    for path in SCHEMAS.iterdir():
        if path.suffix in (".json", ".yaml"):
            assert path.name in source, f"{path.name} is not described in SOURCE.md"
    assert "1184bc872c0801e59c18caf8a1a4eb5f2800ce93" in source
    assert "kubernetes-validate==1.37.0" in source


# --- what the manifests say ----------------------------------------------------------------------


def test_front_door_and_coordinator_are_on_the_head() -> None:
    cluster = one("RayCluster")
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    head = cluster["spec"]["headGroupSpec"]
    advertised = kuberay_resources(head["rayStartParams"]["resources"])
    assert head["rayStartParams"]["num-cpus"] == "0"
    (command,) = head_container(cluster)["args"]
    assert command.startswith("exec with-ray-head paramserver serve ")
    args = serve_args(command)
    assert args["--address"] == "auto"
    assert args["--host"] == "0.0.0.0" and args["--shard-host"] == "0.0.0.0"
    name, amount = args["--coordinator-resource"].split("=")
    assert name in advertised and 0 < float(amount) <= advertised[name]
    assert args["--log-format"] == "json"
    for group in cluster["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            assert "paramserver serve" not in " ".join(container.get("args", []))
            assert "$KUBERAY_GEN_RAY_START_CMD" in " ".join(container["args"])


def _gpus(group: dict[str, Any]) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)) for c in group["template"]["spec"]["containers"])


def test_shard_groups_on_cpus_and_gpus() -> None:
    groups = one("RayCluster")["spec"]["workerGroupSpecs"]
    cpu = [g for g in groups if _gpus(g) == 0]
    gpu = [g for g in groups if _gpus(g) > 0]
    assert cpu and gpu
    for group in gpu:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"].endswith("-cuda")
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def _health_service() -> str:
    """paramserver.server.HEALTH_SERVICE, read from the source (importing it starts no Ray, but is slow)."""
    tree = ast.parse((ROOT / "paramserver" / "server.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "HEALTH_SERVICE" for t in node.targets):
            assert isinstance(node.value, ast.Constant)
            return str(node.value.value)
    raise AssertionError("HEALTH_SERVICE not found")


def test_grpc_probes_point_to_the_front_door() -> None:
    cluster = one("RayCluster")
    container = head_container(cluster)
    port = int(serve_args(container["args"][0])["--port"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port in ports.values()
    # KubeRay names Ray's ports gcs-server, dashboard, client, metrics (its --metrics-export-port)
    assert not {"gcs-server", "dashboard", "client", "metrics", "serve"} & set(ports), "a port name KubeRay uses for Ray"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc = container[probe]["grpc"]
        assert grpc == {"port": port, "service": _health_service()}, probe
    service = one("Service", "paramserver")
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    by_name = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports[by_name["grpc"]["targetPort"]] == port == by_name["grpc"]["port"]
    metrics_port = int(serve_args(container["args"][0])["--metrics-port"])
    assert ports[by_name["metrics"]["targetPort"]] == metrics_port == by_name["metrics"]["port"]


def test_one_shard_port_range_everywhere() -> None:
    low, high = shard_range()
    wanted = f"{low}-{high}"
    assert serve_args(head_container(one("RayCluster"))["args"][0])["--shard-port-range"] == wanted
    head_commands = " ; ".join(ray_up()["head_start_ray_commands"])
    assert serve_args(head_commands)["--shard-port-range"] == wanted
    (cmd,) = [i["value"] for i in DockerfileParser(str(ROOT / "Dockerfile")).structure if i["instruction"] == "CMD"]
    assert serve_args(shlex.join(json.loads(cmd)))["--shard-port-range"] == wanted
    policy = one("NetworkPolicy")
    ranges = [(p["port"], p["endPort"]) for rule in policy["spec"]["ingress"] for p in rule.get("ports", []) if "endPort" in p]
    assert ranges == [(low, high)]
    assert re.search(rf"\b{low}-{high}\b", (DEPLOY / "README.md").read_text())


def test_network_policy_lets_workers_reach_front_door_and_shards() -> None:
    policy = one("NetworkPolicy")
    cluster = one("RayCluster")
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    front_door = int(serve_args(head_container(cluster)["args"][0])["--port"])
    low, _ = shard_range()
    client_rules = [r for r in policy["spec"]["ingress"] if any("paramserver.io/client" in str(f) for f in r.get("from", []))]
    (rule,) = client_rules
    assert {p["port"] for p in rule["ports"]} == {front_door, low}
    assert all(p["protocol"] == "TCP" for p in rule["ports"])


def test_rayjob_trains_through_the_front_door_of_the_cluster() -> None:
    job = one("RayJob")
    cluster = one("RayCluster")
    service = one("Service", "paramserver")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    argv = command_argv(job["spec"]["entrypoint"], ("paramserver", "demo"))
    address = argv[argv.index("--address") + 1]
    assert "PARAMSERVER_TOKEN=${PARAMSERVER_ADMIN_TOKEN:-}" in shlex.split(job["spec"]["entrypoint"])
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert address == f"{service['metadata']['name']}:{grpc_port}"
    labels = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    policy = one("NetworkPolicy")
    dashboard = [r for r in policy["spec"]["ingress"] if any(p["port"] == 8265 for p in r.get("ports", []))]
    assert dashboard and all(f["podSelector"]["matchLabels"].items() <= labels.items() for r in dashboard for f in r["from"])


def test_ray_up_runs_the_front_door_on_the_head() -> None:
    config = ray_up()
    head = " ; ".join(config["head_start_ray_commands"])
    start = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    resources = json.loads(shlex.split(start[start.index("--resources=") :].split(" --")[0].removeprefix("--resources="))[0])
    args = serve_args(head)
    assert args["--address"] == "auto"
    name, amount = args["--coordinator-resource"].split("=")
    assert name in resources and 0 < float(amount) <= resources[name]
    assert "--num-cpus=0" in start
    setup = " ".join(config["setup_commands"])
    assert "paramserver[server,dashboard] @ file://" in setup
    assert all("ray start --address=" in c or c == "ray stop" or "ulimit" in c for c in config["worker_start_ray_commands"])


def test_images_are_the_ones_the_dockerfile_builds() -> None:
    cluster = one("RayCluster")
    images = {head_container(cluster)["image"]} | {
        c["image"] for g in cluster["spec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]
    }
    images |= {c["image"] for c in one("RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"]}
    assert images == {"paramserver:0.1.0", "paramserver:0.1.0-cuda"}
    readme = (DEPLOY / "README.md").read_text()
    for image in images:
        assert f"-t {image} " in readme, f"deploy/README.md does not build {image}"


def _serve_commands() -> dict[str, str]:
    """Every `paramserver serve` command line the deployments run."""
    (cmd,) = [i["value"] for i in DockerfileParser(str(ROOT / "Dockerfile")).structure if i["instruction"] == "CMD"]
    return {
        "Dockerfile CMD": shlex.join(json.loads(cmd)),
        "RayCluster head": head_container(one("RayCluster"))["args"][0],
        "ray up head": " ; ".join(ray_up()["head_start_ray_commands"]),
    }


@pytest.mark.parametrize("where", ["Dockerfile CMD", "RayCluster head", "ray up head"])
def test_serve_command_lines_parse_with_the_real_cli(where: str) -> None:
    """The options exist and their values parse, as `paramserver serve` itself reads them."""
    import typer.core
    import typer.main

    from paramserver.cli import _resources, app
    from paramserver.log_format import FORMATS
    from paramserver.spread import PortRange

    argv = command_argv(_serve_commands()[where])
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    serve = group.commands["serve"]
    params = serve.make_context("serve", list(argv)).params
    assert params["log_format"] in FORMATS
    assert PortRange.parse(params["shard_port_range"]) == PortRange(*shard_range())
    if params["coordinator_resource"]:
        assert _resources(list(params["coordinator_resource"]))


def test_rayjob_demo_command_parses_with_the_real_cli() -> None:
    import typer.core
    import typer.main

    from paramserver.cli import app

    argv = command_argv(one("RayJob")["spec"]["entrypoint"], ("paramserver", "demo"))
    group = typer.main.get_command(app)
    assert isinstance(group, typer.core.TyperGroup)
    demo = group.commands["demo"]
    params = demo.make_context("demo", list(argv)).params
    assert params["address"] and params["workers"] >= 1
