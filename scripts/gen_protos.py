"""Regenerate the Python stubs in paramserver/v1 from protos/paramserver/v1.

    python scripts/gen_protos.py          # rewrite the committed stubs
    python scripts/gen_protos.py --check  # exit 1 if they differ from a fresh generation

The stubs are the only generated code in the tree; CI runs --check. The Node.js package ships
copies of the .proto files (clients/node/protos/): this script writes them too, and --check
compares them.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("paramserver") / "v1"
NODE_PROTOS = ROOT / "clients" / "node" / "protos"
INIT_TEXT = '"""Generated protobuf and gRPC stubs for paramserver.v1 (do not edit)."""\n'


def generate(out_root: Path) -> Path:
    """Generate stubs for every .proto under protos/paramserver/v1 into out_root."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *protos,
    ]
    # protoc finds the mypy plugins on PATH; they sit beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    pkg = out_root / PACKAGE_DIR
    (pkg / "__init__.py").write_text(INIT_TEXT)
    (pkg.parent / "__init__.py").touch()
    return pkg


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    ns = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        target = ROOT / PACKAGE_DIR
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if ns.check:
            existing = sorted(p.name for p in target.glob("*") if p.is_file())
            drift = [n for n in names if not (target / n).exists() or not filecmp.cmp(fresh / n, target / n, shallow=False)]
            drift += [n for n in existing if n not in names]
            drift += node_drift()
            if drift:
                print("generated stubs differ from protos/: " + ", ".join(drift), file=sys.stderr)
                print("run: python scripts/gen_protos.py", file=sys.stderr)
                return 1
            print(f"stubs match protos/ ({len(names)} files)")
            return 0
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*_pb2*"):
            old.unlink()
        for n in names:
            shutil.copyfile(fresh / n, target / n)
        print(f"wrote {len(names)} files to {target.relative_to(ROOT)}")
    for src in sources():
        dst = NODE_PROTOS / src.relative_to(PROTO_ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    for stale in NODE_PROTOS.rglob("*.proto"):
        if not (PROTO_ROOT / stale.relative_to(NODE_PROTOS)).exists():
            stale.unlink()
    print(f"copied the protos to {NODE_PROTOS.relative_to(ROOT)}")
    return 0


def sources() -> list[Path]:
    """The .proto files of the API."""
    return sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def node_drift() -> list[str]:
    """Copies in the Node package that differ from protos/ (or are missing, or stale)."""
    out = []
    for src in sources():
        dst = NODE_PROTOS / src.relative_to(PROTO_ROOT)
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            out.append(str(dst.relative_to(ROOT)))
    out += [str(s.relative_to(ROOT)) for s in NODE_PROTOS.rglob("*.proto") if not (PROTO_ROOT / s.relative_to(NODE_PROTOS)).exists()]
    return out


if __name__ == "__main__":
    sys.exit(main())
