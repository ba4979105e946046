"""Snapshot stores without a cluster, on a directory and on a real S3 HTTP server (moto): atomic
commits, verification of every file's format, corruption, crash cleanup and quarantine, resharded
reads, export, the CLI, and a snapshot written by the first format version."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from paramserver import snapshot_names as names
from paramserver.cli import app
from paramserver.errors import ParamServerError, Reason
from paramserver.export import export
from paramserver.jobconfig import JobConfig
from paramserver.manifest import Manifest
from paramserver.shard import ShardState
from paramserver.snapshot_store import DirectoryStore, SnapshotReader, SnapshotRef, SnapshotStore, prune, resolve, verify
from paramserver.snapshot_stores import open_store
from paramserver.steps import Decision
from tests.helpers import load, local_params, set_gradient

CONFIG = JobConfig(parameters=(("w", (30, 7), ""), ("b", (7,), ""), ("s", (), "")), optimizer="adamw", num_shards=2)
FIXTURE = Path(__file__).parent.parent / "fixtures" / "snapshot-v1"


@pytest.fixture(params=["dir", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SnapshotStore]:
    """A directory store, or an S3 store on a fresh bucket of the session's moto server."""
    if request.param == "dir":
        yield DirectoryStore(tmp_path / "snaps")
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    import boto3

    bucket = f"b-{os.urandom(4).hex()}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    yield open_store(f"s3://{bucket}/some/prefix")


def states(version: int = 3, shards: int = 2) -> list[ShardState]:
    """`shards` ShardStates after `version` AdamW steps."""
    config = JobConfig(**{**CONFIG.__dict__, "num_shards": shards})
    out = []
    p0 = np.linspace(-1, 1, config.total_elements, dtype=np.float32)
    for i, spans in enumerate(config.plan()):
        st = ShardState(config, i, spans)
        load(st, p0)
        for step in range(version):
            set_gradient(st, torch.full((st.numel,), 0.1 * (step + 1)))
            st.apply(Decision(step, True, "", 1.0, 1.0, 1))
        out.append(st)
    return out


def make_snapshot(store: SnapshotStore, job_id: str = "j", version: int = 3, shards: int = 2) -> tuple[SnapshotRef, np.ndarray]:
    """A real, committed snapshot of `shards` ShardStates after `version` AdamW steps, and the params."""
    sts = states(version, shards)
    ref = SnapshotRef(job_id, f"v{version:010d}-x")
    store.begin(ref)
    entries = []
    for st in sts:
        meta = {names.META_SHARD: str(st.index), names.META_RANGES: json.dumps([[s.start, s.length] for s in st.spans]),
                **st.snapshot_metadata()}  # fmt: skip
        e = store.write_file(ref, names.shard_file(st.index), {k: v.numpy() for k, v in st.capture().items()}, meta)
        entries.append(e.__class__(st.index, e.file, e.size, e.sha256, tuple((s.start, s.length) for s in st.spans), version))
    store.commit(ref, Manifest.build(job_id, version, sts[0].config, entries))
    params = np.concatenate([st.capture()["params"].numpy() for st in sts])
    return ref, params


def rewrite(store: SnapshotStore, ref: SnapshotRef, name: str, data: bytes) -> None:
    """Replace one stored file's bytes (damage)."""
    if isinstance(store, DirectoryStore):
        (Path(store.path(ref)) / name).write_bytes(data)
        return
    s3 = store.client  # type: ignore[attr-defined]
    s3.put_object(Bucket=store.bucket, Key=store._key(ref, name), Body=data)  # type: ignore[attr-defined]


def remove(store: SnapshotStore, ref: SnapshotRef, name: str) -> None:
    if isinstance(store, DirectoryStore):
        (Path(store.path(ref)) / name).unlink()
        return
    store.client.delete_object(Bucket=store.bucket, Key=store._key(ref, name))  # type: ignore[attr-defined]


def read(store: SnapshotStore, ref: SnapshotRef, name: str) -> bytes:
    r = store.open(ref, name)
    return r.read(0, r.size)


