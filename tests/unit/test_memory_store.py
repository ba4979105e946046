"""Snapshots in memory (paramserver.memory_store): the replica a recovery restores from is read
through the same SnapshotReader and checks as a snapshot on disk, and restores bit for bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from paramserver.errors import ParamServerError, Reason
from paramserver.jobconfig import JobConfig
from paramserver.manifest import Manifest
from paramserver.memory_store import MEMORY_URL, Blob, MemoryStore, held_files
from paramserver.placement import Span
from paramserver.shard import ShardState
from paramserver.snapshot_store import SnapshotReader, SnapshotRef, verify
from tests.helpers import flat_params, load

CONFIG = JobConfig(parameters=(("w", (64, 5), ""), ("b", (7,), "")), optimizer="adamw", hyperparameters={"lr": 0.01}, num_shards=2)


def states() -> list[ShardState]:
    out = []
    for i, spans in enumerate(CONFIG.plan()):
        st = ShardState(CONFIG, i, [Span(s.start, s.length) for s in spans])
        out.append(st)
    return out


def test_a_replica_round_trips_through_the_snapshot_reader_and_its_checks() -> None:
    sts = states()
    p0 = np.linspace(-1, 1, CONFIG.total_elements, dtype=np.float32)
    for st in sts:
        load(st, np.concatenate([p0[s.start : s.start + s.length] for s in st.spans]))
    ref = SnapshotRef("job", "replica-0000000000")
    store = MemoryStore()
    store.begin(ref)
    entries = []
    for st in sts:
        tensors = st.open_snapshot()
        try:
            meta = {
                "shard": str(st.index),
                "version": "0",
                "applied": "0",
                "ranges": "[" + ",".join(f"[{s.start},{s.length}]" for s in st.spans) + "]",
                "ledger": "[]",
                **st.snapshot_metadata(),
            }
            e = store.write_file(ref, f"shard-{st.index:05d}.safetensors", tensors, meta)
        finally:
            st.close_snapshot()
        entries.append(dataclasses.replace(e, index=st.index, ranges=tuple((s.start, s.length) for s in st.spans), applied=0))
    manifest = Manifest.build("job", 0, CONFIG, entries)
    store.commit(ref, manifest)
    assert store.snapshots("job") == [ref] and store.path(ref) == f"{MEMORY_URL}job/replica-0000000000"
    assert store.parse(store.path(ref)) == ref
    verify(store, ref)  # sizes, sha256 and formats, as for a file on disk
    # what a recovery does: the bytes travel, a new store holds them, a fresh state restores from them
    again = MemoryStore.holding(ref, Manifest.parse(manifest.to_json(), "replica"), store.files(ref))
    fresh = states()
    reader = SnapshotReader(again, ref, again.read_manifest(ref))
    try:
        for st in fresh:
            st.restore(reader, 0, 0)
    finally:
        reader.close()
    assert np.array_equal(flat_params(fresh), flat_params(sts))
    with pytest.raises(ParamServerError) as missing:
        MemoryStore().open(ref, "shard-00000.safetensors")
    assert (missing.value.code, missing.value.reason) == ("DATA_LOSS", Reason.SNAPSHOT_CORRUPT)
    damaged: dict[str, Blob | bytes] = {n: b.to_bytes() for n, b in store.files(ref).items()}
    name = next(iter(damaged))
    damaged[name] = damaged[name][:-1] + bytes([damaged[name][-1] ^ 1])
    with pytest.raises(ParamServerError) as corrupt:
        verify(MemoryStore.holding(ref, manifest, damaged), ref)
    assert corrupt.value.code == "DATA_LOSS"


def test_a_blob_reads_any_range_across_its_blocks_and_refuses_reads_beyond_it() -> None:
    data = bytes(range(256)) * 3
    blob = Blob()
    for a, b in ((0, 5), (5, 300), (300, 301), (301, 768)):
        blob.write(memoryview(data[a:b]))
    assert blob.size == len(data) and blob.to_bytes() == data
    for offset, length in ((0, 0), (0, 5), (3, 4), (4, 300), (299, 3), (300, 1), (767, 1), (0, 768), (768, 0)):
        assert blob.read(offset, length) == data[offset : offset + length], (offset, length)
    assert Blob.of(data).to_bytes() == data and Blob.of(blob) is blob
    for offset, length in ((-1, 2), (767, 2), (0, 769)):
        with pytest.raises(ValueError):
            blob.read(offset, length)


def test_held_files_pass_files_and_bytes_and_refuse_an_unresolved_handle() -> None:
    blob = Blob.of(b"abc")
    assert held_files({"a": blob, "b": b"xyz"}) == {"a": blob, "b": b"xyz"}
    with pytest.raises(ParamServerError) as refused:
        held_files({"a": blob, "shard-00001.safetensors": object()})  # e.g. an ObjectRef nobody fetched
    assert refused.value.code == "INTERNAL" and "shard-00001.safetensors" in refused.value.message
