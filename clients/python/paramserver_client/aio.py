"""The asyncio client (grpc.aio): control plane and one worker's data plane, over numpy.

    async with AsyncJobClient("127.0.0.1:50051") as jobs:
        job = await jobs.create_job(spec_params, optimizer="adamw", num_workers=2, num_shards=3)
    worker = await AsyncWorker.join("127.0.0.1:50051", job.job_id)
    await worker.upload(flat_params)            # if worker.upload_parameters
    version, params, _ = await worker.pull(0)
    await worker.push(step=0, grad=flat_grad, loss_terms=n)

Pushes and pulls go to every shard concurrently, straight to the shards.
Every call has a deadline; UNAVAILABLE is retried with the same request id,
so a retried push is never applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import job_service_pb2_grpc as jgrpc
from paramserver.v1 import shard_service_pb2 as spb
from paramserver.v1 import tensor_pb2
from paramserver_client import compression
from paramserver_client.codec import (
    COMPRESSED,
    FLOAT32,
    INT4_BLOCK,
    INT8_BLOCK,
    ITEMSIZE,
    MAX_MESSAGE_BYTES,
    TRAIN,
    F32Array,
    chunk_elements,
    decode_into,
    encode_chunk_message,
    parse_chunk_message,
    split,
    to_wire,
)
from paramserver_client.credentials import Credentials
from paramserver_client.errors import JobRolledBack, ServiceError
from paramserver_client.reasons import Reason
from paramserver_client.retry import RetryPolicy, call_with_retry

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
#: Rounds a compressed pull spends bringing shards that served an older version up to the newest.
BROADCAST_ALIGN_TRIES = 8
#: Default deadline of control-plane calls, seconds.
DEFAULT_TIMEOUT_S = 60.0
#: Default deadline of a pull (it may wait for the slowest worker), seconds.
DEFAULT_PULL_TIMEOUT_S = 600.0
#: How long a worker waits for a job that lost a shard to be restored, seconds.
DEFAULT_RECOVERY_TIMEOUT_S = 300.0

ParamLike = tuple[str, Sequence[int]] | jpb.ParameterSpec

log = logging.getLogger(__name__)


def new_request_id() -> str:
    """A fresh idempotency key."""
    return uuid.uuid4().hex


#: JobSpec fields that make_spec takes as arguments of their own (lists, Structs, names).
_SPECIAL_FIELDS = frozenset({"parameters", "optimizer", "schedule", "param_groups"})
#: Keyword prefixes of the fields of nested JobSpec messages (``spike_window`` sets
#: ``spike_guard.window``).
_NESTED_PREFIXES = {"spike_guard": "spike_"}


def _scalar_settings() -> dict[str, str]:
    out: dict[str, str] = {}
    for f in jpb.JobSpec.DESCRIPTOR.fields:
        if f.name in _SPECIAL_FIELDS or f.is_repeated:
            continue
        if f.message_type is None:
            out[f.name] = f.name
        elif f.name in _NESTED_PREFIXES:
            for sub in f.message_type.fields:
                if sub.message_type is None and not sub.is_repeated:
                    out[_NESTED_PREFIXES[f.name] + sub.name] = f"{f.name}.{sub.name}"
    return out


#: make_spec's keywords for the scalar settings of a job, each with the JobSpec field it sets
#: (dotted through nested messages): every scalar field of JobSpec under its own name, and
#: spike_guard's as ``spike_window``, ``spike_warmup`` and ``spike_threshold_std``.
SPEC_SETTINGS: Mapping[str, str] = _scalar_settings()


def make_spec(
    parameters: Sequence[ParamLike],
    *,
    optimizer: str = "adamw",
    hyperparameters: Mapping[str, Any] | None = None,
    schedule: str = "constant",
    schedule_parameters: Mapping[str, Any] | None = None,
    param_groups: Sequence[jpb.ParamGroup] = (),
    num_workers: int = 1,
    num_shards: int = 1,
    labels: Mapping[str, str] | None = None,
    **settings: float,
) -> jpb.JobSpec:
    """Build a JobSpec from (name, shape) pairs (or ParameterSpec messages) and settings.

    Besides the arguments above, every scalar JobSpec field is a keyword of the same name (e.g.
    ``max_grad_norm``, ``shard_memory_budget_bytes``, ``snapshot_every_steps``), and the spike
    guard's fields are ``spike_window``, ``spike_warmup`` and ``spike_threshold_std``
    (:data:`SPEC_SETTINGS` lists them all; job_service.proto gives their meaning; unset = the
    service's default). `labels`: free-form strings recorded with the job (JobSpec.labels).
    num_workers and num_shards, which the wire requires, default to 1 here. An unknown
    keyword is a TypeError naming it; a value of the wrong type or range a TypeError or
    ValueError naming the keyword.
    """
    spec = jpb.JobSpec(param_groups=list(param_groups), labels=dict(labels or {}))
    for key, value in {"num_workers": num_workers, "num_shards": num_shards, **settings}.items():
        path = SPEC_SETTINGS.get(key)
        if path is None:
            raise TypeError(
                f"make_spec() got an unexpected keyword argument {key!r} (besides optimizer, hyperparameters, schedule, "
                f"schedule_parameters and param_groups it takes the JobSpec settings {', '.join(SPEC_SETTINGS)})"
            )
        message: Any = spec
        *outer, leaf = path.split(".")
        for name in outer:
            message = getattr(message, name)
        try:
            setattr(message, leaf, value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"make_spec(): {key}={value!r}: {e}") from e
    for p in parameters:
        if isinstance(p, jpb.ParameterSpec):
            spec.parameters.append(p)
        else:
            spec.parameters.add(name=p[0], shape=[int(d) for d in p[1]], dtype=tensor_pb2.DTYPE_FLOAT32)
    spec.optimizer.name = optimizer
    spec.optimizer.hyperparameters.update(dict(hyperparameters or {}))
    spec.schedule.name = schedule
    spec.schedule.parameters.update(dict(schedule_parameters or {}))
    return spec


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def param_group(
    name: str,
    *,
    patterns: Sequence[str] = (),
    ndims: Sequence[int] = (),
    optimizer: str = "",
    hyperparameters: Mapping[str, Any] | None = None,
) -> jpb.ParamGroup:
    """A ParamGroup message (see job_service.proto)."""
    g = jpb.ParamGroup(name=name, patterns=list(patterns), ndims=list(ndims))
    g.optimizer.name = optimizer
    g.optimizer.hyperparameters.update(dict(hyperparameters or {}))
    return g


def no_decay_for_biases_and_norms() -> list[jpb.ParamGroup]:
    """Preset: parameters with fewer than 2 dimensions (biases, norm gains, scalars) get the job's
    optimizer without weight decay."""
    return [param_group("no_decay", ndims=(0, 1), hyperparameters={"weight_decay": 0.0})]


#: Name patterns of the matrices that are not hidden layers: embeddings and output heads.
EMBEDDING_AND_HEAD_PATTERNS = ("*embed*", "*wte*", "*wpe*", "*lm_head*", "head.*", "*.head.*", "*classifier*")
#: Name patterns of the hidden matrices GaLore projects (its README: attention and MLP Linears).
ATTENTION_AND_MLP_PATTERNS = ("*attn*", "*attention*", "*mlp*", "*ffn*", "*feed_forward*")


def muon_param_groups(
    muon: Mapping[str, Any] | None = None,
    *,
    aux: Mapping[str, Any] | None = None,
    exclude: Sequence[str] = EMBEDDING_AND_HEAD_PATTERNS,
) -> list[jpb.ParamGroup]:
    """Preset: Muon for the hidden matrices (2-D or more: conv weights too), the job's optimizer
    (use "adamw") for embeddings and heads (names matching `exclude`) and, by default, for every
    parameter of fewer than 2 dimensions. `muon` are Muon's hyperparameters, `aux` overrides of the
    job's hyperparameters for embeddings and heads."""
    return [
        param_group("embeddings_and_heads", patterns=exclude, hyperparameters=aux),
        param_group("muon", ndims=(2, 3, 4, 5), optimizer="muon", hyperparameters=muon),
    ]


def galore_param_groups(
    galore: Mapping[str, Any] | None = None, *, patterns: Sequence[str] = ATTENTION_AND_MLP_PATTERNS
) -> list[jpb.ParamGroup]:
    """Preset: GaLore (rank, update_proj_gap, scale, lr ... in `galore`) for the 2-D attention and
    MLP matrices (names matching `patterns`); every other parameter keeps the job's optimizer."""
    return [param_group("galore", patterns=patterns, ndims=(2,), optimizer="galore", hyperparameters=galore)]


@dataclass
class OptimizerState:
    """A job's optimizer state as ReadOptimizerState streams it: the version, the snapshot it was
    read from, and per parameter name its state tensors by key (fp32 numpy arrays; e.g. AdamW's
    step, exp_avg, exp_avg_sq)."""

    version: int
    snapshot: str
    tensors: dict[str, dict[str, npt.NDArray[np.float32]]]


class AsyncJobClient:
    """Control-plane calls (JobService)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        credentials: Credentials | None = None,
        token: str | None = None,
    ) -> None:
        """`token` (else `credentials.token`, else $PARAMSERVER_TOKEN) goes with every call; TLS
        comes from `credentials` (else $PARAMSERVER_TLS_CA/_CERT/_KEY): see credentials.py."""
        self.address = address
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.credentials = Credentials.resolve(credentials, token=token)
        self._channel = self.credentials.channel(address, CHANNEL_OPTIONS)
        self._stub = jgrpc.JobServiceStub(self._channel)

    async def __aenter__(self) -> AsyncJobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def _unary(self, method: Any, request: Any, what: str) -> Any:
        return await call_with_retry(lambda: method(request, timeout=self.timeout), self.retry, what)

    async def create_job(
        self, parameters: Sequence[ParamLike] | jpb.JobSpec, *, job_id: str = "", resume: bool = False, **settings: Any
    ) -> jpb.Job:
        """Create a job; see make_spec for the settings. If job_id exists: with `resume`, the job
        is returned when its description is the same (to continue it); otherwise ServiceError
        ALREADY_EXISTS (JOB_ALREADY_EXISTS, metadata ``version``)."""
        spec = parameters if isinstance(parameters, jpb.JobSpec) else make_spec(parameters, **settings)
        req = jpb.CreateJobRequest(request_id=new_request_id(), job_id=job_id, spec=spec, resume=resume)
        job: jpb.Job = await self._unary(self._stub.CreateJob, req, "CreateJob")
        return job

    async def restore_job(self, restore_from: str, *, job_id: str = "", **overrides: Any) -> jpb.Job:
        """Create a job from a snapshot (a path, or "JOB_ID" / "JOB_ID:latest"). Overrides (JobSpec
        field names; 0 or absent keeps the snapshot's value): num_workers, num_shards,
        shard_num_cpus, shard_num_gpus, shard_memory_budget_bytes, snapshot_every_steps,
        snapshot_keep_last, snapshot_every_seconds."""
        spec = jpb.JobSpec(**overrides)
        req = jpb.CreateJobRequest(request_id=new_request_id(), job_id=job_id, spec=spec, restore_from=restore_from)
        job: jpb.Job = await self._unary(self._stub.CreateJob, req, "CreateJob")
        return job

    async def rollback_job(self, job_id: str, snapshot: str, *, expected_generation: int | None = None) -> jpb.Job:
        """Restore a running job in place to `snapshot` (a path, or "JOB_ID" / "JOB_ID:latest"):
        it goes on from the snapshot's version under a new generation, and its workers' next
        calls raise JobRolledBack. For resuming a training loop from an older checkpoint. With
        `expected_generation` (a Job.generation read before), only if the job is still at that
        generation, else ServiceError GENERATION_CHANGED: several workers resuming from one
        checkpoint roll the job back once."""
        req = jpb.RollbackJobRequest(request_id=new_request_id(), job_id=job_id, snapshot=snapshot, expected_generation=expected_generation)
        job: jpb.Job = await self._unary(self._stub.RollbackJob, req, "RollbackJob")
        return job

    async def read_optimizer_state(self, job_id: str, snapshot: str = "", *, timeout: float | None = None) -> OptimizerState:
        """A job's full optimizer state per parameter, from `snapshot` (a path, or "JOB_ID" /
        "JOB_ID:latest"; empty = a new snapshot of the current version). See OptimizerState."""
        req = jpb.ReadOptimizerStateRequest(request_id=new_request_id(), job_id=job_id, snapshot=snapshot)

        async def attempt() -> OptimizerState:
            state: OptimizerState | None = None
            async for chunk in self._stub.ReadOptimizerState(req, timeout=timeout or max(self.timeout, 600.0)):
                if chunk.HasField("header"):
                    state = OptimizerState(int(chunk.header.version), chunk.header.snapshot, {})
                    continue
                if state is None:
                    raise ServiceError(grpc.StatusCode.DATA_LOSS, "", "a state tensor came before the header")
                t = chunk.tensor
                shape = tuple(int(d) for d in t.shape)
                per_param = state.tensors.setdefault(t.parameter, {})
                flat = per_param.get(t.key)
                if flat is None:
                    flat = per_param[t.key] = np.empty(shape, dtype=np.float32)
                values = np.frombuffer(t.data, dtype="<f4")
                if flat.shape != shape or t.offset + values.size > flat.size:
                    raise ServiceError(grpc.StatusCode.DATA_LOSS, "", f"a malformed piece of {t.parameter}.{t.key} at {t.offset}")
                flat.reshape(-1)[t.offset : t.offset + values.size] = values
            if state is None:
                raise ServiceError(grpc.StatusCode.DATA_LOSS, "", "no header in ReadOptimizerState")
            return state

        return await call_with_retry(attempt, self.retry, "ReadOptimizerState")

    async def create_snapshot(self, job_id: str) -> jpb.Snapshot:
        """Take a consistent snapshot of a job; returns once it is durable."""
        req = jpb.CreateSnapshotRequest(request_id=new_request_id(), job_id=job_id)
        snap: jpb.Snapshot = await self._unary(self._stub.CreateSnapshot, req, "CreateSnapshot")
        return snap

    async def list_snapshots(self, job_id: str) -> list[jpb.Snapshot]:
        """A job's committed snapshots, oldest first."""
        resp: jpb.ListSnapshotsResponse = await self._unary(
            self._stub.ListSnapshots, jpb.ListSnapshotsRequest(job_id=job_id), "ListSnapshots"
        )
        return list(resp.snapshots)

    async def get_job(self, job_id: str) -> jpb.Job:
        """A job with its shard map."""
        job: jpb.Job = await self._unary(self._stub.GetJob, jpb.GetJobRequest(job_id=job_id), "GetJob")
        return job

    async def list_jobs(self) -> list[jpb.Job]:
        """Every job."""
        resp: jpb.ListJobsResponse = await self._unary(self._stub.ListJobs, jpb.ListJobsRequest(), "ListJobs")
        return list(resp.jobs)

    async def join_job(self, job_id: str, worker_name: str = "") -> jpb.JoinJobResponse:
        """Join a job as a worker."""
        req = jpb.JoinJobRequest(request_id=new_request_id(), job_id=job_id, worker_name=worker_name)
        resp: jpb.JoinJobResponse = await self._unary(self._stub.JoinJob, req, "JoinJob")
        return resp

    async def leave_job(self, job_id: str, worker_id: int, lease: int = 0) -> None:
        """Leave a job (what the worker pushed for the open step is discarded)."""
        req = jpb.LeaveJobRequest(request_id=new_request_id(), job_id=job_id, worker_id=worker_id, lease=lease)
        await self._unary(self._stub.LeaveJob, req, "LeaveJob")

    async def heartbeat(self, job_id: str, worker_id: int, lease: int) -> jpb.HeartbeatResponse:
        """Renew a worker's lease (AsyncWorker does it on its own)."""
        req = jpb.HeartbeatRequest(job_id=job_id, worker_id=worker_id, lease=lease)
        resp: jpb.HeartbeatResponse = await self._unary(self._stub.Heartbeat, req, "Heartbeat")
        return resp

    async def delete_job(self, job_id: str) -> None:
        """Delete a job."""
        await self._unary(self._stub.DeleteJob, jpb.DeleteJobRequest(request_id=new_request_id(), job_id=job_id), "DeleteJob")

    async def rotate_job_token(self, job_id: str, previous_valid_s: float = 300.0) -> jpb.RotateJobTokenResponse:
        """A new worker token for a job (admin); the previous ones stay valid `previous_valid_s` more seconds."""
        req = jpb.RotateJobTokenRequest(request_id=new_request_id(), job_id=job_id, previous_valid_s=previous_valid_s)
        resp: jpb.RotateJobTokenResponse = await self._unary(self._stub.RotateJobToken, req, "RotateJobToken")
        return resp


@dataclass(frozen=True)
class StepResult:
    """The combined answer of every shard to one push."""

    outcome: int
    """spb.STEP_OUTCOME_PENDING, _APPLIED or _SKIPPED."""
    version: int
    """The lowest version any shard reported."""
    report: spb.StepReport | None
    """The step's report when some shard completed it."""

    @property
    def skipped(self) -> bool:
        """True when the step was skipped (see report.skip_reason)."""
        return self.outcome == spb.STEP_OUTCOME_SKIPPED


@dataclass(frozen=True)
class Compressed:
    """A flat gradient encoded in a compressed wire dtype (:meth:`AsyncWorker.compress`)."""

    dtype: int
    messages: list[list[bytes]]
    """Each shard's serialised chunk messages, in shard order."""
    decoded: F32Array
    """The values the service decodes (what it sums, before loss_terms weighting)."""
    nbytes: int
    """Bytes of encoded chunk data."""


class AsyncWorker:
    """One worker's data plane: upload, push and pull against every shard of a job."""

    def __init__(
        self,
        job: jpb.Job,
        worker_id: int,
        *,
        upload_parameters: bool = False,
        timeout: float = DEFAULT_TIMEOUT_S,
        pull_timeout: float = DEFAULT_PULL_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        lease: int = 0,
        lease_timeout_s: float = 0.0,
        address: str = "",
        recovery_timeout: float = DEFAULT_RECOVERY_TIMEOUT_S,
        credentials: Credentials | None = None,
        token: str | None = None,
    ) -> None:
        """`lease` is JoinJob's; with the front door's `address` and `lease_timeout_s` the worker
        renews its lease in the background (every third of the timeout) until close(). With the
        `address`, a push or pull that finds the job restored after a lost shard reconnects to the
        new shards (waiting up to `recovery_timeout` seconds for the restore) and raises
        :class:`JobRolledBack` with the version to resume from."""
        self.recovery_timeout = recovery_timeout
        creds = Credentials.resolve(credentials, token=token)
        self.credentials = creds.with_token(job.worker_token) if job.worker_token else creds
        """The token shards accept: the job's worker token when JoinJob (as an admin) gave one."""
        self.job = job
        self.job_id = job.job_id
        self.worker_id = worker_id
        self.lease = lease
        self.generation = int(job.generation)
        self.address = address
        self._heartbeat: asyncio.Task[None] | None = None
        if address and lease and lease_timeout_s > 0:
            self._heartbeat = asyncio.get_running_loop().create_task(self._renew(lease_timeout_s / 3))
        self.upload_parameters = upload_parameters
        self.timeout = timeout
        self.pull_timeout = pull_timeout
        self.retry = retry or RetryPolicy()
        self._wire_buffers: list[np.ndarray] = []
        """2-byte wire buffers of the model's size that pushes in bf16/fp16 convert into, reused
        push after push (a fresh one costs more in page faults than the conversion itself)."""
        self.bytes_pushed = 0
        """Bytes of the chunk messages this worker has sent in pushes (data and its framing;
        retries included; stream headers and gRPC/HTTP2 framing not)."""
        self.bytes_pulled = 0
        """Bytes of the messages this worker has received in pulls (chunks and headers)."""
        self.total = int(job.total_elements)
        self._connect(job)
        self.frozen: frozenset[int] = frozenset()
        """Parameters (indices into the model description) the update after the last pulled
        version does not train (e.g. LISA's frozen layers): their gradients may be skipped and
        sent as zeros."""

    @classmethod
    async def join(cls, address: str, job_id: str, worker_name: str = "", **kwargs: Any) -> AsyncWorker:
        """Join `job_id` through the front door at `address` and connect to its shards."""
        creds = Credentials.resolve(kwargs.pop("credentials", None), token=kwargs.pop("token", None))
        async with AsyncJobClient(address, timeout=kwargs.get("timeout", DEFAULT_TIMEOUT_S), credentials=creds) as jobs:
            resp = await jobs.join_job(job_id, worker_name)
        return cls(
            resp.job,
            resp.worker_id,
            upload_parameters=resp.upload_parameters,
            lease=resp.lease,
            lease_timeout_s=resp.lease_timeout_s,
            address=address,
            credentials=creds,
            **kwargs,
        )

    def _connect(self, job: jpb.Job) -> None:
        """Channels to the job's shards."""
        self._channels = [self.credentials.channel(s.address, CHANNEL_OPTIONS) for s in job.shards]
        self._ranges = [[(int(r.start), int(r.length)) for r in s.ranges] for s in job.shards]

    async def _shard_gone(self, exc: ServiceError) -> bool:
        """Whether a shard that answered UNAVAILABLE is gone for good (the job shows it unreachable,
        recovers, or was restored already): then retrying its address is pointless."""
        if not self.address:
            return False
        try:
            async with AsyncJobClient(
                self.address, timeout=min(self.timeout, 5.0), retry=RetryPolicy(attempts=1), credentials=self.credentials
            ) as jobs:
                job = await jobs.get_job(self.job_id)
        except ServiceError:
            return False
        moved = job.state == jpb.JOB_STATE_RECOVERING or int(job.generation) != self.generation
        return moved or any(s.unreachable for s in job.shards)

    async def _recovered(self, exc: ServiceError) -> None:
        """After a shard call failed with `exc`: if the job was restored after losing a shard (or is
        being restored: wait for it), reconnect and raise JobRolledBack; otherwise re-raise `exc`."""
        transport = exc.code == grpc.StatusCode.UNAVAILABLE or (exc.code == grpc.StatusCode.INTERNAL and not exc.reason)
        if not self.address or not (transport or exc.reason == Reason.JOB_ROLLED_BACK):
            raise exc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.recovery_timeout
        async with AsyncJobClient(self.address, timeout=self.timeout, credentials=self.credentials) as jobs:
            while True:
                try:
                    job = await jobs.get_job(self.job_id)
                except ServiceError:
                    raise exc from None
                if job.state == jpb.JOB_STATE_FAILED:
                    raise ServiceError(
                        grpc.StatusCode.FAILED_PRECONDITION, Reason.JOB_FAILED, f"the job failed: {job.state_reason}"
                    ) from exc
                if job.state != jpb.JOB_STATE_RECOVERING and int(job.generation) != self.generation:
                    break
                # a shard gone but not noticed yet is shown unreachable: wait for the recovery it starts
                troubled = job.state == jpb.JOB_STATE_RECOVERING or any(s.unreachable for s in job.shards)
                if not troubled or loop.time() > deadline:
                    raise exc
                await asyncio.sleep(0.05)
        old = self._channels
        self.job, self.generation = job, int(job.generation)
        self._connect(job)
        await asyncio.gather(*(c.close(None) for c in old))
        log.warning(
            "worker %d: job %s was restored to version %d (generation %d)", self.worker_id, self.job_id, job.version, self.generation
        )
        raise JobRolledBack(int(job.version), self.generation) from exc

    async def _renew(self, every_s: float) -> None:
        """Heartbeats until the lease ends or the worker closes."""
        async with AsyncJobClient(self.address, timeout=max(every_s, 1.0), credentials=self.credentials) as jobs:
            while True:
                await asyncio.sleep(every_s)
                try:
                    await jobs.heartbeat(self.job_id, self.worker_id, self.lease)
                except ServiceError as exc:
                    if exc.code == grpc.StatusCode.ABORTED:  # the lease ended: the next push or pull says so
                        log.warning("worker %d: %s", self.worker_id, exc.message)
                        return
                    log.info("worker %d: heartbeat failed (%s); retrying", self.worker_id, exc.message)

    async def leave(self) -> None:
        """Leave the job (stops the heartbeats; frees the worker id)."""
        await self._stop_heartbeat()
        async with AsyncJobClient(self.address, credentials=self.credentials) as jobs:
            await jobs.leave_job(self.job_id, self.worker_id, self.lease)

    async def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None

    async def close(self) -> None:
        """Stop the heartbeats and close the shard channels."""
        await self._stop_heartbeat()
        await asyncio.gather(*(c.close(None) for c in self._channels))

    async def set_token(self, token: str) -> None:
        """Use another worker token from the next call on (after RotateJobToken): the shard
        channels are opened again with it; calls in flight finish on the old ones."""
        old = self._channels
        self.credentials = self.credentials.with_token(token)
        self._connect(self.job)
        await asyncio.gather(*(c.close(2.0) for c in old))

    @property
    def shard_ranges(self) -> list[list[tuple[int, int]]]:
        """Each shard's (start, length) ranges of the flat space, in shard order."""
        return [list(r) for r in self._ranges]

    def _check_flat(self, values: F32Array, what: str) -> F32Array:
        arr = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        if arr.size != self.total:
            raise ValueError(f"{what} has {arr.size} elements; the job has {self.total}")
        return arr

    def _chunks(self, shard: int, wire: np.ndarray, dtype: int) -> Iterator[bytes]:
        """The shard's chunk messages from the whole model in wire format (see to_wire),
        already serialised: one copy of the data each."""
        step = chunk_elements(dtype)
        for start, length in self._ranges[shard]:
            for off, n in split(start, length, step):
                yield encode_chunk_message(off, n, dtype, wire[off : off + n].data.cast("B"))

    def pieces(self, dtype: int) -> list[tuple[int, int]]:
        """The (offset, count) of every chunk a push in a compressed `dtype` sends, shard after
        shard: each is encoded on its own (see :func:`compression.encode_pieces`)."""
        step = compression.chunk_elements(COMPRESSED[dtype])
        return [p for ranges in self._ranges for start, length in ranges for p in split(start, length, step)]

    def compress(
        self, values: F32Array, dtype: int, *, feedback: compression.ErrorFeedback | None = None, topk_ratio: float | None = None
    ) -> Compressed:
        """Encode a flat fp32 array in a compressed wire dtype (codec.COMPRESSED) chunk by
        chunk, as :meth:`push_compressed` sends it; with `feedback`, ``values + residual`` is
        encoded and the residual updated (error feedback). `topk_ratio`: the share of each
        chunk's elements top-k keeps (DTYPE_TOPK only)."""
        if dtype not in COMPRESSED:
            raise ValueError(f"dtype {dtype} is not a compressed wire dtype")
        flat = self._check_flat(values, "values")
        pieces = self.pieces(dtype)
        method = COMPRESSED[dtype]
        if feedback is not None:
            data, decoded = feedback.compress_pieces(flat, method, pieces, ratio=topk_ratio)
        else:
            data, decoded = compression.encode_pieces(flat, pieces, method, ratio=topk_ratio)
        chunks = iter(zip(pieces, data, strict=True))
        per_shard = []
        for ranges in self._ranges:
            n = sum(len(list(split(start, length, compression.chunk_elements(method)))) for start, length in ranges)
            per_shard.append([encode_chunk_message(off, count, dtype, d) for (off, count), d in (next(chunks) for _ in range(n))])
        return Compressed(dtype, per_shard, decoded, sum(len(d) for d in data))

    def _stream_unary(self, shard: int, method: str, response: Any) -> Any:
        return self._channels[shard].stream_unary(
            f"/paramserver.v1.ShardService/{method}", request_serializer=_serialize, response_deserializer=response.FromString
        )

    async def upload(self, params: F32Array, request_id: str | None = None) -> None:
        """Upload the initial parameters (a flat fp32 array of the whole model) to every shard."""
        flat = self._check_flat(params, "params")
        rid = request_id or new_request_id()

        def stream(i: int) -> Iterator[spb.UploadParametersRequest | bytes]:
            yield spb.UploadParametersRequest(header=spb.UploadHeader(job_id=self.job_id, request_id=rid))
            yield from self._chunks(i, flat, FLOAT32)  # fp32 is its own wire format

        async def one(i: int) -> None:
            await call_with_retry(
                lambda: self._stream_unary(i, "UploadParameters", spb.UploadParametersResponse)(stream(i), timeout=self.timeout),
                self.retry,
                f"UploadParameters[{i}]",
            )

        await asyncio.gather(*(one(i) for i in range(len(self._channels))))

    async def push(
        self,
        step: int,
        grad: F32Array,
        loss_terms: int,
        *,
        dtype: int = FLOAT32,
        request_id: str | None = None,
        lrs: Sequence[float] = (),
        feedback: compression.ErrorFeedback | None = None,
        topk_ratio: float | None = None,
    ) -> StepResult:
        """Push this worker's gradient of the SUMMED loss over `loss_terms` terms for `step`.

        `dtype`: the wire dtype: fp32 (exact), bf16 / fp16, or a compressed one (codec.INT8_BLOCK,
        INT4_BLOCK, TOPK with `topk_ratio`; see :meth:`compress`), where `feedback` (an
        ErrorFeedback of the model's size) adds what earlier pushes dropped and keeps what this
        one drops.

        `lrs`: each parameter group's lr for this step (Job.groups order), when the training loop
        drives the lr; empty = the job's schedule. Every worker must send the same values (else
        the step is skipped with LR_MISMATCH)."""
        flat = self._check_flat(grad, "grad")
        rid = request_id or new_request_id()
        if dtype in COMPRESSED:
            encoded = self.compress(flat, dtype, feedback=feedback, topk_ratio=topk_ratio)
            return await self.push_compressed(step, encoded, loss_terms, request_id=rid, lrs=lrs)
        if feedback is not None or topk_ratio is not None:
            raise ValueError("feedback and topk_ratio are for compressed wire dtypes")
        if dtype == FLOAT32:
            return await self.settle_push(
                [self.push_shard(i, step, flat, loss_terms, dtype=dtype, request_id=rid, lrs=lrs) for i in range(len(self._channels))]
            )
        buffer = self._wire_buffers.pop() if self._wire_buffers else np.empty(self.total, dtype="<u2")
        try:
            wire = to_wire(flat, dtype, out=buffer)  # one conversion pass for every shard
            return await self.settle_push(
                [self.push_shard(i, step, wire, loss_terms, dtype=dtype, request_id=rid, lrs=lrs) for i in range(len(self._channels))]
            )
        finally:
            self._wire_buffers.append(buffer)  # a concurrent push takes another buffer meanwhile

    async def push_compressed(
        self, step: int, data: Compressed, loss_terms: int, *, request_id: str | None = None, lrs: Sequence[float] = ()
    ) -> StepResult:
        """Push a gradient encoded by :meth:`compress` (the service decodes it to fp32 and sums
        it as a dense push; see :meth:`push`)."""
        if len(data.messages) != len(self._channels):
            raise ValueError(f"encoded for {len(data.messages)} shards; the job has {len(self._channels)}")
        rid = request_id or new_request_id()
        return await self.settle_push(
            [self._push_messages(i, step, msgs, loss_terms, request_id=rid, lrs=lrs) for i, msgs in enumerate(data.messages)]
        )

    async def push_shard(
        self,
        shard: int,
        step: int,
        wire: np.ndarray,
        loss_terms: int,
        *,
        dtype: int,
        request_id: str,
        lrs: Sequence[float] = (),
    ) -> spb.PushGradientsResponse:
        """Push shard `shard`'s part of a gradient (`wire`: the whole model in wire format, see
        codec.to_wire; only the shard's ranges are read) as one worker's push of `step` under
        `request_id` (the same id on every shard). A push is complete once every shard has
        answered; :meth:`step_result` combines the answers. Used to push each shard as soon as
        its gradients are ready (while backward still runs)."""
        return await self._push_messages(shard, step, lambda: self._chunks(shard, wire, dtype), loss_terms, request_id=request_id, lrs=lrs)

    async def _push_messages(
        self,
        shard: int,
        step: int,
        messages: Callable[[], Iterable[bytes]] | Sequence[bytes],
        loss_terms: int,
        *,
        request_id: str,
        lrs: Sequence[float] = (),
    ) -> spb.PushGradientsResponse:
        """One shard's push stream: the header, then the chunk messages (a list, or a function
        that makes them again for each attempt)."""
        if loss_terms < 0:
            raise ValueError("loss_terms must be >= 0")

        def stream() -> Iterator[spb.PushGradientsRequest | bytes]:
            yield spb.PushGradientsRequest(
                header=spb.PushHeader(
                    job_id=self.job_id,
                    worker_id=self.worker_id,
                    step=step,
                    request_id=request_id,
                    loss_terms=loss_terms,
                    lease=self.lease,
                    generation=self.generation,
                    group_lrs=list(lrs),
                )
            )
            for m in messages() if callable(messages) else messages:
                self.bytes_pushed += len(m)
                yield m

        answer: spb.PushGradientsResponse = await call_with_retry(
            lambda: self._stream_unary(shard, "PushGradients", spb.PushGradientsResponse)(stream(), timeout=self.timeout),
            self.retry,
            f"PushGradients[{shard}]",
            self._shard_gone,
        )
        return answer

    async def settle_push(self, pushes: Sequence[Awaitable[spb.PushGradientsResponse]]) -> StepResult:
        """Wait for every shard's part of one push (:meth:`push_shard`) and combine the answers;
        JobRolledBack if the job was restored meanwhile (see :meth:`push`)."""
        try:
            answers = await asyncio.gather(*pushes)
        except ServiceError as exc:
            await self._recovered(exc)
            raise
        done = [a for a in answers if a.outcome != spb.STEP_OUTCOME_PENDING]
        outcome = done[0].outcome if done else spb.STEP_OUTCOME_PENDING
        return StepResult(outcome, min(a.version for a in answers), done[0].report if done else None)

    async def pull(
        self,
        min_version: int,
        out: F32Array | None = None,
        *,
        dtype: int = FLOAT32,
        point: int = TRAIN,
        on_shard: Callable[[int], None] | None = None,
        base: tuple[int, F32Array] | None = None,
    ) -> tuple[int, F32Array, spb.StepReport | None]:
        """Wait for `min_version` on every shard and return (version, flat fp32 params, last step report).

        The version is the lowest any shard served (in synchronous training
        every shard serves the same one). ``point=EVAL`` asks for the evaluation
        point (Schedule-Free's x; the same values for every other rule).
        `on_shard(i)` is called as soon as shard i's ranges of `out` are complete (while other
        shards may still stream), e.g. to copy them into a model.

        A compressed `dtype` (codec.INT8_BLOCK or INT4_BLOCK: DiLoCo-style rounds) returns the
        shards' broadcast values (see PullParametersRequest.base_version): pass `base`, the
        (version, values) of this worker's previous compressed pull, and each shard sends an
        update to add to them when it can, else its values whole (in fp32).
        """
        flat = np.empty(self.total, dtype=np.float32) if out is None else out
        if flat.size != self.total or flat.dtype != np.float32:
            raise ValueError(f"out must be a float32 array of {self.total} elements")
        broadcast = dtype in (INT8_BLOCK, INT4_BLOCK)
        if base is not None and (not broadcast or base[1].shape != (self.total,) or base[1].dtype != np.float32):
            raise ValueError(f"base is for compressed pulls: (version, a float32 array of {self.total} elements)")

        frozen: set[int] = set()

        prior = base[1].copy() if base is not None else None  # (`out` may be base's array: a retry adds once)

        async def one(i: int, want: int, base_version: int | None) -> tuple[int, spb.StepReport | None]:
            req = spb.PullParametersRequest(
                job_id=self.job_id,
                min_version=want,
                dtype=dtype,  # type: ignore[arg-type]
                point=point,  # type: ignore[arg-type]
                worker_id=self.worker_id,
                lease=self.lease,
                generation=self.generation,
                base_version=base_version,
            )

            async def attempt() -> tuple[int, spb.StepReport | None]:
                version = -1
                report: spb.StepReport | None = None
                got = 0
                call = self._channels[i].unary_stream(
                    "/paramserver.v1.ShardService/PullParameters", request_serializer=_serialize, response_deserializer=None
                )
                async for raw in call(req, timeout=self.pull_timeout):
                    self.bytes_pulled += len(raw)
                    parsed = parse_chunk_message(raw)
                    if parsed is None:  # the header
                        head = spb.PullParametersResponse.FromString(raw).header
                        version = int(head.version)
                        report = head.last_step if head.HasField("last_step") else None
                        frozen.update(int(k) for k in head.frozen_parameters)
                        continue
                    offset, count, wire, start, length = parsed
                    if broadcast and wire == dtype and prior is not None and offset + count <= self.total:
                        try:  # an update to add to this worker's values of base_version
                            update = compression.decode(memoryview(raw)[start : start + length], count, COMPRESSED[wire])
                        except ValueError as exc:
                            raise ServiceError(
                                grpc.StatusCode.DATA_LOSS, "", f"shard {i} sent a malformed chunk at {offset}: {exc}"
                            ) from None
                        np.add(prior[offset : offset + count], update, out=flat[offset : offset + count])
                        got += count
                        continue
                    if wire not in ITEMSIZE or length != count * ITEMSIZE[wire] or offset + count > self.total:
                        raise ServiceError(grpc.StatusCode.DATA_LOSS, "", f"shard {i} sent a malformed chunk at {offset}")
                    decode_into(memoryview(raw)[start : start + length], wire, flat, offset)
                    got += count
                expected = sum(n for _, n in self._ranges[i])
                if got != expected:
                    raise ServiceError(grpc.StatusCode.DATA_LOSS, "", f"shard {i} sent {got} of {expected} elements")
                if on_shard is not None:
                    on_shard(i)
                return version, report

            return await call_with_retry(attempt, self.retry, f"PullParameters[{i}]", self._shard_gone)

        shards = range(len(self._channels))
        try:
            results = await asyncio.gather(*(one(i, min_version, base[0] if base is not None else None) for i in shards))
            for _ in range(BROADCAST_ALIGN_TRIES):
                # a compressed pull must leave every shard's values at one version (the next one's base):
                # bring the shards that served an older one up to the newest, from what they served
                newest = max(v for v, _ in results)
                behind = [i for i in shards if results[i][0] < newest]
                if not broadcast or not behind:
                    break
                prior = flat.copy()
                again = await asyncio.gather(*(one(i, newest, results[i][0]) for i in behind))
                results = [again[behind.index(i)] if i in behind else results[i] for i in shards]
        except ServiceError as exc:
            await self._recovered(exc)
            raise
        if broadcast and len({v for v, _ in results}) > 1:
            raise ServiceError(
                grpc.StatusCode.ABORTED, "", f"the shards kept serving different versions {[v for v, _ in results]}: pull again"
            )
        version = min(v for v, _ in results)
        report = next((r for _, r in results if r is not None), None)
        if point == TRAIN:
            self.frozen = frozenset(frozen)
        return version, flat, report
