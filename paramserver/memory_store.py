"""Snapshots kept in memory: the :class:`~paramserver.snapshot_store.SnapshotStore` seam over dicts
(pure: no Ray, no gRPC).

A job's *replica* is a snapshot that never touches a disk: each shard writes its file into a
MemoryStore of its own and hands the bytes over; the coordinator keeps the newest complete set; a
recovery passes them to the new shards, which read them through the same SnapshotReader (and so
the same checks and the same range copy, resharding included) as a snapshot on disk.
"""

from __future__ import annotations

from collections.abc import Mapping

from paramserver.manifest import Manifest, ShardEntry, data_loss
from paramserver.snapshot_store import CleanReport, FaultHook, SnapshotRef, Tensors, no_fault
from paramserver.tensor_file import write_tensors

#: The URL of every memory store (it is not shared between processes: the bytes travel).
MEMORY_URL = "memory:"


class _Buffer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: memoryview) -> None:
        self.data += data


class BytesReader:
    """Range reads over bytes held in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    @property
    def size(self) -> int:
        """The file's size."""
        return len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`."""
        if offset < 0 or offset + length > len(self._data):
            raise ValueError(f"read of [{offset}, {offset + length}) beyond {len(self._data)} bytes")
        return self._data[offset : offset + length]


class MemoryStore:
    """Snapshots in this process's memory (see the module docstring)."""

    def __init__(self) -> None:
        self.url = MEMORY_URL
        self._files: dict[SnapshotRef, dict[str, bytes]] = {}
        self._manifests: dict[SnapshotRef, Manifest] = {}

    @classmethod
    def holding(cls, ref: SnapshotRef, manifest: Manifest, files: Mapping[str, bytes]) -> MemoryStore:
        """A store holding one committed snapshot made of `files`."""
        store = cls()
        store._files[ref] = dict(files)
        store._manifests[ref] = manifest
        return store

    def files(self, ref: SnapshotRef) -> dict[str, bytes]:
        """The files written for a snapshot, by name."""
        return dict(self._files.get(ref, {}))

    def begin(self, ref: SnapshotRef) -> None:
        """Start a snapshot."""
        self._files.setdefault(ref, {})

    def write_file(
        self, ref: SnapshotRef, name: str, tensors: Tensors, metadata: Mapping[str, str], fault: FaultHook = no_fault
    ) -> ShardEntry:
        """Serialise one shard file (safetensors, sha256) into memory."""
        buf = _Buffer()
        written = write_tensors(buf, tensors, metadata)
        self._files.setdefault(ref, {})[name] = bytes(buf.data)
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

    def open(self, ref: SnapshotRef, name: str) -> BytesReader:
        """A file, for range reads (DATA_LOSS if it is not held)."""
        data = self._files.get(ref, {}).get(name)
        if data is None:
            raise data_loss(f"{self.path(ref)}/{name}", "not held in memory")
        return BytesReader(data)

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
