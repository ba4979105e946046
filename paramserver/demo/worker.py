"""One demo worker process: trains TinyGPT with RemoteOptimizer and prints JSON progress lines."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from paramserver.demo.task import TaskConfig, batch, make_model, summed_loss
from paramserver_client.torch_optim import RemoteOptimizer


def main(argv: list[str] | None = None) -> int:
    """Run one worker; the last line printed is {"done": ...}."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--config", required=True, help="JSON of the job settings")
    ap.add_argument("--out", help="where worker 0 writes the final flat parameters (.npy)")
    ns = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = json.loads(ns.config)
    cfg = TaskConfig(**settings.pop("task"))
    model = make_model(cfg)
    opt = RemoteOptimizer(model.named_parameters(), ns.address, ns.job, worker_name=ns.name, **settings)
    wid = opt.worker_id
    t0 = time.perf_counter()
    for step in range(ns.steps):
        opt.zero_grad()
        inp, tgt = batch(cfg, wid, step)
        loss, terms = summed_loss(model, inp, tgt)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step(loss_terms=terms)
        report = opt.last_report
        skipped = report is not None and report.skip_reason != ""
        line = {
            "worker": wid,
            "step": step,
            "loss_sum": float(loss),
            "terms": terms,
            "skipped": skipped,
            "elapsed": time.perf_counter() - t0,
        }
        print(json.dumps(line), flush=True)
    if wid == 0 and ns.out:
        flat = np.concatenate([p.detach().reshape(-1).numpy() for _, p in model.named_parameters()])
        np.save(ns.out, flat)
    opt.close()
    print(json.dumps({"done": True, "worker": wid}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
