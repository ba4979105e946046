#!/usr/bin/env python
"""Fan-in benchmark: a shard's resident memory while W workers push to it at once, against the
documented bound, measured through the real service (local Ray, one shard actor per job).

    RAY_AUTH_MODE=disabled python bench/bench_fanin.py            # 4M parameters, W = 1, 16, 64 (~1 min)
    RAY_AUTH_MODE=disabled python bench/bench_fanin.py --quick    # 1M parameters, W = 1, 8 (CI, ~20 s)
    #   --params N   --workers 1,16,64   --steps S (default 4)   --dtype fp32|bf16

Per W: a job of one shard (AdamW, num_workers = W), W asyncio workers (AsyncWorker) in this
process; one uploads, all pull version 0; then the shard is idle: its RSS is the baseline (state,
the upload's gradient buffer kept by the pool, version 0's cached encoding). Each step, all W push
at once, then all pull the next version; the shard process's peak RSS over the step (VmHWM, reset
before each step) minus the idle RSS is the rise; the largest rise over the steps is reported, in
bytes and in shard-sized buffers (S = shard elements x 4 bytes), next to

* the old statement (num_workers + 1 gradient buffers: a rise of W x S over the idle shard, which
  holds one of them already), and
* the documented bound (BOUND_DOC): W x S + W x STREAM_BYTES + FIXED_BYTES, where STREAM_BYTES is
  what one stream may hold in transport buffers (the chunk being decoded, its copy, gRPC's receive
  buffer for it, freed memory not yet given back) and FIXED_BYTES covers the rest. It holds when the
  shard's gRPC server keeps its HTTP/2 receive windows fixed (channel argument
  ``grpc.http2.bdp_probe`` = 0): with gRPC's default BDP probing, a receive window grows to many
  MiB per stream (up to the whole push) and the transport column shows it.

Also printed: the transport bytes per stream actually seen ((rise - W x S) / W), the RSS left after
the last step (held) and the median step time. Each W runs in a new job, so in a fresh shard
process. It reports; in the full mode it also prints PASS / FAIL against the bound (exit code 0
either way; 1 only if the benchmark itself fails).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

MIB = 1 << 20

#: Transport bytes one push or pull stream may hold in the shard: 8 chunk messages of the clients'
#: 1 MiB (paramserver_client.codec.CHUNK_BYTES).
STREAM_BYTES = 8 * MIB
#: Everything else a step may add (per-step temporaries, the interpreter, gRPC's own state).
FIXED_BYTES = 32 * MIB
BOUND_DOC = f"rise <= W x S + W x {STREAM_BYTES // MIB} MiB + {FIXED_BYTES // MIB} MiB"


def log(msg: str) -> None:
    print(f"[bench_fanin] {msg}", file=sys.stderr, flush=True)


def predicted(workers: int, shard_bytes: int) -> int:
    """The documented bound on the rise of a shard's RSS over the idle shard during a step of
    `workers` pushes and pulls: one more gradient buffer per worker (the idle shard holds one of
    the num_workers + 1 already) and each stream's transport buffers."""
    return workers * (shard_bytes + STREAM_BYTES) + FIXED_BYTES


