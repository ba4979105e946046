"""Tiered storage of a shard's flat arrays: tiles resident in memory or in a spill file (pure; no
Ray, no gRPC).

A :class:`TileStore` holds a few named float32 *columns* (e.g. ``params``, ``exp_avg``,
``exp_avg_sq``) over a list of *tiles* (runs of elements). A resident tile keeps its columns in
memory; a spilled tile lives in one preallocated file, tile-major: the record of a tile holds its
columns back to back, padded to 4 KiB, so streaming a tile is one contiguous read and one
contiguous write. :meth:`TileStore.stream` walks the tiles with read-ahead and write-behind on
two background threads through a fixed ring of aligned buffers (ZeRO-Infinity's pipelined swap):
while the caller updates tile i, tile i+1 is being read and tile i-1 written, so disk and compute
overlap. The ring is the only memory the spilled tiles cost: ``depth`` x the largest record.

The file is created with its full size up front (``posix_fallocate``: no silent sparse or empty
file, and no write can run out of space later); if the directory's free space cannot hold it,
or the allocation fails, the error is RESOURCE_EXHAUSTED with the path and the bytes needed, and
no file is left behind. I/O uses O_DIRECT where the filesystem allows it (no page-cache copy, so
neither the page cache nor this process grows with the spilled state), else plain pread/pwrite.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from paramserver.errors import ParamServerError, Reason

#: Alignment of O_DIRECT buffers, file offsets and record sizes.
ALIGN_BYTES = 4096
#: Bytes per float32 element.
ITEM = 4


def round_up(n: int, align: int = ALIGN_BYTES) -> int:
    """n rounded up to a multiple of align."""
    return -(-n // align) * align


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 array of nbytes whose address is a multiple of ALIGN_BYTES."""
    raw = np.empty(nbytes + ALIGN_BYTES, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN_BYTES
    return raw[skip : skip + nbytes]


def disk_full(path: Path, needed: int, free: int | None, detail: str = "") -> ParamServerError:
    """RESOURCE_EXHAUSTED naming the spill file and the bytes it needs."""
    have = "" if free is None else f", {free} free"
    return ParamServerError(
        "RESOURCE_EXHAUSTED",
        Reason.SPILL_DISK_FULL,
        f"spill file {path} needs {needed} bytes{have}{': ' + detail if detail else ''}",
        {"path": str(path), "bytes_needed": needed, **({} if free is None else {"bytes_free": free})},
    )


@dataclass
class IOStats:
    """Bytes moved to and from a spill file and the time the I/O threads spent on them."""

    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, read: int, written: int, seconds: float) -> None:
        """Record one transfer."""
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written
            if read:
                self.read_seconds += seconds
            else:
                self.write_seconds += seconds

    @property
    def read_rate(self) -> float:
        """Bytes per second of the reads (0 before any)."""
        return self.bytes_read / self.read_seconds if self.read_seconds > 0 else 0.0

    @property
    def write_rate(self) -> float:
        """Bytes per second of the writes (0 before any)."""
        return self.bytes_written / self.write_seconds if self.write_seconds > 0 else 0.0


