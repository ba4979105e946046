#!/usr/bin/env python
"""Foundation benchmark: the shard's optimizer, the data plane and one synchronous step,
each divided by a baseline measured in the same run (see bench/README.md).

    RAY_AUTH_MODE=disabled python bench/bench_foundation.py            # 25M params (about 35 s here)
    RAY_AUTH_MODE=disabled python bench/bench_foundation.py --quick    # 2M params, smoke test

(a) ShardState.apply (AdamW) rate / torch.optim.AdamW(fused=True).step() rate   target >= 0.95
(b) push / pull GB/s through the real service (1 worker, 1 shard, sgd lr 0)
    / a raw grpc.aio client-stream / server-stream of the same bytes, 1 MiB chunks,
    served by a bare generic-handler server in another process                    target >= 0.80
(c) one synchronous step (push + wait + pull; 1 worker, 2 shards, adamw; fp32 and bf16 wire)
    / model = grad bytes / raw push rate + fused AdamW time + param bytes / raw pull rate
                                                                                   target <= 1.25

It reports; it never asserts: the exit status is 0 whether or not a target is met.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

CHUNK_BYTES = 1 << 20
RAW_SERVICE = "bench.Raw"
MAX_MESSAGE = 64 << 20
GRPC_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]
GB = 1e9


# ---------------------------------------------------------------------------------------
# The raw baseline server: a bare grpc.aio server with generic handlers and identity bytes
# (de)serializers, in its own (spawned) process like a shard actor.
# ---------------------------------------------------------------------------------------


def _raw_server_main(conn: Any, max_bytes: int) -> None:
    import grpc
    import numpy as np
    from grpc import aio

    rng = np.random.default_rng(0)
    # Distinct 1 MiB chunks (as a shard serves distinct memory), built once, like a shard's cached encoding.
    chunks = [rng.integers(0, 255, CHUNK_BYTES, dtype=np.uint8).tobytes() for _ in range((max_bytes + CHUNK_BYTES - 1) // CHUNK_BYTES)]

    async def push(request_iterator: Any, context: Any) -> bytes:
        n = 0
        async for b in request_iterator:  # the transport alone: count and drop each chunk
            n += len(b)
        return n.to_bytes(8, "little")

    async def push_keep(request_iterator: Any, context: Any) -> bytes:
        kept = []  # hold every chunk until the stream ends, as the shard holds its Pieces (diagnostic)
        n = 0
        async for b in request_iterator:
            kept.append(b)
            n += len(b)
        return n.to_bytes(8, "little")

    async def pull(request: bytes, context: Any) -> Any:
        want = int.from_bytes(request, "little")
        sent = 0
        for c in chunks:
            if sent >= want:
                break
            take = min(len(c), want - sent)
            yield c if take == len(c) else c[:take]
            sent += take

    async def main() -> None:
        server = aio.server(options=[*GRPC_OPTIONS, ("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            RAW_SERVICE,
            {
                "Push": grpc.stream_unary_rpc_method_handler(push),
                "PushKeep": grpc.stream_unary_rpc_method_handler(push_keep),
                "Pull": grpc.unary_stream_rpc_method_handler(pull),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # any message = stop
        await server.stop(0)

    asyncio.run(main())


class RawClient:
    """aio client of the raw server (create it inside the running loop)."""

    def __init__(self, address: str) -> None:
        from grpc import aio

        self.channel = aio.insecure_channel(address, options=GRPC_OPTIONS)
        self._push = self.channel.stream_unary(f"/{RAW_SERVICE}/Push")
        self._push_keep = self.channel.stream_unary(f"/{RAW_SERVICE}/PushKeep")
        self._pull = self.channel.unary_stream(f"/{RAW_SERVICE}/Pull")

    async def push(self, chunks: list[bytes], keep: bool = False) -> int:
        rpc = self._push_keep if keep else self._push
        return int.from_bytes(await rpc(iter(chunks)), "little")

    async def pull(self, nbytes: int) -> int:
        got = 0
        async for b in self._pull(nbytes.to_bytes(8, "little")):
            got += len(b)
        return got


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# (a) the shard's AdamW update vs torch fused AdamW
# ---------------------------------------------------------------------------------------


def bench_optimizer(n: int, warmup: int, reps: int) -> dict[str, float]:
    import numpy as np
    import torch

    from paramserver.jobconfig import JobConfig
    from paramserver.shard import Contribution, ShardState
    from paramserver.steps import Decision
    from paramserver.wire import wire_tensor
    from paramserver_client.codec import FLOAT32

    rng = np.random.default_rng(1)
    init = rng.standard_normal(n, dtype=np.float32)
    grad = torch.from_numpy(rng.standard_normal(n, dtype=np.float32))

    config = JobConfig(parameters=(("w", (n,), ""),), optimizer="adamw", num_shards=1)
    state = ShardState(config, 0, config.plan()[0])
    buf = state.grads.acquire()
    buf.write(0, wire_tensor(init.tobytes(), FLOAT32))
    state.load(buf)
    buf = state.grads.acquire()
    buf.write(0, grad)
    state.reduce([Contribution(0, 1, buf)])  # the step's gradient (divided by 1: unchanged)

    p = torch.nn.Parameter(torch.from_numpy(init.copy()))
    p.grad = grad.clone()
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, fused=True)

    step = 0

    def shard_step() -> None:
        nonlocal step
        state.apply(Decision(step=step, apply=True, skip_reason="", grad_norm=1.0, clip_coef=1.0, loss_terms=1))
        step += 1

    shard_t: list[float] = []
    torch_t: list[float] = []
    torch1_t: list[float] = []
    threads = torch.get_num_threads()
    for r in range(warmup + reps):  # interleaved, alternating which goes first, so drift hits both alike
        if r % 2:
            b = timed(opt.step)
            a = timed(shard_step)
        else:
            a = timed(shard_step)
            b = timed(opt.step)
        if r >= warmup:
            shard_t.append(a)
            torch_t.append(b)
    # For reference: fused AdamW on one thread (what a shard actor gets: Ray sets OMP_NUM_THREADS=1).
    torch.set_num_threads(1)
    try:
        for r in range(warmup + reps):
            b = timed(opt.step)
            if r >= warmup:
                torch1_t.append(b)
    finally:
        torch.set_num_threads(threads)
    return {"shard_s": med(shard_t), "torch_s": med(torch_t), "torch1_s": med(torch1_t)}


def bench_norm(n: int, warmup: int, reps: int) -> dict[str, float]:
    """The shard's share of the global gradient norm (fixed blocks, the same bits on any shard
    count) vs the plain fp32 norm it replaced (torch.linalg.vector_norm in 1M blocks, summed in
    fp64), both on one thread as in a shard actor."""
    import numpy as np
    import torch

    from paramserver.gradnorm_kernel import norm_part

    grad = torch.from_numpy(np.random.default_rng(2).standard_normal(n, dtype=np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def ours() -> None:
        norm_part(lambda a, k: grad[a : a + k], [(0, n)], n)

    def plain() -> None:
        total = 0.0
        for k in range(0, n, 1 << 20):
            v = float(torch.linalg.vector_norm(grad[k : k + (1 << 20)]))
            total += v * v

    ours_t, plain_t = [], []
    try:
        for r in range(warmup + reps):
            a, b = timed(ours), timed(plain)
            if r >= warmup:
                ours_t.append(a)
                plain_t.append(b)
    finally:
        torch.set_num_threads(threads)
    return {"ours_s": med(ours_t), "plain_s": med(plain_t)}


# ---------------------------------------------------------------------------------------


async def bench_service(n: int, warmup: int, reps: int, raw_address: str, svc_address: str) -> dict[str, Any]:
    import numpy as np

    from paramserver.v1 import shard_service_pb2 as spb
    from paramserver_client.aio import AsyncJobClient, AsyncWorker
    from paramserver_client.codec import BFLOAT16, FLOAT32

    rng = np.random.default_rng(3)
    params = rng.standard_normal(n, dtype=np.float32)
    grad = (rng.standard_normal(n, dtype=np.float32) * 1e-3).astype(np.float32)
    out = np.empty(n, dtype=np.float32)
    nbytes = n * 4
    raw_chunks = [grad[i : i + CHUNK_BYTES // 4].tobytes() for i in range(0, n, CHUNK_BYTES // 4)]
    raw = RawClient(raw_address)
    res: dict[str, Any] = {}
    jobs = AsyncJobClient(svc_address)
    try:
        # ---- (b): 1 worker, 1 shard, sgd lr 0 ---------------------------------------------
        log("(b) creating the sgd job (1 shard)")
        job = await jobs.create_job([("w", (n,))], optimizer="sgd", hyperparameters={"lr": 0.0}, num_workers=1, num_shards=1)
        w = await AsyncWorker.join(svc_address, job.job_id)
        try:
            await w.upload(params)
            await w.pull(0, out)
            t: dict[str, list[float]] = {k: [] for k in ("raw_push", "raw_pull", "push", "pull", "raw_push_keep")}
            step = 0
            for r in range(warmup + reps):  # interleaved, so drift hits service and baseline alike
                t0 = time.perf_counter()
                got = await raw.push(raw_chunks)
                t1 = time.perf_counter()
                back = await raw.pull(nbytes)
                t2 = time.perf_counter()
                ans = await w.push(step, grad, 1)
                t3 = time.perf_counter()
                version, _, _ = await w.pull(step + 1, out)
                t4 = time.perf_counter()
                kept = await raw.push(raw_chunks, keep=True)
                t5 = time.perf_counter()
                assert got == nbytes and back == nbytes and kept == nbytes, (got, back, kept, nbytes)
                assert ans.outcome == spb.STEP_OUTCOME_APPLIED and version == step + 1, (ans, version)
                step += 1
                if r >= warmup:
                    for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                        t[k].append(v)
            res["b"] = {k: med(v) for k, v in t.items()}
            res["b_all"] = t
        finally:
            await w.close()
            await jobs.delete_job(job.job_id)

        # ---- (c): 1 worker, 2 shards, adamw; fp32 and bf16 wire ---------------------------
        log("(c) creating the adamw job (2 shards)")
        job = await jobs.create_job([("w", (n,))], optimizer="adamw", num_workers=1, num_shards=2)
        w = await AsyncWorker.join(svc_address, job.job_id)
        try:
            await w.upload(params)
            await w.pull(0, out)
            c: dict[str, list[float]] = {k: [] for k in ("fp32_push", "fp32_pull", "bf16_push", "bf16_pull", "fp32", "bf16")}
            step = 0
            for r in range(warmup + reps):
                for name, dt in (("fp32", FLOAT32), ("bf16", BFLOAT16)):
                    t0 = time.perf_counter()
                    ans = await w.push(step, grad, 1, dtype=dt)
                    t1 = time.perf_counter()
                    version, _, _ = await w.pull(step + 1, out, dtype=dt)
                    t2 = time.perf_counter()
                    assert ans.outcome == spb.STEP_OUTCOME_APPLIED and version == step + 1, (ans, version)
                    step += 1
                    if r >= warmup:
                        c[f"{name}_push"].append(t1 - t0)
                        c[f"{name}_pull"].append(t2 - t1)
                        c[name].append(t2 - t0)
            res["c"] = {k: med(v) for k, v in c.items()}
        finally:
            await w.close()
            await jobs.delete_job(job.job_id)
    finally:
        await jobs.close()
        await raw.channel.close()
    return res


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2M params, fewer repeats")
    ap.add_argument("--params", type=int, default=None, help="number of parameters (default 25M; 2M with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (default 15; 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 2; 1 with --quick)")
    args = ap.parse_args()
    n = args.params or (2_000_000 if args.quick else 25_000_000)
    reps = args.repeats or (3 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)

    import grpc
    import numpy as np
    import ray
    import torch

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    threads = torch.get_num_threads()
    log(f"params={n:,} repeats={reps} warmup={warmup} torch threads={threads}")

    # (a) before anything else runs on the machine.
    log("(a) shard AdamW vs torch fused AdamW")
    a = bench_optimizer(n, max(warmup, 2), max(reps, 5) * 3)
    gc.collect()
    log("(a) gradient norm: fixed blocks vs plain fp32 norm")
    norm = bench_norm(n, warmup, reps)
    gc.collect()

    # The raw baseline server in its own process (spawned like a fresh shard actor).
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_raw_server_main, args=(child, n * 4), daemon=True)
    proc.start()
    if not parent.poll(60):
        raise RuntimeError("the raw gRPC server did not start")
    raw_address = f"127.0.0.1:{parent.recv()}"

    from paramserver.server import BackgroundService, ServiceConfig

    log("starting the service (Ray, 2 CPUs)")
    svc = BackgroundService(ServiceConfig(port=0, num_cpus=2, state_dir=tempfile.mkdtemp(prefix="ps-bench-state-")))
    try:
        s = asyncio.run(bench_service(n, warmup, reps, raw_address, svc.address))
    finally:
        log("stopping")
        try:
            svc.stop()
        finally:
            parent.send("stop")
            proc.join(10)
            if proc.is_alive():
                proc.terminate()

    # ---- report -------------------------------------------------------------------------------
    b = s["b"]
    c = s["c"]
    nb = n * 4
    raw_push = nb / b["raw_push"]  # bytes/s
    raw_pull = nb / b["raw_pull"]
    model = {name: (n * isz) / raw_push + a["torch_s"] + (n * isz) / raw_pull for name, isz in (("fp32", 4), ("bf16", 2))}

    rows: list[tuple[str, str, str, float, str]] = []
    rows.append(
        (
            "(a) shard AdamW apply",
            f"{n / a['shard_s'] / 1e9:.3f} Gparam/s ({a['shard_s'] * 1e3:.1f} ms)",
            f"{n / a['torch_s'] / 1e9:.3f} Gparam/s ({a['torch_s'] * 1e3:.1f} ms) torch AdamW fused",
            a["torch_s"] / a["shard_s"],
            ">= 0.95",
        )
    )
    rows.append(
        (
            "(b) push 1 shard",
            f"{nb / b['push'] / GB:.3f} GB/s ({b['push'] * 1e3:.1f} ms)",
            f"{raw_push / GB:.3f} GB/s ({b['raw_push'] * 1e3:.1f} ms) raw client-stream",
            b["raw_push"] / b["push"],
            ">= 0.80",
        )
    )
    rows.append(
        (
            "(b) pull 1 shard",
            f"{nb / b['pull'] / GB:.3f} GB/s ({b['pull'] * 1e3:.1f} ms)",
            f"{raw_pull / GB:.3f} GB/s ({b['raw_pull'] * 1e3:.1f} ms) raw server-stream",
            b["raw_pull"] / b["pull"],
            ">= 0.80",
        )
    )
    for name in ("fp32", "bf16"):
        rows.append(
            (
                f"(c) step 2 shards {name}",
                f"{c[name] * 1e3:.1f} ms (push {c[name + '_push'] * 1e3:.1f} + pull {c[name + '_pull'] * 1e3:.1f})",
                f"{model[name] * 1e3:.1f} ms model",
                c[name] / model[name],
                "<= 1.25",
            )
        )

    def ok(ratio: float, target: str) -> str:
        op, val = target.split()
        good = ratio >= float(val) if op == ">=" else ratio <= float(val)
        return "ok" if good else "MISS"

    print()
    print(f"paramserver foundation benchmark: {n:,} params ({nb / 1e6:.0f} MB fp32), median of {reps} after {warmup} warm-up")
    print(
        f"torch {torch.__version__} (threads {threads}), grpcio {grpc.__version__}, numpy {np.__version__}, ray {ray.__version__}, "
        f"python {sys.version.split()[0]}, cpus {os.cpu_count()}, chunk {CHUNK_BYTES >> 10} KiB"
    )
    print(f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}")
    print(
        f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
        "(other processes on this machine make every number noisier; rerun if the load was high)"
    )
    w0, w1, w2 = 24, 44, 58
    print()
    print(f"{'quantity':<{w0}} {'measured':<{w1}} {'baseline':<{w2}} {'ratio':>6}  {'target':<8} ")
    print("-" * (w0 + w1 + w2 + 24))
    for q, m, base, ratio, target in rows:
        print(f"{q:<{w0}} {m:<{w1}} {base:<{w2}} {ratio:>6.3f}  {target:<8} {ok(ratio, target)}")
    print()
    print("details")
    print(f"  torch fused AdamW, 1 thread (a shard actor's default): {n / a['torch1_s'] / 1e9:.3f} Gparam/s ({a['torch1_s'] * 1e3:.1f} ms)")
    print(
        f"  gradient norm, 1 thread: split-invariant blocks {norm['ours_s'] * 1e3:.1f} ms, plain fp32 vector_norm "
        f"{norm['plain_s'] * 1e3:.1f} ms (cost ratio {norm['ours_s'] / norm['plain_s']:.2f}x; "
        f"{norm['ours_s'] / a['torch1_s'] * 100:.0f}% of a 1-thread AdamW update)"
    )
    print(
        f"  (b) raw client-stream, server holding every chunk to the end (as the shard holds its Pieces): "
        f"{nb / b['raw_push_keep'] / GB:.3f} GB/s ({b['raw_push_keep'] * 1e3:.1f} ms)"
    )

    def spread(key: str) -> str:
        xs = sorted(s["b_all"][key])
        return f"{xs[0] * 1e3:.0f}/{med(xs) * 1e3:.0f}/{xs[-1] * 1e3:.0f}"

    print(
        f"  (b) min/median/max ms: push {spread('push')}, raw push {spread('raw_push')}, "
        f"pull {spread('pull')}, raw pull {spread('raw_pull')}"
    )
    for name, isz in (("fp32", 4), ("bf16", 2)):
        print(
            f"  (c) {name} model = {n * isz / raw_push * 1e3:.1f} ms push + {a['torch_s'] * 1e3:.1f} ms AdamW"
            f" + {n * isz / raw_pull * 1e3:.1f} ms pull"
        )
    print()
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
