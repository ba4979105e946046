"""DiLoCo (paramserver_client.diloco) in a Hugging Face ``transformers.Trainer`` or a PyTorch
Lightning ``Trainer``: a callback calls ``diloco.step(tokens)`` after each optimizer step of the
framework's own loop, which trains with the local (inner) optimizer as usual.

    from paramserver_client.diloco import DiLoCo, create_jobs
    from paramserver_client.diloco_callbacks import DiLoCoHFCallback, DiLoCoLightningCallback

    create_jobs(address, "run1", model.named_parameters(), num_workers=2)        # once, anywhere
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diloco = DiLoCo(model.named_parameters(), inner, address, "run1", "w0", inner_steps=20)

    # Hugging Face: the Trainer steps `inner` (pass it in `optimizers`)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(inner, None),
            callbacks=[DiLoCoHFCallback(diloco)]).train()

    # Lightning: configure_optimizers returns `inner`
    pl.Trainer(callbacks=[DiLoCoLightningCallback(diloco)], ...).fit(module, loader)

The callback is a drop-in for a plain loop that calls ``diloco.step(tokens)`` after each
``inner.step()``: the same model, data and inner optimizer give the same parameters, bit for bit
(tests/cluster/test_diloco_callbacks.py). Each worker is one process (world size 1, no DDP inside a
worker): the service, not DDP, combines the workers.

Checkpoints keep the DiLoCo state (``DiLoCo.state_dict``: the inner optimizer, the step count and,
per fragment, the version, θ_start and the tokens of the open round), so a resumed run continues the
open round where it stopped: Hugging Face in a file ``diloco.pt`` in each ``checkpoint-N`` folder,
Lightning in the ``.ckpt`` (the callback's ``state_dict``). Resume with a *new* DiLoCo of the same
worker name (it rejoins the job as the same worker) while the job is still at the checkpoint's
round: the other workers wait for this worker's push of that round.

Neither framework is needed to import this module: the HF callback needs ``transformers``
(``paramserver[hf]``), the Lightning one ``pytorch_lightning`` (``paramserver[lightning]``; the
``lightning`` package's ``lightning.pytorch`` when ``pytorch_lightning`` is not installed); building
one without its framework raises ImportError.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from paramserver_client.diloco import DiLoCo

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from pytorch_lightning import Callback as _LightningCallback
    from transformers import TrainerCallback as _HFCallback
    from transformers import TrainerControl, TrainerState, TrainingArguments
else:

    def _missing(package: str, extra: str) -> type:
        class Missing:
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise ImportError(f"this callback needs {package}: pip install 'paramserver[{extra}]'")

        return Missing

    try:
        from transformers import TrainerCallback as _HFCallback
    except ImportError:  # pragma: no cover - the hf extra is missing
        _HFCallback = _missing("transformers", "hf")
    try:
        from pytorch_lightning import Callback as _LightningCallback
    except ImportError:  # pragma: no cover - the lightning extra is missing
        try:
            from lightning.pytorch import Callback as _LightningCallback
        except ImportError:
            _LightningCallback = _missing("pytorch_lightning", "lightning")

__all__ = ["DILOCO_STATE_NAME", "DiLoCoHFCallback", "DiLoCoLightningCallback", "count_tokens"]

#: The file of the DiLoCo state in each of Hugging Face Trainer's ``checkpoint-N`` folders.
DILOCO_STATE_NAME = "diloco.pt"
#: Labels of this value are not trained on (Hugging Face's and torch's ``ignore_index``).
IGNORE_INDEX = -100


def _wraps(optimizer: Any, inner: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is `inner` or a wrapper of it (accelerate's AcceleratedOptimizer,
    Lightning's LightningOptimizer: ``.optimizer``)."""
    seen = 0
    while optimizer is not None and seen < 8:
        if optimizer is inner:
            return True
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return False


