"""DiLoCo in Hugging Face Trainer and PyTorch Lightning (paramserver_client.diloco_callbacks; real
Ray, real service, real transformers and Lightning): the callbacks are a drop-in for a plain loop
that calls ``DiLoCo.step(tokens)`` after each inner step.

One DiLoCo job, two workers training the same tiny Llama (H = 3, gradient accumulation 2, unequal
token counts): worker 0 is a ``transformers.Trainer`` with DiLoCoHFCallback (main thread), worker 1
a Lightning ``Trainer`` with DiLoCoLightningCallback (a thread). Both workers' parameters equal, bit
for bit, those of a run of two plain loops (a job of its own) on the same models, data and inner
optimizers, where each loop writes out its framework's step and calls ``DiLoCo.step``: a wrong
token count or step of either callback would change a round's token-weighted mean, hence both.

One job for both frameworks, and threads rather than worker processes, because creating a job
(starting its shard actor) and importing a framework in a new process each cost seconds; two HF
Trainers in one process would share accelerate's GradientState, an HF and a Lightning Trainer share
nothing.

The checkpoint test stops both workers at step 4 (one step into the second round): HF after its
``save_steps`` checkpoint, Lightning at the end of its first epoch (its checkpoint there; Lightning
2.6.6 replays a plain DataLoader's epoch from its start after a mid-epoch checkpoint). Each builds
a new model, inner optimizer, DiLoCo (same worker name: it rejoins as the same worker) and
callback, resumes from its checkpoint, and ends where the uninterrupted plain run ends.
"""

from __future__ import annotations

import re
import threading
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

from paramserver_client import JobClient, ServiceError
from paramserver_client.diloco import DiLoCo, create_jobs
from paramserver_client.diloco_callbacks import DILOCO_STATE_NAME, DiLoCoHFCallback, DiLoCoLightningCallback, count_tokens

