"""DiLoCo through the service: workers train locally with their own (inner) torch optimizer and,
every ``inner_steps`` steps, push their pseudo-gradient to the service, which applies the outer
rule to the token-weighted mean of them (Douillard et al., "DiLoCo", 2023; Streaming DiLoCo's
fragments, 2025).

The service needs nothing special for it: a round is a synchronous step of a job whose "gradient"
is the pseudo-gradient. Worker i pushes ``n_i * Δ_i`` with ``loss_terms = n_i`` (Δ_i = θ_start -
θ_local over the round, n_i the tokens it trained on), so the service's step gradient is
``Σ n_i Δ_i / Σ n_i``, the exact token-weighted mean, summed in worker-id order; the job's rule is
the outer optimizer (by default Nesterov SGD, lr 0.7, momentum 0.9: ``OUTER_DEFAULTS``); the new
version is every worker's next θ_start. Clipping, the spike guard, skips, exactly-once pushes,
snapshots, resharding, spilling and membership are the job's, as in synchronous training.

Fragments (Streaming DiLoCo): with ``fragments=F`` the parameters are cut into F contiguous groups
of about equal size, each a job of its own (``JOB.f0`` ... ``JOB.f{F-1}``: one outer state per
fragment), and fragment k is synchronised after inner steps t with
``t % H == ((k + 1) * H // F) % H``: the rounds of the fragments are staggered by H/F steps, so a
worker sends 1/F of the model every H/F steps instead of all of it every H steps.

Compression (``compression="int8"``, ``"int4"`` or ``"topk"`` with ``topk_ratio``): each worker
pushes ``n·Δ + residual`` in a compressed wire dtype (layouts in tensor.proto), chunk by chunk,
and keeps what the encoding dropped as its error-feedback residual for the next round
(paramserver_client.compression.ErrorFeedback, one per fragment, in :meth:`DiLoCo.state_dict`).
The service decodes to fp32 and divides the sum by Σ n_i exactly as for fp32 pushes. Over rounds,
the sum of what a worker sent plus its residual equals the sum of its n·Δ (up to one float32
rounding per element and round of adding the residual).

Quorum (a job with ``min_workers`` below its members and a ``grace_window_s``): a round may close
without a slow worker. Its pseudo-gradient, discarded by the service, is then folded into its
next push with its tokens (``late="fold"``, the default: nothing a worker trained on is lost) or
dropped (``late="drop"``); the round report (StepReport.workers / missing_workers) says who
contributed, and :attr:`DiLoCo.folded` counts the folds.

Reproducibility: :func:`create_jobs` records ``inner_steps``, ``inner_optimizer``, the fragment
and the compression as the jobs' labels (``diloco.*``; GetJob shows them in ``spec.labels``).

Needs torch (the ``torch`` extra).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from paramserver_client.client import JobClient, Worker
from paramserver_client.codec import FLOAT32, compressed_dtype, dtype_from_name
from paramserver_client.compression import ErrorFeedback
from paramserver_client.errors import ServiceError
from paramserver_client.reasons import Reason

#: The outer optimizer of DiLoCo's paper: Nesterov SGD, lr 0.7, momentum 0.9.
OUTER_DEFAULTS: dict[str, Any] = {"optimizer": "sgd", "hyperparameters": {"lr": 0.7, "momentum": 0.9, "nesterov": True}}


def fragment_ids(job_id: str, fragments: int) -> list[str]:
    """The job of each fragment: `job_id` itself for one fragment, else ``JOB.f{k}``."""
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    return [job_id] if fragments == 1 else [f"{job_id}.f{k}" for k in range(fragments)]


def split(named: Sequence[tuple[str, torch.Tensor]], fragments: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Cut the parameters, in order, into `fragments` contiguous groups of about equal element
    counts, each of at least one parameter (fragment k starts at the first parameter that begins
    at or after k/F of the elements, moved so that every fragment keeps one)."""
    n = len(named)
    if not 1 <= fragments <= n:
        raise ValueError(f"{fragments} fragments for {n} parameters (1 to {n})")
    starts, total, at = [], sum(p.numel() for _, p in named), 0
    for _, p in named:
        starts.append(at)
        at += p.numel()
    cuts = [0]
    for k in range(1, fragments):
        first = next((i for i, s in enumerate(starts) if s * fragments >= k * total), n)
        cuts.append(min(max(first, cuts[-1] + 1), n - (fragments - k)))
    cuts.append(n)
    return [list(named[cuts[k] : cuts[k + 1]]) for k in range(fragments)]


