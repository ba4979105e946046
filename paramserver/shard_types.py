"""Plain records that travel between a shard and the coordinator (no torch, no gRPC, no Ray): what
the control plane knows of shards without importing the data plane."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from paramserver.memory_store import Held


@dataclass(frozen=True)
class ShardMemory:
    """Where a shard's state lives and how much spill traffic it has (Job.shards[i].memory)."""

    budget_bytes: int = 0
    """The job's per-shard budget (0 = unlimited)."""
    resident_bytes: int = 0
    """Parameters and optimizer state held in memory."""
    buffer_bytes: int = 0
    """I/O rings and the fixed allowance for message and block buffers (spilled shards)."""
    spilled_bytes: int = 0
    """Bytes of the state's spill files."""
    read_bytes: int = 0
    """Bytes read from spill files so far."""
    written_bytes: int = 0
    """Bytes written to spill files so far."""
    read_bytes_per_second: float = 0.0
    """Read rate of the I/O threads while they read."""
    write_bytes_per_second: float = 0.0
    """Write rate of the I/O threads while they write."""


@dataclass(frozen=True)
class Restore:
    """Where a shard loads its initial state from (a verified snapshot)."""

    store: str
    """The snapshot store's URL (a directory or s3://bucket/prefix)."""
    job_id: str
    """The snapshot's job."""
    name: str
    """The snapshot's name."""
    version: int
    applied: int
    replica: Mapping[str, Held | object] = field(default_factory=dict)
    """When the source is a replica held in memory: its shard files by name (``store`` is then
    ``memory:``), with `manifest_json`. A file may be a launcher's handle on one held elsewhere
    (on Ray, an ObjectRef in the object store), which the launcher's shard host resolves before it
    loads (see :func:`paramserver.memory_store.held_files`)."""
    manifest_json: bytes = b""


def restore_for(restore: Restore | None, index: int, file_of: Callable[[int], str]) -> Restore | None:
    """The restore shard `index` needs: from a replica in memory, only its own file (a recovery
    keeps the plan, so a shard's ranges lie in its own file); anything else unchanged."""
    if restore is None or not restore.replica:
        return restore
    name = file_of(index)
    return dataclasses.replace(restore, replica={name: restore.replica[name]} if name in restore.replica else {})


@dataclass(frozen=True)
class ShardStatus:
    """What the coordinator learns from a shard."""

    index: int
    address: str
    version: int
    initialized: bool
    applied: int
    device: str
    memory: ShardMemory = field(default_factory=ShardMemory)
    last_seen: dict[int, float] = field(default_factory=dict)
    """Seconds since each worker's last push or pull on this shard (renews its lease)."""
    node: str = ""
    """The cluster node the shard runs on ("" outside Ray)."""
    pushed: tuple[int, ...] = ()
    """The workers whose push of the open step the shard holds."""


#: Fault injection for tests: the path of a file whose lines "JOB_ID SHARD PHASE" make that
#: shard's snapshot writes fail at PHASE ("write", "fsync" or "rename"; shard -1 and "manifest"
#: for the coordinator's commit) with an OSError, or, as "PHASE:hang", stall there for a minute
#: (to kill a service in the middle of a save).
FAULT_FILE_ENV = "PARAMSERVER_SNAPSHOT_FAULT_FILE"


def fault_from_env(job_id: str, index: int) -> Callable[[str, str], None] | None:
    """The fault hook configured through PARAMSERVER_SNAPSHOT_FAULT_FILE for this shard, if any."""
    path = os.environ.get(FAULT_FILE_ENV, "")
    try:
        lines = Path(path).read_text().splitlines() if path else []
    except OSError:
        return None
    phases = [p[2] for p in (line.split() for line in lines) if len(p) == 3 and p[0] == job_id and p[1] == str(index)]
    if not phases:
        return None
    phase = phases[0]

    def hook(at: str, name: str) -> None:
        if phase == f"{at}:hang":
            time.sleep(60)
        elif at == phase:
            raise OSError(f"injected failure at {phase} of {name}")

    return hook
