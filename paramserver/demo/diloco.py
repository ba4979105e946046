"""DiLoCo next to synchronous data-parallel training, both through the service, on the addition
task of the main demo (task.py), with the same workers and the same batches:

* sync: each step every worker pushes its gradient, the job's rule (AdamW, warmup-cosine, clip
  1.0: run.py's settings) updates, every worker pulls the new parameters;
* DiLoCo (paramserver_client.diloco): every worker trains on its own with an inner AdamW (the same
  hyperparameters and schedule, clipped locally) and every H steps pushes its token-weighted
  pseudo-gradient (optionally compressed); the job's rule is the outer Nesterov SGD, lr 0.7 as in
  OUTER_DEFAULTS (the paper's) but momentum 0.5 (DEMO_OUTER, see there).

Both see exactly the same batches (worker w's batch of step s), so the same tokens. Reported per
run: the loss on a fixed held-out set (problems no run trains on), the bytes on the wire per
token (pushed + pulled by all workers during training, as counted by the clients; the one-time
initial upload and download of the parameters are left out, being the same for every run), the
wall seconds per token, and DiLoCo's ratios to sync.

    paramserver demo --diloco 20 [--compression int8] [--steps 800] [--quick]

What to expect (2 workers, 800 steps, 2 CPU cores, about 70 s): both runs end at a held-out loss
of about 1.05-1.10 per answer token (from 2.63): the model has learned the digits' statistics, not
yet the carries, and it sits on that plateau for a while. DiLoCo lands within about 1.5% of sync's
loss at H = 10, 20 and 50 (three task seeds) with H times fewer bytes per token. The comparison is
a plateau's, and so sensitive to the schedule: with more steps (1200+) or sync's lr doubled, sync
may leave the plateau (loss 0.6-0.9) before DiLoCo does, or after it; one seed decides.

Workers are threads of this process, each with its own model replica (torch at one thread each).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paramserver.demo.task import TaskConfig, batch, make_model, summed_loss
from paramserver.optim.schedules import build_schedule
from paramserver_client import JobClient, Worker
from paramserver_client.diloco import OUTER_DEFAULTS, DiLoCo, create_jobs

#: Steps of the default run (a multiple of the inner steps it is run with).
DEFAULT_STEPS = 800
#: Steps of the quick run (a multiple of 10, 20 and 50).
QUICK_STEPS = 100
#: Held-out evaluation: this many batches of EVAL_BATCH problems, from steps no run trains on.
EVAL_BATCHES = 4
EVAL_BATCH = 256
_EVAL_STEP0 = 10_000_000

#: The inner / synchronous rule: run.py's AdamW.
ADAMW: dict[str, Any] = {"lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.01}
#: Gradients are clipped to this global norm (by the job in sync, by each worker in DiLoCo).
MAX_GRAD_NORM = 1.0
#: The demo's outer rule: the paper's Nesterov SGD at lr 0.7 (OUTER_DEFAULTS) with momentum 0.5
#: instead of 0.9. A run of the demo has 16-80 rounds, and momentum 0.9 (a memory of about 10
#: rounds, steady-state steps up to 7x the averaged pseudo-gradient) overshoots in so few: with it
#: DiLoCo H=20 ends 4-18% above sync's loss at 800 steps (15-19% at 400), against 0.4-1.4% with 0.5.
DEMO_MOMENTUM = 0.5


def outer_rule(momentum: float = DEMO_MOMENTUM) -> dict[str, Any]:
    """OUTER_DEFAULTS (Nesterov SGD, lr 0.7) with this momentum (the paper's is 0.9)."""
    return {**OUTER_DEFAULTS, "hyperparameters": {**OUTER_DEFAULTS["hyperparameters"], "momentum": momentum}}


DEMO_OUTER = outer_rule()


@dataclass
class RunResult:
    """One training run."""

    name: str
    steps: int
    workers: int
    initial_loss: float
    """Held-out loss per answer token of the initial model."""
    final_loss: float
    """Held-out loss per answer token of the final model."""
    tokens: int
    """Answer tokens trained on (the loss terms), all workers."""
    bytes_pushed: int
    """Chunk-data bytes pushed by all workers during training."""
    bytes_pulled: int
    """Chunk-data bytes pulled by all workers during training."""
    seconds: float
    """Wall time of the training (workers started to workers done)."""
    syncs: int
    """Pushes per worker."""
    train_losses: list[float] = field(default_factory=list)
    """Training loss per token of each step, all workers."""

    @property
    def bytes_per_token(self) -> float:
        return (self.bytes_pushed + self.bytes_pulled) / max(1, self.tokens)

    @property
    def seconds_per_token(self) -> float:
        return self.seconds / max(1, self.tokens)


@dataclass
class DiLoCoDemoResult:
    """The synchronous run and the DiLoCo runs, in the order run."""

    sync: RunResult
    runs: list[RunResult]
    table: str

    @property
    def diloco(self) -> RunResult:
        """The first DiLoCo run."""
        return self.runs[0]


def task_config(workers: int) -> TaskConfig:
    """run.py's task: per-worker batch sizes 24, 40, 56, ... (uneven on purpose)."""
    return TaskConfig(batch_sizes=tuple(24 + 16 * i for i in range(workers)))


def schedule(steps: int) -> dict[str, Any]:
    """run.py's schedule: warmup for a tenth of the steps, then cosine to a tenth of the lr."""
    return {"warmup_steps": max(1, steps // 10), "total_steps": steps, "min_lr_ratio": 0.1}


def eval_set(task: TaskConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed held-out batches (seeds no training step uses)."""
    cfg = dataclasses.replace(task, batch_sizes=(EVAL_BATCH,))
    return [batch(cfg, 0, _EVAL_STEP0 + i) for i in range(EVAL_BATCHES)]


def evaluate(model: torch.nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Loss per answer token over `batches`."""
    total, terms = 0.0, 0
    with torch.no_grad():
        for inp, tgt in batches:
            loss, n = summed_loss(model, inp, tgt)
            total += float(loss)
            terms += n
    return total / max(1, terms)


@contextmanager
def local_service(address: str | None, say: Callable[..., None] = print, num_cpus: int = 2) -> Iterator[str]:
    """`address`, or a service started here with its own local Ray (`num_cpus` CPUs), stopped at exit."""
    if address is not None:
        yield address
        return
    from paramserver.server import BackgroundService, ServiceConfig

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    tmp = Path(tempfile.mkdtemp(prefix="ps-diloco-"))
    say(f"starting paramserver with a local Ray ({num_cpus} CPUs) ...")
    # warm_shards=0: the demo loses no shard, and spares starting beside it would only take CPU
    config = ServiceConfig(port=0, num_cpus=num_cpus, snapshot_dir=str(tmp / "snap"), spill_dir=str(tmp / "spill"),
                           state_dir=str(tmp / "state"), name=f"diloco-{uuid.uuid4().hex[:6]}", warm_shards=0)  # fmt: skip
    svc = BackgroundService(config)
    try:
        yield svc.address
    finally:
        svc.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _flat_grad(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in model.parameters()]).numpy()


def _load(model: torch.nn.Module, values: np.ndarray) -> None:
    flat = torch.from_numpy(np.asarray(values, dtype=np.float32))
    at = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[at : at + p.numel()].view(p.shape))
            at += p.numel()


def _on_threads(workers: int, target: Callable[[int], None], timeout: float = 900.0) -> float:
    """Run target(w) for every worker on its own thread; the wall seconds it took. Raises the
    first error of a worker."""
    errors: list[BaseException] = []

    def run(w: int) -> None:
        try:
            target(w)
        except BaseException as exc:  # noqa: BLE001 - raised below, on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,), name=f"worker-{w}", daemon=True) for w in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"the workers did not finish in {timeout:.0f} s")
    return seconds


def _counters(client: Worker | DiLoCo) -> tuple[int, int]:
    """(bytes pushed, bytes pulled) by the client so far."""
    return client.bytes_pushed, client.bytes_pulled


def _losses(per_step: list[list[tuple[float, int]]]) -> list[float]:
    return [sum(x for x, _ in s) / max(1, sum(n for _, n in s)) for s in per_step]


def train_sync(
    address: str, task: TaskConfig, steps: int, *, workers: int = 2, shards: int = 2, hyperparameters: dict[str, Any] | None = None
) -> RunResult:
    """Synchronous data-parallel training: every step each worker pushes its summed-loss gradient
    and pulls the job's AdamW update."""
    job_id = f"sync-{uuid.uuid4().hex[:8]}"
    held_out = eval_set(task)
    models = [make_model(task) for _ in range(workers)]
    initial = evaluate(models[0], held_out)
    shapes = [(n, tuple(p.shape)) for n, p in models[0].named_parameters()]
    with JobClient(address, timeout=300) as jobs:  # the first job of a fresh Ray waits for its worker processes
        jobs.create_job(shapes, job_id=job_id, optimizer="adamw", hyperparameters=hyperparameters or ADAMW, schedule="warmup_cosine",
                        schedule_parameters=schedule(steps), num_workers=workers, num_shards=shards,
                        max_grad_norm=MAX_GRAD_NORM)  # fmt: skip
    per_step: list[list[tuple[float, int]]] = [[] for _ in range(steps)]
    wire = [[0, 0] for _ in range(workers)]
    tokens = [0] * workers
    joined = [Worker(address, job_id, f"w{w}") for w in range(workers)]
    try:
        for w, worker in enumerate(joined):  # join all first: the one chosen uploads
            if worker.upload_parameters:
                worker.upload(np.concatenate([p.detach().reshape(-1).numpy() for p in models[w].parameters()]))
        start = []
        for w, worker in enumerate(joined):
            version, values, _ = worker.pull(0)
            _load(models[w], values)
            start.append(version)
        base = [_counters(w) for w in joined]

        def work(w: int) -> None:
            model, worker, version = models[w], joined[w], start[w]
            for s in range(steps):
                model.zero_grad(set_to_none=False)
                inp, tgt = batch(task, w, s)
                loss, n = summed_loss(model, inp, tgt)
                loss.backward()  # type: ignore[no-untyped-call]
                worker.push(version, _flat_grad(model), n)
                version, values, _ = worker.pull(version + 1)
                _load(model, values)
                per_step[s].append((float(loss.detach()), n))
                tokens[w] += n
            now = _counters(worker)
            wire[w] = [now[0] - base[w][0], now[1] - base[w][1]]

        seconds = _on_threads(workers, work)
        final = evaluate(models[0], held_out)
    finally:
        for worker in joined:
            worker.close()
        with JobClient(address) as jobs:
            jobs.delete_job(job_id)
    return RunResult("sync", steps, workers, initial, final, sum(tokens), sum(b[0] for b in wire), sum(b[1] for b in wire),
                     seconds, steps, _losses(per_step))  # fmt: skip


def train_diloco(
    address: str,
    task: TaskConfig,
    steps: int,
    inner_steps: int,
    *,
    workers: int = 2,
    shards: int = 2,
    compression: str | None = None,
    outer: dict[str, Any] | None = None,
    inner: dict[str, Any] | None = None,
    pull_dtype: str = "fp32",
) -> RunResult:
    """DiLoCo: each worker takes `steps` inner AdamW steps (`inner`: its hyperparameters, ADAMW by
    default) on its own batches (the same batches as train_sync), synchronising through the service
    every `inner_steps` steps (`outer`: the job's optimizer and hyperparameters, DEMO_OUTER by
    default; OUTER_DEFAULTS is the paper's)."""
    if steps % inner_steps:
        raise ValueError(f"steps ({steps}) must be a multiple of the inner steps ({inner_steps}): the last round ends training")
    name = f"DiLoCo H={inner_steps}" + (f" {compression}" if compression else "") + (f"+{pull_dtype}" if pull_dtype != "fp32" else "")
    job_id = f"diloco-{uuid.uuid4().hex[:8]}"
    held_out = eval_set(task)
    models = [make_model(task) for _ in range(workers)]
    initial = evaluate(models[0], held_out)
    create_jobs(address, job_id, models[0].named_parameters(), num_workers=workers, num_shards=shards, **(outer or DEMO_OUTER))
    per_step: list[list[tuple[float, int]]] = [[] for _ in range(steps)]
    wire = [[0, 0] for _ in range(workers)]
    tokens = [0] * workers
    syncs = [0] * workers
    sched_fn = build_schedule("warmup_cosine", schedule(steps))
    h = inner or ADAMW
    inners = [torch.optim.AdamW(m.parameters(), lr=h["lr"], betas=tuple(h["betas"]), weight_decay=h["weight_decay"]) for m in models]
    joined: list[DiLoCo | None] = [None] * workers
    try:
        # all join at once, on threads: a constructor not chosen to upload waits for the upload
        def join(w: int) -> None:
            joined[w] = DiLoCo(
                models[w].named_parameters(),
                inners[w],
                address,
                job_id,
                f"w{w}",
                inner_steps=inner_steps,
                compression=compression,
                pull_dtype=pull_dtype,
            )

        _on_threads(workers, join)
        ready = [d for d in joined if d is not None]
        base = [_counters(d) for d in ready]

        def work(w: int) -> None:
            model, inner, d = models[w], inners[w], ready[w]
            lr = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: sched_fn(s))
            for s in range(steps):
                inner.zero_grad()
                inp, tgt = batch(task, w, s)
                loss, n = summed_loss(model, inp, tgt)
                (loss / n).backward()  # type: ignore[no-untyped-call]
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                inner.step()
                lr.step()
                d.step(n)
                per_step[s].append((float(loss.detach()), n))
                tokens[w] += n
            now = _counters(d)
            wire[w] = [now[0] - base[w][0], now[1] - base[w][1]]
            syncs[w] = d.rounds

        seconds = _on_threads(workers, work)
        final = evaluate(models[0], held_out)
    finally:
        for d in joined:
            if d is not None:
                d.close()
        with JobClient(address) as jobs:
            jobs.delete_job(job_id)
    return RunResult(name, steps, workers, initial, final, sum(tokens), sum(b[0] for b in wire), sum(b[1] for b in wire),
                     seconds, syncs[0], _losses(per_step))  # fmt: skip


def format_table(sync: RunResult, runs: Sequence[RunResult]) -> str:
    """The runs next to sync: final held-out loss, wire bytes and wall time per token, ratios."""
    head = (f"{'run':<22} {'syncs':>6} {'init loss':>9} {'final loss':>10} {'loss/sync':>9} {'bytes/token':>12} "
            f"{'sync/bytes':>10} {'us/token':>9} {'time/sync':>9}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in [sync, *runs]:
        lines.append(
            f"{r.name:<22} {r.syncs:>6} {r.initial_loss:9.4f} {r.final_loss:10.4f} {r.final_loss / sync.final_loss:9.3f} "
            f"{r.bytes_per_token:12.1f} {sync.bytes_per_token / max(r.bytes_per_token, 1e-30):9.1f}x "
            f"{1e6 * r.seconds_per_token:9.1f} {r.seconds_per_token / sync.seconds_per_token:9.2f}"
        )
    return "\n".join(lines)


def table_notes(sync: RunResult, model_params: int) -> str:
    """What the table's columns mean."""
    return (
        f"{sync.workers} workers (threads), {sync.steps} steps each, {sync.tokens:,} answer tokens per run, the same batches in every run; "
        f"{model_params:,} parameters.\n"
        f"loss: per answer token on {EVAL_BATCHES * EVAL_BATCH} held-out problems; bytes/token: chunk bytes pushed + pulled by all "
        "workers during training (initial parameter download left out) / tokens; sync/bytes: how many times fewer than sync; "
        "us/token: wall time / tokens; time/sync: its ratio to sync's."
    )


def run_diloco_demo(
    inner_steps: int = 20,
    compression: str | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    workers: int = 2,
    shards: int = 2,
    address: str | None = None,
    quiet: bool = False,
    outer: dict[str, Any] | None = None,
    pull_dtype: str = "fp32",
) -> DiLoCoDemoResult:
    """Train the addition task twice through the service, synchronously and with DiLoCo (H =
    `inner_steps`, optionally compressed pushes), with the same workers and batches; print and
    return the comparison (`outer`: DiLoCo's outer rule, DEMO_OUTER by default; `pull_dtype`: how
    each round's result travels, see DiLoCo). Starts a service
    (and local Ray) unless `address` is given."""

    def say(*a: object) -> None:
        if not quiet:
            print(*a, flush=True)

    torch.set_num_threads(1)
    task = task_config(workers)
    n_params = sum(p.numel() for p in make_model(task).parameters())
    with local_service(address, say) as addr:
        say(f"service at {addr}; {n_params:,} parameters, {workers} workers, {shards} shards, {steps} steps")
        say(f"sync: AdamW lr {ADAMW['lr']} + warmup-cosine + clip {MAX_GRAD_NORM} in the service, a push and a pull every step ...")
        sync = train_sync(addr, task, steps, workers=workers, shards=shards)
        say(f"  held-out loss {sync.initial_loss:.4f} -> {sync.final_loss:.4f} in {sync.seconds:.1f} s")
        outer = outer or DEMO_OUTER
        h = outer["hyperparameters"]
        rule = ", ".join(f"{k} {v}" for k, v in h.items())
        say(f"DiLoCo: inner AdamW (the same, clipped locally), every {inner_steps} steps a push of the pseudo-gradient"
            f"{' (' + compression + ')' if compression else ''}; outer {outer['optimizer']} ({rule}) ...")  # fmt: skip
        dil = train_diloco(
            addr, task, steps, inner_steps, workers=workers, shards=shards, compression=compression, outer=outer, pull_dtype=pull_dtype
        )
        say(f"  held-out loss {dil.initial_loss:.4f} -> {dil.final_loss:.4f} in {dil.seconds:.1f} s")
    table = format_table(sync, [dil])
    say("")
    say(table)
    say("")
    say(table_notes(sync, n_params))
    say(f"loss ratio DiLoCo/sync {dil.final_loss / sync.final_loss:.3f}; bytes per token {sync.bytes_per_token / dil.bytes_per_token:.1f}x "
        f"fewer; wall time per token x{dil.seconds_per_token / sync.seconds_per_token:.2f}")  # fmt: skip
    if not (math.isfinite(sync.final_loss) and math.isfinite(dil.final_loss)):
        say("WARNING: a loss is not finite")
    return DiLoCoDemoResult(sync, [dil], table)
