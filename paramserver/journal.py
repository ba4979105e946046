"""A durable, append-only journal of control-plane records (pure: no Ray, no gRPC).

The coordinator writes one record per control-plane event (a job created, a member joined, a
decision taken) so that a restarted coordinator can replay them and rebuild its state. A record is
a dict of plain msgpack-able values: str, int, float, bool, None, bytes, lists and dicts.

File format
-----------
The file is a sequence of frames, each an 8-byte header followed by a payload::

    u32 little-endian  payload length in bytes (at most MAX_RECORD_BYTES = 64 MiB)
    u32 little-endian  zlib.crc32 of the payload
    payload            msgpack (use_bin_type=True) of one dict

The first frame of every file is the header record ``{"journal": "paramserver", "format": 1}``;
a file that does not start with it is refused.

Crash guarantees
----------------
* :meth:`Journal.append` issues one ``write`` of the whole frame and, with ``sync=True``, an
  ``fsync`` before it returns: a record whose append returned survives a crash of the process or
  of the machine. With ``sync=False`` it survives a crash of the process only (the page cache
  holds it), which is what tests and throw-away deployments want.
* A crash during an append leaves at most one incomplete frame at the end of the file: a short
  header, a short payload, or a payload whose CRC does not match (the filesystem extended the file
  before the data reached it). On :meth:`Journal.open` such a *torn tail* is cut off (the file is
  truncated to the end of the last good record, with a logged warning naming the bytes dropped)
  and replay goes on: the interrupted append never returned, so nobody relied on it.
* Damage anywhere else (a bad CRC, an undecodable payload, or an insane length, followed by bytes
  that still parse as valid records) is not what a crash produces: replaying around it would
  silently forget decisions, so :meth:`Journal.open` raises DATA_LOSS with reason
  ``JOURNAL_CORRUPT`` naming the file and the byte offset of the bad record. (The check scans the
  bytes after the bad frame for any valid frame; should a torn record's own bytes embed one, replay
  errs on the side of refusing.)
* :meth:`Journal.compact` writes the header and the given records to a temporary file in the same
  directory, fsyncs it, renames it over the journal (``os.replace``, atomic) and fsyncs the
  directory: after a crash the journal is either the old file or the new one, never a mix. A
  temporary file left behind by a crash is ignored by replay and removed by the next open.
* A failed write (e.g. ENOSPC) is rolled back by truncating the file to its previous length, so a
  half-written frame can never end up in the middle of the file. If even the rollback fails, the
  journal refuses further appends until a successful :meth:`Journal.compact` rewrites it.

One process writes a journal at a time; :class:`Journal` serializes its own writers with a lock.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final

import msgpack  # type: ignore[import-untyped]

from paramserver.errors import ParamServerError, Reason

__all__ = ["FORMAT_VERSION", "HEADER_RECORD", "MAX_RECORD_BYTES", "Journal"]

logger = logging.getLogger(__name__)

#: The journal format this module writes and reads.
FORMAT_VERSION: Final = 1
#: The first record of every journal file.
HEADER_RECORD: Final[Mapping[str, Any]] = MappingProxyType({"journal": "paramserver", "format": FORMAT_VERSION})
#: The largest payload a frame may carry; a longer length field is damage, not data.
MAX_RECORD_BYTES: Final = 64 * 1024 * 1024

_FRAME_HEADER: Final = struct.Struct("<II")
_TMP_SUFFIX: Final = ".compact.tmp"


def _encode(record: Mapping[str, Any]) -> bytes:
    """Frame one record: header (length, crc32) + msgpack payload. Raises before any I/O."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a journal record must be a mapping, not {type(record).__name__}")
    try:
        payload: bytes = msgpack.packb(dict(record), use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"journal record cannot be encoded with msgpack: {exc}") from exc
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"journal record is {len(payload)} bytes encoded, over the limit of {MAX_RECORD_BYTES}")
    return _FRAME_HEADER.pack(len(payload), zlib.crc32(payload)) + payload


_HEADER_FRAME: Final = _encode(HEADER_RECORD)


def _parse_at(data: bytes, pos: int) -> tuple[dict[str, Any], int] | str:
    """The record at `pos` and the offset after it, or a short description of what is wrong there."""
    end = len(data)
    if end - pos < _FRAME_HEADER.size:
        return "short header"
    length, crc = _FRAME_HEADER.unpack_from(data, pos)
    if length > MAX_RECORD_BYTES:
        return f"length {length} over the limit of {MAX_RECORD_BYTES}"
    start = pos + _FRAME_HEADER.size
    if start + length > end:
        return "short payload"
    payload = data[start : start + length]
    if zlib.crc32(payload) != crc:
        return "CRC mismatch"
    try:
        record = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        return f"undecodable payload ({type(exc).__name__})"
    if not isinstance(record, dict):
        return f"payload is a {type(record).__name__}, not a map"
    return record, start + length


