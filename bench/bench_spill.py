#!/usr/bin/env python
"""Spill benchmark: AdamW on state 4x its memory budget, against the disk-bound floor measured on
the same directory in the same run (see bench/README.md). Two rows:

* store: a TileStore alone (params + both moments, the gradient in memory), one update pass;
* shard: a SpilledShardState (job budget = state / 4) doing a whole shard step without the
  network: one worker's fp32 push written into its gradient file chunk by chunk, the reduction,
  the update and the publication of the new version, next to an in-memory ShardState doing the same.

    python bench/bench_spill.py                 # 48M params: 576 MB of AdamW state, 144 MB budget
    python bench/bench_spill.py --quick         # 12M params (the store row only: a shard's budget
                                                #   needs at least its 96 MiB allowance)
    python bench/bench_spill.py --dir /nvme/x   # where the spill files go (default: a temp dir here)

    floor      = spilled bytes / sequential read rate + spilled bytes / sequential write rate
                 (O_DIRECT, same directory, tile-sized records, measured in this run between steps)
    efficiency = floor / step time                     target >= 0.5, stretch >= 0.8
    context    = step time / in-memory step time

One thread for the math, as in a shard actor. It reports; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.adam import adam as torch_adam

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from paramserver.gradnorm import sum_of_squares
from paramserver.spill import SpillFile, TileStore, aligned_empty

COLUMNS = ["params", "exp_avg", "exp_avg_sq"]


def adamw_tile(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: torch.Tensor) -> None:
    torch_adam([p], [g], [m], [v], [], [step.clone()], fused=True, decoupled_weight_decay=True, amsgrad=False,
               beta1=0.9, beta2=0.999, lr=1e-3, weight_decay=0.01, eps=1e-8, maximize=False)  # fmt: skip


def disk_rates(directory: Path, total: int, record: int) -> tuple[float, float]:
    """Sequential O_DIRECT write (then fsync) and read rates of `total` bytes in `record` blocks."""
    f = SpillFile(directory / "rates.probe", total)
    buf = aligned_empty(record)
    buf[:] = 7
    t0 = time.perf_counter()
    for off in range(0, f.size - record + 1, record):
        f.write_from(off, buf)
    os.fsync(f.fd)
    write = (f.size // record * record) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for off in range(0, f.size - record + 1, record):
        f.read_into(off, buf)
    read = (f.size // record * record) / (time.perf_counter() - t0)
    f.close()
    return read, write


def shard_row(n: int, directory: Path, repeats: int) -> None:
    """A spilled ShardState step (push to file, reduce, update, publish) against the floor and an
    in-memory ShardState step."""
    from paramserver.jobconfig import JobConfig
    from paramserver.placement import Span
    from paramserver.shard import Contribution, ShardState, Storage
    from paramserver.steps import Decision
    from paramserver.wire import wire_tensor
    from paramserver_client.codec import FLOAT32, chunk_elements

    cfg = JobConfig(parameters=(("w", (n,), ""),), optimizer="adamw", hyperparameters={"lr": 1e-3}, num_workers=1)
    spans = [Span(0, n)]
    budget = n * 12 // 4
    try:
        spilled = ShardState(cfg, 0, spans, storage=Storage(budget, directory / "shard"))
        assert spilled.spilled
    except Exception as exc:  # noqa: BLE001 - e.g. a budget below the fixed allowance
        print(f"shard row skipped: {exc}")
        return
    memory = ShardState(cfg, 0, spans)
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(n).astype(np.float32).tobytes()
    grad = (rng.standard_normal(n) * 1e-3).astype(np.float32).tobytes()
    step = chunk_elements(FLOAT32)

    def push(state: ShardState, data: bytes) -> Any:
        """A push (or the upload) as the shard's runtime feeds it: 1 MiB fp32 chunks."""
        buf = state.grads.acquire()
        for a in range(0, n, step):
            k = min(step, n - a)
            buf.write(a, wire_tensor(memoryview(data)[4 * a : 4 * (a + k)], FLOAT32))
        return buf

    for st in (spilled, memory):
        st.load(push(st, p0))

    def one(st: ShardState, k: int) -> float:
        t0 = time.perf_counter()
        stats = st.reduce([Contribution(0, 1, push(st, grad))])
        st.apply(Decision(k, True, "", sum_of_squares([stats.norm]) ** 0.5, 1.0, 1))
        return time.perf_counter() - t0

    one(spilled, 0)
    one(memory, 0)
    spilled_bytes = sum(s.spilled_bytes for s in spilled.stores.values())
    record = max(s.record_bytes(s.tiles[0].length) for s in spilled.stores.values())
    times, mems, floors = [], [], []
    for k in range(1, repeats + 1):
        read, write = disk_rates(directory, spilled_bytes, record)
        floors.append(spilled_bytes / read + spilled_bytes / write)
        times.append(one(spilled, k))
        mems.append(one(memory, k))
    t, m, f = statistics.median(times), statistics.median(mems), statistics.median(floors)
    mem = spilled.memory()
    print(f"\nshard: {n / 1e6:.1f}M params, AdamW, budget {budget / 1e6:.0f} MB: resident {mem.resident_bytes / 1e6:.0f} MB + "
          f"buffers {mem.buffer_bytes / 1e6:.0f} MB, spilled {spilled_bytes / 1e6:.0f} MB")  # fmt: skip
    print(f"floor {f * 1e3:.0f} ms; spilled shard step (push to file, reduce, update, publish) {t * 1e3:.0f} ms "
          f"(min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f}); in-memory shard step {m * 1e3:.0f} ms")  # fmt: skip
    print(f"efficiency = floor / step      {f / t:6.2f}   (target >= 0.5, stretch >= 0.8)")
    print(f"step / in-memory step          {t / m:6.1f}")
    rates = mem.read_bytes_per_second / 1e9, mem.write_bytes_per_second / 1e9
    print(f"spill I/O threads: read {rates[0]:.2f} GB/s, write {rates[1]:.2f} GB/s while busy")
    spilled.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=0, help="parameters (default 48M; --quick 12M)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tile", type=int, default=1 << 20, help="elements per tile of the store row (default 1M: 12 MB records)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="", help="directory of the spill files")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.params or ((12 << 20) if args.quick else (48 << 20))
    tile = min(args.tile, n)
    state_bytes = n * 4 * len(COLUMNS)
    budget = state_bytes // 4
    record = tile * 4 * len(COLUMNS)
    ring = 3 * record
    resident_tiles = max(0, (budget - ring) // record)
    ntiles = -(-n // tile)
    lengths = [min(tile, n - k * tile) for k in range(ntiles)]
    layout = [(length, k < resident_tiles) for k, length in enumerate(lengths)]
    directory = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ps-spill-bench-", dir=os.getcwd()))
    store = TileStore(COLUMNS, layout, directory / "shard-0.spill")
    spilled = store.spilled_bytes
    print(f"{n / 1e6:.1f}M params: state {state_bytes / 1e6:.0f} MB, budget {budget / 1e6:.0f} MB "
          f"(ring {store.ring_bytes / 1e6:.0f} MB + {store.resident_bytes / 1e6:.0f} MB resident), spilled {spilled / 1e6:.0f} MB; "
          f"O_DIRECT {store.file.direct if store.file else '-'}; {directory}")  # fmt: skip
    rng = np.random.default_rng(0)
    store.write_column("params", rng.standard_normal(n).astype(np.float32))
    grad = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 1e-3)
    step = torch.zeros(())

    def spilled_step() -> float:
        t0 = time.perf_counter()
        for t in store.stream():
            c = t.columns
            adamw_tile(c["params"], grad[t.start : t.start + t.length], c["exp_avg"], c["exp_avg_sq"], step)
        step.add_(1)
        return time.perf_counter() - t0

    mem = [torch.zeros(n) for _ in COLUMNS]
    mem[0].copy_(torch.from_numpy(store.read_column("params")))

    def memory_step() -> float:
        t0 = time.perf_counter()
        adamw_tile(mem[0], grad, mem[1], mem[2], step)
        return time.perf_counter() - t0

    spilled_step()  # warm-up
    memory_step()
    times, mems, floors = [], [], []
    for _ in range(args.repeats):
        read, write = disk_rates(directory, spilled, record)
        floors.append(spilled / read + spilled / write)
        times.append(spilled_step())
        mems.append(memory_step())
    t, m, f = statistics.median(times), statistics.median(mems), statistics.median(floors)
    stats = store.file.stats if store.file else None
    store.close()
    print(f"store: disk (O_DIRECT, {record / 1e6:.0f} MB records): floor {f * 1e3:.0f} ms for {2 * spilled / 1e6:.0f} MB moved")
    print(f"spilled AdamW step  {t * 1e3:8.0f} ms   (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})")
    print(f"in-memory step      {m * 1e3:8.0f} ms")
    print(f"efficiency = floor / step      {f / t:6.2f}   (target >= 0.5, stretch >= 0.8)")
    print(f"step / in-memory step          {t / m:6.1f}")
    if stats is not None:
        print(f"spill I/O threads: read {stats.read_rate / 1e9:.2f} GB/s, write {stats.write_rate / 1e9:.2f} GB/s while busy")
    mem.clear()  # free the in-memory copy before the shard row
    if not args.quick:
        shard_row(n, directory, max(3, args.repeats // 2))
    if not args.dir:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
