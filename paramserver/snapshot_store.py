"""Snapshot files: atomic, checksummed, pickle-free, readable by range (pure; no Ray, no gRPC).

Layout of one snapshot (a directory under ``<root>/<job_id>/``)::

    <snapshot_id>/shard-00000.safetensors   one file per shard: flat tensors of the shard's ranges
    <snapshot_id>/...                        ("params", "state.G.exp_avg", ... and 0-d scalars;
                                             "param.I.KEY": parameter I's own state, any shape)
    <snapshot_id>/manifest.json              written last: format version, job config, layout,
                                             version, each file's ranges, size and sha256

Every file is written under a ``.tmp-`` name, fsynced, renamed, and its directory fsynced. A
snapshot exists only once its manifest does; a directory without one is a crashed save and is
removed by :func:`clean_partial`. Shard files are standard safetensors (a JSON header and raw
little-endian arrays), written by :func:`write_tensors` in one pass that also computes the
checksum, and read with the safetensors library, which never executes code. Every checksum is
verified before anything is loaded; a missing, truncated or altered file is DATA_LOSS naming it.

The storage seam is the small set of functions here over a directory (local or shared FS).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paramserver.errors import ParamServerError, Reason

FORMAT = "paramserver-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"

#: A hook called at each phase of writing a file ("write", "fsync", "rename"; "manifest" before
#: the manifest is committed) with the target path; it may raise to inject a failure (tests).
FaultHook = Callable[[str, Path], None]

_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64"}
_NP = {v: k for k, v in _DTYPES.items()}


SnapshotReason = Reason


def data_loss(file: Path | str, message: str) -> ParamServerError:
    """DATA_LOSS naming the file."""
    return ParamServerError("DATA_LOSS", SnapshotReason.SNAPSHOT_CORRUPT, f"{file}: {message}", {"file": str(file)})


@dataclass(frozen=True)
class FileEntry:
    """A written file: its name in the snapshot directory, size and sha256."""

    name: str
    size: int
    sha256: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _noop(phase: str, path: Path) -> None:
    return None


@dataclass(frozen=True)
class TensorStream:
    """A tensor written from blocks: its dtype ("F32", "F64" or "I64"), shape and a callable that
    yields its little-endian bytes in order (exactly nbytes in all)."""

    dtype: str
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[memoryview]]
    stable: bool = False
    """True when a block stays valid after the next is produced (an array's memory); otherwise
    the hasher gets a copy."""

    @property
    def nbytes(self) -> int:
        """Bytes of the data."""
        return int(np.prod(self.shape, dtype=np.int64)) * (8 if self.dtype in ("F64", "I64") else 4)


def array_stream(arr: np.ndarray) -> TensorStream:
    """A TensorStream over an in-memory array (written straight from its memory)."""
    a = arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # (ascontiguousarray makes 0-d arrays 1-d)
    if a.dtype not in _DTYPES:
        raise TypeError(f"unsupported dtype {a.dtype}")

    def blocks() -> Iterator[memoryview]:
        view = a.data.cast("B") if a.ndim else memoryview(a.tobytes())
        for i in range(0, len(view), _BLOCK):
            yield view[i : i + _BLOCK]

    return TensorStream(_DTYPES[a.dtype], tuple(arr.shape), blocks, stable=True)


def write_tensors(
    path: Path,
    tensors: Mapping[str, np.ndarray | TensorStream],
    metadata: Mapping[str, str],
    fault: FaultHook = _noop,
    progress: Callable[[int], None] | None = None,
    sync_dir: bool = True,
) -> FileEntry:
    """Write a safetensors file atomically (tmp, fsync, rename, and unless sync_dir=False an
    fsync of the directory, which the caller then owes before committing) and return its sha256.

    Arrays must be little-endian fp32/fp64/int64; they are written straight from their memory in
    16 MiB blocks (no staging copy), and a :class:`TensorStream` from its blocks as they are
    produced (a spilled shard streams its tiles). The sha256 runs on a second thread, block by
    block, while the next block is written (hashlib releases the GIL), and each written block's
    writeback is started at once, so hashing, copying and the disk overlap.
    """
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    pos = 0
    streams = []
    for name, value in tensors.items():
        st = value if isinstance(value, TensorStream) else array_stream(value)
        header[name] = {"dtype": st.dtype, "shape": list(st.shape), "data_offsets": [pos, pos + st.nbytes]}
        pos += st.nbytes
        streams.append((name, st))
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(TMP_PREFIX + path.name)
    digest = hashlib.sha256()
    fault("write", path)
    with open(tmp, "wb", buffering=0) as f, ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher:
        pending: list[Future[None]] = []
        written = 0
        for piece in (struct.pack("<Q", len(head)), head):
            f.write(piece)
            digest.update(piece)
            written += len(piece)
        for name, st in streams:
            start = written
            for block in st.blocks():
                _write_all(f, block)
                pending.append(hasher.submit(digest.update, block if st.stable else bytes(block)))  # in order: one thread
                while not st.stable and len(pending) > 4:  # bound the copies waiting for the hasher
                    pending.pop(0).result()
                if hasattr(os, "posix_fadvise"):  # start writeback now rather than at fsync
                    os.posix_fadvise(f.fileno(), written, len(block), os.POSIX_FADV_DONTNEED)
                written += len(block)
                if progress is not None:
                    progress(len(block))
            if written - start != st.nbytes:
                raise ValueError(f"{name}: {written - start} bytes written, {st.nbytes} expected")
        for fut in pending:
            fut.result()
        fault("fsync", path)
        os.fsync(f.fileno())
    fault("rename", path)
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)
    return FileEntry(path.name, 8 + len(head) + pos, digest.hexdigest())


_BLOCK = 16 << 20


def _write_all(f: Any, block: memoryview) -> None:
    while block:
        n = f.write(block)
        block = block[n:]


def write_manifest(directory: Path, manifest: Mapping[str, Any], fault: FaultHook = _noop) -> None:
    """Commit a snapshot: write manifest.json atomically, last."""
    path = directory / MANIFEST
    fault("manifest", path)
    _fsync_dir(directory)  # the shard files' renames are durable before the commit
    tmp = directory / (TMP_PREFIX + MANIFEST)
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def snapshot_id(version: int) -> str:
    """A sortable directory name for a snapshot at `version`."""
    return f"v{version:010d}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid() % 100000:05d}"


def job_dir(root: Path, job_id: str) -> Path:
    """Where a job's snapshots live."""
    return root / job_id


def list_snapshots(root: Path, job_id: str) -> list[Path]:
    """Committed snapshots of a job (those with a manifest), oldest first."""
    d = job_dir(root, job_id)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX) and (p / MANIFEST).is_file())


