"""The blocking client: the same calls as paramserver_client.aio, for ordinary code.

Each client runs a private asyncio loop on a daemon thread and drives the aio
client on it (aio clients against the aio servers are the fastest pairing
measured here), so a blocking caller still pushes to and pulls from all
shards concurrently.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client.aio import AsyncJobClient, AsyncWorker, Compressed, OptimizerState, ParamLike, StepResult
from paramserver_client.codec import FLOAT32, TRAIN, F32Array
from paramserver_client.compression import ErrorFeedback

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="paramserver-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


class JobClient:
    """Blocking control-plane client; see AsyncJobClient for the methods."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        self._loop = _Loop()
        self._c: AsyncJobClient = self._loop.run(_make(AsyncJobClient, address, **kwargs))

    def __enter__(self) -> JobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and the loop."""
        self._loop.run(self._c.close())
        self._loop.close()

    def create_job(
        self, parameters: Sequence[ParamLike] | jpb.JobSpec, *, job_id: str = "", resume: bool = False, **settings: Any
    ) -> jpb.Job:
        """Create a job (an existing one only with `resume`); see AsyncJobClient.create_job."""
        return self._loop.run(self._c.create_job(parameters, job_id=job_id, resume=resume, **settings))

    def restore_job(self, restore_from: str, *, job_id: str = "", **overrides: Any) -> jpb.Job:
        """Create a job from a snapshot; see AsyncJobClient.restore_job."""
        return self._loop.run(self._c.restore_job(restore_from, job_id=job_id, **overrides))

    def rollback_job(self, job_id: str, snapshot: str, *, expected_generation: int | None = None) -> jpb.Job:
        """Restore a running job in place to a snapshot; see AsyncJobClient.rollback_job."""
        return self._loop.run(self._c.rollback_job(job_id, snapshot, expected_generation=expected_generation))

    def read_optimizer_state(self, job_id: str, snapshot: str = "") -> OptimizerState:
        """A job's full optimizer state per parameter; see AsyncJobClient.read_optimizer_state."""
        return self._loop.run(self._c.read_optimizer_state(job_id, snapshot))

    def create_snapshot(self, job_id: str) -> jpb.Snapshot:
        """Take a consistent snapshot of a job; returns once it is durable."""
        return self._loop.run(self._c.create_snapshot(job_id))

    def list_snapshots(self, job_id: str) -> list[jpb.Snapshot]:
        """A job's committed snapshots, oldest first."""
        return self._loop.run(self._c.list_snapshots(job_id))

    def get_job(self, job_id: str) -> jpb.Job:
        """A job with its shard map."""
        return self._loop.run(self._c.get_job(job_id))

    def list_jobs(self) -> list[jpb.Job]:
        """Every job."""
        return self._loop.run(self._c.list_jobs())

    def join_job(self, job_id: str, worker_name: str = "") -> jpb.JoinJobResponse:
        """Join a job (prefer Worker.join, which also connects to the shards)."""
        return self._loop.run(self._c.join_job(job_id, worker_name))

    def leave_job(self, job_id: str, worker_id: int, lease: int = 0) -> None:
        """Leave a job."""
        self._loop.run(self._c.leave_job(job_id, worker_id, lease))

    def heartbeat(self, job_id: str, worker_id: int, lease: int) -> jpb.HeartbeatResponse:
        """Renew a worker's lease (Worker does it on its own)."""
        return self._loop.run(self._c.heartbeat(job_id, worker_id, lease))

    def delete_job(self, job_id: str) -> None:
        """Delete a job and its shards."""
        self._loop.run(self._c.delete_job(job_id))

    def rotate_job_token(self, job_id: str, previous_valid_s: float = 300.0) -> jpb.RotateJobTokenResponse:
        """A new worker token for a job (admin); see AsyncJobClient.rotate_job_token."""
        return self._loop.run(self._c.rotate_job_token(job_id, previous_valid_s))


