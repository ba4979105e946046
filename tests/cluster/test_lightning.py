"""RemoteOptimizer under PyTorch Lightning's automatic optimisation (real Ray, real service, real
Lightning): configure_optimizers returns it with a per-step torch LambdaLR, and the trained model
equals a plain torch loop with torch.optim.AdamW(fused=True) and the same scheduler on the same
batches bit for bit; so does a fit resumed from a checkpoint, and one with accumulate_grad_batches.

How the loss reaches the service: Lightning's training_step returns a per-batch mean loss (and
divides it by ``accumulate_grad_batches``), so ``loss="mean"`` is the natural fit: every worker's
mean gradient counts once (equal batches). With a summed loss and ``loss="sum"``, training_step
sets the *raw* optimizer's ``loss_terms`` (``self.optimizers().optimizer``: Lightning's
LightningOptimizer wrapper forwards attribute reads to the optimizer but keeps writes for itself, so
``self.optimizers().loss_terms = n`` would never reach the RemoteOptimizer).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from paramserver_client import JobClient, RemoteOptimizer

HYPER: dict[str, Any] = {"lr": 0.02, "weight_decay": 0.1}
SEED = 5
BATCH = 8
SAMPLES = 48  # 6 equal batches an epoch: the fits cross an epoch end


def lr_lambda(step: int) -> float:
    return 1.0 / (1.0 + 0.25 * step)


def make_net() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def dataset() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SAMPLES, 6, generator=g)
    y = x[:, :1] * 2.0 - x[:, 1:2] + 0.1 * torch.randn(SAMPLES, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def loader() -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    return torch.utils.data.DataLoader(dataset(), batch_size=BATCH, shuffle=False)


def batches() -> Iterator[list[torch.Tensor]]:
    """The batches a fit sees, epoch after epoch."""
    while True:
        yield from loader()


class Regressor(pl.LightningModule):  # type: ignore[misc]
    def __init__(self, address: str, job_id: str, *, loss: Literal["mean", "sum"] = "mean", resume: bool = False) -> None:
        super().__init__()
        self.net = make_net()
        self.address, self.job_id, self.loss_kind, self.resume = address, job_id, loss, resume
        self.remote: RemoteOptimizer | None = None
        self.lrs: list[float] = []  # the lr the service applied, step after step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self.net(x)
        if self.loss_kind == "mean":
            return F.mse_loss(pred, y)
        raw = self.optimizers().optimizer  # the RemoteOptimizer itself, not Lightning's wrapper
        raw.loss_terms = (raw.loss_terms or 0) + len(x)  # step() reads and clears it
        return F.mse_loss(pred, y, reduction="sum")

    def configure_optimizers(self) -> dict[str, Any]:
        self.remote = RemoteOptimizer(
            self, self.address, self.job_id, loss=self.loss_kind, resume=self.resume, optimizer="adamw", hyperparameters=HYPER,
            num_workers=1, num_shards=2, timeout=30, pull_timeout=60,
        )  # fmt: skip
        sched = torch.optim.lr_scheduler.LambdaLR(self.remote, lr_lambda)
        return {"optimizer": self.remote, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)  # -> RemoteOptimizer.step(closure=...)
        assert self.remote is not None and self.remote.last_report is not None
        self.lrs.append(self.remote.last_report.lr)

    def teardown(self, stage: str) -> None:
        if self.remote is not None:
            self.remote.close()  # leave the job (it stays alive for the next fit)
            self.remote = None


def trainer(root: Path, max_steps: int, **kw: Any) -> Any:
    settings: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                                "enable_model_summary": False, "enable_checkpointing": False, **kw}  # fmt: skip
    return pl.Trainer(max_steps=max_steps, default_root_dir=str(root), **settings)


def fit(model: Regressor, root: Path, max_steps: int, ckpt_path: str | None = None, **kw: Any) -> Any:
    tr = trainer(root, max_steps, **kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        tr.fit(model, loader(), ckpt_path=ckpt_path)
    return tr


def reference(steps: int, *, loss: Literal["mean", "sum"] = "mean", accumulate: int = 1) -> list[torch.Tensor]:
    """The plain torch loop: what Lightning computes per micro-batch, AdamW(fused) + the same LambdaLR."""
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), **HYPER, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    data = batches()
    for _ in range(steps):
        opt.zero_grad()
        terms = 0
        for _ in range(accumulate):
            x, y = next(data)
            if loss == "mean":
                (F.mse_loss(net(x), y) / accumulate).backward()
            else:
                (F.mse_loss(net(x), y, reduction="sum") / accumulate).backward()
                terms += len(x)
        if loss == "sum":
            for p in net.parameters():
                assert p.grad is not None
                p.grad = p.grad / terms  # what the service does with a summed gradient
        opt.step()
        sched.step()
    return [p.detach().clone() for p in net.parameters()]


def window_reference(steps: int, accumulate: int) -> list[torch.Tensor]:
    """AdamW on the mean loss of each whole accumulation window at once."""
    net = make_net()
    opt = torch.optim.AdamW(net.parameters(), **HYPER, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    data = batches()
    for _ in range(steps):
        xs, ys = zip(*(next(data) for _ in range(accumulate)), strict=True)
        opt.zero_grad()
        F.mse_loss(net(torch.cat(xs)), torch.cat(ys)).backward()
        opt.step()
        sched.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a shard actor: torch's kernels split their scalar tail by thread count
    yield
    torch.set_num_threads(threads)


def params_of(model: Regressor) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.net.parameters()]


def assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"parameter {i}: max |diff| {(g - w).abs().max().item():.3e}"


@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_lightning_fit_with_a_step_scheduler_equals_torch_adamw_bit_for_bit(
    address: str, job_id: str, tmp_path: Path, loss: Literal["mean", "sum"]
) -> None:
    steps = 7
    model = Regressor(address, job_id, loss=loss)
    before = params_of(model)
    tr = fit(model, tmp_path, steps)
    assert tr.global_step == steps
    got = params_of(model)
    assert not all(torch.equal(a, b) for a, b in zip(before, got, strict=True))
    assert_equal(got, reference(steps, loss=loss))
    assert model.lrs == [HYPER["lr"] * lr_lambda(s) for s in range(steps)]  # the scheduler, stepped every step
    with JobClient(address) as jc:
        assert jc.get_job(job_id).version == steps


def test_a_fit_resumed_from_a_checkpoint_equals_the_uninterrupted_run(address: str, job_id: str, tmp_path: Path) -> None:
    # Epoch-based, with a checkpoint at an epoch end: Lightning 2.6.6 replays a plain DataLoader's
    # epoch from its start after a mid-epoch checkpoint, and resuming a max_steps fit runs one extra
    # batch from a fresh iterator (with torch's own optimizers too), so neither would be a replay.
    epoch = SAMPLES // BATCH
    ckpts = tmp_path / "ckpt"
    first = Regressor(address, job_id)
    fit(first, tmp_path, -1, max_epochs=1, enable_checkpointing=True, callbacks=[pl.callbacks.ModelCheckpoint(dirpath=str(ckpts))])
    (ckpt,) = ckpts.glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)  # as Lightning loads it
    assert state["global_step"] == epoch
    assert state["optimizer_states"][0]["paramserver"] == {"job_id": job_id, "version": epoch, "snapshot": ""}
    assert state["lr_schedulers"][0]["last_epoch"] == epoch

    # A new Trainer and module (as a new process would build them) join the job, which is still at
    # the checkpoint's version; Lightning restores the module, the optimizer (its version check
    # passes) and the scheduler from the checkpoint.
    second = Regressor(address, job_id, resume=True)
    tr = fit(second, tmp_path, -1, ckpt_path=str(ckpt), max_epochs=2)
    assert tr.global_step == 2 * epoch
    assert second.lrs == [HYPER["lr"] * lr_lambda(s) for s in range(epoch, 2 * epoch)]  # the scheduler went on
    assert_equal(params_of(second), reference(2 * epoch))
    with JobClient(address) as jc:
        assert jc.get_job(job_id).version == 2 * epoch

    # The job has moved on: that checkpoint no longer matches it, and resuming from it is refused.
    third = Regressor(address, job_id, resume=True)
    try:
        with pytest.raises(ValueError, match=f"saved at version {epoch}, but job .* is at version {2 * epoch}"):
            fit(third, tmp_path, -1, ckpt_path=str(ckpt), max_epochs=3)
    finally:
        if third.remote is not None:
            third.remote.close()
    with JobClient(address) as jc:
        assert jc.get_job(job_id).version == 2 * epoch


def test_accumulate_grad_batches_steps_once_per_window(address: str, job_id: str, tmp_path: Path) -> None:
    steps, accumulate = 4, 2
    model = Regressor(address, job_id)
    tr = fit(model, tmp_path, steps, accumulate_grad_batches=accumulate)
    assert tr.global_step == steps
    got = params_of(model)
    assert model.lrs == [HYPER["lr"] * lr_lambda(s) for s in range(steps)]  # one step (and lr) per window
    assert_equal(got, reference(steps, accumulate=accumulate))
    for g, w in zip(got, window_reference(steps, accumulate), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    with JobClient(address) as jc:
        assert jc.get_job(job_id).version == steps