def clean_partial(root: Path, job_id: str, keep: Iterable[Path] = ()) -> list[Path]:
    """Remove a job's crashed saves (directories without a manifest) and stray temp files."""
    removed: list[Path] = []
    d = job_dir(root, job_id)
    if not d.is_dir():
        return removed
    keep_set = {Path(k).resolve() for k in keep}
    for p in d.iterdir():
        if p.resolve() in keep_set:
            continue
        if p.is_dir() and not (p / MANIFEST).is_file():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif p.is_dir():
            for t in p.glob(TMP_PREFIX + "*"):
                t.unlink(missing_ok=True)
                removed.append(t)
    return removed


def clean_all(root: Path) -> list[Path]:
    """clean_partial for every job under root (at service start, when no save can be running)."""
    if not root.is_dir():
        return []
    return [p for d in root.iterdir() if d.is_dir() for p in clean_partial(root, d.name)]


def prune(root: Path, job_id: str, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` committed snapshots (0 = keep all)."""
    if keep_last <= 0:
        return []
    old = list_snapshots(root, job_id)[:-keep_last]
    for p in old:
        (p / MANIFEST).unlink(missing_ok=True)  # uncommit first, so a crash leaves a partial dir
        shutil.rmtree(p, ignore_errors=True)
    return old


def resolve(root: Path, ref: str) -> Path:
    """A snapshot directory from a path, or "JOB_ID:latest" / "JOB_ID" (the newest of that job)."""
    p = Path(ref)
    if (p / MANIFEST).is_file():
        return p
    job_id = ref[: -len(":latest")] if ref.endswith(":latest") else ref
    if "/" not in job_id:
        snaps = list_snapshots(root, job_id)
        if snaps:
            return snaps[-1]
    raise ParamServerError.not_found(SnapshotReason.SNAPSHOT_NOT_FOUND, f"no snapshot {ref!r} (under {root})", snapshot=ref)


def read_manifest(directory: Path) -> dict[str, Any]:
    """Parse and check a manifest (DATA_LOSS naming it when it is unreadable)."""
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise data_loss(path, "missing") from None
    except (OSError, ValueError) as exc:
        raise data_loss(path, f"unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise data_loss(path, "not a paramserver snapshot manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ParamServerError(
            "FAILED_PRECONDITION",
            SnapshotReason.SNAPSHOT_INCOMPATIBLE,
            f"{path}: format version {manifest.get('format_version')}, this build reads {FORMAT_VERSION}",
            {"file": str(path)},
        )
    for key in ("job_id", "version", "config", "layout", "shards"):
        if key not in manifest:
            raise data_loss(path, f"field {key!r} missing")
    return manifest


def sha256_file(path: Path) -> str:
    """The sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def verify(directory: Path, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check every file's presence, size and sha256; return the manifest. DATA_LOSS names the file."""
    manifest = dict(manifest) if manifest is not None else read_manifest(directory)
    for shard in manifest["shards"]:
        path = directory / shard["file"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise data_loss(path, "missing") from None
        if size != shard["size"]:
            raise data_loss(path, f"{size} bytes, the manifest says {shard['size']} (truncated or altered)")
        if sha256_file(path) != shard["sha256"]:
            raise data_loss(path, "checksum mismatch (altered)")
    return manifest


class SnapshotReader:
    """Reads ranges of the flat tensors of a verified snapshot, whatever its shard count."""

    def __init__(self, directory: Path, manifest: Mapping[str, Any]) -> None:
        from safetensors import safe_open  # pickle-free reader

        self.directory = directory
        self.manifest = manifest
        self._files: list[tuple[Path, Any, dict[str, list[tuple[int, int]]]]] = []
        for shard in manifest["shards"]:
            path = directory / shard["file"]
            try:
                handle: Any = safe_open(str(path), framework="numpy")
            except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
                raise data_loss(path, f"not a valid safetensors file ({exc})") from None
            # where each tensor's elements lie in the flat space: "params" covers the shard's
            # ranges; "state.G.*" the pieces of group G listed in the file's "ranges.G" metadata
            ranges = {"": [(int(s), int(n)) for s, n in shard["ranges"]]}
            for key, value in (handle.metadata() or {}).items():
                if key.startswith("ranges."):
                    try:
                        ranges[key[len("ranges.") :]] = [(int(s), int(n)) for s, n in json.loads(value)]
                    except (ValueError, TypeError):
                        raise data_loss(path, f"bad metadata {key!r}") from None
            self._files.append((path, handle, ranges))

    def names(self) -> set[str]:
        """Tensor names present in any shard file (a group's state is only in the files of the
        shards that hold some of its parameters)."""
        return set().union(*(set(h.keys()) for _, h, _ in self._files))

    def _handle(self, name: str) -> Any:
        for _path, handle, _ in self._files:
            if name in handle.keys():
                return handle
        raise data_loss(self.directory / MANIFEST, f"no file holds {name!r}")

    def metadata(self, shard: int) -> dict[str, str]:
        """The string metadata of one shard file."""
        return dict(self._files[shard][1].metadata() or {})

    def is_scalar(self, name: str) -> bool:
        """True for 0-d tensors."""
        return len(self._handle(name).get_slice(name).get_shape()) == 0

    def scalar(self, name: str) -> np.ndarray:
        """A 0-d tensor (equal on every shard; taken from the first)."""
        return np.asarray(self._handle(name).get_tensor(name))

    def tensor(self, name: str) -> np.ndarray:
        """A whole tensor as saved (a parameter's own optimizer state, "param.INDEX.KEY"; every
        file that holds it has the same values, the first is read)."""
        handle = self._handle(name)
        try:
            return np.asarray(handle.get_tensor(name))
        except Exception as exc:  # noqa: BLE001
            raise data_loss(self.directory / MANIFEST, f"cannot read {name!r} ({exc})") from None

    def read(self, name: str, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, start + length) of flat tensor `name` across the snapshot's shards."""
        out = np.empty(length, dtype=np.float32) if out is None else out
        end = start + length
        filled = 0
        group = name.split(".")[1] if name.startswith("state.") else ""
        for path, handle, all_ranges in self._files:
            local = 0
            for s, n in all_ranges.get(group, []):
                a, b = max(s, start), min(s + n, end)
                if a < b:
                    try:
                        piece = handle.get_slice(name)[local + a - s : local + b - s]
                    except Exception as exc:  # noqa: BLE001
                        raise data_loss(path, f"cannot read {name!r} ({exc})") from None
                    out[a - start : b - start] = piece
                    filled += b - a
                local += n
        if filled != length:
            raise data_loss(self.directory / MANIFEST, f"the shards do not cover [{start}, {end}) of {name!r}")
        return out


def summary(directory: Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """A short description of a snapshot for listings."""
    total = sum(int(s["size"]) for s in manifest["shards"])
    return {
        "path": str(directory),
        "job_id": manifest["job_id"],
        "version": manifest["version"],
        "applied": manifest.get("applied", 0),
        "shards": len(manifest["shards"]),
        "bytes": total,
        "created_at": manifest.get("created_at", ""),
        "optimizer": manifest["config"].get("optimizer", ""),
    }


def remove_quietly(path: Path) -> None:
    """Delete a file or directory, ignoring errors."""
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
