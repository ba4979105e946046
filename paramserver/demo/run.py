"""The main job: start the service (with its own local Ray), train with 2 worker processes,
then compare with the same training done locally with torch.optim.

    paramserver demo [--steps 400] [--workers 2] [--shards 2] [--quick]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paramserver.demo.task import TaskConfig, batch, make_model, summed_loss
from paramserver.optim.schedules import build_schedule
from paramserver.server import BackgroundService, ServiceConfig
from paramserver_client import JobClient


@dataclass
class DemoResult:
    """What the demo measured."""

    steps: int
    remote_losses: list[float] = field(default_factory=list)
    local_losses: list[float] = field(default_factory=list)
    max_abs_param_diff: float = math.nan
    rel_param_diff: float = math.nan
    seconds: float = 0.0


def _settings(steps: int, workers: int, shards: int, task: TaskConfig) -> dict[str, Any]:
    return {
        "optimizer": "adamw",
        "hyperparameters": {"lr": 3e-3, "betas": [0.9, 0.99], "weight_decay": 0.01},
        "schedule": "warmup_cosine",
        "schedule_parameters": {"warmup_steps": max(1, steps // 10), "total_steps": steps, "min_lr_ratio": 0.1},
        "num_workers": workers,
        "num_shards": shards,
        "max_grad_norm": 1.0,
        "task": asdict(task),
    }


def local_reference(task: TaskConfig, settings: dict[str, Any], steps: int, workers: int) -> tuple[list[float], np.ndarray]:
    """The same training in one process with torch.optim.AdamW on the full-batch gradient."""
    torch.set_num_threads(1)
    model = make_model(task)
    h = settings["hyperparameters"]
    opt = torch.optim.AdamW(model.parameters(), lr=h["lr"], betas=tuple(h["betas"]), weight_decay=h["weight_decay"], fused=True)
    sched_fn = build_schedule(settings["schedule"], settings["schedule_parameters"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: sched_fn(s))
    losses = []
    for step in range(steps):
        opt.zero_grad()
        total, terms = 0.0, 0
        for w in range(workers):  # accumulate in worker order, as the service sums
            inp, tgt = batch(task, w, step)
            loss, n = summed_loss(model, inp, tgt)
            loss.backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach())
            terms += n
        for p in model.parameters():
            assert p.grad is not None
            p.grad.div_(terms)
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings["max_grad_norm"])
        opt.step()
        sched.step()
        losses.append(total / terms)
    flat = np.concatenate([p.detach().reshape(-1).numpy() for p in model.parameters()])
    return losses, flat


def run_demo(steps: int = 400, workers: int = 2, shards: int = 2, *, quiet: bool = False, address: str | None = None) -> DemoResult:
    """Run the demo end to end; start a service (and local Ray) unless `address` is given."""

    def say(*a: object) -> None:
        if not quiet:
            print(*a, flush=True)

    task = TaskConfig(batch_sizes=tuple(24 + 16 * i for i in range(workers)))
    settings = _settings(steps, workers, shards, task)
    result = DemoResult(steps)
    t_start = time.perf_counter()
    svc = None
    if address is None:
        say("starting paramserver with a local Ray ...")
        # warm_shards=0: the demo loses no shard, and spares starting beside it would only take CPU
        svc = BackgroundService(ServiceConfig(port=0, state_dir=tempfile.mkdtemp(prefix="paramserver-demo-state-"), warm_shards=0))
        address = svc.address
    try:
        job_id = f"demo-{uuid.uuid4().hex[:8]}"
        model = make_model(task)
        n_params = sum(p.numel() for p in model.parameters())
        job_settings = {k: v for k, v in settings.items() if k != "task"}
        with JobClient(address) as jobs:
            job = jobs.create_job([(n, tuple(p.shape)) for n, p in model.named_parameters()], job_id=job_id, **job_settings)
        say(
            f"service at {address}; job {job_id}: {n_params} parameters on {len(job.shards)} shards "
            f"({', '.join(s.address for s in job.shards)}), {workers} workers, AdamW + warmup-cosine + clip 1.0"
        )
        result.remote_losses = _train(address, job_id, steps, workers, settings, say, out_dir := Path(tempfile.mkdtemp(prefix="ps-demo-")))
        remote_flat = np.load(out_dir / "final.npy")
        with JobClient(address) as jobs:
            jobs.delete_job(job_id)
    finally:
        if svc is not None:
            svc.stop()
    say("training the same model locally with torch.optim.AdamW on the full-batch gradient ...")
    result.local_losses, local_flat = local_reference(task, settings, steps, workers)
    diff = np.abs(remote_flat.astype(np.float64) - local_flat.astype(np.float64))
    result.max_abs_param_diff = float(diff.max())
    result.rel_param_diff = float(np.linalg.norm(diff)) / max(float(np.linalg.norm(local_flat.astype(np.float64))), 1e-30)
    result.seconds = time.perf_counter() - t_start
    say("")
    say(
        f"final loss      service {result.remote_losses[-1]:.6f}   local torch.optim {result.local_losses[-1]:.6f}"
        f"   (first step {result.remote_losses[0]:.4f})"
    )
    say(
        f"loss curves     max |service - local| over {steps} steps: "
        f"{max(abs(a - b) for a, b in zip(result.remote_losses, result.local_losses, strict=True)):.3e}"
    )
    say(f"parameters      max |diff| {result.max_abs_param_diff:.3e}   ||diff|| / ||params|| {result.rel_param_diff:.3e}")
    say(f"done in {result.seconds:.1f} s")
    return result


def _train(address: str, job_id: str, steps: int, workers: int, settings: dict[str, Any], say: Any, out_dir: Path) -> list[float]:
    cfg_json = json.dumps({**settings, "create": False})  # the driver created the job
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = []
    for i in range(workers):
        cmd = [
            sys.executable,
            "-m",
            "paramserver.demo.worker",
            "--address",
            address,
            "--job",
            job_id,
            "--name",
            f"worker-{i}",
            "--steps",
            str(steps),
            "--config",
            cfg_json,
            "--out",
            str(out_dir / "final.npy"),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    per_step: dict[int, dict[int, tuple[float, int]]] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def reader(p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "step" in msg:
                with lock:
                    per_step.setdefault(msg["step"], {})[msg["worker"]] = (msg["loss_sum"], msg["terms"])

    threads = [threading.Thread(target=reader, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    first: tuple[int, float] | None = None
    shown = -1
    every = max(1, steps // 20)
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        with lock:
            complete = [s for s, d in per_step.items() if len(d) == workers]
        if complete:
            s = max(complete)
            if s > shown and (s // every > shown // every or s == steps - 1):
                with lock:
                    d = per_step[s]
                    if first is None:
                        first = (s, time.perf_counter())
                loss = sum(v[0] for v in d.values()) / max(1, sum(v[1] for v in d.values()))
                shown = s
                rate = (s - first[0]) / max(1e-9, time.perf_counter() - first[1])
                say(f"step {s + 1:5d}/{steps}  loss/token {loss:.4f}  {rate:6.1f} steps/s")
    for p in procs:
        if p.returncode != 0:
            assert p.stderr is not None
            errors.append(p.stderr.read()[-3000:])
    for t in threads:
        t.join(timeout=5)
    if errors:
        raise RuntimeError("a worker failed:\n" + "\n".join(errors))
    losses = []
    for s in range(steps):
        d = per_step[s]
        losses.append(sum(v[0] for v in d.values()) / sum(v[1] for v in d.values()))
    return losses
