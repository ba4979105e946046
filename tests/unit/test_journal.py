"""The control-plane journal: framing, replay, torn tails, corruption, compaction, concurrency."""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

from paramserver import journal as journal_mod
from paramserver.errors import ParamServerError, Reason
from paramserver.journal import HEADER_RECORD, MAX_RECORD_BYTES, Journal

MIXED: list[dict[str, Any]] = [
    {"kind": "job_created", "job_id": "job-1", "shards": 4, "lr": 0.001, "enabled": True, "note": None},
    {"kind": "member", "worker": "w-0", "blob": b"\x00\x01\xff" * 10, "tags": ["a", "b", "é"], "nested": {"x": [1, [2, {"y": None}]]}},
    {"kind": "numbers", "neg": -(2**63), "big": 2**64 - 1, "zero": 0, "inf": float("inf"), "ninf": float("-inf"), "tiny": 5e-324},
    {},
    {"kind": "int keys", "map": {1: "one", 2: "two"}, "empty": {}, "empty_list": [], "empty_bytes": b"", "empty_str": ""},
    {"kind": "unicode", "text": "snowman ☃ and emoji 🚀", "false": False},
]


def _journal_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "coordinator.journal"


def _write_records(path: Path, records: list[dict[str, Any]]) -> list[int]:
    """Write a fresh journal; return the offset of each record followed by the end of the file."""
    journal, replayed = Journal.open(path)
    assert replayed == []
    offsets = [journal.size_bytes]
    for record in records:
        journal.append(record)
        offsets.append(journal.size_bytes)
    journal.close()
    return offsets


def _replay(path: Path) -> list[dict[str, Any]]:
    """The records of the journal at `path` (opened and closed again)."""
    journal, records = Journal.open(path)
    journal.close()
    return records