class Worker:
    """Blocking data-plane client of one worker; see AsyncWorker for the methods."""

    def __init__(self, address: str, job_id: str, worker_name: str = "", **kwargs: Any) -> None:
        self.address = address
        self._loop = _Loop()
        self._w: AsyncWorker = self._loop.run(AsyncWorker.join(address, job_id, worker_name, **kwargs))

    @property
    def worker_id(self) -> int:
        """This worker's id."""
        return self._w.worker_id

    @property
    def job(self) -> jpb.Job:
        """The job as joined (shard map, layout)."""
        return self._w.job

    @property
    def frozen(self) -> frozenset[int]:
        """Parameters the next update does not train (see AsyncWorker.frozen)."""
        return self._w.frozen

    @property
    def upload_parameters(self) -> bool:
        """True when this worker was chosen to upload the initial parameters."""
        return self._w.upload_parameters

    def upload(self, params: F32Array) -> None:
        """Upload the initial flat fp32 parameters."""
        self._loop.run(self._w.upload(params))

    def push(
        self,
        step: int,
        grad: F32Array,
        loss_terms: int,
        *,
        dtype: int = FLOAT32,
        request_id: str | None = None,
        lrs: Sequence[float] = (),
        feedback: ErrorFeedback | None = None,
        topk_ratio: float | None = None,
    ) -> StepResult:
        """Push the gradient of the summed loss over loss_terms terms for step, in wire `dtype`
        (compressed ones with optional error `feedback`; see AsyncWorker.push)."""
        return self._loop.run(
            self._w.push(step, grad, loss_terms, dtype=dtype, request_id=request_id, lrs=lrs, feedback=feedback, topk_ratio=topk_ratio)
        )

    def compress(
        self, values: F32Array, dtype: int, *, feedback: ErrorFeedback | None = None, topk_ratio: float | None = None
    ) -> Compressed:
        """Encode a flat gradient in a compressed wire dtype, chunk by chunk (see AsyncWorker.compress)."""
        return self._w.compress(values, dtype, feedback=feedback, topk_ratio=topk_ratio)

    def pieces(self, dtype: int) -> list[tuple[int, int]]:
        """The chunks a push in a compressed dtype sends (see AsyncWorker.pieces)."""
        return self._w.pieces(dtype)

    def push_compressed(self, step: int, data: Compressed, loss_terms: int, *, request_id: str | None = None) -> StepResult:
        """Push a gradient encoded by :meth:`compress` (see AsyncWorker.push_compressed)."""
        return self._loop.run(self._w.push_compressed(step, data, loss_terms, request_id=request_id))

    @property
    def bytes_pushed(self) -> int:
        """Bytes of chunk messages sent in pushes (see AsyncWorker.bytes_pushed)."""
        return self._w.bytes_pushed

    @property
    def bytes_pulled(self) -> int:
        """Bytes of messages received in pulls (see AsyncWorker.bytes_pulled)."""
        return self._w.bytes_pulled

    def pull(
        self,
        min_version: int,
        out: F32Array | None = None,
        *,
        dtype: int = FLOAT32,
        point: int = TRAIN,
        on_shard: Callable[[int], None] | None = None,
        base: tuple[int, F32Array] | None = None,
    ) -> tuple[int, F32Array, spb.StepReport | None]:
        """(version, flat fp32 params, last step report) once min_version is published
        (``point=EVAL``: the evaluation point, e.g. Schedule-Free's x; `on_shard(i)`: called on
        the client's thread as soon as shard i's values are in `out`; `base`: for a compressed
        `dtype`, see AsyncWorker.pull)."""
        return self._loop.run(self._w.pull(min_version, out, dtype=dtype, point=point, on_shard=on_shard, base=base))

    @property
    def shard_ranges(self) -> list[list[tuple[int, int]]]:
        """Each shard's (start, length) ranges of the flat space."""
        return self._w.shard_ranges

    def start_push_shard(
        self, shard: int, step: int, wire: np.ndarray, loss_terms: int, *, dtype: int, request_id: str, lrs: Sequence[float] = ()
    ) -> concurrent.futures.Future[spb.PushGradientsResponse]:
        """Start pushing one shard's part of a gradient without waiting (see AsyncWorker.push_shard;
        `wire` must stay unchanged until :meth:`settle_push` returns)."""
        return asyncio.run_coroutine_threadsafe(
            self._w.push_shard(shard, step, wire, loss_terms, dtype=dtype, request_id=request_id, lrs=lrs), self._loop.loop
        )

    def settle_push(self, pushes: Sequence[concurrent.futures.Future[spb.PushGradientsResponse]]) -> StepResult:
        """Wait for every shard's part of one push and combine them (see AsyncWorker.settle_push)."""

        async def settle() -> StepResult:
            return await self._w.settle_push([asyncio.wrap_future(f) for f in pushes])

        return self._loop.run(settle())

    @property
    def lease(self) -> int:
        """This worker's lease (renewed in the background)."""
        return self._w.lease

    def leave(self) -> None:
        """Leave the job (frees the worker id; what it pushed for the open step is discarded)."""
        self._loop.run(self._w.leave())

    def close(self) -> None:
        """Close the shard channels and the loop."""
        self._loop.run(self._w.close())
        self._loop.close()

    def set_token(self, token: str) -> None:
        """Use another worker token from the next call on; see AsyncWorker.set_token."""
        self._loop.run(self._w.set_token(token))

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make(cls: type[T], *args: Any, **kwargs: Any) -> T:
    return cls(*args, **kwargs)  # channels must be created on the loop that uses them