def due(step: int, fragment: int, fragments: int, inner_steps: int) -> bool:
    """Whether `fragment` is synchronised after inner step `step` (counted from 1)."""
    return step % inner_steps == ((fragment + 1) * inner_steps // fragments) % inner_steps


def create_jobs(
    address: str,
    job_id: str,
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    fragments: int = 1,
    num_workers: int = 1,
    num_shards: int = 1,
    inner_steps: int | None = None,
    inner_optimizer: str = "",
    compression: str | None = None,
    **settings: Any,
) -> list[str]:
    """Create the job of each fragment (``OUTER_DEFAULTS`` unless `settings` name another
    `optimizer` / `hyperparameters`; any other JobSpec setting as in JobClient.create_job).
    `inner_steps`, `inner_optimizer` (a description, e.g. ``repr(opt)`` or "AdamW(lr=1e-3)") and
    `compression` are recorded as the jobs' labels (``diloco.*``, with ``diloco.fragment`` and
    ``diloco.fragments``) for reproducibility; they do not change what the service does.
    Returns the jobs' ids."""
    named = list(named_parameters)
    outer = {**OUTER_DEFAULTS, **settings}
    ids = fragment_ids(job_id, fragments)
    labels = {**outer.pop("labels", {}), "diloco.fragments": str(fragments), "diloco.compression": compression or "none"}
    if inner_steps is not None:
        labels["diloco.inner_steps"] = str(inner_steps)
    if inner_optimizer:
        printable = "".join(ch for ch in " ".join(inner_optimizer.split()) if ch.isprintable())
        labels["diloco.inner_optimizer"] = printable.encode()[:1024].decode(errors="ignore")
    with JobClient(address, **{k: outer.pop(k) for k in ("token", "credentials") if k in outer}) as jobs:
        for k, (jid, part) in enumerate(zip(ids, split(named, fragments), strict=True)):
            shapes = [(n, tuple(p.shape)) for n, p in part]
            jobs.create_job(
                shapes, job_id=jid, num_workers=num_workers, num_shards=num_shards, labels={**labels, "diloco.fragment": str(k)}, **outer
            )
    return ids


@dataclass
class _Fragment:
    job_id: str
    params: list[torch.Tensor]
    worker: Worker
    version: int
    start: np.ndarray
    """θ_start: the fragment's parameters at the start of the round (flat fp32)."""
    tokens: int = 0
    """Tokens trained on since the fragment's last synchronisation."""
    feedback: ErrorFeedback | None = None
    """The error-feedback residual of a compressed fragment."""
    carry: np.ndarray | None = None
    """A pseudo-gradient (as sent: n·Δ, decoded) of a round that closed without it, to fold in."""
    carry_tokens: int = 0


class DiLoCo:
    """A worker of DiLoCo: call ``step(tokens)`` after each inner optimizer step (it steps the
    inner optimizer itself when `step_inner`); every `inner_steps` steps each fragment due pushes
    its pseudo-gradient and loads the outer result into the model.

    `params`: the model's named parameters (``model.named_parameters()``), in the order the jobs
    were created with (create_jobs). `inner`: the local optimizer (any torch optimizer over those
    parameters; its state is kept across rounds, as in DiLoCo). The worker joins every fragment's
    job; the one chosen to upload gives the service its initial parameters, the others start from
    them. `compression`: None (fp32, exact), "int8", "int4" or "topk" (keeping `topk_ratio` of
    each chunk's elements), with error feedback (see the module docstring). `late`: what a
    pseudo-gradient a round closed without becomes: "fold" (into the next push, with its tokens)
    or "drop". `pull_dtype`: how each round's result travels: "fp32" (exact); "bf16" (half the
    bytes: every round starts from the outer parameters rounded to bf16, while the service keeps
    and updates them in fp32); "int8" or "int4" (the service's broadcast: each round an int8 /
    int4 update to the previous round's values with error feedback on the service, so every
    worker starts from the same values, within one quantisation step of the last update of the
    outer parameters, never drifting; see PullParametersRequest.base_version).
    """

    def __init__(
        self,
        params: Iterable[tuple[str, torch.Tensor]],
        inner: torch.optim.Optimizer,
        address: str,
        job_id: str,
        worker_name: str = "",
        *,
        inner_steps: int = 20,
        fragments: int = 1,
        compression: str | None = None,
        topk_ratio: float = 0.01,
        late: str = "fold",
        pull_dtype: str = "fp32",
        **client_options: Any,
    ) -> None:
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        self.dtype = FLOAT32 if compression in (None, "none") else compressed_dtype(compression)
        if compression == "topk" and not 0 < topk_ratio <= 1:
            raise ValueError(f"topk_ratio must be in (0, 1], got {topk_ratio}")
        self.compression = None if self.dtype == FLOAT32 else compression
        if late not in ("fold", "drop"):
            raise ValueError(f"late must be 'fold' or 'drop', got {late!r}")
        self.late = late
        self.broadcast = pull_dtype in ("int8", "int4")
        self.pull_dtype = compressed_dtype(pull_dtype) if self.broadcast else dtype_from_name(pull_dtype)
        self.folded = 0
        """Rounds this worker's pseudo-gradient missed (a quorum closed without it)."""
        self.topk_ratio = topk_ratio if compression == "topk" else None
        named = list(params)
        self.inner = inner
        self.inner_steps = inner_steps
        self.steps = 0
        """Inner steps taken."""
        self.rounds = 0
        """Fragment synchronisations done."""
        self.fragments: list[_Fragment] = []
        for jid, part in zip(fragment_ids(job_id, fragments), split(named, fragments), strict=True):
            tensors = [p for _, p in part]
            worker = Worker(address, jid, worker_name, **client_options)
            if worker.upload_parameters:
                worker.upload(_flat(tensors))
            version, values, _ = worker.pull(0, dtype=self.pull_dtype if self.broadcast else FLOAT32)
            fragment = _Fragment(jid, tensors, worker, version, values.copy())
            if self.compression:
                fragment.feedback = ErrorFeedback(values.size)
            _load(tensors, values)
            self.fragments.append(fragment)

    def step(self, tokens: int, *, step_inner: bool = False) -> list[int]:
        """Count one inner step over `tokens` tokens (after ``inner.step()``, or doing it when
        `step_inner`); synchronise the fragments that are due. Returns the indices of the
        fragments synchronised (empty on most steps)."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if step_inner:
            self.inner.step()
        self.steps += 1
        done = []
        for k, f in enumerate(self.fragments):
            f.tokens += tokens
            if due(self.steps, k, len(self.fragments), self.inner_steps):
                self._sync(f)
                done.append(k)
        return done

    def _sync(self, f: _Fragment) -> None:
        """Push n·Δ (n tokens; plus a folded late one) for the fragment's round, pull the outer
        result, start anew from it."""
        local = _flat(f.params)
        delta = np.subtract(f.start, local, dtype=np.float32)
        pushed = np.multiply(delta, np.float32(f.tokens), dtype=np.float32)
        tokens = f.tokens
        if f.carry is not None:
            pushed = np.add(pushed, f.carry, dtype=np.float32)
            tokens += f.carry_tokens
        counted = True
        saved = f.feedback.state_dict() if f.feedback is not None else None
        try:
            if self.compression:
                encoded = f.worker.compress(pushed, self.dtype, feedback=f.feedback, topk_ratio=self.topk_ratio)
                sent = encoded.decoded
                f.worker.push_compressed(f.version, encoded, tokens)
            else:
                sent = pushed
                f.worker.push(f.version, pushed, tokens)
        except ServiceError as exc:  # the round closed (quorum) before this push arrived
            if exc.reason != Reason.STEP_ALREADY_APPLIED:
                if saved is not None and f.feedback is not None:  # nothing was sent: the residual is as before
                    f.feedback.load_state_dict(saved)
                raise
            counted = False
        step = f.version
        base = (f.version, f.start) if self.broadcast else None
        f.version, values, report = f.worker.pull(f.version + 1, dtype=self.pull_dtype, base=base)
        if counted and report is not None and report.step == step:
            counted = f.worker.worker_id in report.workers
        f.carry, f.carry_tokens = (sent.copy(), tokens) if not counted and self.late == "fold" else (None, 0)
        self.folded += not counted
        f.start = values.copy()
        f.tokens = 0
        _load(f.params, values)
        self.rounds += 1

    @property
    def bytes_pushed(self) -> int:
        """Bytes of chunk messages this worker pushed (all fragments; see Worker.bytes_pushed)."""
        return sum(f.worker.bytes_pushed for f in self.fragments)

    @property
    def bytes_pulled(self) -> int:
        """Bytes of messages this worker pulled, the first pull included (see Worker.bytes_pulled)."""
        return sum(f.worker.bytes_pulled for f in self.fragments)

    def state_dict(self) -> dict[str, Any]:
        """What resuming needs: the inner optimizer's state, the step count, and per fragment its
        version, θ_start, tokens of the open round and error-feedback residual (compressed)."""
        return {
            "inner": self.inner.state_dict(),
            "steps": self.steps,
            "fragments": [
                {
                    "job_id": f.job_id,
                    "version": f.version,
                    "start": torch.from_numpy(f.start.copy()),
                    "tokens": f.tokens,
                    "carry": None if f.carry is None else torch.from_numpy(f.carry.copy()),
                    "carry_tokens": f.carry_tokens,
                    **({"residual": torch.from_numpy(f.feedback.state_dict()["residual"])} if f.feedback is not None else {}),
                }
                for f in self.fragments
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state_dict() of the same jobs (the model's parameters are the caller's to load)."""
        saved = list(state["fragments"])
        if [s["job_id"] for s in saved] != [f.job_id for f in self.fragments]:
            raise ValueError(f"this state is of jobs {[s['job_id'] for s in saved]}, not {[f.job_id for f in self.fragments]}")
        self.inner.load_state_dict(state["inner"])
        self.steps = int(state["steps"])
        for f, s in zip(self.fragments, saved, strict=True):
            f.version, f.tokens = int(s["version"]), int(s["tokens"])
            carry = s.get("carry")
            f.carry = None if carry is None else carry.numpy().astype(np.float32, copy=True)
            f.carry_tokens = int(s.get("carry_tokens", 0))
            f.start = s["start"].numpy().astype(np.float32, copy=True)
            if f.feedback is not None:
                if "residual" not in s:
                    raise ValueError(f"this state of {f.job_id} has no error-feedback residual (saved without compression)")
                f.feedback.load_state_dict({"residual": s["residual"].numpy().astype(np.float32, copy=True)})

    def close(self) -> None:
        """Close the workers' connections."""
        for f in self.fragments:
            f.worker.close()

    def __enter__(self) -> DiLoCo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _flat(tensors: Sequence[torch.Tensor]) -> np.ndarray:
    """The tensors' values end to end, fp32."""
    with torch.no_grad():
        return torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy().copy()


def _load(tensors: Sequence[torch.Tensor], values: np.ndarray) -> None:
    """Copy flat fp32 `values` into the tensors."""
    flat = torch.from_numpy(np.asarray(values, dtype=np.float32))
    at = 0
    with torch.no_grad():
        for t in tensors:
            n = t.numel()
            t.copy_(flat[at : at + n].view(t.shape))
            at += n
