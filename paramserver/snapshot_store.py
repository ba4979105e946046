"""Where snapshots live: the :class:`SnapshotStore` seam, the directory store, and what is built on
the seam whatever the backend (verification, range reads across shard files, pruning, lookup).

Layout of one snapshot, under the store's root (a directory, or an object-store prefix)::

    <job_id>/<snapshot>/in-progress              written first; removed after the commit
    <job_id>/<snapshot>/shard-00000.safetensors  one file per shard (tensor_file, snapshot_names)
    <job_id>/<snapshot>/manifest.json            written last: the commit marker (manifest.Manifest)

A snapshot exists once its manifest does. A crash cleanup (:meth:`SnapshotStore.clean`) deletes
only what was provably being written: a snapshot still marked in progress, a file's temporary
name, an unfinished upload. A snapshot that lost its manifest but was never marked in progress
holds committed data: it is quarantined (a ``quarantine.json`` note beside it) and reported, never
deleted. Pruning marks a snapshot in progress before it uncommits it, so a crash while pruning
leaves something the next cleanup may delete.

Every file is verified (size, sha256 and its format against the manifest, as a restore reads it)
before anything is loaded: a missing, truncated, altered or foreign file is DATA_LOSS naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from paramserver import snapshot_names as names
from paramserver.errors import ParamServerError, Reason
from paramserver.manifest import Manifest, ShardEntry, data_loss
from paramserver.tensor_file import (
    FileRangeReader,
    Header,
    RangeReader,
    TensorStream,
    read_elements,
    read_header,
    read_tensor,
    write_tensors,
)

log = logging.getLogger(__name__)

#: Temporary names of files being written (directory store).
TMP_PREFIX = ".tmp-"

#: A hook called at each phase of writing a file ("write", "fsync", "rename"; "manifest" before
#: the manifest is committed) with the file's name; it may raise to inject a failure (tests).
FaultHook = Callable[[str, str], None]

#: Tensors of a shard file: arrays, or streams of blocks (a spilled shard's tiles).
Tensors = Mapping[str, "np.ndarray | TensorStream"]


def no_fault(phase: str, name: str) -> None:
    """The FaultHook that injects nothing."""
    return None


@dataclass(frozen=True, order=True)
class SnapshotRef:
    """A snapshot: its job and its name (sortable: names start with the zero-padded version)."""

    job_id: str
    name: str


@dataclass
class CleanReport:
    """What a crash cleanup did."""

    removed: list[str] = field(default_factory=list)
    """Saves cut short and temporary names, deleted."""
    quarantined: list[str] = field(default_factory=list)
    """Snapshots that lost their manifest, kept and marked."""


class SnapshotStore(Protocol):
    """The storage seam of snapshots (a directory every node mounts, or an object store)."""

    url: str
    """What ``serve --snapshot-dir`` was given (an absolute path, or ``s3://bucket/prefix``)."""

    def begin(self, ref: SnapshotRef) -> None:
        """Mark a snapshot as being written (before any of its files)."""
        ...

    def write_file(
        self, ref: SnapshotRef, name: str, tensors: Tensors, metadata: Mapping[str, str], fault: FaultHook = no_fault
    ) -> ShardEntry:
        """Write one shard file atomically (it appears whole or not at all); its entry (index -1:
        the caller sets it)."""
        ...

    def commit(self, ref: SnapshotRef, manifest: Manifest, fault: FaultHook = no_fault) -> None:
        """Make the snapshot exist: every file durable, then the manifest, then unmark it."""
        ...

    def snapshots(self, job_id: str) -> list[SnapshotRef]:
        """Committed snapshots of a job, oldest first."""
        ...

    def jobs(self) -> list[str]:
        """Jobs with anything stored."""
        ...

    def open(self, ref: SnapshotRef, name: str) -> RangeReader:
        """A file of a snapshot, for range reads (DATA_LOSS naming it if it is missing)."""
        ...

    def read_manifest(self, ref: SnapshotRef) -> Manifest:
        """The validated manifest (DATA_LOSS if missing or bad)."""
        ...

    def delete(self, ref: SnapshotRef) -> None:
        """Remove a snapshot (marked in progress first, so a crash halfway leaves a deletable save)."""
        ...

    def clean(self, job_id: str | None = None) -> CleanReport:
        """Crash cleanup of one job (or all): see the module docstring."""
        ...

    def quarantined(self, job_id: str) -> list[SnapshotRef]:
        """Snapshots of a job that lost their manifest (kept, never loaded)."""
        ...

    def path(self, ref: SnapshotRef) -> str:
        """How users name the snapshot (a directory path or an object URL)."""
        ...

    def parse(self, path: str) -> SnapshotRef | None:
        """The snapshot a path names, if it lies in this store."""
        ...


def snapshot_name(version: int) -> str:
    """A sortable name for a snapshot at `version`."""
    return f"v{version:010d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid() % 100000:05d}"


# ---- the directory store ----------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _FileSink:
    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, data: memoryview) -> None:
        while data:
            n = self.f.write(data)
            data = data[n:]


