"""Hugging Face Trainer through the service (ParamServerTrainer; real Ray, real service, real
transformers, real worker processes): two workers with unequal padding and gradient accumulation
train a tiny Llama to the same parameters as one torch.optim.AdamW on the token mean over both
workers' whole windows, under Trainer's own linear lr schedule; a run stopped right after a
checkpoint and resumed from it ends where the uninterrupted run ends."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainingArguments, default_data_collator, get_scheduler

from paramserver_client import JobClient, RemoteOptimizer, ServiceError
from paramserver_client.hf import ParamServerTrainer
from tests.cluster.hf_worker import ACCUM, BATCH, HYPER, STEPS, VOCAB, make_dataset, make_model

ROOT = Path(__file__).resolve().parents[2]
#: The longest a round of worker processes may take (start, import, train, exit).
ROUND_TIMEOUT = 180.0
STOP_AT = 2


def run_workers(address: str, tmp: Path, runs: dict[str, tuple[str, list[str]]]) -> dict[str, list[dict[str, Any]]]:
    """Run both workers (``hf_worker``) of each run ``tag: (job, extra args)`` at once, until all
    exit; each run's two results. Worker w of a job writes its checkpoints under ``tmp/JOB-out{w}``
    ("{w}" in an extra argument becomes w). A worker that fails or runs past ROUND_TIMEOUT fails
    the test, and no process outlives this."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip
    procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
    try:
        for tag, (job, extra) in runs.items():
            for w in range(2):
                cmd = [sys.executable, "-m", "tests.cluster.hf_worker", address, job, str(w), str(tmp / f"{job}-out{w}"),
                       str(tmp / f"{tag}-{w}.pt"), *(e.replace("{w}", str(w)) for e in extra)]  # fmt: skip
                log = tmp / f"{tag}-{w}.log"
                with open(log, "wb") as out:
                    procs.append((f"{tag} worker {w}", log, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)))
        deadline = time.monotonic() + ROUND_TIMEOUT
        while any(p.poll() is None for _, _, p in procs):
            for name, log, p in procs:
                if p.poll() not in (None, 0):
                    raise AssertionError(f"{name} failed ({p.returncode}):\n{log.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the workers ran past {ROUND_TIMEOUT}s:\n" + "\n".join(log.read_text()[-2000:] for _, log, _ in procs)
                )
            time.sleep(0.1)
        for name, log, p in procs:
            assert p.returncode == 0, f"{name} failed ({p.returncode}):\n{log.read_text()[-6000:]}"
    finally:
        for _, _, p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)
    return {tag: [torch.load(tmp / f"{tag}-{w}.pt", weights_only=True) for w in range(2)] for tag in runs}


def delete_job(address: str, job: str) -> None:
    with JobClient(address) as jc:
        try:
            jc.delete_job(job)
        except ServiceError:
            pass


class Runs:
    """The module's worker runs: "whole" (STEPS steps on job `whole`) and "first" (job `stopped`,
    stopped after the checkpoint of step STOP_AT), run at once; "resumed" is run by the test."""

    def __init__(self, address: str, tmp: Path) -> None:
        self.address, self.tmp = address, tmp
        self.whole, self.stopped = f"hf-{uuid.uuid4().hex[:8]}", f"hf-{uuid.uuid4().hex[:8]}"
        self.results: dict[str, list[dict[str, Any]]] = {}

    def checkpoint(self, w: int | str) -> Path:
        """Worker w's checkpoint of step STOP_AT in the stopped run."""
        return self.tmp / f"{self.stopped}-out{w}" / f"checkpoint-{STOP_AT}"


@pytest.fixture(scope="module")
def runs(service: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    r = Runs(service.address, tmp_path_factory.mktemp("hf"))
    try:
        first = ["--stop-at", str(STOP_AT), "--snapshot-on-save"]
        r.results = run_workers(r.address, r.tmp, {"whole": (r.whole, []), "first": (r.stopped, first)})
        yield r
    finally:
        delete_job(r.address, r.whole)
        delete_job(r.address, r.stopped)


def reference() -> tuple[dict[str, torch.Tensor], list[int], list[float]]:
    """One process, one torch.optim.AdamW on the full batch: each step's loss is the summed token
    cross-entropy over both workers' ACCUM micro-batches (labels shifted as the causal LM's
    ForCausalLMLoss shifts them) over their total token count, with HF's linear schedule. Returns the final
    parameters, each step's token count and lr."""
    model = make_model()
    model.train()
    params = [p for _, p in model.named_parameters()]
    opt = torch.optim.AdamW(params, **HYPER)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=STEPS)
    data = [make_dataset(w) for w in range(2)]
    per_step = ACCUM * BATCH
    terms, lrs = [], []
    for s in range(STEPS):
        batches = [default_data_collator(data[w][s * per_step + i * BATCH : s * per_step + (i + 1) * BATCH]) for w in range(2)
                   for i in range(ACCUM)]  # fmt: skip
        total = sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
        opt.zero_grad()
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB).float(), b["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
            )
            (loss / total).backward()
        terms.append(total)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return {n: p.detach() for n, p in model.named_parameters()}, terms, lrs


