#!/usr/bin/env python
"""Spill benchmark: AdamW streamed through a TileStore whose state is 4x its memory budget, against
the disk-bound floor measured on the same directory in the same run (see bench/README.md).

    python bench/bench_spill.py                 # 32M params: 384 MB of state, 96 MB budget
    python bench/bench_spill.py --quick         # 4M params
    python bench/bench_spill.py --dir /nvme/x   # where the spill file goes (default: a temp dir)

State = params + exp_avg + exp_avg_sq (12 bytes/param). Budget = state / 4: the I/O ring
(3 tiles) plus as many resident tiles as fit; the rest is spilled. One step = every tile read,
updated by torch's fused AdamW (one thread, as a shard actor) and written back.

    floor      = spilled bytes / sequential read rate + spilled bytes / sequential write rate
                 (O_DIRECT, same directory, same record size, measured in this run)
    efficiency = floor / step time                     target >= 0.5, stretch >= 0.8
    context    = step time / in-memory step time       (the same AdamW on resident tensors)

The gradient stays in memory here (this layer streams optimizer state; the shard's push path is
not part of this measurement). It reports; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.optim.adam import adam as torch_adam

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=int, default=0, help="parameters (default 32M; --quick 4M)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tile", type=int, default=1 << 20, help="elements per tile (default 1M: 12 MB records)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", default="", help="directory of the spill file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = args.params or ((4 << 20) if args.quick else (32 << 20))
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
    print(f"disk (O_DIRECT, {record / 1e6:.0f} MB records): floor {f * 1e3:.0f} ms for {2 * spilled / 1e6:.0f} MB moved")
    print(f"spilled AdamW step  {t * 1e3:8.0f} ms   (min {min(times) * 1e3:.0f}, max {max(times) * 1e3:.0f})")
    print(f"in-memory step      {m * 1e3:8.0f} ms")
    print(f"efficiency = floor / step      {f / t:6.2f}   (target >= 0.5, stretch >= 0.8)")
    print(f"step / in-memory step          {t / m:6.1f}")
    if stats is not None:
        print(f"spill I/O threads: read {stats.read_rate / 1e9:.2f} GB/s, write {stats.write_rate / 1e9:.2f} GB/s while busy")
    if not args.dir:
        for p in directory.iterdir():
            p.unlink()
        directory.rmdir()


if __name__ == "__main__":
    main()
