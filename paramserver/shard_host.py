"""The shard actor's class (plain Python; cluster.py is the only module that makes it a Ray actor).

A ShardHost owns one shard of one job: its state, its step runtime and its
own data-plane gRPC server on a free port.
"""

from __future__ import annotations

import ctypes
import logging
import socket
from dataclasses import dataclass

import numpy as np
import torch
from grpc import aio

from paramserver.jobconfig import JobConfig
from paramserver.placement import Span
from paramserver.rpc import GRPC_OPTIONS
from paramserver.shard import ShardState
from paramserver.shard_runtime import ShardRuntime, StepReducer
from paramserver.shard_service import ShardServicer, add_shard_service

log = logging.getLogger(__name__)

#: glibc mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep 1 MiB message buffers on the heap instead of fresh mmaps (glibc only).

    Every chunk of a stream is a ~1 MiB allocation; with glibc's defaults each one is a new
    mmap that is page-faulted in and unmapped again, which costs the shard a large share of
    its stream throughput (bench/README.md). Returns False where mallopt is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 64 << 20) == 1
        return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20) == 1)
    except (OSError, AttributeError):
        return False


@dataclass(frozen=True)
class ShardStatus:
    """What the coordinator learns from a shard."""

    index: int
    address: str
    version: int
    initialized: bool
    applied: int
    device: str


class ShardHost:
    """One shard of one job, with its own gRPC port."""

    def __init__(
        self,
        job_id: str,
        config: JobConfig,
        index: int,
        spans: list[Span],
        reducer: StepReducer,
        bind_host: str = "127.0.0.1",
    ) -> None:
        self.job_id = job_id
        self.config = config
        self.index = index
        self.spans = spans
        self.reducer = reducer
        self.bind_host = bind_host
        self.address = ""
        self._server: aio.Server | None = None
        self.runtime: ShardRuntime | None = None

    def device(self) -> torch.device:
        """CUDA when this actor was given a GPU, else CPU."""
        if self.config.shard_num_gpus > 0 and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def advertise_host(self) -> str:
        """The host part of the address workers use to reach this shard."""
        if self.bind_host in ("0.0.0.0", "::", "[::]"):
            return socket.gethostbyname(socket.gethostname())
        return self.bind_host

    async def start(self) -> str:
        """Build the state, start the data-plane server; return its "host:port"."""
        tune_malloc()
        state = ShardState(self.config, self.index, self.spans, self.device())
        self.runtime = ShardRuntime(state, self.reducer)
        server = aio.server(options=GRPC_OPTIONS)
        add_shard_service(ShardServicer(self.job_id, self.runtime), server)
        host = self.bind_host if ":" not in self.bind_host or self.bind_host.startswith("[") else f"[{self.bind_host}]"
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
        self._server = server
        self.address = f"{self.advertise_host()}:{port}"
        log.info("job %s shard %d serving %s on %s", self.job_id, self.index, self.address, state.device)
        return self.address

    async def status(self) -> ShardStatus:
        """Version and initialisation state."""
        assert self.runtime is not None
        s = self.runtime.state
        return ShardStatus(self.index, self.address, s.version, s.initialized, s.applied, str(s.device))

    async def tensors(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and optimizer state (inspection and tests)."""
        assert self.runtime is not None
        state = self.runtime.state
        if not state.initialized:
            return {}
        with state.lock:
            return {k: v.numpy() for k, v in state.snapshot_tensors().items()}

    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving; waiters get UNAVAILABLE."""
        if self.runtime is not None:
            await self.runtime.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
