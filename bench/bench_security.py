#!/usr/bin/env python
"""Security benchmark: what credentials and TLS cost a training step, measured in one run.

    RAY_AUTH_MODE=disabled python bench/bench_security.py            # 16M parameters, 20 steps
    RAY_AUTH_MODE=disabled python bench/bench_security.py --quick    # 1M parameters, 4 steps (CI)

One local Ray, three front doors on it: plaintext without credentials (the baseline), plaintext
with tokens (every call carries the worker token; every shard port checks it), and tokens with
mutual TLS on every port (certificates made for the run). Per front door: a job (1 worker, 2
shards, SGD lr 0, so the step is the wire both ways), then the median time of push + pull over
--steps steps, and the median time of a GetJob. Printed: seconds and each / the baseline. It
reports; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

ADMIN = "bench-security-admin-token-0123456789"


def log(msg: str) -> None:
    print(f"[bench_security] {msg}", file=sys.stderr, flush=True)


def measure(address: str, credentials: object, n: int, steps: int, job_id: str) -> tuple[float, float]:
    """(median push + pull seconds, median GetJob seconds) of one job through `address`."""
    from paramserver_client import JobClient, Worker

    with JobClient(address, credentials=credentials) as jobs:
        jobs.create_job([("w", (n,))], job_id=job_id, num_workers=1, num_shards=2, optimizer="sgd", hyperparameters={"lr": 0.0})
        w = Worker(address, job_id, "w", credentials=credentials)
        try:
            grad = np.ones(n, np.float32)
            w.upload(np.zeros(n, np.float32))
            w.pull(0)
            times = []
            for s in range(steps + 1):
                t0 = time.perf_counter()
                w.push(s, grad, 1)
                w.pull(s + 1)
                times.append(time.perf_counter() - t0)
            gets = []
            for _ in range(20):
                t0 = time.perf_counter()
                jobs.get_job(job_id)
                gets.append(time.perf_counter() - t0)
        finally:
            w.close()
            jobs.delete_job(job_id)
    return statistics.median(times[1:]), statistics.median(gets)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M parameters, 4 steps (CI smoke test)")
    ap.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    n = (1 << 20) if args.quick else (16 << 20)
    steps = args.steps or (4 if args.quick else 20)

    from paramserver.access import AuthConfig
    from paramserver.cluster import start_ray, stop_ray
    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver.tls import TlsConfig
    from paramserver_client import Credentials
    from tests.certs import Authority

    tmp = Path(tempfile.mkdtemp(prefix="bench-security-"))
    ca = Authority(tmp, "bench")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    variants = {
        "plaintext, no credentials": (None, None, Credentials()),
        "plaintext, tokens": (AuthConfig.single(ADMIN), None, Credentials(ADMIN)),
        "mutual TLS, tokens": (
            AuthConfig.single(ADMIN),
            TlsConfig(server.cert, server.key, ca.ca_file),
            Credentials(ADMIN, ca.ca_file, client.cert, client.key),
        ),
    }
    owned = start_ray(None, 2)
    rows: dict[str, tuple[float, float]] = {}
    try:
        for i, (name, (auth, tls, creds)) in enumerate(variants.items()):
            log(f"{name}: {n:,} parameters, {steps} steps")
            config = ServiceConfig(port=0, snapshot_dir=str(tmp / "snap"), spill_dir=str(tmp / "spill"), state_dir=str(tmp / "state"),
                                   name=f"bench-sec-{i}", auth=auth, tls=tls, keep_jobs_on_exit=False)  # fmt: skip
            svc = BackgroundService(config, own_ray=False)
            try:
                if i == 0:  # warm up the process, Ray and the shards' code paths first
                    measure(svc.address, creds, n, 2, "bench-sec-warmup")
                rows[name] = measure(svc.address, creds, n, steps, f"bench-sec-{i}")
            finally:
                svc.stop()
    finally:
        if owned:
            stop_ray()
    base_step, base_get = rows["plaintext, no credentials"]
    print()
    print(f"push + pull of {n:,} fp32 parameters (1 worker, 2 shards, SGD lr 0) and GetJob, medians (seconds)")
    print(f"{'':28} {'step':>9} {'/ base':>7} {'GetJob':>9} {'/ base':>7}")
    for name, (step, get) in rows.items():
        print(f"{name:28} {step:9.4f} {step / base_step:7.2f} {get:9.5f} {get / base_get:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