def _valid_record_after(data: bytes, pos: int) -> int | None:
    """The offset of the first valid record that starts after `pos`, or None (a torn tail)."""
    end = len(data)
    # Fast path: when only the payload is damaged the length field still points at the next frame.
    if end - pos >= _FRAME_HEADER.size:
        natural: int = pos + _FRAME_HEADER.size + _FRAME_HEADER.unpack_from(data, pos)[0]
        if natural < end and not isinstance(_parse_at(data, natural), str):
            return natural
    # The smallest valid frame is a header and a one-byte payload (an empty map).
    for candidate in range(pos + 1, end - _FRAME_HEADER.size):
        length, crc = _FRAME_HEADER.unpack_from(data, candidate)
        if length == 0 or length > MAX_RECORD_BYTES or candidate + _FRAME_HEADER.size + length > end:
            continue
        start = candidate + _FRAME_HEADER.size
        if zlib.crc32(data[start : start + length]) != crc:
            continue
        if not isinstance(_parse_at(data, candidate), str):
            return candidate
    return None


def _corrupt(path: Path, offset: int, message: str, **metadata: object) -> ParamServerError:
    """DATA_LOSS / JOURNAL_CORRUPT naming the file and the byte offset."""
    return ParamServerError(
        "DATA_LOSS",
        Reason.JOURNAL_CORRUPT,
        f"journal {path} is corrupt at byte offset {offset}: {message}",
        {"path": str(path), "offset": offset, **metadata},
    )


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_all(fd: int) -> bytes:
    """The whole content of the file open as `fd`."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename or a creation in it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(path: Path, data: bytes, *, sync: bool) -> None:
    """Make `data` the content of `path`: temp file in the same directory, fsync, os.replace, fsync dir."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    if sync:
        _fsync_dir(path.parent)


def _remove_stale_temp_files(path: Path) -> None:
    """Remove temporary files left by a compaction that crashed before its rename."""
    for stale in path.parent.glob(glob.escape(f".{path.name}.") + "*" + _TMP_SUFFIX):
        try:
            stale.unlink()
        except OSError as exc:
            logger.warning("journal %s: could not remove the stale compaction file %s: %s", path, stale, exc)
        else:
            logger.info("journal %s: removed %s, left by an interrupted compaction", path, stale)