async def one_w(svc: Any, address: str, n: int, workers: int, steps: int, dtype: int, job_id: str) -> dict[str, Any]:
    """Train `steps` steps of a W-worker, 1-shard AdamW job; the shard's RSS figures."""
    from paramserver_client.aio import AsyncJobClient, AsyncWorker

    def probe(reset: bool = False) -> dict[str, int]:
        (m,) = svc.run(svc.service.cluster.shard_memory(job_id, reset_peak=reset))
        return dict(m)

    async with AsyncJobClient(address) as jobs:
        await jobs.create_job([("w", (n,))], job_id=job_id, num_workers=workers, num_shards=1, optimizer="adamw",
                              hyperparameters={"lr": 1e-3})  # fmt: skip
        ws: list[AsyncWorker] = []
        try:
            for _ in range(workers):
                ws.append(await AsyncWorker.join(address, job_id, timeout=600.0))
            rng = np.random.default_rng(0)
            p0 = rng.standard_normal(n).astype(np.float32)
            grads = [(rng.standard_normal(n) * 1e-3).astype(np.float32) for _ in range(min(workers, 4))]
            out = np.empty(n, np.float32)  # shared by every pull (the same values)
            await next(w for w in ws if w.upload_parameters).upload(p0)
            await asyncio.gather(*(w.pull(0, out=out) for w in ws))
            await asyncio.sleep(0.5)
            idle = await asyncio.to_thread(probe, True)
            rises, times = [], []
            for s in range(steps):
                await asyncio.to_thread(probe, True)
                t0 = time.perf_counter()
                await asyncio.gather(*(w.push(s, grads[k % len(grads)], 1, dtype=dtype) for k, w in enumerate(ws)))
                await asyncio.gather(*(w.pull(s + 1, out=out) for w in ws))
                times.append(time.perf_counter() - t0)
                after = await asyncio.to_thread(probe)
                rises.append(after["peak"] - idle["rss"])
            after = await asyncio.to_thread(probe)
        finally:
            await asyncio.gather(*(w.close() for w in ws), return_exceptions=True)
            await jobs.delete_job(job_id)
    return {"idle": idle["rss"], "rise": max(rises), "rises": rises, "held": after["rss"] - idle["rss"], "step_s": float(np.median(times))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M parameters, W = 1, 8, 2 steps (CI smoke test)")
    ap.add_argument("--params", type=int, default=0, help="parameters of the one shard (default 4M; --quick 1M)")
    ap.add_argument("--workers", default="", help="comma-separated W values (default 1,16,64; --quick 1,8)")
    ap.add_argument("--steps", type=int, default=0, help="steps per W (default 4; --quick 2)")
    ap.add_argument("--dtype", default="fp32", help="wire dtype of the pushes: fp32, bf16 or fp16")
    args = ap.parse_args()
    n = args.params or ((1 << 20) if args.quick else (4 << 20))
    ws = [int(w) for w in args.workers.split(",")] if args.workers else ([1, 8] if args.quick else [1, 16, 64])
    steps = args.steps or (2 if args.quick else 4)

    from paramserver.cluster import start_ray, stop_ray
    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver_client.codec import dtype_from_name

    dtype = dtype_from_name(args.dtype)
    shard_bytes = 4 * n
    tmp = Path(tempfile.mkdtemp(prefix="bench-fanin-"))
    owned = start_ray(None, 2)
    rows: dict[int, dict[str, Any]] = {}
    try:
        config = ServiceConfig(port=0, snapshot_dir=str(tmp / "snap"), spill_dir=str(tmp / "spill"), state_dir=str(tmp / "state"),
                               name="bench-fanin", keep_jobs_on_exit=False)  # fmt: skip
        svc = BackgroundService(config, own_ray=False)
        try:
            for w in ws:
                log(f"W = {w}: {n:,} parameters, {steps} steps, {args.dtype} pushes")
                rows[w] = asyncio.run(one_w(svc, svc.address, n, w, steps, dtype, f"bench-fanin-{w}"))
        finally:
            svc.stop()
    finally:
        if owned:
            stop_ray()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"one shard of {n:,} fp32 parameters (AdamW), S = {shard_bytes / MIB:.0f} MiB, {args.dtype} pushes, "
          f"{steps} steps per W; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"bound: {BOUND_DOC}")
    print(f"{'W':>4} {'idle MiB':>9} {'rise MiB':>9} {'/ S':>6} {'old W*S':>8} {'ratio':>6} {'bound MiB':>10} {'/ S':>6} "
          f"{'ratio':>6} {'MiB/stream':>11} {'held MiB':>9} {'step s':>7}")  # fmt: skip
    ok = True
    for w, r in rows.items():
        bound = predicted(w, shard_bytes)
        ok = ok and r["rise"] <= bound
        per_stream = (r["rise"] - w * shard_bytes) / w
        print(f"{w:>4} {r['idle'] / MIB:9.0f} {r['rise'] / MIB:9.0f} {r['rise'] / shard_bytes:6.1f} {w * shard_bytes / MIB:8.0f} "
              f"{r['rise'] / (w * shard_bytes):6.2f} {bound / MIB:10.0f} {bound / shard_bytes:6.1f} {r['rise'] / bound:6.2f} "
              f"{per_stream / MIB:11.1f} {r['held'] / MIB:9.0f} {r['step_s']:7.2f}")  # fmt: skip
    print("rise: the largest peak RSS over a step minus the idle RSS; / S: in shard-sized buffers; old W*S: the rise the old")
    print("statement (num_workers + 1 buffers) predicts; ratio: rise / prediction; MiB/stream: (rise - W x S) / W; held: RSS")
    print("after the last step minus the idle RSS")
    for w, r in rows.items():
        print(f"W = {w}: rise per step, in buffers of S: {' '.join(f'{x / shard_bytes:.1f}' for x in r['rises'])}")
    if not args.quick:
        print("PASS" if ok else "FAIL", f"(every W within {BOUND_DOC})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