class DiLoCoHFCallback(_HFCallback):
    """Runs `diloco` in a Hugging Face ``transformers.Trainer``: after each optimizer step (every
    ``gradient_accumulation_steps`` micro-batches, at ``on_step_end``: after the lr scheduler's
    step, before the step's checkpoint is saved) it calls ``diloco.step(tokens)``.

    The Trainer must step DiLoCo's inner optimizer: pass it as ``optimizers=(diloco.inner,
    scheduler or None)`` (training starts with a ValueError otherwise). Trainer's own clipping
    (``max_grad_norm``) and lr schedule act on the inner steps, as in a plain loop.

    Tokens of a step: the callback cannot see Trainer's batches, so it watches the model's training
    forwards (a forward pre-hook, on while training). For models that take loss kwargs (Hugging
    Face's causal LMs) Trainer passes every micro-batch of the window its token count
    ``num_items_in_batch`` (the labels ≠ -100 of the window's micro-batches, over ``labels[..., 1:]``
    for losses that shift the labels), the count ``paramserver_client.hf`` uses: that is the step's
    tokens. Otherwise they are the labels ≠ -100 of the window's micro-batches (unshifted). A window
    whose forwards carry neither (no ``labels``, or a ``compute_loss_func``, which takes them from
    the model) raises ValueError. Subclass and override :meth:`tokens_of_step` to count otherwise.

    Checkpoints: ``on_save`` writes ``diloco.state_dict()`` to ``diloco.pt`` in the checkpoint's
    folder (``args.output_dir/checkpoint-N``). When Trainer resumes (``train(resume_from_checkpoint=
    ...)``, global step N > 0), ``on_train_begin`` loads ``diloco.pt`` from `resume_from` if given,
    else from ``args.output_dir/checkpoint-N`` (what ``resume_from_checkpoint=True`` picks): pass
    `resume_from` when the checkpoint lies elsewhere. Build the resumed run's DiLoCo before
    ``train()`` (its construction loads the service's parameters into the model; Trainer then loads
    the checkpoint's).
    """

    def __init__(self, diloco: DiLoCo, *, resume_from: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.diloco = diloco
        self.resume_from = resume_from
        self.synced: list[int] = []
        """The fragments synchronised after the last step (DiLoCo.step's answer)."""
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._items: torch.Tensor | float | None = None
        self._labels: list[torch.Tensor] = []
        self._unlabeled = 0

    # -- token counting -------------------------------------------------------------------------

    def _reset_window(self) -> None:
        self._items, self._labels, self._unlabeled = None, [], 0

    def _forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook: note the token count of a training forward (kept on the device until
        the step ends: no synchronisation per micro-batch)."""
        if not module.training:
            return
        items = kwargs.get("num_items_in_batch")
        if items is not None:
            self._items = items
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor):
            self._labels.append(labels.ne(IGNORE_INDEX).sum())
        elif items is None:
            self._unlabeled += 1

    def tokens_of_step(self) -> int:
        """The tokens of the optimizer step just taken (see the class's docstring)."""
        items = self._items
        if items is not None:
            return round(float(items.reshape(-1)[0] if isinstance(items, torch.Tensor) else items))
        if self._unlabeled:
            raise ValueError(
                "DiLoCoHFCallback could not count the tokens of the step: the model's training forwards got no 'labels' and "
                "no num_items_in_batch (batches need 'labels'; with a compute_loss_func, override tokens_of_step)"
            )
        return sum(int(n) for n in self._labels)

    # -- Trainer events -------------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        optimizer, model = kwargs.get("optimizer"), kwargs.get("model")
        if not _wraps(optimizer, self.diloco.inner):
            raise ValueError(
                "DiLoCoHFCallback: the Trainer does not step DiLoCo's inner optimizer; pass it to the Trainer as "
                f"optimizers=(diloco.inner, None), not {type(optimizer).__name__}"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"DiLoCoHFCallback needs the Trainer's model, got {type(model).__name__}")
        if state.global_step > 0:
            self._resume(args, state)
        self._remove_hook()
        self._hook = model.register_forward_pre_hook(self._forward, with_kwargs=True)
        self._reset_window()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._reset_window()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        tokens = self.tokens_of_step()
        self._reset_window()
        self.synced = self.diloco.step(tokens)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = self.checkpoint_folder(args, state.global_step)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"DiLoCoHFCallback: no checkpoint folder {folder} to save the DiLoCo state in")
        torch.save({"diloco": self.diloco.state_dict(), "global_step": state.global_step}, os.path.join(folder, DILOCO_STATE_NAME))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._remove_hook()

    # -- checkpoints ----------------------------------------------------------------------------

    @staticmethod
    def checkpoint_folder(args: TrainingArguments, global_step: int) -> str:
        """Trainer's folder of the checkpoint of `global_step` (``args.output_dir/checkpoint-N``)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        return os.path.join(str(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{global_step}")

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        folder = os.fspath(self.resume_from) if self.resume_from is not None else self.checkpoint_folder(args, state.global_step)
        path = os.path.join(folder, DILOCO_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"DiLoCoHFCallback: the Trainer resumes at step {state.global_step}, but {path} does not exist (a checkpoint "
                "saved without the callback, or one outside args.output_dir: pass DiLoCoHFCallback(..., resume_from=CHECKPOINT))"
            )
        saved = torch.load(path, weights_only=True)
        if int(saved["global_step"]) != state.global_step:
            raise ValueError(
                f"DiLoCoHFCallback: {path} was saved at step {saved['global_step']}, the Trainer resumes at {state.global_step}"
            )
        self.diloco.load_state_dict(saved["diloco"])

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def count_tokens(batch: Any) -> int:
    """The default token count of a Lightning batch: the labels ≠ -100 of a mapping with
    ``"labels"`` (unshifted), else the rows (samples) of the batch's first tensor (a tensor, or a
    list / tuple / mapping whose first value is one)."""
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor):
            return int(labels.ne(IGNORE_INDEX).sum())
        first: Any = next(iter(batch.values()), None)
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        first = batch[0] if len(batch) else None
    else:
        first = batch
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        return int(first.shape[0])
    raise TypeError(f"cannot count the tokens of a {type(batch).__name__} batch: pass DiLoCoLightningCallback(..., tokens=fn)")


class DiLoCoLightningCallback(_LightningCallback):
    """Runs `diloco` in a PyTorch Lightning ``Trainer``: at ``on_train_batch_end`` of each batch
    that ended with an optimizer step (``trainer.global_step`` moved: the last batch of each
    ``accumulate_grad_batches`` window, and of each epoch) it calls ``diloco.step(tokens)``, tokens
    being the sum of ``tokens(batch)`` over the window's batches (default :func:`count_tokens`: the
    labels ≠ -100 of a dict batch with ``"labels"``, else its number of samples).

    The module's ``configure_optimizers`` must return DiLoCo's inner optimizer (one optimizer;
    training starts with a ValueError otherwise): build the model, the optimizer and the DiLoCo
    before ``fit`` and have ``configure_optimizers`` return ``diloco.inner``.

    Checkpoints: the callback's ``state_dict`` (in the ``.ckpt``, under :attr:`state_key`, which
    names DiLoCo's jobs) is ``diloco.state_dict()`` and the tokens of an open accumulation window;
    ``fit(ckpt_path=...)`` loads it into the new run's DiLoCo before training (build that DiLoCo
    before ``fit``: its construction loads the service's parameters into the model, Lightning then
    loads the checkpoint's).
    """

    def __init__(self, diloco: DiLoCo, *, tokens: Callable[[Any], int] | None = None) -> None:
        super().__init__()
        self.diloco = diloco
        self.tokens = tokens or count_tokens
        self.synced: list[int] = []
        """The fragments synchronised after the last optimizer step (DiLoCo.step's answer)."""
        self._window = 0
        self._seen: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(jobs=[f.job_id for f in self.diloco.fragments])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not any(_wraps(o, self.diloco.inner) for o in trainer.optimizers):
            raise ValueError(
                "DiLoCoLightningCallback: the Trainer does not step DiLoCo's inner optimizer; configure_optimizers must return diloco.inner"
            )
        self._seen = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._window += int(self.tokens(batch))
        if self._seen is None:
            self._seen = trainer.global_step
        if trainer.global_step != self._seen:  # this batch ended with an optimizer step
            self._seen = trainer.global_step
            tokens, self._window = self._window, 0
            self.synced = self.diloco.step(tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"diloco": self.diloco.state_dict(), "window_tokens": self._window}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.diloco.load_state_dict(state_dict["diloco"])
        self._window = int(state_dict["window_tokens"])