def test_round_trip_and_reshard_reads(store: SnapshotStore) -> None:
    ref, params = make_snapshot(store, shards=3)
    assert store.snapshots("j") == [ref] and resolve(store, "j:latest") == ref and resolve(store, store.path(ref)) == ref
    manifest = verify(store, ref)
    reader = SnapshotReader(store, ref, manifest)
    assert {"params", "state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= reader.names()
    assert reader.is_scalar("state.0.step") and float(reader.scalar("state.0.step")) == 3.0
    np.testing.assert_array_equal(reader.read("params", 0, params.size), params)
    np.testing.assert_array_equal(reader.read("params", 50, 101), params[50:151])  # across shard files
    config2 = JobConfig(**{**CONFIG.__dict__, "num_shards": 2})  # another shard count restores exactly its ranges
    st = ShardState(config2, 1, config2.plan()[1])
    st.restore(reader, 3, 3)
    assert st.initialized and st.version == 3 and st.applied == 3
    span = config2.plan()[1][0]
    np.testing.assert_array_equal(local_params(st), params[span.start : span.end])
    reader.close()


def test_files_are_standard_safetensors(store: SnapshotStore, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    ref, _ = make_snapshot(store)
    local = tmp_path / "copy.safetensors"
    local.write_bytes(read(store, ref, names.shard_file(0)))
    loaded = load_file(str(local))
    assert loaded["params"].dtype == np.float32 and loaded["state.0.step"].shape == ()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "extra-byte"])
