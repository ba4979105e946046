"""RemoteOptimizer: a ``torch.optim.Optimizer`` whose state and update live in the service.

    opt = RemoteOptimizer(model, "127.0.0.1:50051", job_id="run1",
                          optimizer="adamw", hyperparameters={"lr": 3e-4},
                          num_workers=2, num_shards=3)
    for batch in data:
        opt.zero_grad()
        loss = loss_fn(model(batch.x), batch.y, reduction="sum")   # the SUMMED loss
        loss.backward()
        opt.step(loss_terms=batch.num_tokens)   # push, wait for the step, pull new values

With a mean loss, create it with ``loss="mean"``: the gradient is multiplied by ``loss_terms``
before it is sent, so unequal batches across workers still average exactly over all terms (and
without ``loss_terms`` every worker's mean counts once). With the default ``loss="sum"``,
``loss_terms`` is required.

It is a real ``torch.optim.Optimizer``: ``param_groups`` mirror the job's parameter groups (name,
rule, hyperparameters, lr), ``step(closure)`` follows torch's contract, step hooks, torch lr
schedulers (the lrs in ``param_groups`` then drive the service's lr, see :meth:`step`),
``torch.amp.GradScaler`` and ``state_dict``/``load_state_dict`` work.

As with schedulefree's optimizers, ``opt.eval()`` loads the evaluation point into the model
(Schedule-Free's x; the same values for every other rule) and ``opt.train()`` the training point
back; ``step()`` needs train mode.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import numpy as np
import torch
from google.protobuf.json_format import MessageToDict

from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client.aio import make_spec, new_request_id
from paramserver_client.client import JobClient, Worker
from paramserver_client.codec import EVAL, FLOAT32, TRAIN, dtype_from_name, to_wire
from paramserver_client.credentials import Credentials
from paramserver_client.errors import JobRolledBack, ServiceError
from paramserver_client.reasons import Reason

log = logging.getLogger(__name__)

#: The key of ``state_dict()`` that holds the service reference.
STATE_KEY = "paramserver"
#: Group options a scheduler may try to move that the service takes from the job only.
FIXED_OPTIONS = ("betas", "momentum", "weight_decay")


class RemoteOptimizer(torch.optim.Optimizer):
    """An optimizer whose state and update live in the paramserver service.

    Args:
        params: the model, or its ``named_parameters()`` (their order defines the flat layout;
            every worker must pass the same model). Parameters without ``requires_grad`` are left out.
        address: the front door, "host:port".
        job_id: the job to create or join.
        loss: "sum" (default: ``step`` needs ``loss_terms``) or "mean" (the loss is a mean over
            ``loss_terms``; see the module docstring).
        resume: continue a job that already exists under `job_id` (it must have the same
            description). Without it, a job that exists and has made progress is an error, so a
            rerun never joins an old run by accident; one still at version 0 is joined (another
            worker of this run created it).
        wire_dtype: "fp32" (default), "bf16" or "fp16" for gradients and parameters on the
            wire; the service keeps fp32 master values.
        worker_name: this worker's stable name (default host:pid).
        create: create the job if it does not exist (default True).
        skip_frozen: before each step, turn ``requires_grad`` off for the parameters the next
            update does not train (LISA's frozen layers), so backward skips them (default True;
            ``close()`` turns it back on).
        on_rollback: called with the version to resume from when the job lost a shard and was
            restored to an earlier version (the model already holds that version's parameters;
            rewind the data loader to that step). Without it, a warning is logged and training
            goes on from the restored parameters. ``rolled_back_to`` keeps the latest such version.
        snapshot_on_save: ``state_dict()`` takes a service snapshot at the current version and
            names it in the state dict, so that loading that state dict later rolls the job back
            to it (resuming from a checkpoint older than the job). Default False.
        full_state: ``state_dict()`` also holds the full optimizer state, read from the service
            (``ReadOptimizerState``, from the snapshot taken at that version) in torch's layout
            (``state[i] = {"step", "exp_avg", ...}``), so the checkpoint loads into the torch
            optimizer of the same rule. Default False (the state stays in the service).
        token: the admin token (it creates the job; the worker then uses the job's worker token
            JoinJob hands back) or a worker token (with ``create=False``); default
            ``$PARAMSERVER_TOKEN``. ``credentials``: a token and TLS files together (see
            :class:`paramserver_client.Credentials`).
        **settings: the job's settings, as :func:`paramserver_client.aio.make_spec` takes them
            (optimizer, hyperparameters, schedule, schedule_parameters, num_workers, num_shards,
            max_grad_norm, param_groups, spike_window, snapshot_every_steps, ...; an unknown one
            is a TypeError). Used when the job is created here.

    Attributes:
        version: the version the model holds (the next step pushes for it).
        last_report: the last step's report (outcome, skip reason, grad norm, clip, lr).
        loss_terms: when set (an integration such as :mod:`paramserver_client.hf` sets it), the
            loss terms of the next ``step()`` called without ``loss_terms``; cleared by it.
    """

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale / found_inf; see step()

    def __init__(
        self,
        params: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
        address: str,
        job_id: str,
        *,
        loss: Literal["sum", "mean"] = "sum",
        resume: bool = False,
        wire_dtype: str = "fp32",
        worker_name: str | None = None,
        create: bool = True,
        timeout: float = 60.0,
        pull_timeout: float = 600.0,
        skip_frozen: bool = True,
        on_rollback: Callable[[int], None] | None = None,
        snapshot_on_save: bool = False,
        full_state: bool = False,
        token: str | None = None,
        credentials: Credentials | None = None,
        **settings: Any,
    ) -> None:
        if loss not in ("sum", "mean"):
            raise ValueError(f"loss must be 'sum' or 'mean', not {loss!r}")
        named_iter = params.named_parameters() if isinstance(params, torch.nn.Module) else params
        self.named = [(n, p) for n, p in named_iter if p.requires_grad]
        if not self.named:
            raise ValueError("no trainable parameters")
        self.loss = loss
        self.job_id = job_id
        self._address, self._timeout = address, timeout
        self._credentials = Credentials.resolve(credentials, token=token)
        self.snapshot_on_save = snapshot_on_save
        self.full_state = full_state
        self._snapshot: tuple[int, str] = (-1, "")
        self.on_rollback = on_rollback
        self.rolled_back_to: int | None = None
        self.loss_terms: int | None = None
        self.params = [p for _, p in self.named]
        self.wire_dtype = dtype_from_name(wire_dtype)
        spec = make_spec([(n, tuple(p.shape)) for n, p in self.named], **settings)  # checks the settings
        if create:
            self._create(address, job_id, spec, resume, timeout, self._credentials)
        name = worker_name if worker_name is not None else f"{socket.gethostname()}:{os.getpid()}"
        self.worker = Worker(address, job_id, name, timeout=timeout, pull_timeout=pull_timeout, credentials=self._credentials)
        job = self.worker.job
        if not create and not resume and job.version > 0:
            self.worker.close()
            raise ValueError(f"job {job_id!r} is at version {job.version}: pass resume=True to continue it")
        layout = {p.name: p for p in job.layout}
        self._slices: list[tuple[int, int]] = []
        by_group: dict[int, list[torch.nn.Parameter]] = {}
        for n, p in self.named:
            entry = layout.get(n)
            if entry is None or int(entry.numel) != p.numel():
                self.worker.close()
                raise ValueError(f"parameter {n!r} {tuple(p.shape)} does not match job {job_id!r}'s layout")
            self._slices.append((int(entry.offset), int(entry.numel)))
            by_group.setdefault(int(entry.group), []).append(p)
        index = {p.name: i for i, p in enumerate(job.layout)}
        self._indices = [index[n] for n, _ in self.named]
        self.groups_info = list(job.groups)
        """The job's parameter groups (Job.groups), the default group first."""
        self.total_steps = int(job.total_steps)
        self._group_of = sorted(by_group)  # job group index of each torch param group
        defaults = _group_options(self.groups_info[0]) if self.groups_info else {"lr": 0.0}
        groups = [{"params": by_group[g], **_group_options(self.groups_info[g])} for g in self._group_of]
        self._building = True
        super().__init__(groups, defaults)
        self._building = False
        self._lrs_shown = self._current_lrs()
        self._fixed = self._fixed_options()
        self._lr_driven = False
        self._warned_past_end = False
        self.skip_frozen = skip_frozen
        self.total = int(job.total_elements)
        self._flat = np.empty(self.total, dtype=np.float32)
        self._step_grad = np.empty(0, dtype=np.float32)  # step()'s gradient buffer: allocated on first use
        self._grad_flat = np.empty(0, dtype=np.float32)  # overlap's buffers: allocated on first use
        self._grad_wire: np.ndarray = self._grad_flat
        self._map_shards(self.worker.shard_ranges)
        self._inflight: _Flight | None = None
        self._arming: _Flight | None = None
        self._hooks = [
            p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, j))  # type: ignore[no-untyped-call]
            for j, p in enumerate(self.params)
        ]
        if self.worker.upload_parameters:
            self.worker.upload(self._gather(lambda p: p.detach()))
        self.version = int(job.version)
        self.version, _, self.last_report = self.worker.pull(self.version, self._flat, dtype=self.wire_dtype)
        self._scatter()
        self.training = True

    def _map_shards(self, ranges: list[list[tuple[int, int]]]) -> None:
        """Where each parameter lies in each shard: `_pieces[s]` = (param j, flat start, length,
        offset in the param) for every overlap of a parameter with shard s's ranges."""
        self._ranges = ranges
        self._pieces: list[list[tuple[int, int, int, int]]] = []
        self._shards_of: list[list[int]] = [[] for _ in self.params]
        for s, shard_ranges in enumerate(ranges):
            pieces = []
            for start, length in shard_ranges:
                for j, (off, n) in enumerate(self._slices):
                    a, b = max(off, start), min(off + n, start + length)
                    if a < b:
                        pieces.append((j, a, b - a, a - off))
            self._pieces.append(pieces)
            for j in sorted({j for j, _, _, _ in pieces}):
                self._shards_of[j].append(s)
        self._streamed = all(p.is_contiguous() for p in self.params)
        """Pulls are copied into the model shard by shard as they arrive (needs contiguous params)."""

    @staticmethod
    def _create(address: str, job_id: str, spec: jpb.JobSpec, resume: bool, timeout: float, credentials: Credentials) -> None:
        """Create the job; one that exists is continued only with `resume` (or when it is still
        at version 0: a sibling worker of this run created it)."""
        with JobClient(address, timeout=timeout, credentials=credentials) as jobs:
            try:
                jobs.create_job(spec, job_id=job_id, resume=resume)
            except ServiceError as exc:
                fresh = exc.metadata.get("version") == "0"
                if exc.code != grpc.StatusCode.ALREADY_EXISTS or exc.reason != Reason.JOB_ALREADY_EXISTS or not fresh:
                    raise
                jobs.create_job(spec, job_id=job_id, resume=True)  # checks the description is the same

    # ---- torch.optim.Optimizer ------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only while the optimizer is built: a job's parameter groups are fixed when it is
        created (create a job with ``param_groups=...`` instead)."""
        if not getattr(self, "_building", False):
            raise RuntimeError(
                "RemoteOptimizer cannot add a parameter group: the job's groups are fixed when it is created "
                "(pass param_groups=[param_group(...)] when creating the job)"
            )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss_terms: int | None = None, loss_is_mean: bool | None = None) -> Any:
        """Push the gradients for the current version, wait for the step, pull the new parameters
        into the model; returns the closure's loss (None without a closure), as torch's step.

        Args:
            closure: re-evaluates the model and returns the loss (called once, under
                ``torch.enable_grad()``, before the gradients are read).
            loss_terms: the number of tokens/samples behind this worker's loss (default: the
                ``loss_terms`` attribute if an integration set it; required with ``loss="sum"``).
            loss_is_mean: overrides the constructor's ``loss`` for this step.

        The lr: while nothing changed the lrs in ``param_groups``, the job's own schedule runs
        (and ``param_groups`` show its lr after each step). Once a torch/HF lr scheduler is
        attached (it sets ``initial_lr``) or the loop writes an lr, every step sends each
        group's ``lr`` and the service uses them for that step (every worker must send the same:
        a mismatch skips the step everywhere and raises here).

        With ``torch.amp.GradScaler``, ``scaler.step(opt)`` calls this with the scale: the
        gradients are unscaled before they are sent, and a non-finite one makes the service skip
        the step on every shard and worker (each worker's scaler backs off on its own overflow).

        After the step, ``last_report`` holds its report. If the job was restored to an earlier
        version (a lost shard), the model gets that version and ``on_rollback`` is called.
        """
        if self._inflight is not None:
            if closure is not None or loss_terms is not None or getattr(self, "grad_scale", None) is not None:
                raise RuntimeError("after overlap(), call step() alone: no closure, loss_terms (give them to overlap()) or GradScaler")
            flight, self._inflight = self._inflight, None
            return self._finish_overlapped(flight)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.training:
            raise RuntimeError("step() in eval mode: call train() first (the model holds the evaluation point)")
        self._check_fixed()
        terms, scale_by = self._terms(loss_terms, loss_is_mean)
        if self._step_grad.size != self.total:
            self._step_grad = np.zeros(self.total, dtype=np.float32)  # the parts no parameter covers stay 0
        grad = self._gather(lambda p: p.grad, self._step_grad)
        inv = self._inverse_grad_scale()
        if inv is not None:
            grad *= inv
        if scale_by is not None:
            grad *= np.float32(scale_by)
        self._warn_past_end()
        try:
            self.worker.push(self.version, grad, terms, dtype=self.wire_dtype, lrs=self._loop_lrs())
        except JobRolledBack as rolled:
            self._roll_back(rolled.resume_version)
            return loss
        self._pull_next()
        return loss

    def _terms(self, loss_terms: int | None, loss_is_mean: bool | None) -> tuple[int, np.float32 | None]:
        """(the loss terms to send, the factor the gradient is multiplied by first, if any)."""
        mean = (self.loss == "mean") if loss_is_mean is None else loss_is_mean
        terms = loss_terms if loss_terms is not None else self.loss_terms
        self.loss_terms = None
        if terms is None:
            if not mean:
                raise ValueError(
                    "step() needs loss_terms= (the number of tokens/samples behind the summed loss), "
                    "or create the optimizer with loss='mean'"
                )
            return 1, None
        if terms < 0:
            raise ValueError("loss_terms must be >= 0")
        return int(terms), (np.float32(terms) if mean else None)

    def _warn_past_end(self) -> None:
        if self.total_steps and self.version >= self.total_steps and not self._warned_past_end:
            self._warned_past_end = True
            warnings.warn(
                f"step {self.version} is past the job's total_steps ({self.total_steps}): its schedule's lr stays at the end value",
                RuntimeWarning,
                stacklevel=3,
            )

    def _pull_next(self) -> None:
        """Pull the next version, each shard's values copied into the model as they arrive."""
        try:
            self.version, _, self.last_report = self.worker.pull(
                self.version + 1, self._flat, dtype=self.wire_dtype, on_shard=self._scatter_shard if self._streamed else None
            )
        except JobRolledBack as rolled:
            self._roll_back(rolled.resume_version)
            return
        if self._streamed:
            self._set_frozen()
        else:
            self._scatter()
        self._after_step(self.last_report)

    # ---- overlap: pushes from gradient hooks --------------------------------------------------

    @contextlib.contextmanager
    def overlap(self, loss_terms: int | None = None, *, loss_is_mean: bool | None = None) -> Iterator[None]:
        """Arm the backward run inside the block: each shard's part of the gradient is pushed as
        soon as the gradients of all its parameters are final (gradient hooks, DDP-style buckets:
        one per shard, the last shards first as backward runs from the output), so transport
        overlaps the rest of backward; the :meth:`step` after the block waits for the pushes and
        pulls. One backward per block (the last micro-batch of an accumulation); not with
        GradScaler or a closure. Parameters that got no gradient are sent as zeros.

            opt.zero_grad()
            loss = loss_fn(model(x), y, reduction="sum")
            with opt.overlap(loss_terms=n):
                loss.backward()
            opt.step()
        """
        if self._inflight is not None:
            raise RuntimeError("overlap() is already armed: call step() first")
        if not self.training:
            raise RuntimeError("overlap() in eval mode: call train() first")
        self._check_fixed()
        terms, scale_by = self._terms(loss_terms, loss_is_mean)
        self._warn_past_end()
        remaining = [len({j for j, _, _, _ in pieces}) for pieces in self._pieces]
        flight = _Flight(self.version, new_request_id(), terms, scale_by, self._loop_lrs(), remaining)
        if self._grad_flat.size != self.total:
            self._grad_flat = np.zeros(self.total, dtype=np.float32)
            self._grad_wire = self._grad_flat if self.wire_dtype == FLOAT32 else to_wire(self._grad_flat, self.wire_dtype).copy()
        else:
            self._grad_flat.fill(0)
        self._arming = flight
        try:
            yield
        except BaseException:
            self._arming = None
            if flight.pushes:
                flight.error = "the backward inside overlap() failed after some shards were pushed"
                self._inflight = flight  # step() says so
            raise
        self._arming = None
        self._inflight = flight

    def _grad_ready(self, j: int, p: torch.Tensor) -> None:
        """Gradient hook of parameter j: copy its final gradient; push the shards it completes."""
        flight = self._arming
        if flight is None or p.grad is None:
            return
        off, n = self._slices[j]
        dst = self._grad_flat[off : off + n]
        dst[:] = p.grad.detach().reshape(-1).to("cpu", torch.float32).numpy()
        if flight.scale_by is not None:
            dst *= flight.scale_by
        for s in self._shards_of[j]:
            if flight.remaining[s] <= 0:
                flight.error = "a gradient changed after its shard was pushed (one backward per overlap() block)"
                continue
            flight.remaining[s] -= 1
            if flight.remaining[s] == 0:
                self._launch(flight, s)

    def _launch(self, flight: _Flight, s: int) -> None:
        wire = self._grad_wire
        if self.wire_dtype != FLOAT32:
            for a, n in self._ranges[s]:
                to_wire(self._grad_flat[a : a + n], self.wire_dtype, out=wire[a : a + n])
        flight.pushes[s] = self.worker.start_push_shard(
            s, flight.step, wire, flight.terms, dtype=self.wire_dtype, request_id=flight.request_id, lrs=flight.lrs
        )

    def _finish_overlapped(self, flight: _Flight) -> None:
        for s in range(len(self._pieces)):  # shards whose parameters got no gradient: zeros
            if s not in flight.pushes:
                self._launch(flight, s)
        try:
            self.worker.settle_push([flight.pushes[s] for s in sorted(flight.pushes)])
        except JobRolledBack as rolled:
            self._roll_back(rolled.resume_version)
            return None
        if flight.error:
            raise RuntimeError(f"{flight.error}; the step was pushed as it was")
        self._pull_next()
        return None

    def _scatter_shard(self, s: int) -> None:
        """Copy shard s's pulled values into the model (on the client's thread, as they arrive)."""
        with torch.no_grad():
            for j, a, n, local in self._pieces[s]:  # the parameter as it is now (a framework may have replaced its .data)
                self.params[j].detach().view(-1)[local : local + n].copy_(torch.from_numpy(self._flat[a : a + n]))

    def _inverse_grad_scale(self) -> np.float32 | None:
        """1/scale as GradScaler computes it, when scaler.step() handed a scale over (None: the
        gradients are not scaled, or unscale_ already ran)."""
        scale = getattr(self, "grad_scale", None)
        if scale is None:
            return None
        inv = torch.as_tensor(scale).double().reciprocal().float()
        return np.float32(inv.item())

    def _fixed_options(self) -> list[dict[str, Any]]:
        return [{k: g[k] for k in FIXED_OPTIONS if k in g} for g in self.param_groups]

    def _check_fixed(self) -> None:
        """Only the lr travels with a step: refuse a loop (e.g. OneCycleLR's momentum cycling) that
        changes another hyperparameter, rather than silently ignore it."""
        for i, (was, now) in enumerate(zip(self._fixed, self._fixed_options(), strict=True)):
            changed = [k for k in was if was[k] != now.get(k)]
            if changed:
                raise RuntimeError(
                    f"param_groups[{i}][{changed[0]!r}] changed from {was[changed[0]]!r} to {now.get(changed[0])!r}: only the lr "
                    "can be driven from the training loop (e.g. OneCycleLR(..., cycle_momentum=False))"
                )

    def _current_lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.param_groups]

    def _loop_lrs(self) -> list[float]:
        """Each job group's lr for this step when the training loop drives them (else empty)."""
        if not self._lr_driven:
            attached = any("initial_lr" in g for g in self.param_groups)
            self._lr_driven = attached or self._current_lrs() != self._lrs_shown
        if not self._lr_driven:
            return []
        lrs = [float(info.lr) for info in self.groups_info]
        for g, group in zip(self._group_of, self.param_groups, strict=True):
            lrs[g] = float(group["lr"])
        return lrs

    def _after_step(self, report: spb.StepReport | None) -> None:
        if report is None:
            return
        if report.skip_reason == Reason.LR_MISMATCH:
            raise RuntimeError(
                f"step {report.step} was skipped: the workers sent different lrs (LR_MISMATCH); "
                "every worker must drive the lr with the same scheduler"
            )
        if not self._lr_driven and self.groups_info and self.groups_info[0].lr:
            factor = report.lr / self.groups_info[0].lr  # the job's schedule: show its lr
            for g, group in zip(self._group_of, self.param_groups, strict=True):
                group["lr"] = self.groups_info[g].lr * factor
            self._lrs_shown = self._current_lrs()

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict (param_groups with their lrs; no per-parameter state: it lives in the
        service) plus a reference to resume from: ``{"paramserver": {"job_id", "version",
        "snapshot"}}``. The snapshot is the path of a service snapshot at that version (taken here
        when the optimizer was created with ``snapshot_on_save=True``, or by :meth:`snapshot`), else ""."""
        if (self.snapshot_on_save or self.full_state) and self._snapshot[0] != self.version:
            self.snapshot()
        sd = super().state_dict()
        path = self._snapshot[1] if self._snapshot[0] == self.version else ""
        sd[STATE_KEY] = {"job_id": self.job_id, "version": int(self.version), "snapshot": path}
        if self.full_state:
            sd["state"] = self._service_state(path)
        return sd

    def _service_state(self, snapshot: str) -> dict[int, dict[str, torch.Tensor]]:
        """The optimizer state of `snapshot` in torch's state_dict layout (keyed by the position
        of each parameter in param_groups)."""
        with JobClient(self._address, timeout=self._timeout, credentials=self._credentials) as jobs:
            state = jobs.read_optimizer_state(self.job_id, snapshot)
        if state.version != self.version:
            raise RuntimeError(f"the service's optimizer state is at version {state.version}, the model at {self.version}")
        position = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {
            position[id(p)]: {k: torch.from_numpy(v) for k, v in state.tensors.get(name, {}).items()}
            for name, p in self.named
            if name in state.tensors
        }

    def snapshot(self) -> str:
        """Take a service snapshot of the job now (every shard at one version) and remember it
        for :meth:`state_dict`; returns its path. While another worker's snapshot is being
        written (every worker of a job saves its checkpoint at once), waits for it: a snapshot at
        a version already saved is that one."""
        deadline = time.monotonic() + self._timeout
        with JobClient(self._address, timeout=self._timeout, credentials=self._credentials) as jobs:
            while True:
                try:
                    snap = jobs.create_snapshot(self.job_id)
                    break
                except ServiceError as exc:
                    if exc.reason != Reason.SNAPSHOT_IN_PROGRESS or time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
        self._snapshot = (int(snap.version), str(snap.path))
        return self._snapshot[1]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's part (param_groups: lrs, hyperparameters) and the reference: the job must
        be the same. When the job is at another version than the saved one and the reference names
        a snapshot, the job is rolled back to it (``RollbackJob``: every worker of the job resumes
        from there) and the model gets its parameters; without a snapshot, ValueError."""
        sd = dict(state_dict)
        ref = sd.pop(STATE_KEY, None)
        if ref is not None and ref.get("job_id") != self.job_id:
            raise ValueError(f"this state dict belongs to job {ref.get('job_id')!r}, not {self.job_id!r}")
        super().load_state_dict(sd)
        self.state.clear()  # a full state (full_state=True) is the service's: it is not kept here
        self._lrs_shown = self._current_lrs()
        self._check_fixed()
        if ref is None:
            return
        saved, path = int(ref.get("version", -1)), str(ref.get("snapshot", ""))
        if saved == self.version:
            return
        if not path:
            raise ValueError(
                f"this state dict was saved at version {saved}, but job {self.job_id!r} is at version {self.version}, and it "
                "names no snapshot to go back to (create the optimizer with snapshot_on_save=True)"
            )
        with JobClient(self._address, timeout=self._timeout, credentials=self._credentials) as jobs:
            # Every worker resuming from this checkpoint gets here: the job is rolled back once. The
            # rollback is conditional on the generation read, so a worker that read the job before
            # another one rolled it back does not roll it back a second time (undoing the steps the
            # first one pushed since).
            for _ in range(8):
                job = jobs.get_job(self.job_id)
                if int(job.version) == saved:  # already rolled back by another worker
                    break
                try:
                    job = jobs.rollback_job(self.job_id, path, expected_generation=int(job.generation))
                except ServiceError as exc:
                    if exc.reason == Reason.GENERATION_CHANGED:
                        continue
                    raise
                log.warning("job %s rolled back to version %d (snapshot %s) to resume from this state dict", self.job_id, job.version, path)
                break
            else:
                raise RuntimeError(f"job {self.job_id!r} kept changing generation while rolling it back to {path}")
        try:
            pulled = self.worker.pull(saved, self._flat, dtype=self.wire_dtype)
        except JobRolledBack:  # this worker learned the new generation; pull again
            pulled = self.worker.pull(saved, self._flat, dtype=self.wire_dtype)
        self.version, _, self.last_report = pulled
        self._scatter()
        self._snapshot = (saved, path)

    # ---- the flat vector ----------------------------------------------------------------------

    @property
    def worker_id(self) -> int:
        """This worker's id in the job."""
        return self.worker.worker_id

    def _gather(self, get: Any, out: np.ndarray | None = None) -> np.ndarray:
        """The flat vector of get(p) over the model (zeros where it is None), into `out` if given
        (a buffer reused step after step: no fresh pages to fault in)."""
        if out is None:
            out = np.zeros(self.total, dtype=np.float32)
        for (off, n), p in zip(self._slices, self.params, strict=True):
            t = get(p)
            if t is None:
                out[off : off + n] = 0
            else:
                out[off : off + n] = t.detach().reshape(-1).to("cpu", torch.float32).numpy()
        return out

    def _scatter(self) -> None:
        flat = torch.from_numpy(self._flat)
        with torch.no_grad():
            for (off, n), p in zip(self._slices, self.params, strict=True):
                p.copy_(flat[off : off + n].view(p.shape))
        self._set_frozen()

    def _set_frozen(self) -> None:
        if self.skip_frozen:
            frozen = self.worker.frozen
            for i, p in zip(self._indices, self.params, strict=True):
                p.requires_grad_(i not in frozen)

    def _roll_back(self, version: int) -> None:
        """Load the restored version into the model and tell the training loop."""
        self.version, _, self.last_report = self.worker.pull(version, self._flat, dtype=self.wire_dtype)
        self._scatter()
        self.rolled_back_to = self.version
        if self.on_rollback is not None:
            self.on_rollback(self.version)
        else:
            log.warning("the job lost a shard and was restored to version %d: training goes on from there", self.version)

    # ---- modes and lifecycle --------------------------------------------------------------------

    def eval(self) -> None:
        """Load the evaluation point of the current version into the model (schedulefree's
        eval()); nothing to do when already in eval mode."""
        if not self.training:
            return
        self.worker.pull(self.version, self._flat, dtype=self.wire_dtype, point=EVAL)
        self._scatter()
        self.training = False

    def train(self) -> None:
        """Load the training point of the current version back into the model (schedulefree's
        train()); nothing to do when already in train mode (HF Trainer calls it every micro-batch)."""
        if self.training:
            return
        self.worker.pull(self.version, self._flat, dtype=self.wire_dtype, point=TRAIN)
        self._scatter()
        self.training = True

    def close(self, leave: bool = True) -> None:
        """Leave the job (unless leave=False) and close connections."""
        for h in self._hooks:
            h.remove()
        for p in self.params:
            p.requires_grad_(True)
        try:
            if leave:
                self.worker.leave()
        finally:
            self.worker.close()


@dataclass
class _Flight:
    """One overlapped push: what every shard's part is sent with, and the parts started."""

    step: int
    request_id: str
    terms: int
    scale_by: np.float32 | None
    lrs: list[float]
    remaining: list[int]
    """Per shard: parameters whose final gradient has not arrived yet."""
    pushes: dict[int, concurrent.futures.Future[spb.PushGradientsResponse]] = field(default_factory=dict)
    error: str = ""


def _group_options(info: jpb.GroupInfo) -> dict[str, Any]:
    """A torch param group's options for a job group: its hyperparameters, lr, name and rule."""
    hyper = {k: (tuple(v) if isinstance(v, list) else v) for k, v in _struct(info.hyperparameters).items()}
    return {**hyper, "lr": float(info.lr), "name": info.name, "rule": info.optimizer}


def _struct(s: Any) -> dict[str, Any]:
    out: dict[str, Any] = MessageToDict(s)
    return out
