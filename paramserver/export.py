"""Export a snapshot's parameters as an ordinary model file (safetensors or a torch state_dict)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from paramserver.snapshot_store import SnapshotReader, verify

FORMATS = ("safetensors", "torch")


def export(
    directory: Path, out: Path, fmt: str = "safetensors", progress: Callable[[str, int], None] | None = None
) -> dict[str, tuple[int, ...]]:
    """Verify a snapshot and write its parameters under their original names and shapes.

    Returns {name: shape}. The output loads with safetensors (``safetensors.numpy.load_file``)
    or with ``torch.load(..., weights_only=True)``, without this project.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    manifest = verify(directory)
    reader = SnapshotReader(directory, manifest)
    tensors: dict[str, np.ndarray] = {}
    for p in manifest["layout"]:
        shape = tuple(int(d) for d in p["shape"])
        tensors[p["name"]] = reader.read("params", int(p["offset"]), int(p["numel"])).reshape(shape)
        if progress is not None:
            progress(p["name"], int(p["numel"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp), metadata={"source": str(directory), "version": str(manifest["version"])})
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp)
    tmp.replace(out)
    return {k: v.shape for k, v in tensors.items()}
