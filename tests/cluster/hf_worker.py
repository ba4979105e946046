"""A Hugging Face Trainer worker as its own process, for test_hf_trainer:

    python -m tests.cluster.hf_worker ADDRESS JOB_ID WORKER OUT_DIR RESULT [--stop-at K] [--resume CHECKPOINT]

Worker WORKER (0 or 1) trains a tiny Llama on its own data (make_dataset) with a ParamServerTrainer
for STEPS optimizer steps (Trainer's linear lr schedule over STEPS), then writes its final
parameters and what each step saw to RESULT (torch.save). With --stop-at K it saves a checkpoint
at step K and stops there (a run interrupted right after a save); with --resume it continues a
checkpoint (the job must be at the checkpoint's version).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from paramserver_client import RemoteOptimizer
from paramserver_client.hf import ParamServerTrainer

STEPS, ACCUM, BATCH = 4, 3, 2
VOCAB, PAD = 50, 0
#: Each worker's sequence length (unequal: different padding and token counts).
LENGTHS = (9, 14)
#: lr 1e-3: Adam divides each gradient element by its own scale, so an element whose gradient is a
#: near-cancelled sum turns the float rounding of another summation order (per worker, then across workers,
#: vs. the test's one process) into a parameter difference proportional to lr (lr 1e-2 came within 2x of
#: the test's tolerance; 1e-3 stays 100x below it, while weighting each worker's mean once is 3000x above).
HYPER: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.1}


def make_model() -> LlamaForCausalLM:
    """The tiny Llama every process starts from (no dropout: the step is deterministic).

    Not GPT-2: in transformers 5.24 ``GPT2LMHeadModel`` gets no ``loss_type`` (its class name matches
    no loss), so Trainer counts ``num_items_in_batch`` over the unshifted labels (one token per row
    too many, for one process as for many); and its key bias has an exactly-zero gradient whose
    rounding noise Adam turns into lr-sized, order-dependent steps."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=PAD)  # fmt: skip
    return LlamaForCausalLM(config)


def make_dataset(worker: int) -> list[dict[str, list[int]]]:
    """Worker `worker`'s STEPS * ACCUM * BATCH examples: right-padded to its length, labels -100 on
    the padding (and on a random prompt prefix)."""
    g = torch.Generator().manual_seed(1000 + worker)
    length = LENGTHS[worker]
    out = []
    for _ in range(STEPS * ACCUM * BATCH):
        n = int(torch.randint(2, length + 1, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (n,), generator=g).tolist()
        prompt = int(torch.randint(0, n - 1, (1,), generator=g))
        labels = [-100] * prompt + ids[prompt:]
        pad = length - n
        out.append({"input_ids": ids + [PAD] * pad, "attention_mask": [1] * n + [0] * pad, "labels": labels + [-100] * pad})
    return out


class Record(TrainerCallback):
    """Keeps each step's token count, lr and version; stops after step `stop_at`."""

    def __init__(self, opt: RemoteOptimizer, stop_at: int | None) -> None:
        self.opt, self.stop_at = opt, stop_at
        self.steps: list[dict[str, Any]] = []
        self._terms: int | None = None

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._terms = self.opt.loss_terms

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        report = self.opt.last_report
        self.steps.append(
            {"step": state.global_step, "terms": self._terms, "version": self.opt.version, "lr": float(report.lr) if report else None}
        )
        if self.stop_at is not None and state.global_step == self.stop_at:
            control.should_training_stop = True  # after the checkpoint save of this step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("address")
    ap.add_argument("job_id")
    ap.add_argument("worker", type=int)
    ap.add_argument("out_dir")
    ap.add_argument("result")
    ap.add_argument("--stop-at", type=int)
    ap.add_argument("--resume")
    ap.add_argument("--snapshot-on-save", action="store_true", help="RemoteOptimizer(snapshot_on_save=True)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"{time.time():.3f} imported", flush=True)
    torch.set_num_threads(1)
    model = make_model()
    opt = RemoteOptimizer(model, a.address, a.job_id, loss="mean", resume=a.resume is not None, worker_name=f"w{a.worker}",
                          snapshot_on_save=a.snapshot_on_save, optimizer="adamw", hyperparameters=HYPER, num_workers=2,
                          num_shards=2, timeout=30, pull_timeout=60)  # fmt: skip
    start_version = opt.version
    print(f"{time.time():.3f} joined {a.job_id} as worker {opt.worker_id} at version {start_version}", flush=True)
    try:
        args = TrainingArguments(
            output_dir=a.out_dir,
            per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUM,
            max_steps=STEPS,
            lr_scheduler_type="linear",
            train_sampling_strategy="sequential",
            save_strategy="steps" if a.stop_at else "no",
            save_steps=a.stop_at or 500,
            save_only_model=False,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=1,
            dataloader_num_workers=0,
            seed=0,
        )
        record = Record(opt, a.stop_at)
        trainer: Trainer = ParamServerTrainer(
            model=model, args=args, train_dataset=make_dataset(a.worker), optimizers=(opt, None), callbacks=[record]
        )
        trainer.train(resume_from_checkpoint=a.resume)
        print(f"{time.time():.3f} trained to version {opt.version}", flush=True)
        result = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "steps": record.steps,
            "start_version": start_version,
            "version": opt.version,
            "max_grad_norm": trainer.args.max_grad_norm,
        }
        torch.save(result, a.result)
    finally:
        opt.close()
    print(f"{time.time():.3f} left the job", flush=True)


if __name__ == "__main__":
    main()
