#!/usr/bin/env python
"""Overlap benchmark: a real model's training step through RemoteOptimizer, with the pushes
started after backward (plain) and from gradient hooks while backward runs (overlap), next to
the floor max(backward, transport) + update, all measured in the same run (see bench/README.md).

    RAY_AUTH_MODE=disabled python bench/bench_overlap.py            # ~25M-parameter transformer
    RAY_AUTH_MODE=disabled python bench/bench_overlap.py --quick    # ~1M parameters (CI smoke test)

One worker (this process), 2 shards, a local service on the same machine. Measured, each the
median of --steps steps after a warm-up step:

  B        forward + backward of the model alone (no service)
  T        transport: push + pull of the same gradient size to an SGD job (lr 0; its update is
           one axpy, so the time is the wire both ways)
  U        the AdamW update: (push + pull to an AdamW job) - T
  plain    a whole step: forward, backward, opt.step(loss_terms) (push after backward, then pull)
  overlap  forward, backward inside opt.overlap(...) (each shard pushed as soon as its gradients
           are final), opt.step() (waits for the pushes; the pull is copied into the model shard
           by shard as it arrives)

Printed per wire dtype (fp32, bf16): each step / (max(B, T) + U), the floor an overlapped step
could reach (aim <= 1.1), and the bf16 step / the fp32 step (aim <= 0.6), of the whole step and
of the transport alone. On this 2-core machine the shards, the gRPC threads and backward share
the same cores, so overlap can only hide what is not CPU-bound: the busy core-seconds of B and T
(from /proc/stat, the whole machine) give a second floor, max(B, T, (cpu(B) + cpu(T)) / cores)
+ U, the step a perfect overlap reaches when the cores, not the waiting, are the limit.
It reports; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from idle import busy_seconds, wait_until_idle
from link import Link, LinkedCredentials

#: The wire dtypes compared (paramserver.v1.DType values).
WIRES = {"fp32": 1, "bf16": 2}


def log(msg: str) -> None:
    print(f"[bench_overlap] {msg}", file=sys.stderr, flush=True)


def make_model(quick: bool) -> tuple[torch.nn.Module, Callable[[], torch.Tensor]]:
    """A small transformer encoder LM (a real backward) and a function computing its summed loss."""
    torch.manual_seed(0)
    d, layers, vocab, seq, batch = (128, 2, 512, 32, 4) if quick else (512, 7, 8192, 64, 8)

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, d)
            layer = torch.nn.TransformerEncoderLayer(d, nhead=8, dim_feedforward=4 * d, batch_first=True, dropout=0.0)
            self.enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.out = torch.nn.Linear(d, vocab)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.enc(self.emb(x)))  # type: ignore[no-any-return]

    model = LM()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    y = torch.randint(0, vocab, (batch, seq), generator=g)

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1), reduction="sum")

    return model, loss


def median_time(fn: Callable[[], object], steps: int, cpu: list[float] | None = None, settle: bool = False) -> float:
    """The median wall time of fn over `steps` calls after a warm-up, once the machine is quiet
    (the service's background work done; `settle`: a job was just created, whose spares the
    service replaces a few seconds later); with `cpu`, the median busy core-seconds of the
    machine per call is appended to it."""
    from paramserver.cluster import REFILL_DELAY_S

    fn()  # warm-up
    wait_until_idle(settle_s=REFILL_DELAY_S + 0.5 if settle else 0.0)
    times, busy = [], []
    for _ in range(steps):
        b0, t0 = busy_seconds(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        b1 = busy_seconds()
        if b0 is not None and b1 is not None:
            busy.append(b1 - b0)
    if cpu is not None and busy:
        cpu.append(statistics.median(busy))
    return statistics.median(times)


def measure(address: str, quick: bool, steps: int, link: Link | None = None) -> dict[str, dict[str, float]]:
    from paramserver_client import JobClient, RemoteOptimizer, Worker

    creds = LinkedCredentials(link=link, front_door=address)  # the shards through the emulated link, if any
    model, loss_fn = make_model(quick)
    terms = 1000
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    total = sum(p.numel() for p in model.parameters())
    rows: dict[str, dict[str, float]] = {w: {"params": float(total)} for w in WIRES}

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn().backward()

    b_cpu: list[float] = []
    b = median_time(backward, steps, b_cpu)
    grad = np.random.default_rng(0).standard_normal(total).astype(np.float32)

    def bare(optimizer: str, hyper: dict[str, float], cpu: dict[str, list[float]]) -> dict[str, float]:
        """push + pull of a ready gradient, per wire dtype, on one job (busy core-seconds into `cpu`)."""
        job_id = f"ovl-{optimizer}-{uuid.uuid4().hex[:6]}"
        times = {}
        with JobClient(address, timeout=600) as jc:
            jc.create_job(shapes, job_id=job_id, optimizer=optimizer, hyperparameters=hyper, num_workers=1, num_shards=2)
            try:
                with Worker(address, job_id, "w", timeout=600, pull_timeout=600, credentials=creds) as w:
                    w.upload(np.zeros(total, dtype=np.float32))
                    flat = np.empty(total, dtype=np.float32)
                    version = [0]
                    for wire, dtype in WIRES.items():

                        def step(dtype: int = dtype) -> None:
                            w.push(version[0], grad, terms, dtype=dtype)
                            version[0], _, _ = w.pull(version[0] + 1, flat, dtype=dtype)

                        times[wire] = median_time(step, steps, cpu.setdefault(wire, []), settle=not times)
            finally:
                jc.delete_job(job_id)
        return times

    t_cpu: dict[str, list[float]] = {}
    sgd, adamw = bare("sgd", {"lr": 0.0}, t_cpu), bare("adamw", {"lr": 1e-4}, {})
    cores = os.cpu_count() or 1
    for wire in WIRES:
        job_id = f"ovl-{wire}-{uuid.uuid4().hex[:6]}"
        opt = RemoteOptimizer(model, address, job_id, optimizer="adamw", hyperparameters={"lr": 1e-4}, num_shards=2,
                              wire_dtype=wire, timeout=600, pull_timeout=600, credentials=creds)  # fmt: skip
        try:

            def plain(opt: RemoteOptimizer = opt) -> None:
                opt.zero_grad()
                loss_fn().backward()
                opt.step(loss_terms=terms)

            def overlapped(opt: RemoteOptimizer = opt) -> None:
                opt.zero_grad()
                loss = loss_fn()
                with opt.overlap(loss_terms=terms):
                    loss.backward()
                opt.step()

            r = rows[wire]
            r["B"], r["T"], r["U"] = b, sgd[wire], max(adamw[wire] - sgd[wire], 0.0)
            r["plain"], r["overlap"] = median_time(plain, steps, settle=True), median_time(overlapped, steps)
            r["floor"] = max(r["B"], r["T"]) + r["U"]
            r["cpu_floor"] = r["floor"]
            if b_cpu and t_cpu.get(wire):  # the cores' limit: B and T cannot overlap into less than their CPU
                r["cpu_floor"] = max(r["B"], r["T"], (b_cpu[0] + t_cpu[wire][0]) / cores) + r["U"]
            log(f"{wire}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items() if k != "params"))
        finally:
            opt.close()
            with JobClient(address) as jc:
                jc.delete_job(job_id)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: a ~1M-parameter model, 2 steps")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default 5; 2 with --quick)")
    link_help = "reach the shards through an emulated link of this many Mbit/s each way (bench/link.py; 0: loopback)"
    ap.add_argument("--link-mbps", type=float, default=0.0, help=link_help)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the worker's forward and backward (default 2)")
    args = ap.parse_args()
    steps = args.steps or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)

    from paramserver.server import BackgroundService, ServiceConfig

    tmp = Path(tempfile.mkdtemp(prefix="ps-bench-ovl-"))
    link = Link(args.link_mbps) if args.link_mbps else None
    svc = BackgroundService(
        ServiceConfig(port=0, num_cpus=2, snapshot_dir=str(tmp / "snap"), spill_dir=str(tmp / "spill"), state_dir=str(tmp / "state"))
    )
    try:
        rows = measure(svc.address, args.quick, steps, link)
    finally:
        if link is not None:
            link.close()
        svc.stop()
    n = int(rows["fp32"]["params"])
    print()
    where = f"through an emulated {args.link_mbps:g} Mbit/s link" if args.link_mbps else "over loopback"
    print(f"training step through the service {where}: {n:,} params, 1 worker ({args.threads} torch threads), 2 shards, AdamW "
          f"(seconds, medians of {steps})")  # fmt: skip
    head = (
        "wire",
        "backward",
        "transport",
        "update",
        "floor",
        "cpu floor",
        "plain",
        "overlap",
        "plain/floor",
        "overlap/floor",
        "ovl/cpu floor",
    )
    print(" ".join(f"{h:>13}" for h in head))
    for wire, r in rows.items():
        cells = [wire, *(f"{r[k]:.3f}" for k in ("B", "T", "U", "floor", "cpu_floor", "plain", "overlap"))]
        cells += [f"{r['plain'] / r['floor']:.2f}", f"{r['overlap'] / r['floor']:.2f}", f"{r['overlap'] / r['cpu_floor']:.2f}"]
        print(" ".join(f"{c:>13}" for c in cells))
    print()
    print(f"bf16 / fp32: plain step {rows['bf16']['plain'] / rows['fp32']['plain']:.2f}, "
          f"overlap step {rows['bf16']['overlap'] / rows['fp32']['overlap']:.2f} (aim <= 0.6), "
          f"transport {rows['bf16']['T'] / rows['fp32']['T']:.2f} (push + pull alone)")  # fmt: skip
    print("floor = max(backward, transport) + update: what a perfectly overlapped step takes (aim: overlap/floor <= 1.1).")
    print(
        f"cpu floor = max(backward, transport, busy core-seconds of both / {os.cpu_count()} cores) + update: "
        "the same when the cores, shared by worker and shards here, are the limit."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
