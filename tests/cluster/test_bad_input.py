"""Bad input gets a clear status with a reason, changes nothing, and the service keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from paramserver.v1 import shard_service_pb2 as spb
from paramserver.v1 import shard_service_pb2_grpc as sgrpc
from paramserver.v1 import tensor_pb2
from paramserver_client import JobClient, Reason, ServiceError, Worker, param_group
from paramserver_client.errors import from_rpc_error
from tests.conftest import shard_tensors

SHAPES = [("w", (10, 13)), ("b", (13,))]
TOTAL = 143


@dataclass
class Setup:
    address: str
    job_id: str
    workers: list[Worker]
    shards: list[tuple[str, int, int]]  # address, start, length
    service: object

    def state(self) -> list[dict[str, np.ndarray]]:
        return shard_tensors(self.service, self.job_id)

    def valid_step(self, step: int) -> spb.StepReport:
        g = np.full(TOTAL, 0.5, dtype=np.float32)
        for w in self.workers:
            w.push(step, g, 2)
        version, _, report = self.workers[0].pull(step + 1)
        assert version == step + 1 and report is not None
        return report


@pytest.fixture
def setup(service: object, address: str, job_id: str) -> Iterator[Setup]:
    with JobClient(address) as jc:
        job = jc.create_job(SHAPES, job_id=job_id, optimizer="adamw", hyperparameters={"lr": 0.01}, num_workers=2, num_shards=2)
    shards = [(s.address, int(s.ranges[0].start), int(s.ranges[0].length)) for s in job.shards]
    ws = sorted([Worker(address, job_id, "a"), Worker(address, job_id, "b")], key=lambda w: w.worker_id)
    ws[0].upload(np.linspace(-1, 1, TOTAL, dtype=np.float32))
    s = Setup(address, job_id, ws, shards, service)
    s.valid_step(0)  # some optimizer state to protect
    yield s
    for w in ws:
        w.close()


def _chunk(offset: int, count: int, dtype: int = 1, data: bytes | None = None) -> spb.PushGradientsRequest:
    payload = np.ones(count, dtype="<f4").tobytes() if data is None else data
    return spb.PushGradientsRequest(chunk=tensor_pb2.TensorChunk(offset=offset, count=count, dtype=dtype, data=payload))  # type: ignore[arg-type]


def push_raw(addr: str, job_id: str, step: int, chunks: list[spb.PushGradientsRequest], worker: int = 0, *, lease: int = 0) -> ServiceError:
    rid = f"bad-{step}-{len(chunks)}-{id(chunks)}"
    header = spb.PushGradientsRequest(
        header=spb.PushHeader(job_id=job_id, worker_id=worker, step=step, request_id=rid, loss_terms=2, lease=lease)
    )
    opts = [("grpc.max_send_message_length", 200 << 20)]
    with grpc.insecure_channel(addr, options=opts) as ch:
        with pytest.raises(grpc.RpcError) as err:
            sgrpc.ShardServiceStub(ch).PushGradients(iter([header, *chunks]), timeout=30)
    return from_rpc_error(err.value)


def assert_unchanged_and_serving(s: Setup, before: list[dict[str, np.ndarray]], next_step: int = 1) -> None:
    after = s.state()
    for b, a in zip(before, after, strict=True):
        assert b.keys() == a.keys()
        for k in b:
            assert np.array_equal(b[k], a[k]), f"{k} changed"
    assert s.valid_step(next_step).outcome == spb.STEP_OUTCOME_APPLIED


def test_unknown_job_is_not_found(setup: Setup) -> None:
    with JobClient(setup.address) as jc, pytest.raises(ServiceError) as err:
        jc.get_job("no-such-job")
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.reason == Reason.JOB_NOT_FOUND
    before = setup.state()
    addr, start, length = setup.shards[0]
    e = push_raw(addr, "no-such-job", 1, [_chunk(start, length)])
    assert e.code == grpc.StatusCode.NOT_FOUND and e.reason == Reason.JOB_NOT_FOUND
    assert_unchanged_and_serving(setup, before)


@pytest.mark.parametrize(
    ("case", "reason", "field"),
    [
        ("dtype", Reason.DTYPE_UNSUPPORTED, "chunk.dtype"),
        ("offset", Reason.CHUNK_OUT_OF_RANGE, "chunk.offset"),
        ("length", Reason.LENGTH_MISMATCH, "chunk.data"),
        ("missing", Reason.LAYOUT_MISMATCH, "chunks"),
        ("overlap", Reason.LAYOUT_MISMATCH, "chunks"),
        ("zero", Reason.INVALID_FIELD, "chunk.count"),
    ],
)
def test_bad_chunks_are_invalid_argument(setup: Setup, case: str, reason: str, field: str) -> None:
    addr, start, length = setup.shards[1]
    half = length // 2
    chunks = {
        "dtype": [_chunk(start, half), _chunk(start + half, length - half, dtype=7)],
        "offset": [_chunk(start, half), _chunk(start + half, length - half + 1)],
        "length": [_chunk(start, half, data=b"\0" * (4 * half - 2)), _chunk(start + half, length - half)],
        "missing": [_chunk(start, half)],
        "overlap": [_chunk(start, half + 1), _chunk(start + half, length - half)],
        "zero": [_chunk(start, 0, data=b"")],
    }[case]
    before = setup.state()
    e = push_raw(addr, setup.job_id, 1, chunks, worker=0, lease=setup.workers[0].lease)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.reason == reason and e.metadata["field"] == field
    assert_unchanged_and_serving(setup, before)


@pytest.mark.parametrize(
    ("step", "code", "reason"),
    [(0, grpc.StatusCode.ABORTED, Reason.STEP_ALREADY_APPLIED), (5, grpc.StatusCode.FAILED_PRECONDITION, Reason.STEP_NOT_READY)],
    ids=["stale-aborted", "future-failed-precondition"],
)
def test_wrong_step_names_the_current_version(setup: Setup, step: int, code: grpc.StatusCode, reason: str) -> None:
    before = setup.state()
    addr, start, length = setup.shards[0]
    e = push_raw(addr, setup.job_id, step, [_chunk(start, length)], lease=setup.workers[0].lease)
    assert e.code == code and e.reason == reason
    assert e.metadata["current_version"] == "1"
    with pytest.raises(ServiceError) as err:  # the same through the client
        setup.workers[1].push(step, np.zeros(TOTAL, dtype=np.float32), 1)
    assert err.value.code == code and err.value.reason == reason
    assert_unchanged_and_serving(setup, before)


def test_over_limit_chunk_is_resource_exhausted(setup: Setup) -> None:
    before = setup.state()
    addr, start, _ = setup.shards[0]
    big = (5 << 20) // 4  # 5 MiB of fp32: over the 4 MiB chunk limit
    e = push_raw(addr, setup.job_id, 1, [_chunk(start, big)], lease=setup.workers[0].lease)
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == Reason.MESSAGE_TOO_LARGE
    huge = (65 << 20) // 4  # over gRPC's own 64 MiB receive limit
    e = push_raw(addr, setup.job_id, 1, [_chunk(start, huge)], lease=setup.workers[0].lease)
    assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_unchanged_and_serving(setup, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_gradient_skips_the_step_on_every_shard(setup: Setup, bad: float) -> None:
    before = setup.state()
    g = np.full(TOTAL, 0.5, dtype=np.float32)
    bad_g = g.copy()
    bad_g[TOTAL - 3] = bad  # lives on the last shard only
    setup.workers[0].push(1, g, 2)
    result = setup.workers[1].push(1, bad_g, 2)
    assert result.skipped and result.report is not None and result.report.skip_reason == Reason.NON_FINITE_GRADIENT
    version, _, report = setup.workers[0].pull(2)
    assert version == 2 and report is not None
    assert report.outcome == spb.STEP_OUTCOME_SKIPPED and report.skip_reason == Reason.NON_FINITE_GRADIENT
    after = setup.state()
    for b, a in zip(before, after, strict=True):  # every shard: params, moments and step counter unchanged
        for k in b:
            assert np.array_equal(b[k], a[k]), k
    assert setup.valid_step(2).outcome == spb.STEP_OUTCOME_APPLIED
    assert all(float(s["state.0.step"]) == 2.0 for s in setup.state())


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"optimizer": "rmsprop"}, "spec.optimizer.name"),
        ({"hyperparameters": {"lr": -1.0}}, "spec.optimizer.hyperparameters.lr"),
        ({"num_shards": 1000}, "spec.num_shards"),
        ({"num_workers": 0}, "spec.num_workers"),
        ({"schedule": "warmup_cosine"}, "spec.schedule.parameters.total_steps"),
        ({"spike_window": 1}, "spec.spike_guard.window"),
        ({"shard_device_memory_budget_bytes": 1 << 30}, "spec.shard_device_memory_budget_bytes"),  # needs GPU shards
        # the optimizer zoo: rules that do not apply to a parameter, bad options
        ({"optimizer": "muon"}, "spec.parameters[1].shape"),
        ({"param_groups": [param_group("g", patterns=["b"], optimizer="galore")]}, "spec.parameters[1].shape"),
        (
            {"hyperparameters": {"cautious": True, "cautious_normalization": "median"}},
            "spec.optimizer.hyperparameters.cautious_normalization",
        ),
        ({"optimizer": "lisa"}, "spec.optimizer.hyperparameters.layer_pattern"),
        ({"optimizer": "tiger_full", "hyperparameters": {"gain_pattern": "("}}, "spec.optimizer.hyperparameters.gain_pattern"),
        (
            {"param_groups": [param_group("m", ndims=[2], optimizer="muon", hyperparameters={"adjust_lr": "x"})]},
            "spec.param_groups[0].optimizer.hyperparameters.adjust_lr",
        ),
        ({"optimizer": "adafactor", "hyperparameters": {"eps": [0, 1e-3]}}, "spec.optimizer.hyperparameters.eps[0]"),
        ({"optimizer": "galore", "hyperparameters": {"rank": 0}}, "spec.optimizer.hyperparameters.rank"),
    ],
)
def test_bad_job_spec_names_the_field(address: str, job_id: str, settings: dict[str, object], field: str) -> None:
    kw: dict[str, object] = {"optimizer": "adamw", "num_workers": 1, "num_shards": 1, **settings}
    with JobClient(address) as jc:
        with pytest.raises(ServiceError) as err:
            jc.create_job(SHAPES, job_id=job_id, **kw)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.metadata["field"] == field
        with pytest.raises(ServiceError) as nf:
            jc.get_job(job_id)  # nothing was created
        assert nf.value.code == grpc.StatusCode.NOT_FOUND


def test_unknown_pull_point_is_invalid_argument(setup: Setup) -> None:
    before = setup.state()
    addr, _, _ = setup.shards[0]
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError) as err:
            req = spb.PullParametersRequest(job_id=setup.job_id, min_version=1, point=7, worker_id=0, lease=setup.workers[0].lease)  # type: ignore[arg-type]
            list(sgrpc.ShardServiceStub(ch).PullParameters(req, timeout=30))
    e = from_rpc_error(err.value)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and e.metadata["field"] == "point"
    assert_unchanged_and_serving(setup, before)