class SpillFile:
    """A preallocated file read and written at aligned offsets (O_DIRECT when supported)."""

    def __init__(self, path: Path, size: int, direct: bool = True) -> None:
        self.path = Path(path)
        self.size = round_up(size)
        self.stats = IOStats()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        free = free_bytes(self.path.parent)
        if free is not None and free < self.size:
            raise disk_full(self.path, self.size, free)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = False
        fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(self.path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError as exc:  # e.g. tmpfs: EINVAL
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                    raise
        if fd < 0:
            fd = os.open(self.path, flags, 0o600)
        self.fd = fd
        try:
            if self.size:
                _allocate(fd, self.size)
        except OSError as exc:
            self.close()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise disk_full(self.path, self.size, free_bytes(self.path.parent), os.strerror(exc.errno)) from None
            raise

    def read_into(self, offset: int, buf: np.ndarray) -> None:
        """Fill buf (aligned, a multiple of 4 KiB) from the file at offset."""
        t0 = time.perf_counter()
        view = buf.data.cast("B")
        _pread_exact(self.fd, view, offset, self.path)
        self.stats.add(len(view), 0, time.perf_counter() - t0)

    def write_from(self, offset: int, buf: np.ndarray) -> None:
        """Write buf (aligned, a multiple of 4 KiB) to the file at offset."""
        t0 = time.perf_counter()
        view = buf.data.cast("B")
        done = 0
        while done < len(view):
            done += os.pwritev(self.fd, [view[done:]], offset + done)
        self.stats.add(0, done, time.perf_counter() - t0)

    def allocated_bytes(self) -> int:
        """Bytes the filesystem has allocated to the file (st_blocks): its full size, not sparse."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self, unlink: bool = True) -> None:
        """Close the file, and by default delete it."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if unlink:
            self.path.unlink(missing_ok=True)


def free_bytes(directory: Path) -> int | None:
    """Bytes free for this user on the file system of `directory` (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _allocate(fd: int, size: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    os.ftruncate(fd, size)  # no fallocate (macOS): at least the size is right


def clean_spill(root: Path) -> list[Path]:
    """Delete every spill file under root (at service start, when no shard can be using them)."""
    if not root.is_dir():
        return []
    removed = sorted(root.glob("*/*.spill"))
    for p in removed:
        p.unlink(missing_ok=True)
    for d in root.iterdir():
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return removed


@dataclass(frozen=True)
class TileSpec:
    """One tile: `length` elements starting at `start` in the store's element space."""

    start: int
    length: int
    resident: bool


@dataclass
class Tile:
    """A tile as :meth:`TileStore.stream` lends it: float32 views of its columns."""

    index: int
    start: int
    length: int
    columns: dict[str, torch.Tensor]
    record: torch.Tensor
    """All its columns, back to back (one contiguous tensor)."""


class TileStore:
    """Named float32 columns over tiles, each tile resident or in the spill file.

    Args:
        columns: the column names (every tile has all of them).
        tiles: (length, resident) per tile, in element order.
        path: the spill file (created only if some tile is spilled).
        depth: buffers in the I/O ring (3: one read ahead, one being updated, one written behind).
        direct: try O_DIRECT.
    """

    def __init__(
        self,
        columns: Sequence[str],
        tiles: Sequence[tuple[int, bool]],
        path: Path,
        depth: int = 3,
        direct: bool = True,
        device: torch.device | None = None,
        host: Sequence[bool] = (),
        stage: bool | None = None,
    ) -> None:
        if not columns:
            raise ValueError("a tile store needs at least one column")
        self.columns = list(columns)
        self.depth = max(2, depth)
        self.tiles: list[TileSpec] = []
        pos = 0
        for length, resident in tiles:
            self.tiles.append(TileSpec(pos, length, resident))
            pos += length
        self.numel = pos
        self.device = device or torch.device("cpu")
        self.stage = stage if stage is not None else self.device.type != "cpu"
        """Whether tiles kept in host memory or on disk are copied to the device for each use."""
        self._memory: dict[int, torch.Tensor] = {}
        self._host: set[int] = {i for i, h in enumerate(host) if h and self.tiles[i].resident}
        self._offsets: dict[int, int] = {}
        offset = 0
        for i, t in enumerate(self.tiles):
            if i in self._host:  # host memory (pinned for fast copies when the device is a GPU)
                pin = self.device.type == "cuda"
                self._memory[i] = torch.zeros(t.length * len(self.columns), dtype=torch.float32, pin_memory=pin)
            elif t.resident:
                self._memory[i] = torch.zeros(t.length * len(self.columns), dtype=torch.float32, device=self.device)
            else:
                self._offsets[i] = offset
                offset += self.record_bytes(t.length)
        self.spilled_records = len(self._offsets)
        self.file: SpillFile | None = SpillFile(path, offset, direct) if offset else None
        self.ring_bytes = self.depth * max((self.record_bytes(t.length) for t in self.tiles if not t.resident), default=0)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="spill-read")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="spill-write")
        self._ring: list[np.ndarray] = []
        self._scratch: np.ndarray | None = None
        self._live_fd = -1
        staged = [t.length for i, t in enumerate(self.tiles) if self.stage and (i in self._host or not t.resident)]
        self._staging = torch.empty(max(staged, default=0) * len(self.columns), dtype=torch.float32, device=self.device)

    def record_bytes(self, length: int) -> int:
        """Bytes of one spilled tile's record (its columns, padded to 4 KiB)."""
        return round_up(length * ITEM * len(self.columns))

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident tiles' columns (on the device and in host memory)."""
        return sum(4 * a.numel() for a in self._memory.values())

    @property
    def host_bytes(self) -> int:
        """Bytes of the tiles kept in host memory (a GPU shard's second tier)."""
        return sum(4 * self._memory[i].numel() for i in self._host)

    @property
    def spilled_bytes(self) -> int:
        """Bytes of the spill file."""
        return self.file.size if self.file is not None else 0

    def _record(self, index: int, flat: np.ndarray | torch.Tensor) -> torch.Tensor:
        n = self.tiles[index].length
        if isinstance(flat, torch.Tensor):
            return flat[: n * len(self.columns)]
        return torch.from_numpy(flat[: n * len(self.columns) * ITEM].view(np.float32))

    def _views(self, index: int, flat: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.tiles[index].length
        data = self._record(index, flat)
        return {c: data[k * n : (k + 1) * n] for k, c in enumerate(self.columns)}

    def _tile(self, index: int, flat: np.ndarray | torch.Tensor) -> Tile:
        t = self.tiles[index]
        return Tile(index, t.start, t.length, self._views(index, flat), self._record(index, flat))

    def _staged(self, index: int, record: torch.Tensor, write: bool) -> Iterator[Tile]:
        """Lend a host-side record through the device's staging buffer (copied back unless write=False)."""
        staging = self._staging[: record.numel()]
        staging.copy_(record, non_blocking=True)
        yield self._tile(index, staging)
        if write:
            record.copy_(staging)

    def read_live(self, index: int, column: str, start: int, count: int, out: np.ndarray) -> None:
        """Elements [start, start + count) of one tile's column, from where the tile lives (memory,
        or its record in the spill file through the page cache), into `out`."""
        n = self.tiles[index].length
        col = self.columns.index(column)
        if index in self._memory:
            out[:count] = self._memory[index][col * n + start : col * n + start + count].cpu().numpy()
            return
        assert self.file is not None
        if self._live_fd < 0:
            self._live_fd = os.open(self.file.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        _pread_exact(
            self._live_fd, out[:count].view(np.uint8).data.cast("B"), self._offsets[index] + ITEM * (col * n + start), self.file.path
        )

    def _buffer(self, slot: int) -> np.ndarray:
        while len(self._ring) <= slot:
            size = self.ring_bytes // self.depth
            self._ring.append(aligned_empty(size))
        return self._ring[slot]

    def stream(self, tiles: Sequence[int] | None = None, write: bool = True) -> Iterator[Tile]:
        """Lend the tiles in order (all by default); a spilled tile's changes are written back
        (unless write=False) once the caller asks for the next one. The views are valid until then."""
        order = list(range(len(self.tiles))) if tiles is None else list(tiles)
        spilled = [i for i in order if i not in self._memory]
        slot_of = {t: k % self.depth for k, t in enumerate(spilled)}
        reads: dict[int, Future[None]] = {}
        writes: dict[int, Future[None]] = {}
        file = self.file

        def submit_read(k: int) -> None:
            t = spilled[k]
            assert file is not None
            buf = self._buffer(slot_of[t])[: self.record_bytes(self.tiles[t].length)]
            reads[t] = self._reader.submit(file.read_into, self._offsets[t], buf)

        for k in range(min(self.depth - 1, len(spilled))):
            submit_read(k)
        k_next = min(self.depth - 1, len(spilled))
        try:
            for i in order:
                if i in self._memory:
                    if i in self._host and self.stage:
                        yield from self._staged(i, self._memory[i], write)
                    else:
                        yield self._tile(i, self._memory[i])
                    continue
                reads.pop(i).result()
                buf = self._buffer(slot_of[i])[: self.record_bytes(self.tiles[i].length)]
                if self.stage:
                    yield from self._staged(i, self._record(i, buf), write)
                else:
                    yield self._tile(i, buf)
                if write:
                    assert file is not None
                    writes[i] = self._writer.submit(file.write_from, self._offsets[i], buf)
                if k_next < len(spilled):
                    nxt = spilled[k_next]
                    reuse = [t for t in writes if slot_of[t] == slot_of[nxt]]  # the buffer's last write
                    for t in reuse:
                        writes.pop(t).result()
                    submit_read(k_next)
                    k_next += 1
        finally:
            for f in list(reads.values()) + list(writes.values()):
                f.result()

    def read_tile(self, index: int) -> dict[str, torch.Tensor]:
        """One tile's columns, read synchronously: views of a resident tile, or of a private
        buffer (valid until the next call) for a spilled one."""
        if index in self._memory:
            return self._views(index, self._memory[index])
        assert self.file is not None
        size = self.record_bytes(self.tiles[index].length)
        if self._scratch is None or self._scratch.nbytes < size:
            self._scratch = aligned_empty(max(size, self.ring_bytes // self.depth))
        self.file.read_into(self._offsets[index], self._scratch[:size])
        return self._views(index, self._scratch[:size])

    def read_column(self, column: str, out: np.ndarray | None = None) -> np.ndarray:
        """A whole column in element order (tests, snapshots of small stores)."""
        out = np.empty(self.numel, dtype=np.float32) if out is None else out
        for tile in self.stream(write=False):
            out[tile.start : tile.start + tile.length] = tile.columns[column].cpu().numpy()
        return out

    def write_column(self, column: str, values: np.ndarray) -> None:
        """Set a whole column (element order), e.g. the uploaded parameters."""
        for tile in self.stream():
            tile.columns[column].copy_(torch.from_numpy(values[tile.start : tile.start + tile.length]))

    def close(self) -> None:
        """Stop the I/O threads and delete the spill file."""
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        if self._live_fd >= 0:
            os.close(self._live_fd)
            self._live_fd = -1
        if self.file is not None:
            self.file.close(unlink=True)
            self.file = None
        self._ring.clear()
        self._memory.clear()
        self._scratch = None


class FrozenTiles:
    """A tile store as it was at one version, readable while updates go on (a snapshot being
    written outside the step lock): a tile is copied to a side file just before its first update
    (copy-on-write), unless the snapshot already read it for the last time; reads of a tile not
    copied come from where it lives. The updater calls :meth:`before_update` under the step lock;
    the writer reads from another thread. A failed copy (e.g. a full disk) fails the snapshot,
    never the update."""

    def __init__(self, store: TileStore, side: Path, reads: dict[int, int]) -> None:
        self.store = store
        self.side_path = Path(side)
        self._reads = dict(reads)
        """Reads the snapshot still makes of each tile (a tile read for the last time needs no copy)."""
        self._saved: dict[int, int] = {}
        self._lock = threading.Lock()
        self._fd = -1
        self._end = 0
        self.copied_bytes = 0
        self.failed: BaseException | None = None

    def before_update(self, index: int, record: torch.Tensor) -> None:
        """Copy a tile's columns aside before the updater changes them (once, if still needed)."""
        with self._lock:
            if self.failed is not None or index in self._saved or self._reads.get(index, 0) <= 0:
                return
            try:
                if self._fd < 0:
                    self._fd = os.open(self.side_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
                data = record.detach().cpu().contiguous().numpy().data.cast("B")
                done = 0
                while done < len(data):
                    done += os.pwrite(self._fd, data[done:], self._end + done)
            except OSError as exc:
                self.failed = exc
                return
            self._saved[index] = self._end
            self._end += len(data)
            self.copied_bytes += len(data)

    def read(self, index: int, column: str, start: int, count: int, out: np.ndarray) -> np.ndarray:
        """Elements [start, start + count) of a tile's column as of the frozen version (into `out`)."""
        with self._lock:
            if self.failed is not None:
                raise ParamServerError("INTERNAL", Reason.SNAPSHOT_FAILED, f"copy-on-write of spilled tiles failed: {self.failed}")
            n = self.store.tiles[index].length
            col = self.store.columns.index(column)
            view = out[:count].view(np.uint8).data.cast("B")
            if index in self._saved:
                _pread_exact(self._fd, view, self._saved[index] + ITEM * (col * n + start), self.side_path)
            else:
                self.store.read_live(index, column, start, count, out)
            self._reads[index] = self._reads.get(index, 1) - 1
        return out[:count]

    def close(self) -> None:
        """Stop copying and delete the side file."""
        with self._lock:
            self._reads.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            self.side_path.unlink(missing_ok=True)


def _pread_exact(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill `buf` from `fd` at `offset` (INTERNAL if the file is shorter: a spill file never is)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise ParamServerError("INTERNAL", Reason.INTERNAL_ERROR, f"{path}: short read at {offset + done}")
        done += n
