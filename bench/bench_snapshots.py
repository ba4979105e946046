#!/usr/bin/env python
"""Snapshot benchmark: how long a snapshot holds training up, and how fast it writes, each
divided by a baseline measured in the same run (see bench/README.md).

    RAY_AUTH_MODE=disabled python bench/bench_snapshots.py                  # 25M params (about 45 s here)
    RAY_AUTH_MODE=disabled python bench/bench_snapshots.py --quick          # 2M params, 1 repeat (~11 s)
    RAY_AUTH_MODE=disabled python bench/bench_snapshots.py --compute-ms 150 # a worker that computes between steps

(1) snapshot pause / one step's time (1 worker, 2 shards, adamw; blocking Worker,
    push s + pull s+1, JobClient.create_snapshot from another thread while training goes on).
    pause = sum over the steps overlapping the snapshot (request .. durable) of
            max(0, step time - median step time without snapshots)               target <= 0.1
(2) snapshot write rate (Snapshot.bytes / request-to-durable wall time, training idle)
    / one plain open('wb') + write + fsync of the same bytes to the same directory  target >= 0.7
    write_tensors (one shard's file: params + 2 AdamW moments, in this process)
    / plain open('wb') + write + fsync of the same bytes                            target >= 0.7

Below the table: the same pause measured against controls that write the same bytes from
another process with no snapshot at all (write_tensors; write_tensors at nice 19; plain write +
fsync), which separate "the snapshot machinery" from "any 300 MB write on a 2-core machine"; the
capture (lock hold) measured in-process, fresh and into reused buffers; sha256 alone; write vs
fsync; and a sketch of write, early writeback and hash overlapped.

It reports; it never asserts: the exit status is 0 whether or not a target is met.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

#: The control writers (mode: what it does), run from another process while training, no snapshot.
CONTROLS = {
    "write_tensors": "write_tensors x2 threads",
    "write_tensors_nice": "write_tensors x2 threads at nice 19",
    "plain": "plain write+fsync x2 threads",
}
BLOCK = 64 << 20  # write_tensors writes (and hashes) 64 MiB blocks; the baselines use the same
GB = 1e9


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def views(tensors: Mapping[str, Any]) -> list[memoryview]:
    """The raw bytes of each (C-contiguous) array, as write_tensors writes them."""
    out = []
    for a in tensors.values():
        out.append(a.data.cast("B") if a.ndim else memoryview(a.tobytes()))
    return out


def plain_write(path: Path, bufs: list[memoryview], split: dict[str, float] | None = None) -> int:
    """The baseline: open('wb'), write the buffers in 64 MiB blocks, fsync. No hash, no rename."""
    n = 0
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for v in bufs:
            for i in range(0, len(v), BLOCK):
                n += f.write(v[i : i + BLOCK])
        f.flush()
        t1 = time.perf_counter()
        os.fsync(f.fileno())
    if split is not None:
        split["write"] = t1 - t0
        split["fsync"] = time.perf_counter() - t1
    return n


def overlapped_write(path: Path, bufs: list[memoryview], block: int = 16 << 20) -> str:
    """A sketch of a fix (not the service's code): write block i and start its writeback at once
    (posix_fadvise DONTNEED starts asynchronous writeback of dirty pages on Linux), while a second
    thread hashes block i-1; the final fsync then finds little left to write. hashlib and file
    writes release the GIL."""
    digest = hashlib.sha256()
    off = 0
    with ThreadPoolExecutor(1) as pool, open(path, "wb", buffering=0) as f:
        fd = f.fileno()
        pending: Any = None
        for v in bufs:
            for i in range(0, len(v), block):
                piece = v[i : i + block]
                if pending is not None:
                    pending.result()  # digest.update calls stay in order
                pending = pool.submit(digest.update, piece)
                done = 0
                while done < len(piece):
                    done += f.write(piece[done:]) or 0
                os.posix_fadvise(fd, off, done, os.POSIX_FADV_DONTNEED)
                off += done
        if pending is not None:
            pending.result()
        os.fsync(fd)
    return digest.hexdigest()


def sha256_only(bufs: list[memoryview]) -> str:
    digest = hashlib.sha256()
    for v in bufs:
        for i in range(0, len(v), BLOCK):
            digest.update(v[i : i + BLOCK])
    return digest.hexdigest()


def settle() -> None:
    """Flush other dirty pages so a timed fsync pays only for its own bytes."""
    os.sync()


# ---------------------------------------------------------------------------------------
# the control writer: the same bytes as the snapshot, written by another process with no
# service involved (two threads, as two shards write two files)
# ---------------------------------------------------------------------------------------


def _control_main(conn: Any, directory: str, shard_numel: int, nshards: int) -> None:
    import numpy as np

    from paramserver.snapshot_store import DirectoryStore, SnapshotRef

    rng = np.random.default_rng(7)
    shards = []
    for _ in range(nshards):
        shards.append(
            {
                "params": rng.standard_normal(shard_numel, dtype=np.float32),
                "state.exp_avg": rng.standard_normal(shard_numel, dtype=np.float32),
                "state.exp_avg_sq": rng.standard_normal(shard_numel, dtype=np.float32),
                "state.step": np.array(1.0, dtype=np.float32),
            }
        )
    store, ref = DirectoryStore(directory), SnapshotRef("bench", "control")
    store.begin(ref)
    d = Path(store.path(ref))
    conn.send("ready")
    while True:
        mode = conn.recv()
        if mode == "stop":
            break

        def one(i: int, mode: str = mode) -> None:
            path = d / f"control-{i:05d}.safetensors"
            if mode == "write_tensors_nice":  # a sketch: the writer thread at the lowest CPU priority
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            if mode.startswith("write_tensors"):  # what a shard does: tmp name, stream + sha256, fsync, rename
                store.write_file(ref, path.name, shards[i], {"shard": str(i)})
            else:
                plain_write(path, views(shards[i]))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(nshards)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        conn.send(sum(p.stat().st_size for p in d.glob("control-*")))


# ---------------------------------------------------------------------------------------
# (2b) in-process: write_tensors on one shard's captured state vs a plain write
# ---------------------------------------------------------------------------------------


def bench_inprocess(n: int, nshards: int, directory: Path, reps: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from paramserver.jobconfig import JobConfig
    from paramserver.shard import Contribution, ShardState
    from paramserver.snapshot_store import DirectoryStore, SnapshotRef
    from paramserver.steps import Decision

    config = JobConfig(parameters=(("w", (n,), ""),), optimizer="adamw", num_shards=nshards)
    state = ShardState(config, 0, config.plan()[0])
    m = state.numel
    rng = np.random.default_rng(1)
    buf = state.grads.acquire()
    buf.write(0, torch.from_numpy(rng.standard_normal(m, dtype=np.float32)))
    state.load(buf)
    buf = state.grads.acquire()
    buf.write(0, torch.from_numpy(rng.standard_normal(m, dtype=np.float32) * 1e-3))
    state.reduce([Contribution(0, 1, buf)])
    state.apply(Decision(step=0, apply=True, skip_reason="", grad_norm=1.0, clip_coef=1.0, loss_terms=1))

    # The capture under the state lock: the only pause the design intends. One torch thread, as
    # in a shard actor (Ray sets OMP_NUM_THREADS=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cap: list[float] = []
    cap_reuse: list[float] = []
    try:
        for _ in range(max(reps, 3) + 1):
            state._capture_buffers.clear()  # a fresh capture: new pages to fault in
            t = time.perf_counter()
            with state.lock:
                state.capture()
            cap.append(time.perf_counter() - t)
        # What the shard does: the copy into the buffers kept from the previous snapshot.
        for _ in range(max(reps, 3) + 1):
            t = time.perf_counter()
            with state.lock:
                state.capture()
            cap_reuse.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    tensors = {k: v.numpy() for k, v in state.capture().items()}
    bufs = views(tensors)
    nbytes = sum(len(v) for v in bufs)
    meta = {"shard": "0", "version": "1", "applied": "1", "ranges": f"[[0, {m}]]", "ledger": "[]"}

    store, ref = DirectoryStore(directory), SnapshotRef("bench", "inprocess")
    store.begin(ref)
    target = Path(store.path(ref)) / "shard-00000.safetensors"
    plain = directory / "plain.bin"
    res: dict[str, list[float]] = {k: [] for k in ("write_tensors", "plain", "plain_write", "plain_fsync", "sha256", "overlapped")}
    for r in range(reps + 1):  # one untimed warm-up round; alternate the order so drift hits both
        order = ("wt", "plain") if r % 2 == 0 else ("plain", "wt")
        got: dict[str, float] = {}
        for which in order:
            settle()
            t = time.perf_counter()
            if which == "wt":
                store.write_file(ref, target.name, tensors, meta)
                got["write_tensors"] = time.perf_counter() - t
                target.unlink()
            else:
                split: dict[str, float] = {}
                plain_write(plain, bufs, split)
                got["plain"] = time.perf_counter() - t
                got["plain_write"], got["plain_fsync"] = split["write"], split["fsync"]
                plain.unlink()
        t = time.perf_counter()
        sha256_only(bufs)
        got["sha256"] = time.perf_counter() - t
        settle()
        t = time.perf_counter()
        overlapped_write(plain, bufs)
        got["overlapped"] = time.perf_counter() - t
        plain.unlink()
        if r >= 1:
            for k, v in got.items():
                res[k].append(v)
    out: dict[str, Any] = {k: med(v) for k, v in res.items()}
    out["capture"] = med(cap[1:])
    out["capture_reuse"] = med(cap_reuse[1:])
    out["bytes"] = nbytes
    out["numel"] = m
    out["all"] = res
    return out


# ---------------------------------------------------------------------------------------
# (1), (2a) through the service
# ---------------------------------------------------------------------------------------


class Trainer:
    """One blocking worker doing synchronous steps: push s, pull s+1."""

    def __init__(self, worker: Any, grad: Any, out: Any, compute_s: float = 0.0) -> None:
        self.w = worker
        self.compute_s = compute_s
        self.grad = grad
        self.out = out
        self.step = 0

    def one(self) -> tuple[float, float, float]:
        from paramserver.v1 import shard_service_pb2 as spb

        s = self.step
        t0 = time.perf_counter()
        if self.compute_s:
            time.sleep(self.compute_s)  # the worker's forward/backward, simulated: the service's CPUs idle
        ans = self.w.push(s, self.grad, 1)
        t1 = time.perf_counter()
        version, _, _ = self.w.pull(s + 1, self.out)
        t2 = time.perf_counter()
        assert ans.outcome == spb.STEP_OUTCOME_APPLIED and version == s + 1, (ans, version)
        self.step += 1
        return t0, t1, t2

    def window(self, action: Callable[[], Any], pre: int, post: int, max_steps: int = 2000) -> dict[str, Any]:
        """Train `pre` steps, start `action` on another thread, keep training until it returns,
        then `post` more steps. Returns every step's (start, push end, end) and the action's window."""
        go = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            go.wait()
            box["t_req"] = time.perf_counter()
            try:
                box["result"] = action()
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                box["error"] = exc
            box["t_done"] = time.perf_counter()

        th = threading.Thread(target=run, daemon=True)
        th.start()
        steps = [self.one() for _ in range(pre)]
        go.set()
        while th.is_alive() and len(steps) < max_steps:
            steps.append(self.one())
        th.join()
        steps += [self.one() for _ in range(post)]
        if "error" in box:
            raise box["error"]
        return {"steps": steps, "t_req": box["t_req"], "t_done": box["t_done"], "result": box.get("result")}


def excess(win: dict[str, Any], base: float) -> dict[str, Any]:
    """The steps overlapping [t_req, t_done]: their count, sum and max of time over `base`."""
    a, b = win["t_req"], win["t_done"]
    over = [(t0, t2) for t0, _, t2 in win["steps"] if t2 > a and t0 < b]
    ex = [max(0.0, (t2 - t0) - base) for t0, t2 in over]
    return {
        "wall": b - a,
        "n": len(over),
        "sum": sum(ex),
        "max": max(ex, default=0.0),
        "durs": [t2 - t0 for t0, t2 in over],
    }


def bench_service(n: int, reps: int, base_steps: int, warmup: int, snap_dir: Path, control: Any, compute_s: float) -> dict[str, Any]:
    import numpy as np

    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver_client import JobClient, Worker

    rng = np.random.default_rng(3)
    params = rng.standard_normal(n, dtype=np.float32)
    grad = (rng.standard_normal(n, dtype=np.float32) * 1e-3).astype(np.float32)
    out = np.empty(n, dtype=np.float32)
    res: dict[str, Any] = {}

    log("starting the service (Ray, 2 CPUs)")
    svc = BackgroundService(ServiceConfig(port=0, num_cpus=2, snapshot_dir=str(snap_dir), state_dir=str(snap_dir.parent / "state")))
    try:
        jobs = JobClient(svc.address)
        try:
            log("creating the adamw job (1 worker, 2 shards)")
            job = jobs.create_job([("w", (n,))], optimizer="adamw", num_workers=1, num_shards=2)
            w = Worker(svc.address, job.job_id)
            try:
                w.upload(params)
                w.pull(0, out)
                tr = Trainer(w, grad, out, compute_s)
                for _ in range(warmup):
                    tr.one()
                # One untimed snapshot: the first one pays for imports and first-touch allocations.
                snap = jobs.create_snapshot(job.job_id)
                shutil.rmtree(snap.path, ignore_errors=True)
                for _ in range(2):
                    tr.one()

                def baseline() -> None:
                    log(f"baseline: {base_steps} steps without snapshots")
                    base_durs = []
                    for _ in range(base_steps):
                        t0, t1, t2 = tr.one()
                        base_durs.append((t2 - t0, t1 - t0, t2 - t1))
                    base = med([d[0] for d in base_durs])
                    res["base"] = base
                    res["base_push"] = med([d[1] for d in base_durs])  # includes the simulated compute
                    res["base_pull"] = med([d[2] for d in base_durs])
                    # The noise floor of the pause metric: the mean positive excess of a step with no snapshot.
                    res["noise_per_step"] = statistics.fmean(max(0.0, d[0] - base) for d in base_durs)
                    res["base_all"] = [d[0] for d in base_durs]

                plain_buf: Any = None
                wins: dict[str, list[dict[str, Any]]] = {k: [] for k in ("snap", *CONTROLS)}
                idle: list[float] = []
                idle_bytes: list[int] = []
                plain: list[float] = []
                nbytes = 0
                # Repeat 0 is an untimed warm-up: on this VM the first few hundred MB written after a
                # while are much slower (new blocks of a thin disk, reclaim), whichever writer goes first.
                for r in range(reps + 1):
                    if r == 1:
                        baseline()
                    rep = "warm-up" if r == 0 else f"repeat {r}/{reps}"
                    log(f"{rep}: snapshot while training")
                    settle()
                    win = tr.window(lambda: jobs.create_snapshot(job.job_id), pre=2, post=3)
                    snap = win["result"]
                    nbytes = int(snap.bytes)
                    wins["snap"].append(win)
                    shutil.rmtree(snap.path, ignore_errors=True)

                    for mode in CONTROLS:
                        log(f"{rep}: control ({mode} of the same bytes, another process) while training")
                        for p in snap_dir.glob("control/bench/control/control-*"):
                            p.unlink()
                        settle()

                        def ctl(mode: str = mode) -> int:
                            control.send(mode)
                            return int(control.recv())

                        win = tr.window(ctl, pre=2, post=3)
                        wins[mode].append(win)
                    for p in snap_dir.glob("control/bench/control/control-*"):
                        p.unlink()

                    # (2a): a snapshot with training idle vs one plain write + fsync of the same bytes.
                    if plain_buf is None:
                        plain_buf = np.random.default_rng(5).integers(0, 255, nbytes, dtype=np.uint8)
                    log(f"{rep}: snapshot, training idle, and a plain write of {nbytes / 1e6:.0f} MB")
                    order = ("snap", "plain") if r % 2 == 0 else ("plain", "snap")
                    for which in order:
                        settle()
                        if which == "snap":
                            t = time.perf_counter()
                            snap = jobs.create_snapshot(job.job_id)
                            idle.append(time.perf_counter() - t)
                            idle_bytes.append(int(snap.bytes))  # varies by a few KB: the ledger in the header
                            shutil.rmtree(snap.path, ignore_errors=True)
                        else:
                            path = snap_dir / "plain.bin"
                            t = time.perf_counter()
                            plain_write(path, [plain_buf.data.cast("B")])
                            plain.append(time.perf_counter() - t)
                            path.unlink()
                    tr.one()
                res["rows"] = {k: [excess(x, res["base"]) for x in v[1:]] for k, v in wins.items()}
                res["idle"] = idle[1:]
                res["idle_rate"] = med([b / t for b, t in zip(idle_bytes[1:], idle[1:], strict=True)])
                res["plain"] = plain[1:]
                res["bytes"] = nbytes
                res["files"] = 2
            finally:
                w.close()
                jobs.delete_job(job.job_id)
        finally:
            jobs.close()
    finally:
        log("stopping")
        svc.stop()
    return res


def bench_spilled(n: int, reps: int, base_steps: int, snap_dir: Path, compute_s: float) -> dict[str, Any]:
    """(3) The pause of a snapshot of a spilled shard while training goes on: one shard whose
    memory budget is below its in-memory footprint (tiles resident up to the budget, the rest in
    its spill file), 1 worker; the same window measure as (1)."""
    import numpy as np

    from paramserver.server import BackgroundService, ServiceConfig
    from paramserver_client import JobClient, Worker

    # In memory the shard would hold 24 bytes per parameter (params, 2 moments, gradient and
    # buffers); the budget must also cover the 96 MiB allowance and the I/O rings.
    budget = max(150 << 20, 24 * n // 2)
    n = max(n, budget // 24 * 3 // 2)
    rng = np.random.default_rng(4)
    params = rng.standard_normal(n, dtype=np.float32)
    grad = (rng.standard_normal(n, dtype=np.float32) * 1e-3).astype(np.float32)
    out = np.empty(n, dtype=np.float32)
    res: dict[str, Any] = {"n": n, "budget": budget}
    log(f"(3) spilled shard: {n:,} params, budget {budget / 1e6:.0f} MB")
    svc = BackgroundService(
        ServiceConfig(
            port=0,
            num_cpus=2,
            snapshot_dir=str(snap_dir),
            spill_dir=str(snap_dir.parent / "spill"),
            state_dir=str(snap_dir.parent / "state"),
        )
    )
    try:
        with JobClient(svc.address) as jobs:
            job = jobs.create_job([("w", (n,))], optimizer="adamw", num_workers=1, num_shards=1, shard_memory_budget_bytes=budget)
            mem = jobs.get_job(job.job_id).shards[0].memory
            res["spilled_bytes"] = int(mem.spilled_bytes)
            try:
                with Worker(svc.address, job.job_id) as w:
                    w.upload(params)
                    w.pull(0, out)
                    tr = Trainer(w, grad, out, compute_s)
                    for _ in range(2):
                        tr.one()
                    snap = jobs.create_snapshot(job.job_id)  # untimed: first-use costs
                    shutil.rmtree(snap.path, ignore_errors=True)
                    durs = []
                    for _ in range(base_steps):
                        t0, _t1, t2 = tr.one()
                        durs.append(t2 - t0)
                    res["base"] = med(durs)
                    wins = []
                    for r in range(reps):
                        log(f"(3) repeat {r + 1}/{reps}: snapshot of the spilled shard while training")
                        settle()
                        win = tr.window(lambda: jobs.create_snapshot(job.job_id), pre=2, post=2)
                        res["bytes"] = int(win["result"].bytes)
                        shutil.rmtree(win["result"].path, ignore_errors=True)
                        wins.append(excess(win, res["base"]))
                    res["wins"] = wins
            finally:
                jobs.delete_job(job.job_id)
    finally:
        svc.stop()
    return res


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2M params, 1 repeat")
    ap.add_argument("--params", type=int, default=None, help="number of parameters (default 25M; 2M with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="snapshot repeats (default 3; 1 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="baseline steps without snapshots (default 15; 6 with --quick)")
    ap.add_argument(
        "--compute-ms",
        type=float,
        default=0.0,
        help="sleep this long before each push, as a worker computing its gradient (default 0: back-to-back steps, the worst case)",
    )
    ap.add_argument("--dir", default=None, help="where to write (default: a new temp dir under $TMPDIR, /tmp)")
    args = ap.parse_args()
    n = args.params or (2_000_000 if args.quick else 25_000_000)
    reps = args.repeats or (1 if args.quick else 3)
    base_steps = args.steps or (6 if args.quick else 15)
    warmup = 2 if args.quick else 3
    nshards = 2

    import numpy as np
    import ray
    import torch

    t_start = time.perf_counter()
    load0 = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="ps-bench-snapshots-", dir=args.dir))
    snap_dir = root / "snapshots"
    (snap_dir / "control").mkdir(parents=True)
    log(f"params={n:,} repeats={reps} baseline steps={base_steps} dir={root}")

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc: Any = None
    try:
        # (2b) first, before the service runs on the machine.
        log("(2b) write_tensors vs plain write + fsync, in this process")
        inproc_dir = root / "inprocess"
        inproc_dir.mkdir()
        ip = bench_inprocess(n, nshards, inproc_dir, max(reps, 2) if not args.quick else 1)
        gc.collect()

        # The control writer: the same shard-sized tensors, in its own (spawned) process.
        shard_numel = ip["numel"]
        proc = ctx.Process(target=_control_main, args=(child, str(snap_dir / "control"), shard_numel, nshards), daemon=True)
        proc.start()
        if not parent.poll(120) or parent.recv() != "ready":
            raise RuntimeError("the control writer did not start")

        s = bench_service(n, reps, base_steps, warmup, snap_dir, parent, args.compute_ms / 1e3)
        gc.collect()
        sp = bench_spilled(n, reps, base_steps, snap_dir, args.compute_ms / 1e3)
    finally:
        if proc is not None:
            parent.send("stop")
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
        shutil.rmtree(root, ignore_errors=True)

    # ---- report -------------------------------------------------------------------------------
    base = s["base"]
    snaps = s["rows"]["snap"]
    pause = med([e["sum"] for e in snaps])
    pause_max = med([e["max"] for e in snaps])
    wall_train = med([e["wall"] for e in snaps])
    nb = s["bytes"]
    idle = med(s["idle"])
    idle_rate = s["idle_rate"]
    plain = med(s["plain"])
    plain_rate = nb / plain
    ib = ip["bytes"]

    rows: list[tuple[str, str, str, float, str]] = [
        (
            "(1) snapshot pause",
            f"{pause * 1e3:.0f} ms excess over {med([e['n'] for e in snaps]):.0f} steps",
            f"{base * 1e3:.1f} ms median step (no snapshot)",
            pause / base,
            "<= 0.1",
        ),
        (
            "(1) slowest step's excess",
            f"{pause_max * 1e3:.0f} ms",
            f"{base * 1e3:.1f} ms median step",
            pause_max / base,
            "",
        ),
        (
            "(2) snapshot rate, idle",
            f"{idle_rate / GB:.3f} GB/s ({idle * 1e3:.0f} ms request..durable)",
            f"{plain_rate / GB:.3f} GB/s ({plain * 1e3:.0f} ms) 1 file write+fsync",
            idle_rate / plain_rate,
            ">= 0.7",
        ),
        (
            "(2) snapshot rate, training",
            f"{nb / wall_train / GB:.3f} GB/s ({wall_train * 1e3:.0f} ms request..durable)",
            f"{plain_rate / GB:.3f} GB/s (same, training idle)",
            nb / wall_train / plain_rate,
            "",
        ),
        (
            "(3) spilled shard's pause",
            f"{med([e['sum'] for e in sp['wins']]) * 1e3:.0f} ms excess over {med([e['n'] for e in sp['wins']]):.0f} steps",
            f"{sp['base'] * 1e3:.1f} ms median spilled step",
            med([e["sum"] for e in sp["wins"]]) / sp["base"],
            "<= 0.1",
        ),
        (
            "(2) write_tensors 1 shard",
            f"{ib / ip['write_tensors'] / GB:.3f} GB/s ({ip['write_tensors'] * 1e3:.0f} ms)",
            f"{ib / ip['plain'] / GB:.3f} GB/s ({ip['plain'] * 1e3:.0f} ms) write+fsync",
            ip["plain"] / ip["write_tensors"],
            ">= 0.7",
        ),
    ]

    def ok(ratio: float, target: str) -> str:
        if not target:
            return "(info)"
        op, val = target.split()
        good = ratio >= float(val) if op == ">=" else ratio <= float(val)
        return "ok" if good else "MISS"

    print()
    print(
        f"paramserver snapshot benchmark: {n:,} params, adamw, 1 worker, {nshards} shards; snapshot {nb / 1e6:.0f} MB "
        f"in {s['files']} files; medians of {reps} repeat(s) after 1 untimed warm-up repeat, {base_steps} baseline steps"
    )
    print(
        f"worker compute per step (simulated, --compute-ms): {args.compute_ms:.0f} ms"
        + ("" if args.compute_ms else " (back-to-back steps: the service's CPUs never idle, the worst case for a background write)")
    )
    print(
        f"torch {torch.__version__}, numpy {np.__version__}, ray {ray.__version__}, python {sys.version.split()[0]}, "
        f"cpus {os.cpu_count()}, directory {root.parent} (removed at the end)"
    )
    print(
        f"load average at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
        "(other processes on this machine make every number noisier; rerun if the load was high)"
    )
    w0, w1, w2 = 28, 46, 46
    print()
    print(f"{'quantity':<{w0}} {'measured':<{w1}} {'baseline':<{w2}} {'ratio':>6}  {'target':<8} ")
    print("-" * (w0 + w1 + w2 + 26))
    for q, m, b, ratio, target in rows:
        print(f"{q:<{w0}} {m:<{w1}} {b:<{w2}} {ratio:>6.3f}  {target:<8} {ok(ratio, target)}")
    print()
    print("details")
    print(
        "  pause = sum over the steps overlapping the snapshot (request .. durable) of max(0, step - median step);\n"
        "          it counts the capture under the shard's lock AND the slowdown of training by the background\n"
        "          write (sha256 + write + fsync on threads of the 2 shard actors) competing for the same 2 cores/disk."
    )
    print(
        f"  median step {base * 1e3:.1f} ms = {f'compute {args.compute_ms:.0f} + ' if args.compute_ms else ''}"
        f"push {s['base_push'] * 1e3 - args.compute_ms:.1f} + pull {s['base_pull'] * 1e3:.1f}; "
        f"min/max {min(s['base_all']) * 1e3:.0f}/{max(s['base_all']) * 1e3:.0f} ms; noise floor of the pause metric "
        f"{s['noise_per_step'] * 1e3:.1f} ms per overlapping step with no snapshot"
    )
    print(
        f"  (3) spilled shard: {sp['n']:,} params, budget {sp['budget'] / 1e6:.0f} MB, spill file {sp['spilled_bytes'] / 1e6:.0f} MB, "
        f"snapshot {sp.get('bytes', 0) / 1e6:.0f} MB; per repeat: "
        + "; ".join(
            f"{e['wall'] * 1e3:.0f} ms request..durable over {e['n']} steps [{', '.join(f'{d * 1e3:.0f}' for d in e['durs'])}] ms"
            for e in sp["wins"]
        )
    )
    for i, e in enumerate(snaps):
        print(
            f"  repeat {i + 1}: snapshot {e['wall'] * 1e3:.0f} ms request..durable, {e['n']} overlapping steps "
            f"[{', '.join(f'{d * 1e3:.0f}' for d in e['durs'])}] ms, excess sum {e['sum'] * 1e3:.0f} / max {e['max'] * 1e3:.0f} ms"
        )
    for key, what in CONTROLS.items():
        c = s["rows"][key]
        print(
            f"  control, no snapshot, {what}, same bytes, another process: "
            f"{med([e['wall'] for e in c]) * 1e3:.0f} ms, excess sum {med([e['sum'] for e in c]) * 1e3:.0f} ms "
            f"= {med([e['sum'] for e in c]) / base:.3f} step, max {med([e['max'] for e in c]) * 1e3:.0f} ms"
        )
    print(
        f"  capture (the lock hold) of one shard's state in this process, 1 thread: {ip['capture'] * 1e3:.1f} ms "
        f"= {ip['capture'] / base:.3f} step ({ib / 1e6:.0f} MB copied at {ib / ip['capture'] / GB:.1f} GB/s)"
    )
    print(
        f"  sketch: the same copy into buffers reused from the previous snapshot: {ip['capture_reuse'] * 1e3:.1f} ms "
        f"= {ip['capture_reuse'] / base:.3f} step (a fresh copy faults in new pages)"
    )
    print(
        f"  one shard's file ({ib / 1e6:.0f} MB): sha256 alone {ib / ip['sha256'] / GB:.2f} GB/s ({ip['sha256'] * 1e3:.0f} ms); "
        f"plain = write {ip['plain_write'] * 1e3:.0f} ms + fsync {ip['plain_fsync'] * 1e3:.0f} ms; "
        f"write_tensors - plain = {(ip['write_tensors'] - ip['plain']) * 1e3:.0f} ms"
    )
    print(
        f"  sketch: write + early writeback (fadvise) with sha256 on a second thread: {ib / ip['overlapped'] / GB:.3f} GB/s "
        f"({ip['overlapped'] * 1e3:.0f} ms) = {ip['plain'] / ip['overlapped']:.3f} of plain"
    )
    print(
        f"  snapshot, training idle, each repeat: {', '.join(f'{t * 1e3:.0f}' for t in s['idle'])} ms; "
        f"plain write+fsync: {', '.join(f'{t * 1e3:.0f}' for t in s['plain'])} ms"
    )
    print("  os.sync() runs before every timed write so an fsync pays only for its own bytes; files are deleted between runs")
    print()
    print(f"total time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