class DirectoryStore:
    """Snapshots in a local or shared directory: ``ROOT/JOB_ID/SNAPSHOT/``. Files are written under a
    temporary name, fsynced and renamed; the directory is fsynced before the manifest is written the
    same way."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)

    def _dir(self, ref: SnapshotRef) -> Path:
        return self.root / ref.job_id / ref.name

    def path(self, ref: SnapshotRef) -> str:
        """The snapshot's directory."""
        return str(self._dir(ref))

    def parse(self, path: str) -> SnapshotRef | None:
        """A directory ROOT/JOB/NAME (or any directory with a manifest, named by its last two parts)."""
        p = Path(path).absolute()
        if p.parent.parent == self.root or (p / names.MANIFEST).is_file() or (p / names.QUARANTINE).is_file():
            return SnapshotRef(p.parent.name, p.name)
        return None

    def begin(self, ref: SnapshotRef) -> None:
        """Create the directory with its in-progress mark."""
        d = self._dir(ref)
        d.mkdir(parents=True, exist_ok=True)
        (d / names.IN_PROGRESS).write_text(f"{os.getpid()} {time.time():.0f}\n")
        _fsync_dir(d)

    def write_file(
        self, ref: SnapshotRef, name: str, tensors: Tensors, metadata: Mapping[str, str], fault: FaultHook = no_fault
    ) -> ShardEntry:
        """tmp name, stream, fsync, rename (the directory is fsynced at the commit)."""
        d = self._dir(ref)
        target = d / name
        tmp = d / (TMP_PREFIX + name)
        fault("write", name)
        with open(tmp, "wb", buffering=0) as f:
            fd = f.fileno()

            def writeback(offset: int, length: int) -> None:
                if hasattr(os, "posix_fadvise"):  # start writeback now rather than at fsync
                    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)

            written = write_tensors(_FileSink(f), tensors, metadata, writeback=writeback)
            fault("fsync", name)
            os.fsync(fd)
        fault("rename", name)
        os.replace(tmp, target)
        return ShardEntry(-1, name, written.size, written.sha256, (), 0)

    def commit(self, ref: SnapshotRef, manifest: Manifest, fault: FaultHook = no_fault) -> None:
        """fsync the directory (the files' renames), write the manifest atomically, unmark."""
        d = self._dir(ref)
        fault("manifest", names.MANIFEST)
        _fsync_dir(d)
        tmp = d / (TMP_PREFIX + names.MANIFEST)
        with open(tmp, "wb") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / names.MANIFEST)
        _fsync_dir(d)
        (d / names.IN_PROGRESS).unlink(missing_ok=True)

    def jobs(self) -> list[str]:
        """Job directories under the root."""
        return sorted(p.name for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []

    def snapshots(self, job_id: str) -> list[SnapshotRef]:
        """Directories with a manifest, oldest first."""
        d = self.root / job_id
        if not d.is_dir():
            return []
        return sorted(SnapshotRef(job_id, p.name) for p in d.iterdir() if p.is_dir() and (p / names.MANIFEST).is_file())

    def open(self, ref: SnapshotRef, name: str) -> RangeReader:
        """A pread reader over one file."""
        path = self._dir(ref) / name
        try:
            return FileRangeReader(path)
        except FileNotFoundError:
            raise data_loss(str(path), "missing") from None
        except OSError as exc:
            raise data_loss(str(path), f"unreadable ({exc})") from None

    def read_manifest(self, ref: SnapshotRef) -> Manifest:
        """Parse and check the manifest."""
        path = self._dir(ref) / names.MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise data_loss(str(path), "missing") from None
        except OSError as exc:
            raise data_loss(str(path), f"unreadable ({exc})") from None
        return Manifest.parse(data, str(path))

    def delete(self, ref: SnapshotRef) -> None:
        """Mark, uncommit, remove."""
        d = self._dir(ref)
        if not d.is_dir():
            return
        with contextlib.suppress(OSError):
            (d / names.IN_PROGRESS).write_text("deleting\n")
            (d / names.MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)

    def clean(self, job_id: str | None = None) -> CleanReport:
        """Delete saves cut short and temporary names; quarantine snapshots that lost their manifest."""
        report = CleanReport()
        for job in [job_id] if job_id is not None else self.jobs():
            jd = self.root / job
            if not jd.is_dir():
                continue
            for d in sorted(p for p in jd.iterdir() if p.is_dir()):
                for t in d.glob(TMP_PREFIX + "*"):
                    t.unlink(missing_ok=True)
                    report.removed.append(str(t))
                has_manifest = (d / names.MANIFEST).is_file()
                if has_manifest:
                    (d / names.IN_PROGRESS).unlink(missing_ok=True)  # committed; the crash came before the unmark
                elif (d / names.IN_PROGRESS).is_file() or not any(d.iterdir()):
                    shutil.rmtree(d, ignore_errors=True)
                    report.removed.append(str(d))
                else:
                    if not (d / names.QUARANTINE).is_file():
                        note = {"reason": "manifest.json is missing but the snapshot was committed", "at": time.time()}
                        (d / names.QUARANTINE).write_text(json.dumps(note) + "\n")
                        log.warning("snapshot %s lost its manifest: quarantined (kept, not loaded)", d)
                    report.quarantined.append(str(d))
        return report

    def quarantined(self, job_id: str) -> list[SnapshotRef]:
        """Snapshots of a job that lost their manifest."""
        d = self.root / job_id
        if not d.is_dir():
            return []
        return sorted(SnapshotRef(job_id, p.name) for p in d.iterdir() if (p / names.QUARANTINE).is_file())


# ---- what every store shares --------------------------------------------------------------------


#: Longest snapshot path or URL, and longest part of one between slashes (UTF-8 bytes).
MAX_REF_BYTES, MAX_REF_PART_BYTES = 4096, 255


def check_ref(ref: str, field: str = "snapshot") -> None:
    """INVALID_ARGUMENT naming `field` for a snapshot name no store could hold (too long, a part
    over a file name's length, control characters)."""
    raw = ref.encode("utf-8", "surrogatepass")
    if len(raw) > MAX_REF_BYTES:
        raise ParamServerError.invalid(field, f"{len(raw)} bytes; a snapshot path has at most {MAX_REF_BYTES}")
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_REF_PART_BYTES for part in ref.split("/")):
        raise ParamServerError.invalid(field, f"a part of the path is over {MAX_REF_PART_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in ref):
        raise ParamServerError.invalid(field, "control characters (e.g. NUL) in a snapshot path")


def resolve(store: SnapshotStore, ref: str, field: str = "snapshot") -> SnapshotRef:
    """A snapshot from a path or URL, "JOB_ID:latest" or "JOB_ID" (the newest of that job);
    INVALID_ARGUMENT naming `field` for a name no store could hold, NOT_FOUND for none."""
    check_ref(ref, field)
    parsed = store.parse(ref)
    if parsed is not None:
        return parsed
    job_id = ref[: -len(":latest")] if ref.endswith(":latest") else ref
    if "/" not in job_id:
        snaps = store.snapshots(job_id)
        if snaps:
            return snaps[-1]
    raise ParamServerError.not_found(Reason.SNAPSHOT_NOT_FOUND, f"no snapshot {ref!r} (in {store.url})", snapshot=ref)


def prune(store: SnapshotStore, job_id: str, keep_last: int) -> list[SnapshotRef]:
    """Delete all but the newest `keep_last` committed snapshots (0 = keep all)."""
    if keep_last <= 0:
        return []
    old = store.snapshots(job_id)[:-keep_last]
    for ref in old:
        store.delete(ref)
    return old


def check_file(header: Header, entry: ShardEntry, manifest: Manifest, where: str) -> dict[int, list[tuple[int, int]]]:
    """Check a shard file's tensors against the manifest as a restore reads them; return where each
    group's flat state lies ({group: [(start, length)]}). DATA_LOSS naming the file otherwise."""
    nparams = len(manifest.config.get("parameters", ()))
    meta = header.metadata
    ranges: dict[int, list[tuple[int, int]]] = {}
    for key, value in meta.items():
        g = names.ranges_group(key)
        if g is None:
            continue
        try:
            ranges[g] = [(int(s), int(n)) for s, n in json.loads(value)]
        except (ValueError, TypeError):
            raise data_loss(where, f"bad metadata {key!r}") from None
        if any(s < 0 or n < 0 or s + n > manifest.total_elements for s, n in ranges[g]):
            raise data_loss(where, f"metadata {key!r} lies outside the flat space")
    if names.META_SHARD in meta and meta[names.META_SHARD] != str(entry.index):
        raise data_loss(where, f"written by shard {meta[names.META_SHARD]}, listed as shard {entry.index}")
    if names.META_RANGES in meta:
        try:
            mine = [(int(s), int(n)) for s, n in json.loads(meta[names.META_RANGES])]
        except (ValueError, TypeError):
            raise data_loss(where, "bad metadata 'ranges'") from None
        if tuple(mine) != entry.ranges:
            raise data_loss(where, "its ranges differ from the manifest's")
    if names.PARAMS not in header.tensors:
        raise data_loss(where, "no 'params' tensor")
    for tname, info in header.tensors.items():
        parsed = names.parse(tname)
        if parsed is None:
            raise data_loss(where, f"unexpected tensor {tname!r}")
        if parsed.kind == "params":
            if info.dtype != np.float32 or info.shape != (entry.numel,):
                raise data_loss(where, f"'params' is {info.dtype} {list(info.shape)}, [{entry.numel}] float32 expected")
        elif parsed.kind == "group":
            if info.shape == ():
                continue
            want = sum(n for _, n in ranges.get(parsed.index, []))
            if parsed.index not in ranges or info.dtype != np.float32 or info.shape != (want,):
                raise data_loss(where, f"{tname!r} is {info.dtype} {list(info.shape)}, [{want}] float32 expected")
        elif parsed.index >= nparams:
            raise data_loss(where, f"{tname!r} names parameter {parsed.index} of {nparams}")
    return ranges


def sha256_of(reader: RangeReader, block: int = 16 << 20) -> str:
    """The sha256 of a stored file, read in blocks."""
    h = hashlib.sha256()
    for offset in range(0, reader.size, block):
        h.update(reader.read(offset, min(block, reader.size - offset)))
    return h.hexdigest()


def verify(store: SnapshotStore, ref: SnapshotRef, manifest: Manifest | None = None) -> Manifest:
    """Check every file's presence, size, sha256 and format; return the manifest. DATA_LOSS names the file."""
    manifest = manifest if manifest is not None else store.read_manifest(ref)
    base = store.path(ref)
    for entry in manifest.shards:
        where = f"{base}/{entry.file}"
        reader = store.open(ref, entry.file)
        try:
            if reader.size != entry.size:
                raise data_loss(where, f"{reader.size} bytes, the manifest says {entry.size} (truncated or altered)")
            if sha256_of(reader) != entry.sha256:
                raise data_loss(where, "checksum mismatch (altered)")
            check_file(read_header(reader, where), entry, manifest, where)
        finally:
            _close(reader)
    return manifest


def _close(reader: RangeReader) -> None:
    close = getattr(reader, "close", None)
    if close is not None:
        close()


class SnapshotReader:
    """Reads ranges of the flat tensors of a verified snapshot, whatever its shard count (the
    SnapshotSource a shard restores from)."""

    def __init__(self, store: SnapshotStore, ref: SnapshotRef, manifest: Manifest, only: Collection[str] | None = None) -> None:
        """`only`: open just these files (a restore onto the same plan needs only its own shard's
        file); reads that need another file are DATA_LOSS naming what is missing."""
        self.store = store
        self.ref = ref
        self.manifest = manifest
        self._files: list[tuple[str, RangeReader, Header, dict[str, list[tuple[int, int]]]]] = []
        base = store.path(ref)
        for entry in manifest.shards:
            if only is not None and entry.file not in only:
                continue
            where = f"{base}/{entry.file}"
            reader = store.open(ref, entry.file)
            header = read_header(reader, where)
            groups = check_file(header, entry, manifest, where)
            # where each tensor's elements lie in the flat space: "params" covers the shard's
            # ranges; "state.G.*" the pieces of group G
            ranges = {"": list(entry.ranges), **{str(g): r for g, r in groups.items()}}
            self._files.append((where, reader, header, ranges))

    def close(self) -> None:
        """Release the files."""
        for _, reader, _, _ in self._files:
            _close(reader)

    def names(self) -> set[str]:
        """Tensor names present in any shard file (a group's state is only in the files of the
        shards that hold some of its parameters)."""
        return set().union(*(set(h.tensors) for _, _, h, _ in self._files))

    def _find(self, name: str) -> tuple[str, RangeReader, Header]:
        for where, reader, header, _ in self._files:
            if name in header.tensors:
                return where, reader, header
        raise data_loss(self.store.path(self.ref), f"no file holds {name!r}")

    def metadata(self, shard: int) -> dict[str, str]:
        """The string metadata of one shard file."""
        return dict(self._files[shard][2].metadata)

    def is_scalar(self, name: str) -> bool:
        """True for 0-d tensors."""
        return self.header_shape(name) == ()

    def header_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape as a shard file holds it (a flat tensor: that file's part)."""
        return tuple(self._find(name)[2].tensors[name].shape)

    def scalar(self, name: str) -> np.ndarray:
        """A 0-d tensor (equal on every shard; taken from the first)."""
        return self.tensor(name)

    def tensor(self, name: str) -> np.ndarray:
        """A whole tensor as saved (a parameter's own optimizer state, "param.INDEX.KEY"; every
        file that holds it has the same values, the first is read)."""
        _, reader, header = self._find(name)
        return read_tensor(reader, header.tensors[name])

    def read(self, name: str, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, start + length) of flat tensor `name` across the snapshot's shards."""
        out = np.empty(length, dtype=np.float32) if out is None else out
        end = start + length
        filled = 0
        parsed = names.parse(name)
        group = str(parsed.index) if parsed is not None and parsed.kind == "group" else ""
        for _, reader, header, all_ranges in self._files:
            info = header.tensors.get(name)
            if info is None:
                continue
            local = 0
            for s, n in all_ranges.get(group, []):
                a, b = max(s, start), min(s + n, end)
                if a < b:
                    read_elements(reader, info, local + a - s, b - a, out[a - start : b - start])
                    filled += b - a
                local += n
        if filled != length:
            raise data_loss(self.store.path(self.ref), f"the shards do not cover [{start}, {end}) of {name!r}")
        return out


def iter_snapshots(store: SnapshotStore, job_id: str) -> Iterator[tuple[SnapshotRef, Manifest | None]]:
    """A job's committed snapshots with their manifests (None where a manifest is unreadable)."""
    for ref in store.snapshots(job_id):
        try:
            yield ref, store.read_manifest(ref)
        except ParamServerError:
            yield ref, None
