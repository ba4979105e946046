"""Snapshot files without a cluster: atomic writes, verification, corruption, resharded reads, export, CLI."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from paramserver.cli import app
from paramserver.errors import ParamServerError, Reason
from paramserver.export import export
from paramserver.jobconfig import JobConfig
from paramserver.shard import ShardState
from paramserver.snapshot_store import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SnapshotReader,
    clean_partial,
    list_snapshots,
    read_manifest,
    verify,
    write_manifest,
    write_tensors,
)
from paramserver.steps import Decision

CONFIG = JobConfig(parameters=(("w", (30, 7), ""), ("b", (7,), ""), ("s", (), "")), optimizer="adamw", num_shards=2)


def make_snapshot(root: Path, job_id: str = "j", version: int = 3, shards: int = 2) -> tuple[Path, np.ndarray]:
    """A real snapshot of `shards` ShardStates after `version` AdamW steps; returns it and the params."""
    config = JobConfig(**{**CONFIG.__dict__, "num_shards": shards})
    states = []
    p0 = np.linspace(-1, 1, config.total_elements, dtype=np.float32)
    for i, spans in enumerate(config.plan()):
        st = ShardState(config, i, spans)
        staging = st.stage()
        for s in spans:
            local = st.check_chunk(s.start, s.length, 1, 4 * s.length, 0)
            st.write(staging, local, s.length, 1, p0[s.start : s.end].tobytes())
        st.load(staging)
        for step in range(version):
            st.grad = torch.full((st.numel,), 0.1 * (step + 1))
            st.apply(Decision(step, True, "", 1.0, 1.0, 1))
        states.append(st)
    directory = root / job_id / f"v{version:010d}"
    directory.mkdir(parents=True)
    entries = []
    for st in states:
        tensors = {k: v.numpy() for k, v in st.capture().items()}
        e = write_tensors(directory / f"shard-{st.index:05d}.safetensors", tensors, {"shard": str(st.index), **st.snapshot_metadata()})
        entries.append(
            {"index": st.index, "file": e.name, "size": e.size, "sha256": e.sha256, "ranges": [[s.start, s.length] for s in st.spans]}
        )
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "job_id": job_id, "version": version, "applied": version,
        "config": config.to_dict(), "total_elements": config.total_elements, "shards": entries,
        "layout": [{"name": p.name, "shape": list(p.shape), "offset": p.offset, "numel": p.numel} for p in config.layout()],
    }  # fmt: skip
    write_manifest(directory, manifest)
    params = np.concatenate([st.capture()["params"].numpy() for st in states])
    return directory, params


def test_round_trip_and_reshard_reads(tmp_path: Path) -> None:
    directory, params = make_snapshot(tmp_path, shards=3)
    manifest = verify(directory)
    reader = SnapshotReader(directory, manifest)
    assert {"params", "state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= reader.names()
    assert reader.is_scalar("state.0.step") and float(reader.scalar("state.0.step")) == 3.0
    np.testing.assert_array_equal(reader.read("params", 0, params.size), params)
    np.testing.assert_array_equal(reader.read("params", 50, 101), params[50:151])  # across shard files
    # a ShardState of another shard count restores exactly its ranges
    config2 = JobConfig(**{**CONFIG.__dict__, "num_shards": 2})
    st = ShardState(config2, 1, config2.plan()[1])
    st.restore(reader, 3, 3)
    assert st.params is not None and st.version == 3 and st.applied == 3
    span = config2.plan()[1][0]
    np.testing.assert_array_equal(st.params.numpy(), params[span.start : span.end])


def test_files_are_standard_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    directory, _ = make_snapshot(tmp_path)
    loaded = load_file(str(directory / "shard-00000.safetensors"))
    assert loaded["params"].dtype == np.float32 and loaded["state.0.step"].shape == ()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra-byte"])
def test_damaged_shard_file_is_data_loss_naming_it(tmp_path: Path, damage: str) -> None:
    directory, _ = make_snapshot(tmp_path)
    f = directory / "shard-00001.safetensors"
    data = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        f.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "extra-byte":
        f.write_bytes(data + b"\0")
    else:
        f.unlink()
    with pytest.raises(ParamServerError) as err:
        verify(directory)
    assert err.value.code == "DATA_LOSS" and err.value.reason == Reason.SNAPSHOT_CORRUPT
    assert err.value.metadata["file"] == str(f)


@pytest.mark.parametrize("damage", ["delete", "garbage", "not-ours", "field-missing"])
def test_damaged_manifest_is_data_loss(tmp_path: Path, damage: str) -> None:
    directory, _ = make_snapshot(tmp_path)
    m = directory / MANIFEST
    if damage == "delete":
        m.unlink()
    elif damage == "garbage":
        m.write_bytes(b"\x00{not json")
    elif damage == "not-ours":
        m.write_text(json.dumps({"format": "something-else"}))
    else:
        d = json.loads(m.read_text())
        del d["shards"]
        m.write_text(json.dumps(d))
    with pytest.raises(ParamServerError) as err:
        read_manifest(directory)
    assert err.value.code == "DATA_LOSS" and err.value.metadata["file"] == str(m)


def test_a_crafted_pickle_never_runs(tmp_path: Path) -> None:
    """A shard file replaced by a pickle whose loading would create a file: refused, never executed."""
    directory, _ = make_snapshot(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    f = directory / "shard-00000.safetensors"
    f.write_bytes(payload)
    manifest = json.loads((directory / MANIFEST).read_text())
    import hashlib

    manifest["shards"][0].update(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())  # checksums match
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ParamServerError) as err:
        SnapshotReader(directory, verify(directory))
    assert err.value.code == "DATA_LOSS" and not marker.exists()


@pytest.mark.parametrize("phase", ["write", "fsync", "rename", "manifest"])
def test_a_failed_write_commits_nothing_and_is_cleaned(tmp_path: Path, phase: str) -> None:
    good, _ = make_snapshot(tmp_path, version=1)

    def fail(at: str, path: Path) -> None:
        if at == phase:
            raise OSError(f"injected {at}")

    partial = tmp_path / "j" / "v0000000002"
    partial.mkdir()
    with pytest.raises(OSError):
        write_tensors(partial / "shard-00000.safetensors", {"params": np.ones(5, np.float32)}, {}, fail)
        write_manifest(partial, {"format": FORMAT}, fail)
    assert list_snapshots(tmp_path, "j") == [good]
    assert not (partial / MANIFEST).exists()
    if phase != "manifest":  # the shard file never got its final name
        assert not (partial / "shard-00000.safetensors").exists()
    removed = clean_partial(tmp_path, "j")
    assert partial in removed and not partial.exists() and good.exists()
    verify(good)


def test_export_loads_without_this_project(tmp_path: Path) -> None:
    directory, params = make_snapshot(tmp_path)
    out = tmp_path / "model.safetensors"
    shapes = export(directory, out, "safetensors")
    assert shapes == {"w": (30, 7), "b": (7,), "s": ()}
    from safetensors.numpy import load_file

    loaded = load_file(str(out))
    np.testing.assert_array_equal(loaded["w"].reshape(-1), params[:210])
    np.testing.assert_array_equal(loaded["s"], params[217])
    pt = tmp_path / "model.pt"
    export(directory, pt, "torch")
    sd = torch.load(pt, weights_only=True)
    assert sd["b"].shape == (7,) and torch.equal(sd["b"], torch.from_numpy(params[210:217]))


def test_cli_list_show_verify_export(tmp_path: Path) -> None:
    directory, _ = make_snapshot(tmp_path)
    runner = CliRunner()
    root = ["--root", str(tmp_path)]
    r = runner.invoke(app, ["snapshot", "list", "j", *root], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and str(directory) in r.output
    r = runner.invoke(app, ["snapshot", "show", "j:latest", *root])
    assert r.exit_code == 0 and json.loads(r.output)["version"] == 3
    r = runner.invoke(app, ["snapshot", "verify", "j", *root])
    assert r.exit_code == 0 and "ok" in r.output
    r = runner.invoke(app, ["export", "j:latest", "--out", str(tmp_path / "m.safetensors"), *root])
    assert r.exit_code == 0 and (tmp_path / "m.safetensors").exists()
    (directory / "shard-00000.safetensors").write_bytes(b"oops")
    r = runner.invoke(app, ["snapshot", "verify", str(directory)])
    assert r.exit_code == 2 and "DATA_LOSS" in r.output