def test_two_workers_with_unequal_padding_and_accumulation_train_as_one_adamw_on_the_token_mean(runs: Runs) -> None:
    want, terms, lrs = reference()
    a, b = runs.results["whole"]
    assert [s["step"] for s in a["steps"]] == list(range(1, STEPS + 1)) and a["version"] == STEPS
    # each worker's window count is its share of the step's tokens; the service divided by the sum
    assert [sa["terms"] + sb["terms"] for sa, sb in zip(a["steps"], b["steps"], strict=True)] == terms
    assert all(sa["terms"] != sb["terms"] for sa, sb in zip(a["steps"], b["steps"], strict=True))  # unequal
    assert [s["lr"] for s in a["steps"]] == [s["lr"] for s in b["steps"]] == pytest.approx(lrs, rel=1e-7)  # HF's linear schedule
    assert len(set(lrs)) == STEPS
    assert a["max_grad_norm"] == 0.0  # Trainer's local clipping is off
    for name, w in want.items():
        assert torch.equal(a["params"][name], b["params"][name]), name  # both workers hold the service's values
        torch.testing.assert_close(a["params"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    moved = max(float((a["params"][n] - p.detach()).abs().max()) for n, p in make_model().named_parameters())
    assert moved > 1e-3  # the steps really moved the parameters


@pytest.mark.slow  # two more Trainer runs (~15 s); make test-slow
def test_a_run_stopped_after_a_checkpoint_resumes_from_it_to_the_same_parameters(runs: Runs, tmp_path: Path) -> None:
    first, whole, job = runs.results["first"], runs.results["whole"], runs.stopped
    assert [f["version"] for f in first] == [STOP_AT, STOP_AT]
    for w in range(2):
        saved = torch.load(runs.checkpoint(w) / "optimizer.pt", weights_only=True)
        assert {k: v for k, v in saved["paramserver"].items() if k != "snapshot"} == {"job_id": job, "version": STOP_AT}
        with JobClient(runs.address) as jc:  # snapshot_on_save: the checkpoint names a service snapshot at its version
            assert saved["paramserver"]["snapshot"] in {s.path for s in jc.list_snapshots(job) if s.version == STOP_AT}
        assert torch.load(runs.checkpoint(w) / "scheduler.pt", weights_only=True)["last_epoch"] == STOP_AT
    # new processes: RemoteOptimizer(resume=True) joins the job at version STOP_AT, Trainer loads the checkpoint
    resumed = run_workers(runs.address, runs.tmp, {"resumed": (job, ["--resume", str(runs.checkpoint("{w}"))])})["resumed"]
    for w in range(2):
        assert resumed[w]["start_version"] == STOP_AT and resumed[w]["version"] == STEPS
        assert [s["step"] for s in resumed[w]["steps"]] == list(range(STOP_AT + 1, STEPS + 1))
        assert first[w]["steps"] + resumed[w]["steps"] == whole[w]["steps"]  # the same windows, counts and lrs
        for name, p in whole[w]["params"].items():
            assert torch.equal(resumed[w]["params"][name], p), name

    # the job is at STEPS now: resuming from the step-STOP_AT checkpoint again rolls the job back to
    # its snapshot (RollbackJob) and the replayed steps end, bit for bit, where the whole run ends
    again = run_workers(runs.address, runs.tmp, {"again": (job, ["--resume", str(runs.checkpoint("{w}"))])})["again"]
    with JobClient(runs.address) as jc:
        state = jc.get_job(job)
    assert state.version == STEPS and "rollback" in state.recovered_from
    for w in range(2):
        assert again[w]["version"] == STEPS and again[w]["steps"] == resumed[w]["steps"]
        for name, p in whole[w]["params"].items():
            assert torch.equal(again[w]["params"][name], p), name


def args(out: Path, **kw: Any) -> TrainingArguments:
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUM,
                             max_steps=STEPS, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", **kw)  # fmt: skip


def test_the_trainer_needs_a_mean_remote_optimizer_turns_clipping_off_and_counts_the_windows_tokens(
    address: str, job_id: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model()
    with pytest.raises(TypeError, match="RemoteOptimizer"):
        ParamServerTrainer(model=model, args=args(tmp_path), optimizers=(torch.optim.AdamW(model.parameters()), None))
    summed = RemoteOptimizer(model, address, job_id, optimizer="adamw", hyperparameters=HYPER, timeout=30)
    try:
        with pytest.raises(ValueError, match="loss='mean'"):
            ParamServerTrainer(model=model, args=args(tmp_path), optimizers=(summed, None))
    finally:
        summed.close()
    opt = RemoteOptimizer(model, address, job_id, loss="mean", optimizer="adamw", hyperparameters=HYPER, timeout=30)
    try:
        with caplog.at_level(logging.WARNING, logger="paramserver_client.hf"):
            trainer = ParamServerTrainer(model=model, args=args(tmp_path, max_grad_norm=0.5), optimizers=(opt, None))
        assert trainer.args.max_grad_norm == 0.0 and "max_grad_norm=0.5" in caplog.text
        batches = [default_data_collator(make_dataset(1)[i : i + BATCH]) for i in range(0, ACCUM * BATCH, BATCH)]
        got, n = trainer.get_batch_samples(iter(batches), ACCUM, torch.device("cpu"))
        assert len(got) == ACCUM and opt.loss_terms == int(n) == sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in batches)
        unlabeled = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
        with pytest.raises(ValueError, match="num_items_in_batch is None"):
            trainer.get_batch_samples(iter(unlabeled), ACCUM, torch.device("cpu"))
    finally:
        opt.close()
