"""Uneven token counts across workers give exactly the full-batch gradient (optimizers.md s11)."""

from __future__ import annotations

import numpy as np
import torch

from paramserver_client import JobClient, Worker


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.Flatten(), torch.nn.Linear(8 * 6, 20))


def _flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def _grad(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()  # type: ignore[union-attr]


def test_uneven_tokens_average_exactly(address: str, job_id: str) -> None:
    model = _model()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (40, 6), generator=g)
    y = torch.randint(0, 20, (40,), generator=g)
    y[torch.rand(40, generator=g) < 0.3] = -100  # padding: 30% of targets ignored
    parts = [slice(0, 5), slice(5, 40)]  # 5 vs 35 rows: very unequal valid-token counts

    # the full-batch gradient of the mean loss over all valid tokens
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y, ignore_index=-100).backward()
    full = _grad(model)

    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    with JobClient(address) as jc:
        jc.create_job(names, job_id=job_id, optimizer="sgd", hyperparameters={"lr": 1.0}, num_workers=2, num_shards=2)
    p0 = _flat(model)
    with Worker(address, job_id, "a") as wa, Worker(address, job_id, "b") as wb:
        workers = sorted([wa, wb], key=lambda w: w.worker_id)
        workers[0].upload(p0)
        counts = []
        for w, sl in zip(workers, parts, strict=True):
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[sl]), y[sl], ignore_index=-100, reduction="sum")
            loss.backward()
            n = int((y[sl] != -100).sum())
            counts.append(n)
            w.push(0, _grad(model), n)
        _, p1, report = workers[1].pull(1)
    assert counts[0] != counts[1]
    assert report is not None and report.loss_terms == sum(counts)
    served = p0 - p1  # SGD with lr 1: the applied gradient
    np.testing.assert_allclose(served, full, rtol=1e-5, atol=1e-7)
    # the naive mean of per-worker means is measurably different
    naive = np.zeros_like(full)
    for sl in parts:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[sl]), y[sl], ignore_index=-100).backward()
        naive += _grad(model) / 2
    assert np.abs(naive - full).max() > 100 * np.abs(served - full).max()