class Journal:
    """An open journal file; records are appended at its end. Use :meth:`Journal.open` to get one.

    Every method is thread-safe. The journal is also a context manager that closes it on exit.
    """

    def __init__(self, path: Path, fd: int, size: int, records: int, *, sync: bool) -> None:
        """Wrap an open, replayed file (internal: call :meth:`Journal.open`)."""
        self._path = path
        self._fd: int | None = fd
        self._size = size
        self._since_compaction = records
        self._sync = sync
        self._lock = threading.Lock()
        self._broken: OSError | None = None

    @classmethod
    def open(cls, path: Path, *, sync: bool = True) -> tuple[Journal, list[dict[str, Any]]]:
        """Open the journal at `path` (creating it and its directory if missing) and replay it.

        Returns the journal, positioned for appends, and the records already in it in the order they
        were appended (without the header record). A torn tail left by a crash during an append is
        truncated away with a warning. With ``sync=False`` nothing is fsynced (a record survives a
        crash of the process but not of the machine).

        Raises ParamServerError DATA_LOSS / JOURNAL_CORRUPT (metadata ``path``, ``offset``) when the
        file is not a paramserver journal, has another format version, or is damaged before its tail.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temp_files(path)
        if not path.exists():
            _replace_atomically(path, _HEADER_FRAME, sync=sync)
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            size, records = cls._replay(path, fd, sync=sync)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, size, len(records), sync=sync), records

    @staticmethod
    def _replay(path: Path, fd: int, *, sync: bool) -> tuple[int, list[dict[str, Any]]]:
        """Read and check the file open as `fd`; cut a torn tail. Returns (good size, records)."""
        data = _read_all(fd)
        if len(data) < len(_HEADER_FRAME) and _HEADER_FRAME.startswith(data):
            # Empty, or the header frame itself torn: nothing was ever appended. Start over.
            if data:
                logger.warning("journal %s: rewriting a torn header (%d bytes)", path, len(data))
            os.ftruncate(fd, 0)
            _write_all(fd, _HEADER_FRAME)
            if sync:
                os.fsync(fd)
            return len(_HEADER_FRAME), []
        first = _parse_at(data, 0)
        if isinstance(first, str) or first[0].get("journal") != HEADER_RECORD["journal"]:
            raise _corrupt(path, 0, "the file does not start with a paramserver journal header")
        header, pos = first
        if header.get("format") != FORMAT_VERSION:
            raise _corrupt(
                path,
                0,
                f"journal format {header.get('format')!r} is not supported (expected {FORMAT_VERSION})",
                format=header.get("format"),
            )
        records: list[dict[str, Any]] = []
        while pos < len(data):
            parsed = _parse_at(data, pos)
            if not isinstance(parsed, str):
                record, pos = parsed
                records.append(record)
                continue
            following = _valid_record_after(data, pos)
            if following is not None:
                raise _corrupt(path, pos, f"{parsed}, followed by a valid record at offset {following}")
            dropped = len(data) - pos
            logger.warning(
                "journal %s: dropped a torn tail of %d bytes at offset %d (%s; an append was interrupted by a crash)",
                path,
                dropped,
                pos,
                parsed,
            )
            os.ftruncate(fd, pos)
            if sync:
                os.fsync(fd)
            break
        return pos, records

    @property
    def path(self) -> Path:
        """The journal file."""
        return self._path

    @property
    def size_bytes(self) -> int:
        """The bytes in the file (header record included) up to the end of the last record."""
        return self._size

    @property
    def records_since_compaction(self) -> int:
        """Records in the file that the last :meth:`compact` did not write.

        Right after :meth:`open` this is the number of records replayed (the handle cannot tell which
        of them an earlier compaction wrote); :meth:`compact` resets it to 0, and every appended record
        adds 1. A caller compacts when it grows well past the size of its live state.
        """
        return self._since_compaction

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._fd is None

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one record; durable on return when the journal was opened with ``sync=True``.

        Raises TypeError (nothing written) when msgpack cannot encode the record, ValueError when it
        is over MAX_RECORD_BYTES encoded or the journal is closed, OSError when the write fails (the
        file is then rolled back to its previous length).
        """
        self._write(_encode(record), 1)

    def append_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append several records with one write and one fsync.

        Every record is encoded before anything is written (TypeError for one msgpack cannot encode),
        and a failed write is rolled back, so an exception leaves none of them. A crash during the call
        may leave a prefix of them, which replay returns (the torn rest is cut off).
        """
        frames = [_encode(record) for record in records]
        if frames:
            self._write(b"".join(frames), len(frames))

    def compact(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Atomically replace the whole journal by the header record and `records`.

        The new content is written to a temporary file in the same directory, fsynced and renamed over
        the journal, then the directory is fsynced; later appends go to the new file. A crash at any
        point leaves either the old journal or the new one. Records are encoded before anything is
        written (TypeError for one msgpack cannot encode). A successful compaction also clears the
        state left by a failed rollback.
        """
        frames = [_encode(record) for record in records]
        data = _HEADER_FRAME + b"".join(frames)
        with self._lock:
            old_fd = self._check_open()
            _replace_atomically(self._path, data, sync=self._sync)
            try:
                new_fd = os.open(self._path, os.O_RDWR | os.O_APPEND)
            except OSError as exc:
                # The old descriptor now points at the replaced file: appends to it would be lost.
                self._broken = exc
                raise
            self._fd = new_fd
            os.close(old_fd)
            self._size = len(data)
            self._since_compaction = 0
            self._broken = None

    def close(self) -> None:
        """Close the file. Idempotent; every other call on a closed journal raises ValueError."""
        with self._lock:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)

    def __enter__(self) -> Journal:
        """Return the journal itself."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close the journal."""
        self.close()

    def __repr__(self) -> str:
        """Path, size and state."""
        state = "closed" if self._fd is None else "open"
        return f"Journal({str(self._path)!r}, size_bytes={self._size}, {state})"

    def _check_open(self) -> int:
        """The file descriptor; ValueError when closed. Call with the lock held."""
        if self._fd is None:
            raise ValueError(f"journal {self._path} is closed")
        return self._fd

    def _write(self, data: bytes, count: int) -> None:
        """Append encoded frames at the end of the file; roll back on failure."""
        with self._lock:
            fd = self._check_open()
            if self._broken is not None:
                raise OSError(
                    errno.EIO, f"journal {self._path} is unusable after a failed rollback (compact() rewrites it)", str(self._path)
                ) from self._broken
            try:
                _write_all(fd, data)
                if self._sync:
                    os.fsync(fd)
            except BaseException:
                self._roll_back(fd)
                raise
            self._size += len(data)
            self._since_compaction += count

    def _roll_back(self, fd: int) -> None:
        """Cut whatever a failed append left after the last good record. Call with the lock held."""
        try:
            os.ftruncate(fd, self._size)
            if self._sync:
                os.fsync(fd)
        except OSError as exc:
            logger.error("journal %s: could not roll back a failed append: %s", self._path, exc)
            self._broken = exc
