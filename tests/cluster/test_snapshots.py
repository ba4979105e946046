"""Snapshots through the service: bitwise resume, resharding, policy, failures, corruption."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from paramserver import snapshot_names as names
from paramserver.snapshot_store import DirectoryStore, verify
from paramserver.v1 import job_service_pb2 as jpb
from paramserver_client import JobClient, Reason, ServiceError, Worker
from tests.cluster.test_parity import SHAPES, TOTAL, worker_grads
from tests.conftest import FAULT_FILE, SNAPSHOT_DIR, shard_tensors

SETTINGS = {
    "optimizer": "adamw",
    "hyperparameters": {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
    "schedule": "warmup_cosine",
    "schedule_parameters": {"warmup_steps": 5, "total_steps": 30},
    # clipping and the spike guard on: their decisions have the same bits on any shard count
    "max_grad_norm": 30.0,
    "spike_window": 8,
    "spike_warmup": 3,
    "spike_threshold_std": 1.0,
}


def flat_state(service: object, job: jpb.Job) -> dict[str, np.ndarray]:
    """Every flat tensor of a job (params, and each group's moments in flat-space coordinates),
    assembled from its shards."""
    from paramserver.convert import spec_to_config
    from paramserver.placement import Span
    from paramserver.shard import ShardState

    config = spec_to_config(job.spec)
    out: dict[str, np.ndarray] = {}
    for info, tensors in zip(job.shards, shard_tensors(service, job.job_id), strict=True):
        spans = [Span(int(r.start), int(r.length)) for r in info.ranges]
        layout = ShardState(config, int(info.index), spans)
        for name, arr in tensors.items():
            if arr.ndim == 0 or name.startswith("param."):  # scalars, a parameter's own state
                assert name not in out or np.array_equal(out[name], arr), f"{name} differs between shards"
                out[name] = arr
                continue
            if name == "params":
                pieces = [(s.start, s.length) for s in spans]
            else:  # "state.GROUP.KEY": the group's pieces, end to end
                pieces = layout.groups[int(name.split(".")[1])].global_pieces
            dst = out.setdefault(name, np.full(TOTAL, np.nan, dtype=np.float32))
            pos = 0
            for start, length in pieces:
                dst[start : start + length] = arr[pos : pos + length]
                pos += length
    return out


def train(address: str, job_id: str, start: int, end: int, p0: np.ndarray | None = None, tag: str = "") -> None:
    with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
        ws = sorted([wa, wb], key=lambda w: w.worker_id)
        if p0 is not None:
            assert ws[0].upload_parameters
            ws[0].upload(p0)
        else:
            assert not ws[0].upload_parameters  # restored: nothing to upload
        for s in range(start, end):
            version, _, _ = ws[0].pull(s)
            assert version == s
            for w in ws:
                g, n = worker_grads(s, w.worker_id)
                w.push(s, g, n, request_id=f"{tag}{job_id}-{w.worker_id}-{s}" if tag else None)
        ws[1].pull(end)
        for w in ws:
            w.leave()


def new_id(jobs: list[str]) -> str:
    jid = f"s-{uuid.uuid4().hex[:8]}"
    jobs.append(jid)
    return jid


@pytest.mark.parametrize(
    ("base_shards", "targets"),
    [pytest.param(3, (3, 2), id="3-to-3-and-2"), pytest.param(2, (4, 5), id="2-to-4-and-5", marks=pytest.mark.slow)],
)
def test_resume_is_bitwise_on_any_shard_count(
    address: str, service: object, jobs: list[str], base_shards: int, targets: tuple[int, ...]
) -> None:
    p0 = np.random.default_rng(3).standard_normal(TOTAL).astype(np.float32)
    base = new_id(jobs)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=base, num_workers=2, num_shards=base_shards, **SETTINGS)
        train(address, base, 0, 12, p0, tag="r-")
        snap = jc.create_snapshot(base)
        assert snap.version == 12 and snap.shards == base_shards and 0 < snap.applied_steps < 12  # the guard skipped spikes
        train(address, base, 12, 30)
        reference = flat_state(service, jc.get_job(base))
        assert not np.isnan(reference["params"]).any()
        for shards in targets:
            jid = new_id(jobs)
            job = jc.restore_job(snap.path, job_id=jid, num_shards=shards)
            assert job.version == 12 and len(job.shards) == shards and job.state == jpb.JOB_STATE_RUNNING
            with Worker(address, jid, "x") as wx, Worker(address, jid, "y") as wy:
                w = wx if wx.worker_id == 1 else wy  # a push answered before the snapshot, retried after it
                g, n = worker_grads(11, 1)
                first = w.push(11, g, n, request_id=f"r-{base}-1-11")
                assert first.outcome == 2 and first.version == 12  # the first answer (APPLIED), not ABORTED
                wx.leave()
                wy.leave()
            train(address, jid, 12, 30)
            resumed = flat_state(service, jc.get_job(jid))
            assert resumed.keys() == reference.keys()
            for name in reference:  # parameters, both moments, amsgrad's max and the step counter
                assert np.array_equal(resumed[name], reference[name]), f"{name} differs after resuming on {shards} shards"


def test_policy_snapshots_keep_the_newest(address: str, jobs: list[str]) -> None:
    jid = new_id(jobs)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=jid, num_workers=2, num_shards=2, snapshot_every_steps=4, snapshot_keep_last=2, **SETTINGS)
        train(address, jid, 0, 13, np.zeros(TOTAL, dtype=np.float32))
        deadline = time.time() + 30
        while time.time() < deadline:  # the last policy snapshot is written in the background
            snaps = jc.list_snapshots(jid)
            if snaps and snaps[-1].version >= 12:
                break
            time.sleep(0.2)
        versions = [s.version for s in snaps]
        assert len(versions) == 2 and versions == sorted(versions) and versions[-1] >= 12
        latest = jc.restore_job(f"{jid}:latest", job_id=new_id(jobs))
        assert latest.version == versions[-1]


def test_restore_from_a_corrupted_snapshot_is_data_loss(address: str, jobs: list[str]) -> None:
    jid = new_id(jobs)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=jid, num_workers=2, num_shards=2, **SETTINGS)
        train(address, jid, 0, 3, np.ones(TOTAL, dtype=np.float32))
        snap = jc.create_snapshot(jid)
        shard_file = Path(snap.path) / "shard-00001.safetensors"
        data = bytearray(shard_file.read_bytes())
        data[-5] ^= 0x40  # one flipped bit in a moment
        shard_file.write_bytes(bytes(data))
        target = new_id(jobs)
        with pytest.raises(ServiceError) as err:
            jc.restore_job(snap.path, job_id=target)
        assert err.value.code == grpc.StatusCode.DATA_LOSS and err.value.reason == Reason.SNAPSHOT_CORRUPT
        assert err.value.metadata["file"].endswith("shard-00001.safetensors")
        with pytest.raises(ServiceError) as nf:
            jc.get_job(target)  # nothing half-created
        assert nf.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(ServiceError) as missing:
            jc.restore_job(str(SNAPSHOT_DIR / "no-such-job"), job_id=new_id(jobs))
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and missing.value.reason == Reason.SNAPSHOT_NOT_FOUND


@pytest.mark.parametrize(
    ("shard", "phase"),
    [("1", "write"), pytest.param("1", "fsync", marks=pytest.mark.slow), pytest.param("0", "rename", marks=pytest.mark.slow),
     ("-1", "manifest")],
)  # fmt: skip
def test_a_failed_save_leaves_the_previous_snapshot_loadable(address: str, jobs: list[str], shard: str, phase: str) -> None:
    jid = new_id(jobs)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=jid, num_workers=2, num_shards=2, **SETTINGS)
        train(address, jid, 0, 2, np.ones(TOTAL, dtype=np.float32))
        good = jc.create_snapshot(jid)
        train(address, jid, 2, 4)
        FAULT_FILE.write_text(f"{jid} {shard} {phase}\n")
        try:
            with pytest.raises(ServiceError) as err:
                jc.create_snapshot(jid)
        finally:
            FAULT_FILE.write_text("")
        assert err.value.reason == Reason.SNAPSHOT_FAILED and phase in err.value.message
        store = DirectoryStore(SNAPSHOT_DIR)
        assert [store.path(r) for r in store.snapshots(jid)] == [good.path]
        assert not [p for p in (SNAPSHOT_DIR / jid).iterdir() if p.is_dir() and not (p / names.MANIFEST).exists()]
        ref = store.parse(good.path)
        assert ref is not None
        verify(store, ref)
        restored = jc.restore_job(good.path, job_id=new_id(jobs))
        assert restored.version == 2
        again = jc.create_snapshot(jid)  # and the service keeps working
        assert again.version == 4


def test_time_policy_takes_snapshots(address: str, jobs: list[str]) -> None:
    # The rule's timing is tested with a fake clock (tests/unit/test_snapshot_policy.py); here the
    # real service: steps decided T seconds apart keep launching snapshots, each at a decided step.
    # The policy restarts T when it learns of a commit, a moment after the manifest is listed (on
    # a loaded machine, longer than T): so the test steps on, T apart, until the second snapshot,
    # instead of expecting it at one particular step.
    period = 0.2
    jid = new_id(jobs)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=jid, num_workers=1, num_shards=2, snapshot_every_seconds=period, **SETTINGS)
        with Worker(address, jid) as w:
            w.upload(np.zeros(TOTAL, dtype=np.float32))
            s = 0
            while s < 40 and len(jc.list_snapshots(jid)) < 2:
                time.sleep(period + 0.05)  # T has passed since the job started or the last snapshot
                w.push(s, worker_grads(s, 0)[0], 1)
                w.pull(s + 1)
                s += 1
                deadline = time.time() + 1  # a snapshot launched at this step becomes listed
                while time.time() < deadline and not any(x.version == s for x in jc.list_snapshots(jid)):
                    time.sleep(0.02)
            versions = sorted(x.version for x in jc.list_snapshots(jid))
    assert len(versions) >= 2 and versions[0] >= 1, versions  # a snapshot at a decided step's version, then another
    assert len(versions) == len(set(versions)) and versions[-1] <= s, (versions, s)


@pytest.mark.parametrize(
    ("optimizer", "hyper", "groups"),
    [  # the single-rule cases run in make test-slow (the suite's 15 minutes); the groups cases here
        pytest.param("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, False, marks=pytest.mark.slow),
        pytest.param("adam", {"lr": 1e-2, "weight_decay": 0.1}, False, marks=pytest.mark.slow),
        pytest.param("lion", {"lr": 1e-3, "weight_decay": 0.1}, False, marks=pytest.mark.slow),
        ("adamw", {"lr": 1e-2}, "sgd"),
        ("adamw", {"lr": 1e-2}, "whole-rules"),
        ("adamw", {"lr": 1e-2}, "split-rules"),
    ],
    ids=[
        "sgd-nesterov",
        "adam",
        "lion",
        "adamw-with-sgd-and-no-decay-groups",
        "adafactor-muon-galore-lamb-tiger-full",
        "lisa-schedule-free-c-adamw-c-sgd",
    ],
)
def test_resume_is_bitwise_for_every_optimizer(
    address: str, service: object, jobs: list[str], optimizer: str, hyper: dict[str, object], groups: bool | str
) -> None:
    from paramserver_client import no_decay_for_biases_and_norms, param_group

    pg = {
        "sgd": [*no_decay_for_biases_and_norms(), param_group("w1", patterns=["w1"], optimizer="sgd", hyperparameters={"momentum": 0.9})],
        # every rule with per-tensor state or whole tensors, one per parameter; GaLore refreshes its
        # projection (every 3 updates) before and after the snapshot at 5
        "whole-rules": [
            param_group("a", patterns=["emb"], optimizer="adafactor", hyperparameters={"lr": 1e-2, "beta1": 0.9}),
            param_group("m", patterns=["w1"], optimizer="muon", hyperparameters={"lr": 0.02}),
            param_group("g", patterns=["w2"], optimizer="galore", hyperparameters={"rank": 3, "update_proj_gap": 3}),
            param_group("l", patterns=["b1"], optimizer="lamb", hyperparameters={"lr": 1e-2}),
            param_group("t", patterns=["scale"], optimizer="tiger_full", hyperparameters={"lr": 1e-2}),
        ],
        # per-tensor step counts (LISA, windows of 2 updates), float64 scalars (Schedule-Free), masks
        "split-rules": [
            param_group("l", patterns=["w*"], optimizer="lisa",
                        hyperparameters={"lr": 1e-2, "layer_pattern": r"^w(\d)$", "active_layers": 1, "interval_steps": 2}),
            param_group("s", patterns=["emb"], optimizer="adamw_schedulefree", hyperparameters={"lr": 1e-2, "warmup_steps": 3}),
            param_group("c", patterns=["b1"], hyperparameters={"cautious": True}),
            param_group("k", patterns=["scale"], optimizer="sgd", hyperparameters={"lr": 0.05, "momentum": 0.9, "cautious": True}),
        ],
    }.get(groups or "", [])  # fmt: skip
    p0 = np.random.default_rng(5).standard_normal(TOTAL).astype(np.float32)
    base, other = new_id(jobs), new_id(jobs)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=base, optimizer=optimizer, hyperparameters=hyper, num_workers=2, num_shards=3,
                      param_groups=pg, max_grad_norm=20.0)  # fmt: skip
        train(address, base, 0, 5, p0)
        snap = jc.create_snapshot(base)
        train(address, base, 5, 12)
        jc.restore_job(snap.path, job_id=other, num_shards=2)
        train(address, other, 5, 12)
        a, b = flat_state(service, jc.get_job(base)), flat_state(service, jc.get_job(other))
        assert a.keys() == b.keys()
        assert [k for k in a if not np.array_equal(a[k], b[k], equal_nan=True)] == []  # NaN: not in that group


@pytest.fixture
def s3_service(ray_session: None, s3_endpoint: str) -> Iterator[tuple[object, str]]:
    """A second front door on the session's Ray whose snapshots go to a fresh bucket of the
    session's S3 server (serve --snapshot-dir s3://BUCKET/prefix)."""
    import boto3

    from paramserver.server import BackgroundService, ServiceConfig
    from tests.conftest import SPILL_DIR, STATE_DIR

    bucket = f"snaps-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    config = ServiceConfig(port=0, snapshot_dir=f"s3://{bucket}/runs", spill_dir=str(SPILL_DIR), state_dir=str(STATE_DIR),
                           name=bucket, keep_jobs_on_exit=False, warm_shards=0)  # fmt: skip
    svc = BackgroundService(config, own_ray=False)  # a second service on the session's Ray: its own coordinator
    yield svc, bucket
    svc.stop()


