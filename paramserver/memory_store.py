"""Snapshots kept in memory: the :class:`~paramserver.snapshot_store.SnapshotStore` seam over dicts
(pure: no Ray, no gRPC).

A job's *replica* is a snapshot that never touches a disk: each shard writes its file into a
MemoryStore of its own (as a :class:`Blob`) and hands it over; the coordinator keeps the newest complete set; a
recovery passes them to the new shards, which read them through the same SnapshotReader (and so
the same checks and the same range copy, resharding included) as a snapshot on disk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from paramserver.errors import ParamServerError, Reason
from paramserver.manifest import Manifest, ShardEntry, data_loss
from paramserver.snapshot_store import CleanReport, FaultHook, SnapshotRef, Tensors, no_fault
from paramserver.tensor_file import ArrayFile, read_parts, write_tensors

#: The URL of every memory store (it is not shared between processes: the bytes travel).
MEMORY_URL = "memory:"


class Blob:
    """A file held in memory as the uint8 blocks it was written in.

    No joining copy is made, and a block is a numpy array, so Ray moves a Blob between processes
    without pickling its bytes (one copy into the object store; the receiver reads it in place).
    It is its own range reader.
    """

    def __init__(self, blocks: Sequence[np.ndarray] = ()) -> None:
        self.blocks: list[np.ndarray] = list(blocks)
        self._starts: list[int] = []
        self._size = 0
        for b in self.blocks:
            self._starts.append(self._size)
            self._size += b.nbytes

    @classmethod
    def of(cls, data: bytes | Blob) -> Blob:
        """`data` as a Blob (bytes are copied once)."""
        return data if isinstance(data, Blob) else cls([np.frombuffer(data, np.uint8).copy()])

    @staticmethod
    def hold(data: bytes | Held) -> Held:
        """`data` as a held file (bytes become a Blob; a Blob or an ArrayFile stays as it is)."""
        return data if isinstance(data, (Blob, ArrayFile)) else Blob.of(data)

    def write(self, data: memoryview) -> None:
        """Append a copy of `data` (a sink for :func:`~paramserver.tensor_file.write_tensors`)."""
        self.blocks.append(np.frombuffer(data, np.uint8).copy())
        self._starts.append(self._size)
        self._size += len(self.blocks[-1])

    @property
    def size(self) -> int:
        """The file's size."""
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`."""
        return read_parts(self.blocks, self._starts, self._size, offset, length)

    def to_bytes(self) -> bytes:
        """The whole file (a copy)."""
        return self.read(0, self._size)


#: A file held in memory: serialised (a Blob) or its arrays as they are (an ArrayFile, a replica's).
Held = Blob | ArrayFile


def held_files(files: Mapping[str, object]) -> dict[str, Held | bytes]:
    """`files` checked to be held files or bytes (a handle on one held elsewhere must have been
    resolved by the launcher: INTERNAL otherwise)."""
    out: dict[str, Held | bytes] = {}
    for name, data in files.items():
        if not isinstance(data, (Blob, ArrayFile, bytes)):
            raise ParamServerError("INTERNAL", Reason.INTERNAL_ERROR, f"replica file {name!r} was not resolved ({type(data).__name__})")
        out[name] = data
    return out


class MemoryStore:
    """Snapshots in this process's memory (see the module docstring)."""

    def __init__(self) -> None:
        self.url = MEMORY_URL
        self._files: dict[SnapshotRef, dict[str, Held]] = {}
        self._manifests: dict[SnapshotRef, Manifest] = {}

    @classmethod
    def holding(cls, ref: SnapshotRef, manifest: Manifest, files: Mapping[str, Held | bytes]) -> MemoryStore:
        """A store holding one committed snapshot made of `files`."""
        store = cls()
        store._files[ref] = {name: Blob.hold(data) for name, data in files.items()}
        store._manifests[ref] = manifest
        return store

    def files(self, ref: SnapshotRef) -> dict[str, Held]:
        """The files written for a snapshot, by name."""
        return dict(self._files.get(ref, {}))

    def begin(self, ref: SnapshotRef) -> None:
        """Start a snapshot."""
        self._files.setdefault(ref, {})

    def write_file(
        self, ref: SnapshotRef, name: str, tensors: Tensors, metadata: Mapping[str, str], fault: FaultHook = no_fault
    ) -> ShardEntry:
        """Serialise one shard file (safetensors, sha256) into memory."""
        buf = Blob()
        written = write_tensors(buf, tensors, metadata)
        self._files.setdefault(ref, {})[name] = buf
        return ShardEntry(-1, name, written.size, written.sha256, (), 0)

    def commit(self, ref: SnapshotRef, manifest: Manifest, fault: FaultHook = no_fault) -> None:
        """Make it visible."""
        self._manifests[ref] = manifest

    def snapshots(self, job_id: str) -> list[SnapshotRef]:
        """Committed snapshots of a job, oldest first."""
        return sorted(r for r in self._manifests if r.job_id == job_id)

    def jobs(self) -> list[str]:
        """Jobs with anything stored."""
        return sorted({r.job_id for r in self._files} | {r.job_id for r in self._manifests})

    def open(self, ref: SnapshotRef, name: str) -> Held:
        """A file, for range reads (DATA_LOSS if it is not held)."""
        data = self._files.get(ref, {}).get(name)
        if data is None:
            raise data_loss(f"{self.path(ref)}/{name}", "not held in memory")
        return data

    def read_manifest(self, ref: SnapshotRef) -> Manifest:
        """The manifest (DATA_LOSS if it is not held)."""
        manifest = self._manifests.get(ref)
        if manifest is None:
            raise data_loss(self.path(ref), "no manifest held in memory")
        return manifest

    def delete(self, ref: SnapshotRef) -> None:
        """Forget a snapshot."""
        self._files.pop(ref, None)
        self._manifests.pop(ref, None)

    def clean(self, job_id: str | None = None) -> CleanReport:
        """Forget what was begun and never committed."""
        report = CleanReport()
        for ref in [r for r in self._files if r not in self._manifests and (job_id is None or r.job_id == job_id)]:
            del self._files[ref]
            report.removed.append(self.path(ref))
        return report

    def quarantined(self, job_id: str) -> list[SnapshotRef]:
        """Nothing is ever quarantined in memory."""
        return []

    def path(self, ref: SnapshotRef) -> str:
        """``memory:JOB/NAME``."""
        return f"{MEMORY_URL}{ref.job_id}/{ref.name}"

    def parse(self, path: str) -> SnapshotRef | None:
        """``memory:JOB/NAME`` names a snapshot here."""
        if not path.startswith(MEMORY_URL):
            return None
        job_id, _, name = path[len(MEMORY_URL) :].partition("/")
        return SnapshotRef(job_id, name) if name else None
