#!/usr/bin/env python
"""Observability benchmark: what the metrics and the optimizer-health measurement cost, measured
in one run.

    RAY_AUTH_MODE=disabled python bench/bench_observability.py            # 16M parameters
    RAY_AUTH_MODE=disabled python bench/bench_observability.py --quick    # 1M parameters (CI)

1. Optimizer health (paramserver.optimizer_health), on one in-process AdamW shard: the median
   update of a measured step (HealthProbe before, finish after) / the median plain update.
   A job pays this every optimizer_health.EVERY-th step.
2. Scrapes, through a real service (local Ray, a job of 4 shards, 1 worker): the median step
   (push + pull) while /metrics is scraped every 0.2 s from another thread / without scraping,
   and the median time of one scrape.

It prints seconds and ratios against the baseline measured in the same run; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def log(msg: str) -> None:
    print(f"[bench_observability] {msg}", file=sys.stderr, flush=True)


def health_cost(n: int, reps: int) -> tuple[float, float]:
    """(median plain update seconds, median measured update seconds) of an n-element AdamW shard."""
    import torch

    from paramserver.jobconfig import JobConfig
    from paramserver.optimizer_health import HealthProbe
    from paramserver.shard import Contribution, ShardState
    from paramserver.steps import Decision

    rng = np.random.default_rng(1)
    config = JobConfig(parameters=(("w", (n // 2,), ""), ("v", (n - n // 2,), "")), optimizer="adamw", num_shards=1)
    state = ShardState(config, 0, config.plan()[0])
    buf = state.grads.acquire()
    buf.write(0, torch.from_numpy(rng.standard_normal(n, dtype=np.float32)))
    state.load(buf)
    buf = state.grads.acquire()
    buf.write(0, torch.from_numpy(rng.standard_normal(n, dtype=np.float32)))
    state.reduce([Contribution(0, 1, buf)])
    plain, measured = [], []
    for r in range(2 * reps + 2):
        decision = Decision(step=r, apply=True, skip_reason="", grad_norm=1.0, clip_coef=1.0, loss_terms=1)
        t0 = time.perf_counter()
        if r % 2:
            probe = HealthProbe(state)
            state.apply(decision)
            probe.finish(r)
            if r > 1:
                measured.append(time.perf_counter() - t0)
        else:
            state.apply(decision)
            if r > 1:
                plain.append(time.perf_counter() - t0)
    return statistics.median(plain), statistics.median(measured)


def scrape_cost(n: int, steps: int) -> tuple[float, float, float]:
    """(median step without scraping, median step while scraping, median scrape) seconds."""
    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver_client import JobClient, Worker

    tmp = Path(tempfile.mkdtemp(prefix="ps-bench-obs-"))
    config = ServiceConfig(host="127.0.0.1", port=0, num_cpus=2, snapshot_dir=str(tmp / "snap"), spill_dir=str(tmp / "spill"),
                           state_dir=str(tmp / "state"), metrics_port=0)  # fmt: skip
    with BackgroundService(config) as svc:
        assert svc.service.metrics is not None
        url = f"http://127.0.0.1:{svc.service.metrics.port}/metrics"
        with JobClient(svc.address) as jobs:
            jobs.create_job([("w", (n,))], job_id="obs", num_workers=1, num_shards=4, optimizer="adamw")
            with Worker(svc.address, "obs", "w") as w:
                grad = np.ones(n, np.float32)
                w.upload(np.zeros(n, np.float32))
                step = 0

                def run(k: int) -> list[float]:
                    nonlocal step
                    out = []
                    for _ in range(k):
                        t0 = time.perf_counter()
                        w.push(step, grad, 1)
                        w.pull(step + 1)
                        out.append(time.perf_counter() - t0)
                        step += 1
                    return out

                run(2)
                quiet = run(steps)
                scrapes: list[float] = []
                stop = threading.Event()

                def scrape() -> None:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        with urllib.request.urlopen(url, timeout=30) as r:
                            r.read()
                        scrapes.append(time.perf_counter() - t0)
                        stop.wait(0.2)

                thread = threading.Thread(target=scrape, daemon=True)
                thread.start()
                busy = run(steps)
                stop.set()
                thread.join(30)
    return statistics.median(quiet), statistics.median(busy), statistics.median(scrapes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M parameters, few repetitions (CI: checks the benchmark still runs)")
    args = ap.parse_args()
    n = (1 << 20) if args.quick else (16 << 20)
    reps, steps = (3, 4) if args.quick else (10, 20)
    log(f"{n:,} parameters")
    plain, measured = health_cost(n, reps)
    quiet, busy, one = scrape_cost(n, steps)
    print(f"optimizer health: plain update {plain * 1e3:.1f} ms, measured update {measured * 1e3:.1f} ms, "
          f"ratio {measured / plain:.2f} (paid every 10th step: {1 + (measured / plain - 1) / 10:.3f} on average)")  # fmt: skip
    print(
        f"scraping every 0.2 s: step {busy * 1e3:.1f} ms / {quiet * 1e3:.1f} ms without = {busy / quiet:.2f}; one scrape {one * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
