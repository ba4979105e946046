"""RemoteOptimizer: use the service in an ordinary PyTorch loop in place of torch.optim.

    opt = RemoteOptimizer(model.named_parameters(), "127.0.0.1:50051", job_id="run1",
                          optimizer="adamw", hyperparameters={"lr": 3e-4},
                          num_workers=2, num_shards=3)
    for batch in data:
        opt.zero_grad()
        loss = loss_fn(model(batch.x), batch.y, reduction="sum")   # the SUMMED loss
        loss.backward()
        opt.step(loss_terms=batch.num_tokens)   # push, wait for the step, pull new values

With a mean loss, pass ``loss_is_mean=True``: the gradient is multiplied by
``loss_terms`` before it is sent, so unequal batches across workers still
average exactly over all terms.

As with schedulefree's optimizers, ``opt.eval()`` loads the evaluation point
into the model (Schedule-Free's x; the same values for every other rule) and
``opt.train()`` the training point back; ``step()`` needs train mode.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client.aio import make_spec
from paramserver_client.client import JobClient, Worker
from paramserver_client.codec import EVAL, TRAIN, dtype_from_name
from paramserver_client.errors import JobRolledBack

log = logging.getLogger(__name__)


class RemoteOptimizer:
    """An optimizer whose state and update live in the paramserver service.

    Args:
        named_parameters: the model's ``named_parameters()`` (order defines the
            flat layout; every worker must pass the same model).
        address: the front door, "host:port".
        job_id: the job to create or join.
        **settings: the job's settings, as :func:`paramserver_client.aio.make_spec` takes them
            (optimizer, hyperparameters, schedule, schedule_parameters, num_workers, num_shards,
            max_grad_norm, param_groups, spike_window, snapshot_every_steps, ...; an unknown one
            is a TypeError). Used when the job is created here (if it exists, they are checked
            for equality by the service).
        wire_dtype: "fp32" (default), "bf16" or "fp16" for gradients and
            parameters on the wire; the service keeps fp32 master values.
        worker_name: this worker's stable name (default host:pid).
        create: create the job if it does not exist (default True).
        skip_frozen: before each step, turn ``requires_grad`` off for the parameters the next
            update does not train (LISA's frozen layers), so backward skips them (default True;
            ``close()`` turns it back on).
        on_rollback: called with the version to resume from when the job lost a shard and was
            restored to an earlier version (the model already holds that version's parameters;
            rewind the data loader to that step). Without it, a warning is logged and training
            goes on from the restored parameters. ``rolled_back_to`` keeps the latest such version.
    """

    def __init__(
        self,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        address: str,
        job_id: str,
        *,
        wire_dtype: str = "fp32",
        worker_name: str | None = None,
        create: bool = True,
        timeout: float = 60.0,
        pull_timeout: float = 600.0,
        skip_frozen: bool = True,
        on_rollback: Callable[[int], None] | None = None,
        **settings: Any,
    ) -> None:
        self.on_rollback = on_rollback
        self.rolled_back_to: int | None = None
        self.named = [(n, p) for n, p in named_parameters if p.requires_grad]
        if not self.named:
            raise ValueError("no trainable parameters")
        self.params = [p for _, p in self.named]
        self.wire_dtype = dtype_from_name(wire_dtype)
        spec = make_spec([(n, tuple(p.shape)) for n, p in self.named], **settings)  # checks the settings
        if create:
            with JobClient(address, timeout=timeout) as jobs:
                jobs.create_job(spec, job_id=job_id)
        name = worker_name if worker_name is not None else f"{socket.gethostname()}:{os.getpid()}"
        self.worker = Worker(address, job_id, name, timeout=timeout, pull_timeout=pull_timeout)
        layout = {p.name: (int(p.offset), int(p.numel)) for p in self.worker.job.layout}
        index = {p.name: i for i, p in enumerate(self.worker.job.layout)}
        self._slices: list[tuple[int, int]] = []
        for n, p in self.named:
            if n not in layout or layout[n][1] != p.numel():
                raise ValueError(f"parameter {n!r} {tuple(p.shape)} does not match job {job_id!r}'s layout")
            self._slices.append(layout[n])
        self._indices = [index[n] for n, _ in self.named]
        self.skip_frozen = skip_frozen
        self.total = int(self.worker.job.total_elements)
        self._flat = np.empty(self.total, dtype=np.float32)
        if self.worker.upload_parameters:
            self.worker.upload(self._gather(lambda p: p.detach()))
        self.version = int(self.worker.job.version)
        self.version, _, self.last_report = self.worker.pull(self.version, self._flat, dtype=self.wire_dtype)
        self._scatter()
        self.training = True

    @property
    def worker_id(self) -> int:
        """This worker's id in the job."""
        return self.worker.worker_id

    def _gather(self, get: Any) -> np.ndarray:
        out = np.zeros(self.total, dtype=np.float32)
        for (off, n), p in zip(self._slices, self.params, strict=True):
            t = get(p)
            if t is not None:
                out[off : off + n] = t.detach().reshape(-1).to("cpu", torch.float32).numpy()
        return out

    def _scatter(self) -> None:
        flat = torch.from_numpy(self._flat)
        with torch.no_grad():
            for (off, n), p in zip(self._slices, self.params, strict=True):
                p.copy_(flat[off : off + n].view(p.shape))
        if self.skip_frozen:
            frozen = self.worker.frozen
            for i, p in zip(self._indices, self.params, strict=True):
                p.requires_grad_(i not in frozen)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, as torch.optim.Optimizer.zero_grad."""
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self, loss_terms: int = 1, *, loss_is_mean: bool = False) -> spb.StepReport | None:
        """Push the gradients for the current version, wait for the step, pull the new parameters.

        Args:
            loss_terms: the number of tokens/samples behind this worker's loss.
            loss_is_mean: True if the loss was a mean over loss_terms (the
                gradient is scaled by loss_terms before it is sent).

        Returns the step's report (outcome, skip reason, grad norm, lr).
        """
        if not self.training:
            raise RuntimeError("step() in eval mode: call train() first (the model holds the evaluation point)")
        grad = self._gather(lambda p: p.grad)
        if loss_is_mean:
            grad *= np.float32(loss_terms)
        try:
            self.worker.push(self.version, grad, loss_terms, dtype=self.wire_dtype)
            self.version, _, self.last_report = self.worker.pull(self.version + 1, self._flat, dtype=self.wire_dtype)
        except JobRolledBack as rolled:
            self._roll_back(rolled.resume_version)
            return None
        self._scatter()
        return self.last_report

    def _roll_back(self, version: int) -> None:
        """Load the restored version into the model and tell the training loop."""
        self.version, _, self.last_report = self.worker.pull(version, self._flat, dtype=self.wire_dtype)
        self._scatter()
        self.rolled_back_to = self.version
        if self.on_rollback is not None:
            self.on_rollback(self.version)
        else:
            log.warning("the job lost a shard and was restored to version %d: training goes on from there", self.version)

    def eval(self) -> None:
        """Load the evaluation point of the current version into the model (schedulefree's eval())."""
        self.worker.pull(self.version, self._flat, dtype=self.wire_dtype, point=EVAL)
        self._scatter()
        self.training = False

    def train(self) -> None:
        """Load the training point of the current version back into the model (schedulefree's train())."""
        self.worker.pull(self.version, self._flat, dtype=self.wire_dtype, point=TRAIN)
        self._scatter()
        self.training = True

    def close(self, leave: bool = True) -> None:
        """Leave the job (unless leave=False) and close connections."""
        for p in self.params:
            p.requires_grad_(True)
        try:
            if leave:
                self.worker.leave()
        finally:
            self.worker.close()
