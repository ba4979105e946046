#!/usr/bin/env python
"""DiLoCo benchmark: synchronous data-parallel training against DiLoCo (H = 10 and 50; pushes in
fp32, int8 or int4 with error feedback; each round's result pulled in fp32, or as the service's
int8 / int4 broadcast update) through the
real service, on the demo's addition task, in one run (see paramserver/demo/diloco.py for what
each run does).

    RAY_AUTH_MODE=disabled python bench/bench_diloco.py            # 800 steps per run (~2-3 min)
    RAY_AUTH_MODE=disabled python bench/bench_diloco.py --quick    # 100 steps per run (CI, < 60 s)
    #   --steps S (a multiple of every H)   --inner-steps 10,50   --shards N

One local service (Ray with 2 CPUs), 2 workers on threads of this process, the same batches in
every run; DiLoCo's outer rule is the demo's (Nesterov SGD, lr 0.7, momentum 0.5: DEMO_OUTER).
Per run: the held-out loss per answer token at the end, the bytes on the wire per token (chunk
bytes pushed + pulled by all workers while training, as the clients count them), the wall time
per token, and the bytes and loss ratios to sync. Aims (the DiLoCo issue): at least H times fewer
bytes than sync with fp32 pushes and 3H times fewer with int8, the loss within LOSS_TOLERANCE of
sync's. The full mode prints PASS / FAIL against them (exit code 0 either way; 1 only if the
benchmark itself fails); --quick reports only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: "Within a few percent": DiLoCo's held-out loss at most this much above sync's.
LOSS_TOLERANCE = 0.05
#: The aim's bytes factor per compression: sync's bytes / DiLoCo's >= FACTOR x H.
BYTES_AIM = {None: 1, "int8": 3, "int4": 3}


def log(msg: str) -> None:
    print(f"[bench_diloco] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 steps per run, no PASS / FAIL (CI smoke test)")
    ap.add_argument("--steps", type=int, default=0, help="steps per run, a multiple of every H (default 800; --quick 100)")
    ap.add_argument("--inner-steps", default="10,50", help="comma-separated H values (default 10,50)")
    ap.add_argument("--shards", type=int, default=2, help="shards per job (default 2)")
    args = ap.parse_args()

    import torch

    from paramserver.demo.diloco import (
        DEFAULT_STEPS,
        DEMO_OUTER,
        QUICK_STEPS,
        RunResult,
        format_table,
        local_service,
        table_notes,
        task_config,
        train_diloco,
        train_sync,
    )
    from paramserver.demo.task import make_model

    hs = [int(h) for h in args.inner_steps.split(",")]
    steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    if any(steps % h for h in hs):
        ap.error(f"--steps {steps} is not a multiple of every H in {hs}")
    torch.set_num_threads(1)
    workers = 2
    task = task_config(workers)
    n_params = sum(p.numel() for p in make_model(task).parameters())
    t0 = time.perf_counter()
    runs: list[tuple[int, str | None, RunResult]] = []
    with local_service(None, log) as address:
        log(f"sync: {steps} steps, {workers} workers, {n_params:,} parameters")
        sync = train_sync(address, task, steps, workers=workers, shards=args.shards)
        for h in hs:
            for compression, pull in ((None, "fp32"), ("int8", "fp32"), ("int8", "int8"), ("int4", "int4")):
                log(f"DiLoCo H={h} push {compression or 'fp32'} pull {pull}")
                r = train_diloco(address, task, steps, h, workers=workers, shards=args.shards, compression=compression, pull_dtype=pull)
                runs.append((h, compression, r))
    print()
    print(format_table(sync, [r for _, _, r in runs]))
    print()
    print(table_notes(sync, n_params))
    print(f"outer rule: {DEMO_OUTER['optimizer']} {DEMO_OUTER['hyperparameters']} (paramserver.demo.diloco.DEMO_OUTER); "
          f"{time.perf_counter() - t0:.0f} s in all; load {os.getloadavg()[0]:.1f}")  # fmt: skip
    for _, _, r in [(0, None, sync), *runs]:
        print(f"{r.name}: pushed {r.bytes_pushed / r.tokens:.1f} + pulled {r.bytes_pulled / r.tokens:.1f} bytes per token")
    print("(run names: 'int8' = int8 pushes, the round's result pulled in fp32 (~5 bytes per element a round instead of 8:")
    print(" ~1.6H x fewer than sync); 'int8+int8' / 'int4+int4' = compressed pushes and the service's compressed broadcast)")
    if args.quick:
        return 0
    for h, compression, r in runs:
        factor = BYTES_AIM[compression]
        fewer = sync.bytes_per_token / r.bytes_per_token
        ratio = r.final_loss / sync.final_loss
        ok_bytes, ok_loss = fewer >= factor * h, ratio <= 1 + LOSS_TOLERANCE
        print(f"{'PASS' if ok_bytes else 'FAIL'} {r.name}: {fewer:.1f}x fewer bytes per token than sync (aim >= {factor * h})")
        print(f"{'PASS' if ok_loss else 'FAIL'} {r.name}: loss {ratio:.3f} x sync's (aim <= {1 + LOSS_TOLERANCE:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
