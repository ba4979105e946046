"""Export a snapshot's parameters as an ordinary model file (safetensors or a torch state_dict)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np

from paramserver import snapshot_names as names
from paramserver.manifest import Manifest
from paramserver.snapshot_store import SnapshotReader, SnapshotRef, SnapshotStore, verify

FORMATS = ("safetensors", "torch")
POINTS = ("eval", "train")


def export(
    store: SnapshotStore,
    ref: SnapshotRef,
    out: Path,
    fmt: str = "safetensors",
    progress: Callable[[str, int], None] | None = None,
    point: str = "eval",
) -> dict[str, tuple[int, ...]]:
    """Verify a snapshot and write its parameters under their original names and shapes.

    ``point`` "eval" writes the evaluation point (Schedule-Free's averaged x; for every other rule
    the parameters themselves), "train" the values gradients were taken at. Returns {name: shape}.
    The output loads with safetensors (``safetensors.numpy.load_file``) or with
    ``torch.load(..., weights_only=True)``, without this project.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if point not in POINTS:
        raise ValueError(f"unknown point {point!r}; use one of {', '.join(POINTS)}")
    manifest = verify(store, ref)
    reader = SnapshotReader(store, ref, manifest)
    tensors: dict[str, np.ndarray] = {}
    try:
        for p in manifest.job_config().layout():
            tensors[p.name] = reader.read(names.PARAMS, p.offset, p.numel).reshape(p.shape)
            if progress is not None:
                progress(p.name, p.numel)
        if point == "eval":
            to_eval_point(reader, manifest, tensors)
    finally:
        reader.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        save_file(tensors, str(tmp), metadata={"source": store.path(ref), "version": str(manifest.version)})
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp)
    tmp.replace(out)
    return {k: v.shape for k, v in tensors.items()}


def to_eval_point(reader: SnapshotReader, manifest: Manifest, tensors: dict[str, np.ndarray]) -> None:
    """Move the parameters of every group whose rule has an evaluation point there, in place."""
    import torch

    config = manifest.job_config()
    assignment, lay = config.assign(), config.layout()
    for g, opt in enumerate(config.build_optimizers()):
        members = [p for p, k in zip(lay, assignment, strict=True) if k == g]
        if not opt.eval_keys or not members:
            continue
        segments = list(zip(itertools.accumulate((p.numel for p in members), initial=0), (p.numel for p in members), strict=False))
        state: dict[str, torch.Tensor] = {}
        for key in opt.eval_keys:
            name = names.group_state(g, key)
            if reader.is_scalar(name):
                state[key] = torch.from_numpy(np.array(reader.scalar(name)))
                continue
            flat = np.empty(sum(p.numel for p in members), dtype=np.float32)
            for p, (pos, n) in zip(members, segments, strict=True):
                reader.read(name, p.offset, n, flat[pos : pos + n])
            state[key] = torch.from_numpy(flat)
        opt.eval_point([torch.from_numpy(tensors[p.name]).view(-1) for p in members], state, segments)
