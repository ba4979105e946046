"""N steps through the service (3 shards x 2 workers) equal N steps of torch on the full-batch gradient."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from lion_pytorch import Lion as RefLion

from paramserver.optim import build_schedule
from paramserver_client import JobClient, Worker

SHAPES = [("emb", (37, 11)), ("w1", (11, 23)), ("b1", (23,)), ("w2", (23, 5)), ("scale", ())]
TOTAL = sum(int(np.prod(s)) for _, s in SHAPES)

CASES: list[tuple[str, dict[str, Any], float, str, dict[str, Any]]] = [
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, 0.0, "constant", {}),
    ("adam", {"lr": 1e-2, "betas": [0.9, 0.99], "weight_decay": 0.05}, 0.0, "constant", {}),
    ("adamw", {"lr": 1e-2, "weight_decay": 0.1}, 1.0, "warmup_cosine", {"warmup_steps": 10, "total_steps": 100, "min_lr_ratio": 0.1}),
    ("adamw", {"lr": 1e-2, "amsgrad": True}, 0.5, "warmup_linear", {"warmup_steps": 5, "total_steps": 100}),
    ("lion", {"lr": 3e-4, "betas": [0.9, 0.99], "weight_decay": 0.1}, 0.0, "warmup_cosine", {"warmup_steps": 5, "total_steps": 100}),
]
IDS = ["sgd-nesterov", "adam", "adamw-clip-warmup-cosine", "adamw-amsgrad-clip-warmup-linear", "lion-warmup-cosine"]
REF: dict[str, Any] = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "lion": RefLion}


def worker_grads(step: int, worker: int) -> tuple[np.ndarray, int]:
    """A seeded gradient of a summed loss and its (uneven) loss-term count."""
    rng = np.random.default_rng(1000 * step + worker)
    terms = int(rng.integers(1, 50)) * (worker + 1)
    scale = (1.0 + step % 5) * terms
    return (rng.standard_normal(TOTAL) * scale).astype(np.float32), terms


def reference(
    name: str, hyper: dict[str, Any], clip: float, sched: str, sched_params: dict[str, Any], p0: np.ndarray, steps: int
) -> np.ndarray:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a shard actor: torch's kernels split their scalar tail by thread count
    try:
        return _reference(name, hyper, clip, sched, sched_params, p0, steps)
    finally:
        torch.set_num_threads(threads)


def _reference(
    name: str, hyper: dict[str, Any], clip: float, sched: str, sched_params: dict[str, Any], p0: np.ndarray, steps: int
) -> np.ndarray:
    torch.manual_seed(0)
    params, off = [], 0
    for _, shape in SHAPES:
        n = int(np.prod(shape))
        params.append(torch.tensor(p0[off : off + n].reshape(shape), requires_grad=True))
        off += n
    kw = dict(hyper)
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    opt = REF[name](params, **kw, **({} if name == "lion" else {"fused": True}))
    f = build_schedule(sched, sched_params)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, f)
    for s in range(steps):
        (g0, n0), (g1, n1) = worker_grads(s, 0), worker_grads(s, 1)
        full = (torch.from_numpy(g0) + torch.from_numpy(g1)) / (n0 + n1)
        off = 0
        for p in params:
            p.grad = full[off : off + p.numel()].view(p.shape).clone()
            off += p.numel()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        lr_sched.step()
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy()


@pytest.mark.parametrize(("name", "hyper", "clip", "sched", "sched_params"), CASES, ids=IDS)
def test_service_matches_torch(
    address: str, job_id: str, name: str, hyper: dict[str, Any], clip: float, sched: str, sched_params: dict[str, Any]
) -> None:
    steps = 100
    with JobClient(address) as jc:
        job = jc.create_job(SHAPES, job_id=job_id, optimizer=name, hyperparameters=hyper, schedule=sched,
                            schedule_parameters=sched_params, num_workers=2, num_shards=3, max_grad_norm=clip)  # fmt: skip
    assert len(job.shards) == 3
    bounds = [int(s.ranges[0].start) for s in job.shards][1:]
    split = [b for b in bounds for p in job.layout if p.offset < b < p.offset + p.numel]
    assert any(b % 2 == 1 for b in split), "a tensor must be split at an odd flat offset"
    p0 = np.random.default_rng(7).standard_normal(TOTAL).astype(np.float32)
    with Worker(address, job_id, "w-a") as wa, Worker(address, job_id, "w-b") as wb:
        first, second = (wa, wb) if wa.worker_id == 0 else (wb, wa)
        assert first.upload_parameters and not second.upload_parameters
        first.upload(p0)
        for s in range(steps):
            for w in (second, first):  # arrival order must not matter
                g, n = worker_grads(s, w.worker_id)
                w.push(s, g, n)
            version, _, report = first.pull(s + 1)
            assert version == s + 1 and report is not None and report.outcome == 2  # APPLIED
        _, final, _ = second.pull(steps)
    ref = reference(name, hyper, clip, sched, sched_params, p0, steps)
    rel = np.abs(final.astype(np.float64) - ref) / np.abs(ref).max()
    assert rel.max() <= 1e-6, f"max relative error {rel.max():.3e}"
    if clip == 0:  # the same fused kernels per tensor and no cross-shard norm: bit for bit
        assert np.array_equal(final, ref)


def test_param_groups_through_the_service_match_torch(address: str, job_id: str) -> None:
    """No decay for biases/scalars (the preset), SGD for one matrix, AdamW for the rest: bitwise."""
    from paramserver_client import no_decay_for_biases_and_norms, param_group

    groups = [
        *no_decay_for_biases_and_norms(),
        param_group("w2-sgd", patterns=["w2"], optimizer="sgd", hyperparameters={"lr": 0.05, "momentum": 0.9}),
    ]
    steps = 40
    with JobClient(address) as jc:
        jc.create_job(SHAPES, job_id=job_id, optimizer="adamw", hyperparameters={"lr": 1e-2, "weight_decay": 0.1},
                      num_workers=2, num_shards=3, param_groups=groups)  # fmt: skip
    p0 = np.random.default_rng(9).standard_normal(TOTAL).astype(np.float32)
    with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
        ws = sorted([wa, wb], key=lambda w: w.worker_id)
        ws[0].upload(p0)
        for s in range(steps):
            for w in ws:
                g, n = worker_grads(s, w.worker_id)
                w.push(s, g, n)
            ws[0].pull(s + 1)
        _, final, _ = ws[1].pull(steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, off = [], 0
        for _, shape in SHAPES:
            n = int(np.prod(shape))
            params.append(torch.tensor(p0[off : off + n].reshape(shape), requires_grad=True))
            off += n
        emb, w1, b1, w2, scale = params
        adamw = torch.optim.AdamW(
            [{"params": [emb, w1]}, {"params": [b1, scale], "weight_decay": 0.0}], lr=1e-2, weight_decay=0.1, fused=True
        )
        sgd = torch.optim.SGD([w2], lr=0.05, momentum=0.9, fused=True)
        for s in range(steps):
            (g0, n0), (g1, n1) = worker_grads(s, 0), worker_grads(s, 1)
            full = (torch.from_numpy(g0) + torch.from_numpy(g1)) / (n0 + n1)
            off = 0
            for p in params:
                p.grad = full[off : off + p.numel()].view(p.shape).clone()
                off += p.numel()
            adamw.step()
            sgd.step()
        ref = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(final, ref)
