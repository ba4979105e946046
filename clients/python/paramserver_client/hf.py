"""Hugging Face ``transformers.Trainer`` through the service (needs ``paramserver[hf]``).

    from paramserver_client import RemoteOptimizer
    from paramserver_client.hf import ParamServerTrainer

    opt = RemoteOptimizer(model, "127.0.0.1:50051", job_id="run1", loss="mean",
                          optimizer="adamw", hyperparameters={"lr": 3e-4},
                          num_workers=2, max_grad_norm=1.0)
    trainer = ParamServerTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.train()   # every worker process runs the same script on its own data

Each worker is its own Trainer (world size 1, no DDP); the service joins them. What this adds to
``Trainer``:

* the loss is the exact token mean over every worker's whole accumulation window: Trainer counts
  the window's label tokens (``num_items_in_batch``) and the model divides its summed loss by them;
  this sets the count as the RemoteOptimizer's ``loss_terms``, so the service weights each
  worker's gradient by its tokens;
* Trainer's own clipping (``args.max_grad_norm``) would clip each worker's local gradient: it is
  turned off (clipping is the job's ``max_grad_norm``, on the combined gradient);
* Trainer's lr scheduler (``optimizers=(opt, None)`` builds it) drives the service's lr, and
  checkpoints work: ``optimizer.pt`` holds the job id and version, and resuming checks them (resume
  with ``RemoteOptimizer(..., resume=True)`` while the job is at the checkpoint's version).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

try:
    import transformers
except ImportError as exc:  # pragma: no cover - the hf extra is missing
    raise ImportError("paramserver_client.hf needs transformers: pip install 'paramserver[hf]'") from exc

from paramserver_client.torch_optim import RemoteOptimizer

log = logging.getLogger(__name__)

__all__ = ["ParamServerTrainer"]


class ParamServerTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer step runs in the paramserver service.

    Takes ``Trainer``'s arguments; ``optimizers`` must be ``(RemoteOptimizer(..., loss="mean"),
    scheduler or None)``. ``args.max_grad_norm`` is set to 0 on the TrainingArguments object (with a
    warning when it was on): set clipping on the job (``RemoteOptimizer(..., max_grad_norm=...)``).
    Each worker is one process (world size 1): the service, not DDP, combines the workers. The
    model must take loss kwargs (``num_items_in_batch``, as Hugging Face's causal LMs do) and the
    batches must hold ``labels``, so that Trainer counts the tokens of each accumulation window.

    Attributes:
        remote_optimizer: the RemoteOptimizer (``self.optimizer`` becomes accelerate's wrapper
            once training starts).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        opt = self.optimizer
        if not isinstance(opt, RemoteOptimizer):
            raise TypeError(
                "ParamServerTrainer needs optimizers=(RemoteOptimizer(model, address, job_id, loss='mean', ...), None), "
                f"not {type(opt).__name__}"
            )
        if opt.loss != "mean":
            raise ValueError(
                "ParamServerTrainer needs a RemoteOptimizer created with loss='mean': Trainer's loss is the mean over the "
                "window's tokens, and the optimizer weights it by their count"
            )
        self.remote_optimizer: RemoteOptimizer = opt
        if self.args.max_grad_norm > 0:
            log.warning(
                "ParamServerTrainer turned off Trainer's max_grad_norm=%s: it would clip each worker's local gradient; "
                "clipping is the job's max_grad_norm (RemoteOptimizer(..., max_grad_norm=...)), on the combined gradient",
                self.args.max_grad_norm,
            )
            self.args.max_grad_norm = 0.0

    def get_batch_samples(
        self, epoch_iterator: Iterator[Any], num_batches: int, device: torch.device
    ) -> tuple[list[Any], torch.Tensor | int | None]:
        """Trainer's batches of one accumulation window and their token count; the count becomes
        the next step's ``loss_terms``."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            if num_items is None:
                raise ValueError(
                    "Trainer did not count the tokens of the accumulation window (num_items_in_batch is None): the batches "
                    "need 'labels' and the model must accept loss kwargs (a forward with **kwargs taking "
                    "num_items_in_batch, as Hugging Face's causal LMs), or pass a compute_loss_func"
                )
            self.remote_optimizer.loss_terms = int(num_items)
        return batches, num_items
