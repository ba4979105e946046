"""A snapshot's optimizer state per parameter, in the shape torch keeps it (pure: no Ray, no gRPC).

A shard file keeps a group's state flat over the group's pieces (``state.GROUP.KEY``), its step
counters as 0-d scalars, and a parameter's own tensors whole (``param.INDEX.KEY``); see
:mod:`paramserver.snapshot_names`. torch keeps ``optimizer.state[param] = {key: tensor}``, every
tensor of the parameter's shape or 0-d. This turns the first into the second, reading each
parameter's range of the flat state from whichever shard files hold it (any shard count).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from paramserver import snapshot_names as names
from paramserver.errors import ParamServerError
from paramserver.manifest import Manifest
from paramserver.snapshot_store import SnapshotReader, SnapshotStore, resolve, verify

#: Elements of one OptimizerStateTensor message (1 MiB of fp32).
PIECE_ELEMENTS = 262_144


def open_snapshot(store: SnapshotStore, job_id: str, snapshot: str) -> tuple[str, Manifest, SnapshotReader]:
    """(path, manifest, reader) of a verified snapshot of `job_id` (NOT_FOUND if there is none,
    DATA_LOSS if it does not verify, INVALID_ARGUMENT naming ``snapshot`` if it is another job's)."""
    ref = resolve(store, snapshot)
    if ref.job_id != job_id:
        raise ParamServerError.invalid("snapshot", f"{store.path(ref)} is a snapshot of job {ref.job_id!r}, not of {job_id!r}")
    manifest = verify(store, ref)
    return store.path(ref), manifest, SnapshotReader(store, ref, manifest)


@dataclass(frozen=True)
class StateTensor:
    """One parameter's state tensor in a snapshot; `read()` reads it (fp32, the parameter's shape,
    or 0-d for a step counter)."""

    parameter: str
    key: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]


def optimizer_state(reader: SnapshotReader, manifest: Manifest) -> list[StateTensor]:
    """Every parameter's state tensors, in layout order: its group's state (its range of each flat
    tensor, shaped as the parameter; each scalar 0-d), then its own tensors; keys are the rule's
    state names, sorted. Nothing is read until a tensor's `read()`."""
    config = manifest.job_config()
    group_keys: dict[int, list[str]] = {}
    param_keys: dict[int, list[str]] = {}
    for name in sorted(reader.names()):
        parsed = names.parse(name)
        if parsed is None or parsed.kind == "params":
            continue
        (group_keys if parsed.kind == "group" else param_keys).setdefault(parsed.index, []).append(parsed.key)
    out: list[StateTensor] = []
    for i, (p, group) in enumerate(zip(config.layout(), config.assign(), strict=True)):
        for key in group_keys.get(group, []):
            tensor = names.group_state(group, key)
            if reader.is_scalar(tensor):
                out.append(StateTensor(p.name, key, (), functools.partial(_scalar, reader, tensor)))
            else:
                out.append(StateTensor(p.name, key, p.shape, functools.partial(_range, reader, tensor, p.offset, p.shape)))
        for key in param_keys.get(i, []):
            tensor = names.param_state(i, key)
            shape = tuple(reader.header_shape(tensor))
            out.append(StateTensor(p.name, key, shape, functools.partial(_whole, reader, tensor)))
    return out


def _scalar(reader: SnapshotReader, tensor: str) -> np.ndarray:
    return np.asarray(reader.scalar(tensor), dtype=np.float32).reshape(())


def _range(reader: SnapshotReader, tensor: str, offset: int, shape: tuple[int, ...]) -> np.ndarray:
    return reader.read(tensor, offset, math.prod(shape)).reshape(shape)


def _whole(reader: SnapshotReader, tensor: str) -> np.ndarray:
    return np.asarray(reader.tensor(tensor), dtype=np.float32)