def test_damaged_shard_file_is_data_loss_naming_it(store: SnapshotStore, damage: str) -> None:
    ref, _ = make_snapshot(store)
    name = names.shard_file(1)
    data = read(store, ref, name)
    if damage == "truncate":
        rewrite(store, ref, name, data[: len(data) // 2])
    elif damage == "flip":
        rewrite(store, ref, name, data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "extra-byte":
        rewrite(store, ref, name, data + b"\0")
    else:
        remove(store, ref, name)
    with pytest.raises(ParamServerError) as err:
        verify(store, ref)
    assert err.value.code == "DATA_LOSS" and err.value.reason == Reason.SNAPSHOT_CORRUPT
    assert err.value.metadata["file"] == f"{store.path(ref)}/{name}"


@pytest.mark.parametrize("damage", ["garbage", "not-ours", "field-missing", "ranges-overlap", "bad-sha"])
def test_damaged_manifest_is_data_loss(store: SnapshotStore, damage: str) -> None:
    ref, _ = make_snapshot(store)
    d = json.loads(read(store, ref, names.MANIFEST))
    if damage == "garbage":
        data = b"\x00{not json"
    elif damage == "not-ours":
        data = json.dumps({"format": "something-else"}).encode()
    else:
        if damage == "field-missing":
            del d["shards"]
        elif damage == "ranges-overlap":
            d["shards"][1]["ranges"][0][0] -= 1
        else:
            d["shards"][0]["sha256"] = "zz"
        data = json.dumps(d).encode()
    rewrite(store, ref, names.MANIFEST, data)
    with pytest.raises(ParamServerError) as err:
        store.read_manifest(ref)
    assert err.value.code == "DATA_LOSS" and err.value.metadata["file"] == f"{store.path(ref)}/{names.MANIFEST}"


def test_a_newer_format_is_failed_precondition(store: SnapshotStore) -> None:
    ref, _ = make_snapshot(store)
    d = json.loads(read(store, ref, names.MANIFEST))
    d["format_version"] = 99
    rewrite(store, ref, names.MANIFEST, json.dumps(d).encode())
    with pytest.raises(ParamServerError) as err:
        verify(store, ref)
    assert err.value.code == "FAILED_PRECONDITION" and err.value.reason == Reason.SNAPSHOT_INCOMPATIBLE


def _recheck(store: SnapshotStore, ref: SnapshotRef, name: str, data: bytes) -> None:
    """Replace a file and rewrite the manifest's size and checksum to match (a forger's snapshot)."""
    rewrite(store, ref, name, data)
    d = json.loads(read(store, ref, names.MANIFEST))
    entry = next(s for s in d["shards"] if s["file"] == name)
    entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    rewrite(store, ref, names.MANIFEST, json.dumps(d).encode())


def test_verify_checks_the_format_not_only_the_checksum(store: SnapshotStore, tmp_path: Path) -> None:
    """A shard file replaced by a pickle whose loading would create a file, with the manifest
    rewritten to match: verify, restore and export all refuse it, and nothing is executed."""
    ref, _ = make_snapshot(store)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, ...]:
            return (os.system, (f"touch {marker}",))

    _recheck(store, ref, names.shard_file(0), pickle.dumps(Evil()))
    for attempt in (lambda: verify(store, ref), lambda: SnapshotReader(store, ref, store.read_manifest(ref))):
        with pytest.raises(ParamServerError) as err:
            attempt()
        assert err.value.code == "DATA_LOSS" and err.value.metadata["file"].endswith(names.shard_file(0))
    with pytest.raises(ParamServerError):
        export(store, ref, tmp_path / "m.safetensors")
    assert not marker.exists()


@pytest.mark.parametrize("forgery", ["foreign-tensor", "short-params", "wrong-shard", "f64-params"])
def test_a_well_formed_file_that_does_not_match_the_manifest_is_data_loss(store: SnapshotStore, forgery: str) -> None:
    from paramserver.tensor_file import write_tensors

    ref, _ = make_snapshot(store)
    sts = states()
    st = sts[1]
    tensors = {k: v.numpy() for k, v in st.capture().items()}
    meta = {names.META_SHARD: "1", **st.snapshot_metadata()}
    if forgery == "foreign-tensor":
        tensors["__class__"] = np.zeros(1, np.float32)
    elif forgery == "short-params":
        tensors["params"] = tensors["params"][:-1].copy()
    elif forgery == "wrong-shard":
        meta[names.META_SHARD] = "0"
    else:
        tensors["params"] = tensors["params"].astype(np.float64)

    class Buf:
        data = bytearray()

        def write(self, b: memoryview) -> None:
            self.data += b

    buf = Buf()
    write_tensors(buf, tensors, meta)
    _recheck(store, ref, names.shard_file(1), bytes(buf.data))
    with pytest.raises(ParamServerError) as err:
        verify(store, ref)
    assert err.value.code == "DATA_LOSS"


@pytest.mark.parametrize("phase", ["write", "fsync", "rename", "manifest"])
def test_a_failed_write_commits_nothing_and_is_cleaned(store: SnapshotStore, phase: str) -> None:
    good, _ = make_snapshot(store, version=1)

    def fail(at: str, name: str) -> None:
        if at == phase:
            raise OSError(f"injected {at}")

    partial = SnapshotRef("j", "v0000000002-x")
    store.begin(partial)
    with pytest.raises(OSError):
        e = store.write_file(partial, names.shard_file(0), {"params": np.ones(5, np.float32)}, {}, fail)
        store.commit(partial, Manifest.build("j", 2, CONFIG, [e]), fail)
    assert store.snapshots("j") == [good]
    report = store.clean("j")
    assert report.quarantined == [] and store.path(partial) in report.removed
    assert store.snapshots("j") == [good] and store.clean("j").removed == []  # nothing left
    verify(store, good)


def test_a_committed_snapshot_that_lost_its_manifest_is_quarantined_never_deleted(store: SnapshotStore) -> None:
    old, _ = make_snapshot(store, version=1)
    ref, _ = make_snapshot(store, version=2)
    remove(store, ref, names.MANIFEST)
    report = store.clean("j")
    assert report.quarantined == [store.path(ref)] and report.removed == []
    assert store.quarantined("j") == [ref] and store.snapshots("j") == [old]
    assert len(read(store, ref, names.shard_file(0))) > 0  # the data is still there
    assert store.clean("j").quarantined == [store.path(ref)]  # reported again, still kept
    r = CliRunner().invoke(app, ["snapshot", "list", "j", "--root", store.url], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and "QUARANTINED" in r.output and store.path(ref) in r.output
    with pytest.raises(ParamServerError) as err:
        verify(store, ref)
    assert err.value.code == "DATA_LOSS"


def test_pruning_keeps_the_newest(store: SnapshotStore) -> None:
    refs = [make_snapshot(store, version=v)[0] for v in (1, 2, 3)]
    assert prune(store, "j", 2) == refs[:1]
    assert store.snapshots("j") == refs[1:] and store.clean("j").removed == [] and store.quarantined("j") == []


def test_export_loads_without_this_project(store: SnapshotStore, tmp_path: Path) -> None:
    ref, params = make_snapshot(store)
    out = tmp_path / "model.safetensors"
    shapes = export(store, ref, out, "safetensors")
    assert shapes == {"w": (30, 7), "b": (7,), "s": ()}
    from safetensors.numpy import load_file

    loaded = load_file(str(out))
    np.testing.assert_array_equal(loaded["w"].reshape(-1), params[:210])
    np.testing.assert_array_equal(loaded["s"], params[217])
    pt = tmp_path / "model.pt"
    export(store, ref, pt, "torch")
    sd = torch.load(pt, weights_only=True)
    assert sd["b"].shape == (7,) and torch.equal(sd["b"], torch.from_numpy(params[210:217]))


def test_cli_list_show_verify_export(store: SnapshotStore, tmp_path: Path) -> None:
    ref, _ = make_snapshot(store)
    runner = CliRunner()
    root = ["--root", store.url]
    r = runner.invoke(app, ["snapshot", "list", "j", *root], env={"COLUMNS": "400"})
    assert r.exit_code == 0 and store.path(ref) in r.output
    r = runner.invoke(app, ["snapshot", "show", "j:latest", *root])
    assert r.exit_code == 0 and json.loads(r.output)["version"] == 3
    r = runner.invoke(app, ["snapshot", "verify", "j", *root])
    assert r.exit_code == 0 and "ok" in r.output
    r = runner.invoke(app, ["export", "j:latest", "--out", str(tmp_path / "m.safetensors"), *root])
    assert r.exit_code == 0 and (tmp_path / "m.safetensors").exists()
    rewrite(store, ref, names.shard_file(0), b"oops")
    r = runner.invoke(app, ["snapshot", "verify", store.path(ref), *root])
    assert r.exit_code == 2 and "DATA_LOSS" in r.output


def test_a_snapshot_of_the_first_format_still_loads(tmp_path: Path) -> None:
    """tests/fixtures/snapshot-v1 was written by the code before the store seam (format version 1):
    it verifies, restores onto another shard count and exports."""
    root = tmp_path / "snaps"
    shutil.copytree(FIXTURE, root)
    store = DirectoryStore(root)
    ref = resolve(store, "fixture:latest")
    manifest = verify(store, ref)
    assert manifest.version == 4 and len(manifest.shards) == 3
    reader = SnapshotReader(store, ref, manifest)
    expect = np.load(FIXTURE / "expected.npz")
    config = manifest.job_config()
    for shards in (1, 2):
        cfg = JobConfig(**{**config.__dict__, "num_shards": shards})
        for i, spans in enumerate(cfg.plan()):
            st = ShardState(cfg, i, spans)
            st.restore(reader, manifest.version, manifest.applied)
            got = st.snapshot_tensors()
            local = 0
            for s in spans:
                np.testing.assert_array_equal(got["params"].numpy()[local : local + s.length], expect["params"][s.start : s.end])
                local += s.length
    shapes = export(store, ref, tmp_path / "m.safetensors")
    assert set(shapes) == {n for n, _, _ in config.parameters}


def test_an_upload_cut_short_is_aborted_by_the_cleanup(s3_endpoint: str) -> None:
    """A shard killed in the middle of its upload leaves an unfinished multipart upload (never a
    visible object); the crash cleanup aborts it and deletes the save it belonged to."""
    import boto3

    from paramserver.s3_store import S3Store

    bucket = f"b-{os.urandom(4).hex()}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    store = S3Store(f"s3://{bucket}/p")
    good, _ = make_snapshot(store, version=1)
    cut = SnapshotRef("j", "v0000000002-x")
    store.begin(cut)
    key = store._key(cut, names.shard_file(0))
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"x" * 1000)  # then the process dies
    assert store.snapshots("j") == [good]
    assert [u["Key"] for u in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [key]
    report = store.clean("j")
    assert any("unfinished upload" in r for r in report.removed) and store.path(cut) in report.removed
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert store.snapshots("j") == [good] and report.quarantined == []
    verify(store, good)


def test_a_bad_store_url_is_invalid_argument() -> None:
    for url in ("ftp://x/y", "s3://"):
        with pytest.raises(ParamServerError) as err:
            open_store(url)
        assert err.value.code == "INVALID_ARGUMENT" and err.value.metadata["field"] == "snapshot_dir"