def test_snapshots_on_an_object_store_restore_bitwise_on_another_shard_count(s3_service: tuple[object, str]) -> None:
    svc, bucket = s3_service
    address = svc.address  # type: ignore[attr-defined]
    p0 = np.random.default_rng(9).standard_normal(TOTAL).astype(np.float32)
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id="base", num_workers=2, num_shards=3, **SETTINGS)
        train(address, "base", 0, 6, p0)
        snap = jc.create_snapshot("base")
        assert snap.path.startswith(f"s3://{bucket}/runs/base/") and snap.version == 6
        assert [s.path for s in jc.list_snapshots("base")] == [snap.path]
        train(address, "base", 6, 12)
        reference = flat_state(svc, jc.get_job("base"))
        jc.restore_job("base:latest", job_id="again", num_shards=2)
        train(address, "again", 6, 12)
        resumed = flat_state(svc, jc.get_job("again"))
        assert resumed.keys() == reference.keys()
        assert [k for k in reference if not np.array_equal(resumed[k], reference[k])] == []
        # an altered object is DATA_LOSS naming it, and creates nothing
        from paramserver.snapshot_stores import open_store

        store = open_store(f"s3://{bucket}/runs")
        ref = store.parse(snap.path)
        assert ref is not None
        key = store._key(ref, "shard-00001.safetensors")  # type: ignore[attr-defined]
        body = store.client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
        store.client.put_object(Bucket=bucket, Key=key, Body=body[:-1] + bytes([body[-1] ^ 1]))  # type: ignore[attr-defined]
        with pytest.raises(ServiceError) as err:
            jc.restore_job(snap.path, job_id="broken")
        assert err.value.code == grpc.StatusCode.DATA_LOSS and err.value.metadata["file"].endswith("shard-00001.safetensors")
        with pytest.raises(ServiceError) as nf:
            jc.get_job("broken")
        assert nf.value.code == grpc.StatusCode.NOT_FOUND
        for j in ("base", "again"):
            jc.delete_job(j)
