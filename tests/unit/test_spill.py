"""The spill store: preallocated files, tiles streamed with read-ahead and write-behind, a full
disk named clearly, nothing left behind."""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from paramserver.errors import ParamServerError
from paramserver.spill import ALIGN_BYTES, SpillFile, TileStore, aligned_empty
from paramserver.v1 import job_service_pb2
from paramserver_client.reasons import Reason


def test_reasons_are_the_proto_enum() -> None:
    names = {n for n in vars(Reason) if n.isupper()}
    assert names == set(job_service_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}


def test_aligned_buffers() -> None:
    for n in (4096, 8192, 3 * 4096):
        assert aligned_empty(n).ctypes.data % ALIGN_BYTES == 0 and aligned_empty(n).nbytes == n


def test_the_file_is_allocated_in_full_and_removed(tmp_path: Path) -> None:
    f = SpillFile(tmp_path / "s.spill", 10 * 4096 + 1)
    assert f.size == 11 * 4096
    assert os.path.getsize(f.path) == f.size and f.allocated_bytes() >= f.size  # not sparse
    f.close()
    assert not f.path.exists()


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_streaming_round_trip_with_resident_and_spilled_tiles(tmp_path: Path, depth: int) -> None:
    tiles = [(1000, True), (1537, False), (4096, False), (7, True), (3000, False), (1, False), (2048, False)]
    store = TileStore(["params", "m", "v"], tiles, tmp_path / "t.spill", depth=depth)
    n = store.numel
    assert store.resident_bytes == (1000 + 7) * 3 * 4 and store.spilled_records == 5
    rng = np.random.default_rng(0)
    cols = {c: rng.standard_normal(n).astype(np.float32) for c in store.columns}
    for c, v in cols.items():
        store.write_column(c, v)
    for _ in range(3):  # an update touching every column of every tile, as an optimizer step would
        for tile in store.stream():
            tile.columns["m"].mul_(0.5).add_(tile.columns["params"])
            tile.columns["v"].add_(1.0)
            tile.columns["params"].sub_(tile.columns["m"] * 0.1)
    for _ in range(3):
        cols["m"] = cols["m"] * np.float32(0.5) + cols["params"]
        cols["v"] = cols["v"] + np.float32(1.0)
        cols["params"] = cols["params"] - cols["m"] * np.float32(0.1)
    for c in store.columns:
        assert np.array_equal(store.read_column(c), cols[c]), c
    stats = store.file.stats if store.file else None
    assert stats is not None and stats.bytes_read > 0 and stats.bytes_written > 0
    path = store.file.path if store.file else None
    store.close()
    assert path is not None and not path.exists()


def test_a_read_only_pass_writes_nothing(tmp_path: Path) -> None:
    store = TileStore(["a"], [(4096, False)] * 4, tmp_path / "r.spill")
    assert store.file is not None
    store.read_column("a")
    assert store.file.stats.bytes_written == 0 and store.file.stats.bytes_read == 4 * 4096 * 4
    store.close()


def test_more_than_the_free_space_is_resource_exhausted_naming_path_and_bytes(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    too_big = st.f_bavail * st.f_frsize + (1 << 30)
    with pytest.raises(ParamServerError) as err:
        SpillFile(tmp_path / "big.spill", too_big)
    e = err.value
    assert e.code == "RESOURCE_EXHAUSTED" and e.reason == Reason.SPILL_DISK_FULL
    assert e.metadata["path"] == str(tmp_path / "big.spill") and int(e.metadata["bytes_needed"]) >= too_big
    assert not (tmp_path / "big.spill").exists()


def test_an_allocation_that_fails_for_space_is_resource_exhausted(tmp_path: Path) -> None:
    """On a real 1 MiB tmpfs when this machine lets us mount one (root in CI), so that the kernel
    itself answers ENOSPC after the free-space check passed (another writer filled the disk)."""
    mnt = tmp_path / f"tiny-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # leave less than the file needs, after statvfs said it fits
            f.write(b"\0" * (1 << 19))
        real = os.statvfs

        def stale_statvfs(path: object) -> os.statvfs_result:
            st = real(path)  # type: ignore[arg-type]
            return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, st.f_blocks, st.f_blocks, *st[5:]))

        os.statvfs = stale_statvfs  # type: ignore[assignment]
        try:
            with pytest.raises(ParamServerError) as err:
                SpillFile(mnt / "s.spill", 1 << 20)
        finally:
            os.statvfs = real
        assert err.value.reason == Reason.SPILL_DISK_FULL and err.value.metadata["bytes_needed"] == str(1 << 20)
        assert os.strerror(errno.ENOSPC) in err.value.message
        assert not (mnt / "s.spill").exists()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_views_are_torch_float32_of_the_tile(tmp_path: Path) -> None:
    store = TileStore(["x", "y"], [(10, False), (6, True)], tmp_path / "v.spill")
    seen = []
    for tile in store.stream():
        assert tile.columns["x"].dtype == torch.float32 and tile.columns["x"].numel() == tile.length
        tile.columns["y"].fill_(float(tile.index + 1))
        seen.append((tile.index, tile.start, tile.length))
    assert seen == [(0, 0, 10), (1, 10, 6)]
    assert store.read_column("y").tolist() == [1.0] * 10 + [2.0] * 6
    store.close()