H = 3
EPOCH = 4  # Lightning's optimizer steps an epoch; the checkpoints are at step EPOCH, one step into round 2
STEPS = 3 * EPOCH  # four rounds
BATCH, ACCUM = 2, 2
VOCAB, PAD = 50, 0
LENGTHS = (9, 14)  # each worker's padded length: unequal token counts
MAX_GRAD_NORM = 1.0  # HF Trainer's default clipping of the local gradient, kept on
CLIENT: dict[str, Any] = {"timeout": 30, "pull_timeout": 90}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_llama() -> LlamaForCausalLM:
    """A tiny Llama (no dropout), as tests/cluster/hf_worker.py: its loss takes num_items_in_batch."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)  # fmt: skip
    return LlamaForCausalLM(config)


def examples(worker: int, n: int) -> list[dict[str, list[int]]]:
    """Worker `worker`'s examples, right-padded, labels -100 on the padding and a random prompt."""
    g = torch.Generator().manual_seed(2000 + worker)
    length, out = LENGTHS[worker], []
    for _ in range(n):
        k = int(torch.randint(3, length + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (k,), generator=g).tolist()
        prompt = int(torch.randint(0, k - 2, (1,), generator=g))
        pad = length - k
        out.append({"input_ids": ids + [PAD] * pad, "attention_mask": [1] * k + [0] * pad,
                    "labels": [-100] * prompt + ids[prompt:] + [-100] * pad})  # fmt: skip
    return out


HF_DATA = examples(0, STEPS * ACCUM * BATCH)  # worker 0: one pass over STEPS windows
PL_DATA = [{k: torch.tensor(v) for k, v in e.items()} for e in examples(1, EPOCH * ACCUM * BATCH)]  # worker 1: an epoch


def flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert np.array_equal(got, want), f"{what}: max |diff| {float(np.abs(got - want).max()):.3e}"


def new_job(address: str, jobs: list[str]) -> str:
    jobs.append(job := f"dlc-{uuid.uuid4().hex[:8]}")
    create_jobs(address, job, make_llama().named_parameters(), num_workers=2, num_shards=1)
    return job


def diloco(model: torch.nn.Module, inner: torch.optim.Optimizer, address: str, job: str, worker: int) -> DiLoCo:
    return DiLoCo(model.named_parameters(), inner, address, job, f"w{worker}", inner_steps=H, **CLIENT)


def inner_of(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


class Thread:
    """`fn()` on a thread; join() returns its result or raises its error."""

    def __init__(self, fn: Callable[[], dict[str, Any]]) -> None:
        self.result: dict[str, Any] = {}
        self.error: BaseException | None = None

        def run() -> None:
            try:
                torch.set_num_threads(1)
                self.result = fn()
            except BaseException as exc:  # noqa: BLE001 - raised by join()
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self) -> dict[str, Any]:
        self._thread.join(180)
        assert not self._thread.is_alive(), "the worker thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


# --------------------------------------------------------------------------------------------------
# The plain loops: each framework's step written out


def hf_step(model: torch.nn.Module, inner: torch.optim.Optimizer, t: int) -> int:
    """HF Trainer's optimizer step t: the window's ACCUM micro-batches, each loss the model's summed
    token loss over the window's count (num_items_in_batch, counted as Trainer does for a causal LM:
    over labels[..., 1:]), clipping, the inner step, zero_grad. Returns the count."""
    per = ACCUM * BATCH
    rows = HF_DATA[(t - 1) * per : t * per]
    batches = [default_data_collator(rows[i : i + BATCH]) for i in range(0, per, BATCH)]
    items = sum(b["labels"][..., 1:].ne(-100).sum() for b in batches) / 1  # Trainer's tensor (over tp*cp*sp = 1)
    model.train()
    for b in batches:
        model(**b, num_items_in_batch=items).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    inner.step()
    model.zero_grad()
    return int(items)


def pl_loader() -> torch.utils.data.DataLoader[Any]:
    return torch.utils.data.DataLoader(PL_DATA, batch_size=BATCH, shuffle=False)  # type: ignore[arg-type]


def pl_step(model: torch.nn.Module, inner: torch.optim.Optimizer, t: int) -> int:
    """Lightning's optimizer step t: the window's ACCUM batches (epoch after epoch), each the
    model's mean loss over accumulate_grad_batches, the inner step; tokens by count_tokens."""
    window = list(pl_loader())[((t - 1) % EPOCH) * ACCUM :][:ACCUM]
    inner.zero_grad()
    for b in window:
        (model(**b).loss / ACCUM).backward()
    inner.step()
    return sum(count_tokens(b) for b in window)


def plain(address: str, job: str, worker: int, step: Callable[[torch.nn.Module, torch.optim.Optimizer, int], int]) -> Thread:
    model = make_llama()  # here: make_llama seeds torch's global generator

    def run() -> dict[str, Any]:
        inner = inner_of(model)
        with diloco(model, inner, address, job, worker) as d:
            tokens = []
            for t in range(1, STEPS + 1):
                tokens.append(n := step(model, inner, t))
                d.step(n)
            return {"params": flat(model), "tokens": tokens}

    return Thread(run)


@pytest.fixture(scope="module")
def reference(service: Any) -> list[dict[str, Any]]:
    """Two plain loops: worker 0 HF's steps, worker 1 Lightning's."""
    jobs: list[str] = []
    try:
        job = new_job(service.address, jobs)
        return [t.join() for t in [plain(service.address, job, 0, hf_step), plain(service.address, job, 1, pl_step)]]
    finally:
        with JobClient(service.address) as jc:
            for job in jobs:
                try:
                    jc.delete_job(job)
                except ServiceError:
                    pass


# --------------------------------------------------------------------------------------------------
# The framework workers


class Recording(DiLoCoHFCallback):
    """Keeps the tokens the HF callback passed to DiLoCo.step."""

    def __init__(self, d: DiLoCo, **kwargs: Any) -> None:
        super().__init__(d, **kwargs)
        self.tokens: list[int] = []

    def tokens_of_step(self) -> int:
        self.tokens.append(n := super().tokens_of_step())
        return n


class StopAt(TrainerCallback):
    """Stops HF training after step `step` (after its checkpoint is saved)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def hf_args(out: Path, *, save_steps: int | None = None) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM, max_steps=STEPS,
        lr_scheduler_type="constant", max_grad_norm=MAX_GRAD_NORM, train_sampling_strategy="sequential",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[], use_cpu=True,
        disable_tqdm=True, logging_steps=1, dataloader_num_workers=0, seed=0,
    )  # fmt: skip


def hf_train(
    model: torch.nn.Module, callback: DiLoCoHFCallback, args: TrainingArguments, resume: Any = None, stop: int | None = None
) -> None:
    callbacks: list[TrainerCallback] = [callback] + ([StopAt(stop)] if stop else [])
    trainer = Trainer(model=model, args=args, train_dataset=HF_DATA, optimizers=(callback.diloco.inner, None), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)


class LlamaModule(pl.LightningModule):
    """The tiny Llama in Lightning; configure_optimizers returns the inner optimizer set on it."""

    def __init__(self) -> None:
        super().__init__()
        self.llama = make_llama()
        self.inner = inner_of(self)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.llama(**batch).loss
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.inner


def pl_fit(module: LlamaModule, callback: DiLoCoLightningCallback, root: Path, epochs: int, *, ckpt_path: str | None = None,
           checkpoints: Path | None = None) -> Any:  # fmt: skip
    callbacks: list[Any] = [callback]
    if checkpoints is not None:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=str(checkpoints), save_top_k=-1))
    tr = pl.Trainer(max_epochs=epochs, accumulate_grad_batches=ACCUM, default_root_dir=str(root), accelerator="cpu", devices=1,
                    logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=checkpoints is not None,
                    callbacks=callbacks)  # fmt: skip
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint need to be provided.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        tr.fit(module, pl_loader(), ckpt_path=ckpt_path)
    return tr


# --------------------------------------------------------------------------------------------------
# The tests


def test_hf_and_lightning_workers_with_the_callbacks_equal_plain_loops_bit_for_bit(
    address: str, jobs: list[str], tmp_path: Path, reference: list[dict[str, Any]]
) -> None:
    job = new_job(address, jobs)
    module = LlamaModule()

    def lightning_worker() -> dict[str, Any]:
        with diloco(module, module.inner, address, job, 1) as d:
            tr = pl_fit(module, DiLoCoLightningCallback(d), tmp_path / "pl", STEPS // EPOCH)
            return {"global_step": tr.global_step, "steps": d.steps, "rounds": d.rounds}

    pl_worker = Thread(lightning_worker)
    model = make_llama()
    with diloco(model, inner_of(model), address, job, 0) as d:
        callback = Recording(d)
        hf_train(model, callback, hf_args(tmp_path / "hf"))
        assert (d.steps, d.rounds, d.fragments[0].version) == (STEPS, STEPS // H, STEPS // H)
    assert pl_worker.join() == {"global_step": STEPS, "steps": STEPS, "rounds": STEPS // H}
    assert callback.tokens == reference[0]["tokens"]  # Trainer's num_items_in_batch of each window
    assert len(set(callback.tokens)) > 1 and callback.tokens != reference[1]["tokens"]
    assert_same(flat(model), reference[0]["params"], "worker 0 (HF Trainer)")
    assert_same(flat(module.llama), reference[1]["params"], "worker 1 (Lightning)")
    assert_same(reference[0]["params"], reference[1]["params"], "the last round synchronised both")
    assert not np.array_equal(reference[0]["params"], flat(make_llama()))  # it trained


def test_both_callbacks_resume_from_a_mid_round_checkpoint_to_the_uninterrupted_run(
    address: str, jobs: list[str], tmp_path: Path, reference: list[dict[str, Any]]
) -> None:
    job = new_job(address, jobs)
    first_module = LlamaModule()  # both modules built here: building seeds torch's global generator
    second_module = LlamaModule()

    def lightning_worker() -> dict[str, Any]:
        ckpts = tmp_path / "pl-ckpt"
        with diloco(first_module, first_module.inner, address, job, 1) as first:
            callback = DiLoCoLightningCallback(first)
            pl_fit(first_module, callback, tmp_path / "pl", 1, checkpoints=ckpts)  # one epoch: EPOCH steps
            stopped = (first.steps, first.fragments[0].tokens)
        (ckpt,) = ckpts.glob("*.ckpt")
        saved = torch.load(ckpt, weights_only=True)["callbacks"][callback.state_key]
        # a new process, as it were; Lightning loads the callback's state into the new DiLoCo
        with diloco(second_module, second_module.inner, address, job, 1) as second:
            tr = pl_fit(second_module, DiLoCoLightningCallback(second), tmp_path / "pl", STEPS // EPOCH, ckpt_path=str(ckpt))
            return {"stopped": stopped, "saved": saved, "global_step": tr.global_step, "steps": second.steps, "rounds": second.rounds}

    pl_worker = Thread(lightning_worker)
    args = hf_args(tmp_path / "hf", save_steps=EPOCH)
    model = make_llama()
    with diloco(model, inner_of(model), address, job, 0) as first:
        hf_train(model, DiLoCoHFCallback(first), args, stop=EPOCH)
        assert first.steps == EPOCH and first.fragments[0].tokens == reference[0]["tokens"][H]  # inside the open round
    saved = torch.load(tmp_path / "hf" / f"checkpoint-{EPOCH}" / DILOCO_STATE_NAME, weights_only=True)
    assert saved["global_step"] == EPOCH and saved["diloco"]["steps"] == EPOCH
    assert saved["diloco"]["fragments"][0]["version"] == 1 and saved["diloco"]["fragments"][0]["tokens"] == reference[0]["tokens"][H]

    # a new process, as it were: model, inner optimizer and DiLoCo (rejoining as "w0"); the Trainer
    # resumes from the last checkpoint in output_dir, and the callback loads its diloco.pt
    model = make_llama()
    with diloco(model, inner_of(model), address, job, 0) as second:
        callback = Recording(second)
        hf_train(model, callback, args, resume=True)
        assert (second.steps, second.rounds) == (STEPS, STEPS // H - 1)
    assert callback.tokens == reference[0]["tokens"][EPOCH:]
    assert (tmp_path / "hf" / f"checkpoint-{2 * EPOCH}" / DILOCO_STATE_NAME).is_file()  # saved again

    got = pl_worker.join()
    assert got["stopped"] == (EPOCH, reference[1]["tokens"][H])
    assert got["saved"]["window_tokens"] == 0 and got["saved"]["diloco"]["steps"] == EPOCH
    assert (got["global_step"], got["steps"], got["rounds"]) == (STEPS, STEPS, STEPS // H - 1)
    assert_same(flat(model), reference[0]["params"], "worker 0 (HF Trainer, resumed)")
    assert_same(flat(second_module.llama), reference[1]["params"], "worker 1 (Lightning, resumed)")


# --------------------------------------------------------------------------------------------------
# Misuse and token counting (no service: a stand-in for the DiLoCo)


def test_the_callbacks_refuse_a_trainer_that_does_not_step_dilocos_inner_optimizer(tmp_path: Path) -> None:
    def step(tokens: int) -> list[int]:
        raise AssertionError("no step may be counted")

    module = LlamaModule()
    other: Any = types.SimpleNamespace(
        inner=torch.optim.SGD(module.parameters(), lr=0.1), fragments=[types.SimpleNamespace(job_id="j")], step=step
    )
    with pytest.raises(ValueError, match=r"configure_optimizers must return diloco\.inner"):
        pl_fit(module, DiLoCoLightningCallback(other), tmp_path / "pl", 1)
    trainer = Trainer(model=module.llama, args=hf_args(tmp_path / "hf"), train_dataset=HF_DATA, callbacks=[DiLoCoHFCallback(other)])
    with pytest.raises(ValueError, match=r"optimizers=\(diloco.inner, None\)"):
        trainer.train()  # Trainer's own AdamW


def test_the_hf_callback_needs_the_checkpoints_diloco_state_and_the_steps_labels(tmp_path: Path) -> None:
    model = make_llama()
    d: Any = types.SimpleNamespace(inner=inner_of(model), fragments=[types.SimpleNamespace(job_id="j")])
    callback = DiLoCoHFCallback(d)
    resumed: Any = types.SimpleNamespace(global_step=EPOCH)
    fresh: Any = types.SimpleNamespace(global_step=0)
    control: Any = None
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint-{EPOCH}/{DILOCO_STATE_NAME} does not exist")):
        callback.on_train_begin(hf_args(tmp_path), resumed, control, model=model, optimizer=d.inner)
    with pytest.raises(FileNotFoundError, match=re.escape(f"elsewhere/{DILOCO_STATE_NAME}")):
        DiLoCoHFCallback(d, resume_from=tmp_path / "elsewhere").on_train_begin(
            hf_args(tmp_path), resumed, control, model=model, optimizer=d.inner
        )
    callback.on_train_begin(hf_args(tmp_path), fresh, control, model=model, optimizer=d.inner)
    batch = default_data_collator(HF_DATA[:BATCH])
    model(**{k: v for k, v in batch.items() if k != "labels"})  # a training forward without labels
    with pytest.raises(ValueError, match="could not count the tokens"):
        callback.tokens_of_step()
    callback.on_step_begin(hf_args(tmp_path), fresh, control)
    model(**batch)  # no num_items_in_batch: the labels != -100 (unshifted)
    model.train(False)
    model(**batch)  # not training: not counted
    assert callback.tokens_of_step() == int(batch["labels"].ne(-100).sum())
    callback.on_train_end(hf_args(tmp_path), fresh, control)
    model.train()
    model(**batch)
    assert callback.tokens_of_step() == int(batch["labels"].ne(-100).sum())  # the hook is gone


def test_count_tokens_counts_labels_or_samples() -> None:
    labels = torch.tensor([[1, -100, 3], [-100, -100, 5]])
    assert count_tokens({"input_ids": torch.zeros(2, 3), "labels": labels}) == 3
    assert count_tokens((torch.zeros(5, 2), torch.zeros(5, 1))) == 5
    assert count_tokens([torch.zeros(4, 2)]) == 4
    assert count_tokens(torch.zeros(7, 3)) == 7
    assert count_tokens({"x": torch.zeros(6, 2)}) == 6
    with pytest.raises(TypeError, match="tokens=fn"):
        count_tokens("text")