def _frame(record: object) -> bytes:
    payload = msgpack.packb(record, use_bin_type=True)
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def _records(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [{"kind": prefix, "i": i, "payload": f"{prefix}-{i}" * (i % 5)} for i in range(n)]


# --- round trip ---------------------------------------------------------------------------------------


def test_round_trip_mixed_types(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    assert not path.parent.exists()
    journal, replayed = Journal.open(path)
    assert replayed == []
    assert path.exists()
    many = MIXED * 50
    for record in many:
        journal.append(record)
    assert journal.size_bytes == path.stat().st_size
    journal.close()

    journal, replayed = Journal.open(path)
    journal.close()
    assert replayed == many
    assert all(isinstance(r, dict) for r in replayed)
    assert replayed[1]["blob"] == b"\x00\x01\xff" * 10
    assert isinstance(replayed[1]["blob"], bytes)
    assert replayed[4]["map"] == {1: "one", 2: "two"}


def test_file_format(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    journal.append({"a": 1})
    journal.close()
    data = path.read_bytes()
    assert data == _frame({"journal": "paramserver", "format": 1}) + _frame({"a": 1})
    assert dict(HEADER_RECORD) == {"journal": "paramserver", "format": 1}


def test_reopen_and_append_more(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    first, second, third = _records(30, "a"), _records(20, "b"), _records(10, "c")
    journal, _ = Journal.open(path)
    for record in first:
        journal.append(record)
    journal.close()

    journal, replayed = Journal.open(path)
    assert replayed == first
    assert journal.records_since_compaction == 30
    journal.append_many(second)
    assert journal.records_since_compaction == 50
    journal.close()

    with Journal.open(path, sync=False)[0] as journal:
        for record in third:
            journal.append(record)
    assert journal.closed

    journal, replayed = Journal.open(path)
    journal.close()
    assert replayed == first + second + third


def test_append_many_empty_is_noop(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    size = journal.size_bytes
    journal.append_many([])
    journal.append_many(iter(()))
    assert journal.size_bytes == size == path.stat().st_size
    journal.close()


def test_empty_existing_file_is_a_new_journal(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.touch()
    journal, replayed = Journal.open(path)
    journal.append({"a": 1})
    journal.close()
    assert replayed == []
    assert _replay(path) == [{"a": 1}]


def test_torn_header_is_rewritten(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(_frame({"journal": "paramserver", "format": 1})[:5])
    journal, replayed = Journal.open(path)
    journal.close()
    assert replayed == []
    assert path.read_bytes() == _frame({"journal": "paramserver", "format": 1})


# --- torn tails ---------------------------------------------------------------------------------------


def test_torn_tail_at_every_offset_is_truncated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _journal_path(tmp_path)
    records = [*_records(3), {"kind": "last", "blob": b"\xab" * 40, "nested": {"k": [1, 2.5, None]}}]
    offsets = _write_records(path, records)
    original = path.read_bytes()
    last_start, last_end = offsets[-2], offsets[-1]
    assert last_end == len(original)

    for cut in range(last_start + 1, last_end):
        path.write_bytes(original[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="paramserver.journal"):
            journal, replayed = Journal.open(path)
        assert replayed == records[:-1], cut
        assert journal.size_bytes == last_start
        assert path.stat().st_size == last_start
        warnings = [r for r in caplog.records if r.name == "paramserver.journal" and r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert f"{cut - last_start} bytes" in warnings[0].getMessage()

        journal.append({"kind": "after", "cut": cut})
        journal.close()
        journal, replayed = Journal.open(path)
        journal.close()
        assert replayed == [*records[:-1], {"kind": "after", "cut": cut}]


def test_clean_file_logs_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _journal_path(tmp_path)
    _write_records(path, _records(5))
    with caplog.at_level(logging.WARNING, logger="paramserver.journal"):
        journal, replayed = Journal.open(path)
    journal.close()
    assert len(replayed) == 5
    assert not [r for r in caplog.records if r.name == "paramserver.journal"]


def test_flipped_byte_in_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    records = _records(4)
    offsets = _write_records(path, records)
    original = path.read_bytes()
    last_start = offsets[-2]
    for index in range(last_start, len(original)):
        damaged = bytearray(original)
        damaged[index] ^= 0xFF
        path.write_bytes(bytes(damaged))
        journal, replayed = Journal.open(path)
        journal.close()
        assert replayed == records[:-1], index
        assert path.stat().st_size == last_start


def test_zero_filled_tail_is_a_torn_tail(tmp_path: Path) -> None:
    # A filesystem may extend the file before the data reaches it: the tail reads back as zeros.
    path = _journal_path(tmp_path)
    records = _records(3)
    offsets = _write_records(path, records)
    with path.open("ab") as f:
        f.write(b"\x00" * 4096)
    journal, replayed = Journal.open(path)
    journal.close()
    assert replayed == records
    assert path.stat().st_size == offsets[-1]


def test_oversized_length_at_the_tail_is_a_torn_tail(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    records = _records(3)
    offsets = _write_records(path, records)
    with path.open("ab") as f:
        f.write(struct.pack("<II", MAX_RECORD_BYTES + 1, 0) + b"junk")
    journal, replayed = Journal.open(path)
    journal.close()
    assert replayed == records
    assert path.stat().st_size == offsets[-1]


# --- corruption -----------------------------------------------------------------------------------------


def _assert_corrupt(exc: ParamServerError, path: Path, offset: int) -> None:
    assert exc.code == "DATA_LOSS"
    assert exc.reason == Reason.JOURNAL_CORRUPT == "JOURNAL_CORRUPT"
    assert exc.metadata["offset"] == str(offset)
    assert exc.metadata["path"] == str(path)
    assert str(path) in exc.message
    assert str(offset) in exc.message


def test_flipped_byte_in_a_middle_record_is_corruption(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    records = _records(5)
    offsets = _write_records(path, records)
    original = path.read_bytes()
    start, end = offsets[2], offsets[3]
    for index in range(start, end):
        damaged = bytearray(original)
        damaged[index] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(ParamServerError) as info:
            Journal.open(path)
        _assert_corrupt(info.value, path, start)
        # Nothing was truncated or rewritten.
        assert path.read_bytes() == bytes(damaged), index


def test_single_bit_flip_in_a_middle_payload_is_corruption(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    offsets = _write_records(path, _records(3))
    damaged = bytearray(path.read_bytes())
    damaged[offsets[1] + 10] ^= 0x01
    path.write_bytes(bytes(damaged))
    with pytest.raises(ParamServerError) as info:
        Journal.open(path)
    _assert_corrupt(info.value, path, offsets[1])


def test_oversized_length_in_the_middle_is_corruption(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    records = _records(2)
    offsets = _write_records(path, records)
    data = path.read_bytes()
    bogus = struct.pack("<II", 0xFFFF_FFF0, 0) + b"x" * 12
    path.write_bytes(data + bogus + _frame({"kind": "later"}))
    with pytest.raises(ParamServerError) as info:
        Journal.open(path)
    _assert_corrupt(info.value, path, offsets[-1])


def test_undecodable_payload_in_the_middle_is_corruption(tmp_path: Path) -> None:
    # A frame with a correct CRC over bytes that are not msgpack of a map.
    path = _journal_path(tmp_path)
    offsets = _write_records(path, _records(2))
    data = path.read_bytes()
    for payload in (b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1a\x01\x02"):
        bad = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
        path.write_bytes(data + bad + _frame({"kind": "later"}))
        with pytest.raises(ParamServerError) as info:
            Journal.open(path)
        _assert_corrupt(info.value, path, offsets[-1])


def test_wrong_header_is_refused(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    path.parent.mkdir(parents=True)
    contents = [
        _frame({"journal": "something-else", "format": 1}) + _frame({"a": 1}),
        _frame({"kind": "job_created"}),
        _frame(["journal", "paramserver"]),
        b"this is not a journal at all, just some text\n",
        b"\x00" * 64,
    ]
    for content in contents:
        path.write_bytes(content)
        with pytest.raises(ParamServerError) as info:
            Journal.open(path)
        _assert_corrupt(info.value, path, 0)
        assert path.read_bytes() == content


def test_unknown_format_version_is_refused(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(_frame({"journal": "paramserver", "format": 2}) + _frame({"a": 1}))
    with pytest.raises(ParamServerError) as info:
        Journal.open(path)
    _assert_corrupt(info.value, path, 0)
    assert info.value.metadata["format"] == "2"


# --- compaction -------------------------------------------------------------------------------------------


def test_compaction_replaces_contents(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    journal.append_many(_records(100))
    assert journal.records_since_compaction == 100
    big_size = journal.size_bytes
    inode_before = path.stat().st_ino

    live = [{"kind": "job", "job_id": "j1", "version": 100}, {"kind": "member", "worker": "w0"}]
    journal.compact(live)
    assert journal.records_since_compaction == 0
    assert journal.size_bytes == path.stat().st_size < big_size
    assert path.stat().st_ino != inode_before  # a new file was renamed over the old one

    journal.append({"kind": "after", "n": 1})
    journal.append_many([{"kind": "after", "n": 2}, {"kind": "after", "n": 3}])
    assert journal.records_since_compaction == 3
    assert journal.size_bytes == path.stat().st_size
    journal.close()

    journal, replayed = Journal.open(path)
    journal.close()
    assert replayed == [*live, {"kind": "after", "n": 1}, {"kind": "after", "n": 2}, {"kind": "after", "n": 3}]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_compaction_to_nothing(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    journal.append_many(_records(10))
    journal.compact([])
    journal.close()
    assert _replay(path) == []
    assert path.read_bytes() == _frame({"journal": "paramserver", "format": 1})


def test_stray_temp_file_from_a_crashed_compaction_is_ignored(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    records = _records(10)
    _write_records(path, records)
    # A compaction that crashed before its rename: a complete temp file, and a torn one.
    stray_full = path.parent / f".{path.name}.abc123.compact.tmp"
    stray_full.write_bytes(_frame({"journal": "paramserver", "format": 1}) + _frame({"kind": "compacted"}))
    stray_torn = path.parent / f".{path.name}.def456.compact.tmp"
    stray_torn.write_bytes(b"\x07\x00")
    unrelated = path.parent / "other.journal"
    unrelated.write_bytes(b"keep me")

    journal, replayed = Journal.open(path)
    journal.append({"kind": "after"})
    journal.close()
    assert replayed == records
    assert not stray_full.exists()
    assert not stray_torn.exists()
    assert unrelated.read_bytes() == b"keep me"
    assert _replay(path) == [*records, {"kind": "after"}]


def test_compaction_failing_before_the_rename_leaves_the_old_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _journal_path(tmp_path)
    records = _records(10)
    journal, _ = Journal.open(path)
    journal.append_many(records)
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(journal_mod.os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        journal.compact([{"kind": "compacted"}])
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temp file was removed
    # The journal keeps appending to the old file.
    journal.append({"kind": "after"})
    assert journal.records_since_compaction == 11
    journal.close()
    assert _replay(path) == [*records, {"kind": "after"}]


# --- encoding errors ------------------------------------------------------------------------------------


def test_unencodable_record_raises_type_error_and_writes_nothing(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    journal.append({"kind": "good"})
    before = path.read_bytes()
    size = journal.size_bytes

    bad_records: list[Any] = [
        {"obj": object()},
        {"nested": {"deeper": [1, 2, {3}]}},
        {"huge": 2**70},
        {"kind": "ok", "fn": print},
        [1, 2, 3],
        "not a mapping",
    ]
    for bad in bad_records:
        with pytest.raises(TypeError):
            journal.append(bad)
        with pytest.raises(TypeError):
            journal.append_many([{"kind": "fine"}, bad])
        with pytest.raises(TypeError):
            journal.compact([{"kind": "fine"}, bad])
        assert path.read_bytes() == before
        assert journal.size_bytes == size
        assert journal.records_since_compaction == 1

    journal.append({"kind": "still works"})
    journal.close()
    assert _replay(path) == [{"kind": "good"}, {"kind": "still works"}]


def test_record_over_the_size_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    before = path.read_bytes()
    monkeypatch.setattr(journal_mod, "MAX_RECORD_BYTES", 100)
    with pytest.raises(ValueError, match="over the limit"):
        journal.append({"blob": b"x" * 200})
    journal.append({"blob": b"x" * 10})
    journal.close()
    assert path.read_bytes().startswith(before)
    assert _replay(path) == [{"blob": b"x" * 10}]


# --- failures and lifecycle -------------------------------------------------------------------------------


def test_failed_write_is_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    journal.append({"kind": "first"})
    size = journal.size_bytes
    real_write_all = journal_mod._write_all

    def half_then_enospc(fd: int, data: bytes) -> None:
        real_write_all(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_mod, "_write_all", half_then_enospc)
    with pytest.raises(OSError, match="No space"):
        journal.append({"kind": "lost", "blob": b"y" * 100})
    with pytest.raises(OSError, match="No space"):
        journal.append_many([{"kind": "lost"}, {"kind": "lost too"}])
    monkeypatch.undo()

    assert path.stat().st_size == size == journal.size_bytes
    journal.append({"kind": "second"})
    journal.close()
    assert _replay(path) == [{"kind": "first"}, {"kind": "second"}]


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    assert not journal.closed
    assert journal.path == path
    journal.close()
    journal.close()  # idempotent
    assert journal.closed
    with pytest.raises(ValueError, match="closed"):
        journal.append({"a": 1})
    with pytest.raises(ValueError, match="closed"):
        journal.append_many([{"a": 1}])
    with pytest.raises(ValueError, match="closed"):
        journal.compact([])
    assert "closed" in repr(journal)


def test_error_survives_pickling(tmp_path: Path) -> None:
    import pickle

    path = _journal_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage garbage garbage")
    with pytest.raises(ParamServerError) as info:
        Journal.open(path)
    clone = pickle.loads(pickle.dumps(info.value))
    assert (clone.code, clone.reason, clone.metadata) == (info.value.code, info.value.reason, info.value.metadata)


# --- concurrency -------------------------------------------------------------------------------------------


def test_concurrent_appends_lose_nothing(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    threads_n, per_thread = 4, 150
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                if i % 10 == 9:
                    journal.append_many([{"t": t, "i": i, "batch": True}])
                else:
                    journal.append({"t": t, "i": i, "pad": "x" * (i % 17)})
        except BaseException as exc:
            errors.append(exc)
            raise

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert journal.records_since_compaction == threads_n * per_thread
    assert journal.size_bytes == path.stat().st_size
    journal.close()

    replayed = _replay(path)
    assert len(replayed) == threads_n * per_thread
    for t in range(threads_n):
        assert [r["i"] for r in replayed if r["t"] == t] == list(range(per_thread))


def test_size_bytes_tracks_the_file(tmp_path: Path) -> None:
    path = _journal_path(tmp_path)
    journal, _ = Journal.open(path)
    assert journal.size_bytes == path.stat().st_size == len(_frame({"journal": "paramserver", "format": 1}))
    journal.append({"a": "b" * 1000})
    assert journal.size_bytes == path.stat().st_size
    assert os.path.getsize(path) == journal.size_bytes
    journal.close()
