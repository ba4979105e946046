"""The control-plane gRPC servicer (JobService): validate, call the cluster, encode."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from grpc import aio

from paramserver.access import MAX_PREVIOUS_VALID_S, check_room, hash_token, new_worker_token
from paramserver.cluster import Cluster
from paramserver.convert import job_state_pb, job_to_pb, restore_overrides, snapshot_to_pb, spec_to_config
from paramserver.errors import ConfigError, ParamServerError, Reason
from paramserver.gate import CALLER, FrontDoorGate
from paramserver.rpc import Observer, streaming, unary
from paramserver.snapshot_store import SnapshotStore
from paramserver.state_export import PIECE_ELEMENTS, open_snapshot, optimizer_state
from paramserver.v1 import job_service_pb2 as pb
from paramserver.v1 import job_service_pb2_grpc as pb_grpc

Ctx = aio.ServicerContext[Any, Any]


def _need(value: str, field: str) -> str:
    if not value:
        raise ConfigError(field, "must not be empty")
    return value


#: Worker tokens the front door remembers by request id, so that a retried CreateJob or
#: RotateJobToken gets the token its first attempt issued.
ISSUED_KEPT = 4096


class JobServicer(pb_grpc.JobServiceServicer):
    """JobService over a Cluster; `store` is the snapshot store ReadOptimizerState reads; `gate`
    (None: no credentials) has already checked each call (see gate.FrontDoorGate)."""

    def __init__(self, cluster: Cluster, store: SnapshotStore, gate: FrontDoorGate | None = None) -> None:
        self.cluster = cluster
        self.store = store
        self.gate = gate
        self.observe: Observer | None = None
        """Told of every call (method, status code, seconds): the front door's metrics."""
        self._issued: OrderedDict[tuple[str, str, str], str] = OrderedDict()

    def _token_for(self, request_id: str, job_id: str) -> str:
        """The worker token issued for (caller's tenant, request_id, job_id): the first one on a retry."""
        key = (CALLER.get().tenant, request_id, job_id)
        token = self._issued.get(key)
        if token is None:
            token = self._issued[key] = new_worker_token(job_id)
            while len(self._issued) > ISSUED_KEPT:
                self._issued.popitem(last=False)
        return token

    async def _issue(self, request_id: str, job: pb.Job) -> pb.Job:
        """With credentials: the job's answer with a worker token, its tenant, accepted on every shard."""
        if self.gate is None or not self.gate.secured:
            return job
        token = self._token_for(request_id, job.job_id)
        await self.cluster.add_token(job.job_id, hash_token(token))
        self.gate.forget(job.job_id)
        job.worker_token = token
        return job

    def _create_args(self) -> dict[str, Any]:
        caller = CALLER.get()
        if self.gate is None or self.gate.auth is None:
            return {}
        tenant = self.gate.auth.tenant(caller.tenant)
        return {"tenant": caller.tenant, "quota": tenant.quota if tenant is not None else None, "secured": True}

    @streaming
    async def ReadOptimizerState(self, request: pb.ReadOptimizerStateRequest, context: Ctx) -> AsyncIterator[pb.OptimizerStateChunk]:
        """A snapshot's optimizer state per parameter (a new snapshot when none is named)."""
        job_id = _need(request.job_id, "job_id")
        snapshot = request.snapshot
        if not snapshot:
            snapshot = str((await self.cluster.create_snapshot(_need(request.request_id, "request_id"), job_id))["path"])
        path, manifest, reader = await asyncio.to_thread(open_snapshot, self.store, job_id, snapshot)
        try:
            tensors = await asyncio.to_thread(optimizer_state, reader, manifest)
            yield pb.OptimizerStateChunk(header=pb.OptimizerStateHeader(version=manifest.version, snapshot=path, tensors=len(tensors)))
            for t in tensors:  # one tensor in memory at a time
                flat = np.ascontiguousarray(await asyncio.to_thread(t.read), dtype="<f4").reshape(-1)
                for offset in range(0, max(flat.size, 1), PIECE_ELEMENTS):
                    piece = flat[offset : offset + PIECE_ELEMENTS].tobytes()
                    tensor = pb.OptimizerStateTensor(parameter=t.parameter, key=t.key, shape=list(t.shape), offset=offset, data=piece)
                    yield pb.OptimizerStateChunk(tensor=tensor)
        finally:
            reader.close()

    @unary
    async def CreateJob(self, request: pb.CreateJobRequest, context: Ctx) -> pb.Job:
        """Create a job (idempotent per request_id; an existing one only with resume), or restore one from a snapshot."""
        _need(request.request_id, "request_id")
        access = self._create_args()
        if request.restore_from:
            overrides = restore_overrides(request.spec)  # 0 = keep the snapshot's value
            view = await self.cluster.create_job(request.request_id, request.job_id, None, request.restore_from, overrides, **access)
        else:
            if not request.HasField("spec"):
                raise ConfigError("spec", "required")
            config = spec_to_config(request.spec)
            view = await self.cluster.create_job(request.request_id, request.job_id, config, resume=request.resume, **access)
        job = job_to_pb(view)
        job.tenant = view.tenant
        return await self._issue(request.request_id, job)

    @unary
    async def CreateSnapshot(self, request: pb.CreateSnapshotRequest, context: Ctx) -> pb.Snapshot:
        """A consistent, durable snapshot of a job."""
        _need(request.request_id, "request_id")
        return snapshot_to_pb(await self.cluster.create_snapshot(request.request_id, _need(request.job_id, "job_id")))

    @unary
    async def ListSnapshots(self, request: pb.ListSnapshotsRequest, context: Ctx) -> pb.ListSnapshotsResponse:
        """A job's committed snapshots."""
        snaps = await self.cluster.list_snapshots(_need(request.job_id, "job_id"))
        return pb.ListSnapshotsResponse(snapshots=[snapshot_to_pb(s) for s in snaps])

    @unary
    async def RollbackJob(self, request: pb.RollbackJobRequest, context: Ctx) -> pb.Job:
        """Restore a running job in place to a snapshot (workers get JOB_ROLLED_BACK)."""
        _need(request.request_id, "request_id")
        job_id, snapshot = _need(request.job_id, "job_id"), _need(request.snapshot, "snapshot")
        expected = request.expected_generation if request.HasField("expected_generation") else None
        return job_to_pb(await self.cluster.rollback_job(request.request_id, job_id, snapshot, expected))

    @unary
    async def GetJob(self, request: pb.GetJobRequest, context: Ctx) -> pb.Job:
        """A job and its shard map."""
        return job_to_pb(await self.cluster.get_job(_need(request.job_id, "job_id")))

    @unary
    async def ListJobs(self, request: pb.ListJobsRequest, context: Ctx) -> pb.ListJobsResponse:
        """Every job (with credentials: the caller's tenant's)."""
        caller = CALLER.get()
        views = [v for v in await self.cluster.list_jobs() if caller.kind == "open" or v.tenant == caller.tenant]
        return pb.ListJobsResponse(jobs=[job_to_pb(v) for v in views])

    @unary
    async def JoinJob(self, request: pb.JoinJobRequest, context: Ctx) -> pb.JoinJobResponse:
        """Join as a worker."""
        _need(request.request_id, "request_id")
        if CALLER.get().kind == "admin":  # it will get a worker token: refuse now if none fits
            check_room((await self.cluster.access(_need(request.job_id, "job_id")))[1])
        wid, view, upload, lease, timeout = await self.cluster.join_job(
            request.request_id, _need(request.job_id, "job_id"), request.worker_name
        )
        job = job_to_pb(view)
        if CALLER.get().kind == "admin":  # an admin joining gets a worker token for the shards
            job = await self._issue(request.request_id, job)
        return pb.JoinJobResponse(worker_id=wid, job=job, upload_parameters=upload, lease=lease, lease_timeout_s=timeout)

    @unary
    async def LeaveJob(self, request: pb.LeaveJobRequest, context: Ctx) -> pb.LeaveJobResponse:
        """Leave a job."""
        _need(request.request_id, "request_id")
        await self.cluster.leave_job(request.request_id, _need(request.job_id, "job_id"), request.worker_id, request.lease)
        return pb.LeaveJobResponse()

    @unary
    async def Heartbeat(self, request: pb.HeartbeatRequest, context: Ctx) -> pb.HeartbeatResponse:
        """Renew a worker's lease."""
        if not request.lease:
            raise ConfigError("lease", "required: the lease JoinJob returned")
        version, state, generation = await self.cluster.heartbeat(_need(request.job_id, "job_id"), request.worker_id, request.lease)
        return pb.HeartbeatResponse(version=version, state=job_state_pb(state, True), generation=generation)

    @unary
    async def DeleteJob(self, request: pb.DeleteJobRequest, context: Ctx) -> pb.DeleteJobResponse:
        """Delete a job and stop its shards."""
        _need(request.request_id, "request_id")
        await self.cluster.delete_job(request.request_id, _need(request.job_id, "job_id"))
        if self.gate is not None:
            self.gate.forget(request.job_id)
        return pb.DeleteJobResponse()

    @unary
    async def RotateJobToken(self, request: pb.RotateJobTokenRequest, context: Ctx) -> pb.RotateJobTokenResponse:
        """A new worker token for a job; the previous ones expire after previous_valid_s."""
        _need(request.request_id, "request_id")
        job_id = _need(request.job_id, "job_id")
        valid = request.previous_valid_s
        if not math.isfinite(valid) or not 0 <= valid <= MAX_PREVIOUS_VALID_S:
            raise ConfigError("previous_valid_s", f"must be a number of seconds within [0, {MAX_PREVIOUS_VALID_S:.0f}], got {valid}")
        if self.gate is None or not self.gate.secured:
            raise ParamServerError.precondition(
                Reason.CREDENTIALS_DISABLED, "the service runs without credentials: there are no worker tokens to rotate"
            )
        token = self._token_for(request.request_id, job_id)
        until = await self.cluster.rotate_token(request.request_id, job_id, hash_token(token), valid)
        self.gate.forget(job_id)
        return pb.RotateJobTokenResponse(worker_token=token, previous_expire_at=until)
