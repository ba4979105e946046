"""RemoteOptimizer is a torch.optim.Optimizer: param groups, closures, hooks, torch lr schedulers
(bit-identical to the same scheduler on torch.optim.AdamW), GradScaler, state_dict, and a job
lifecycle that never joins an old run by accident (real Ray, real service, real torch)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from paramserver.optim import build_schedule
from paramserver_client import JobClient, Reason, RemoteOptimizer, ServiceError, param_group

SHAPES = [("w1", (13, 7)), ("b1", (7,)), ("w2", (7, 3)), ("b2", (3,))]
HYPER: dict[str, Any] = {"lr": 0.02, "weight_decay": 0.1}


def make_params(seed: int = 3) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(*s, generator=g))) for n, s in SHAPES]


def grads(step: int, worker: int = 0) -> tuple[list[torch.Tensor], int]:
    """A seeded summed-loss gradient per parameter and its loss-term count."""
    rng = np.random.default_rng(100 * step + worker)
    terms = int(rng.integers(1, 20))
    return [torch.from_numpy((rng.standard_normal(s) * terms).astype(np.float32)) for _, s in SHAPES], terms


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a shard actor: torch's kernels split their scalar tail by thread count
    yield
    torch.set_num_threads(threads)


def remote(address: str, job_id: str, named: list[tuple[str, torch.nn.Parameter]], **kw: Any) -> RemoteOptimizer:
    settings: dict[str, Any] = {"optimizer": "adamw", "hyperparameters": HYPER, "num_workers": 1, "num_shards": 2, "timeout": 30,
                                "pull_timeout": 60, **kw}  # fmt: skip
    return RemoteOptimizer(named, address, job_id, **settings)


def test_it_is_a_torch_optimizer_with_the_jobs_groups_closures_and_hooks(address: str, job_id: str) -> None:
    named = make_params()
    opt = remote(
        address, job_id, named, param_groups=[param_group("biases", patterns=["b*"], hyperparameters={"weight_decay": 0.0, "lr": 0.05})]
    )
    try:
        assert isinstance(opt, torch.optim.Optimizer)
        groups = {g["name"]: g for g in opt.param_groups}
        assert set(groups) == {"default", "biases"}
        assert groups["default"]["lr"] == 0.02 and groups["default"]["weight_decay"] == 0.1 and groups["default"]["rule"] == "adamw"
        assert groups["biases"]["lr"] == 0.05 and groups["biases"]["weight_decay"] == 0.0
        assert [id(p) for p in groups["biases"]["params"]] == [id(p) for n, p in named if n.startswith("b")]
        assert opt.defaults["lr"] == 0.02
        with pytest.raises(RuntimeError, match="groups are fixed"):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
        calls: list[str] = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        before = [p.detach().clone() for _, p in named]
        with pytest.raises(ValueError, match="loss_terms"):  # a summed loss needs its term count
            opt.step()
        assert opt.version == 0 and all(torch.equal(b, p) for b, (_, p) in zip(before, named, strict=True))

        def closure() -> torch.Tensor:
            assert torch.is_grad_enabled()
            opt.zero_grad()
            loss = sum((p * p).sum() for _, p in named)
            loss.backward()
            return loss

        with torch.no_grad():
            loss = opt.step(closure, loss_terms=4)
        assert isinstance(loss, torch.Tensor) and opt.version == 1 and opt.last_report.outcome == 2  # APPLIED
        assert calls == ["pre", "pre", "post"]  # the refused step ran its pre hook only
        assert not all(torch.equal(b, p) for b, (_, p) in zip(before, named, strict=True))
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for _, p in named)
        opt.zero_grad()
        assert all(p.grad is None for _, p in named)
    finally:
        opt.close()


def reference(make_sched: Callable[[torch.optim.Optimizer], Any], steps: int) -> list[torch.Tensor]:
    named = make_params()
    ps = [p for _, p in named]
    opt = torch.optim.AdamW(ps, **HYPER, fused=True)
    sched = make_sched(opt)
    for s in range(steps):
        gs, n = grads(s)
        for p, g in zip(ps, gs, strict=True):
            p.grad = g / n
        opt.step()
        sched.step()
    return [p.detach() for p in ps]


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1.0 + 0.3 * s)),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12, cycle_momentum=False),
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12, eta_min=1e-4),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_a_torch_scheduler_drives_the_lr_bit_for_bit_as_on_torch_adamw(address: str, job_id: str, one_thread: None, kind: str) -> None:
    steps = 12
    want = reference(SCHEDULERS[kind], steps)
    named = make_params()
    opt = remote(address, job_id, named)
    try:
        sched = SCHEDULERS[kind](opt)
        lrs = []
        for s in range(steps):
            gs, n = grads(s)
            for (_, p), g in zip(named, gs, strict=True):
                p.grad = g.clone()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step(loss_terms=n)
            assert opt.last_report.lr == lrs[-1]  # the service used the loop's lr
            sched.step()
        assert len(set(lrs)) > 3  # the schedule really moved
        for (name, p), w in zip(named, want, strict=True):
            assert torch.equal(p.detach(), w), name
    finally:
        opt.close()


def test_without_a_scheduler_the_jobs_schedule_runs_and_param_groups_show_its_lr(address: str, job_id: str) -> None:
    named = make_params()
    sched = {"warmup_steps": 2, "total_steps": 3}
    factor = build_schedule("warmup_linear", sched)
    opt = remote(address, job_id, named, schedule="warmup_linear", schedule_parameters=sched)
    try:
        seen = []
        for s in range(4):
            gs, n = grads(s)
            for (_, p), g in zip(named, gs, strict=True):
                p.grad = g
            if s == 3:
                with pytest.warns(RuntimeWarning, match="past the job's total_steps"):
                    opt.step(loss_terms=n)
            else:
                opt.step(loss_terms=n)
            seen.append((opt.last_report.lr, opt.param_groups[0]["lr"]))
        assert [r for r, _ in seen] == [HYPER["lr"] * factor(s) for s in range(4)]
        assert len({r for r, _ in seen}) > 2
        assert all(shown == pytest.approx(r) for r, shown in seen)
    finally:
        opt.close()


def test_workers_driving_different_lrs_skip_the_step_everywhere_and_are_told(address: str, job_id: str) -> None:
    named = [make_params(), make_params()]
    opts = [remote(address, job_id, named[k], num_workers=2, worker_name=f"w{k}") for k in range(2)]
    try:
        import threading

        before = [p.detach().clone() for _, p in named[0]]
        errors: list[BaseException] = []
        for k, opt in enumerate(opts):
            opt.param_groups[0]["lr"] = 0.01 * (k + 1)

        def step(k: int) -> None:
            gs, n = grads(0, k)
            for (_, p), g in zip(named[k], gs, strict=True):
                p.grad = g
            try:
                opts[k].step(loss_terms=n)
            except RuntimeError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=step, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(errors) == 2 and all("LR_MISMATCH" in str(e) for e in errors), errors
        assert all(o.last_report.skip_reason == Reason.LR_MISMATCH and o.version == 1 for o in opts)
        for b, (_, p) in zip(before, named[1], strict=True):
            assert torch.equal(b, p.detach())  # skipped on every shard: nothing moved
    finally:
        for o in opts:
            o.close()


def test_a_rerun_does_not_join_an_old_run_unless_it_resumes_and_state_dict_round_trips(address: str, job_id: str) -> None:
    named = make_params()
    opt = remote(address, job_id, named)
    for s in range(2):
        gs, n = grads(s)
        for (_, p), g in zip(named, gs, strict=True):
            p.grad = g
        opt.step(loss_terms=n)
    opt.param_groups[0]["lr"] = 0.01
    sd = opt.state_dict()
    assert sd["paramserver"] == {"job_id": job_id, "version": 2, "snapshot": ""}
    opt.close()
    again = make_params(seed=9)
    with pytest.raises(ServiceError) as exists:
        remote(address, job_id, again)
    assert exists.value.code == grpc.StatusCode.ALREADY_EXISTS and exists.value.reason == Reason.JOB_ALREADY_EXISTS
    assert "resume=True" in str(exists.value)
    resumed = remote(address, job_id, again, resume=True)
    try:
        assert resumed.version == 2
        for (_, a), (_, b) in zip(again, named, strict=True):
            assert torch.equal(a.detach(), b.detach())  # the job's parameters, not the new model's
        torch.save(sd, buf := __import__("io").BytesIO())
        buf.seek(0)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        assert resumed.param_groups[0]["lr"] == 0.01
        stale = {**sd, "paramserver": {**sd["paramserver"], "version": 1}}
        with pytest.raises(ValueError, match="saved at version 1"):
            resumed.load_state_dict(stale)
        with pytest.raises(ValueError, match="belongs to job"):
            resumed.load_state_dict({**sd, "paramserver": {**sd["paramserver"], "job_id": "other"}})
    finally:
        resumed.close()
    with JobClient(address) as jc:
        assert jc.get_job(job_id).version == 2  # nothing was pushed by the refused attempts


def test_grad_scaler_unscales_and_an_overflow_skips_the_step_on_every_worker(address: str, job_id: str) -> None:
    named = [make_params(), make_params()]
    opts = [remote(address, job_id, named[k], num_workers=2, worker_name=f"s{k}") for k in range(2)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    try:
        import threading

        failed: list[BaseException] = []

        def step(k: int, s: int, overflow: bool) -> None:
            try:
                scaled_step(k, s, overflow)
            except BaseException as exc:  # noqa: BLE001 - re-raised by the test thread
                failed.append(exc)

        def scaled_step(k: int, s: int, overflow: bool) -> None:
            gs, n = grads(s, k)
            scale = scalers[k].scale(torch.ones(()))  # what backward of scaler.scale(loss) sees
            for (_, p), g in zip(named[k], gs, strict=True):
                p.grad = g * scale  # as backward of a scaled loss
            if overflow:
                named[k][0][1].grad[0, 0] = float("inf")
            if s == 2:  # unscaled by the loop first (as before clipping): sent as it is
                scalers[k].unscale_(opts[k])
            scalers[k].step(opts[k], loss_terms=n)
            scalers[k].update()

        for s, bad in ((0, None), (1, 1), (2, None)):
            threads = [threading.Thread(target=step, args=(k, s, k == bad)) for k in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not failed, failed
            reports = [o.last_report for o in opts]
            assert all(o.version == s + 1 for o in opts)
            if bad is None:
                assert all(r.outcome == 2 for r in reports)
            else:
                assert all(r.outcome == 3 and r.skip_reason == Reason.NON_FINITE_GRADIENT for r in reports)
        assert scalers[1].get_scale() == 512.0 and scalers[0].get_scale() == 1024.0  # the overflowing worker backed off
        # what was applied is the unscaled gradient: the same as steps 0 and 2 of torch AdamW on the mean
        ps = [p for _, p in make_params()]
        ref = torch.optim.AdamW(ps, **HYPER)
        for s in (0, 2):
            (g0, n0), (g1, n1) = grads(s, 0), grads(s, 1)
            for p, a, b in zip(ps, g0, g1, strict=True):
                p.grad = (a + b) / (n0 + n1)
            ref.step()
        for (name, p), w in zip(named[0], ps, strict=True):
            torch.testing.assert_close(p.detach(), w.detach(), rtol=1e-5, atol=1e-6, msg=name)
    finally:
        for o in opts:
            o.close()


def test_a_scheduler_that_moves_more_than_the_lr_is_refused_before_anything_is_pushed(address: str, job_id: str) -> None:
    named = make_params()
    opt = remote(address, job_id, named, hyperparameters={**HYPER, "betas": [0.9, 0.99]})
    try:
        assert opt.param_groups[0]["betas"] == (0.9, 0.99)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=10)  # cycles beta1 too
        gs, n = grads(0)
        for (_, p), g in zip(named, gs, strict=True):
            p.grad = g
        with pytest.raises(RuntimeError, match="only the lr"):
            opt.step(loss_terms=n)
        assert opt.version == 0 and sched.last_epoch == 0
        opt.param_groups[0]["betas"] = (0.9, 0.99)
        opt.param_groups[0]["weight_decay"] = 0.5  # the loop moving weight_decay itself: refused alike
        with pytest.raises(RuntimeError, match="weight_decay"):
            opt.step(loss_terms=n)
        assert opt.version == 0
    finally:
        opt.close()
    with JobClient(address) as jc:
        assert jc.get_job(job_id).version == 0


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.l1 = torch.nn.Linear(13, 32)
        self.l2 = torch.nn.Linear(32, 32)
        self.l3 = torch.nn.Linear(32, 3)
        self.unused = torch.nn.Parameter(torch.ones(4))  # never gets a gradient: sent as zeros

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 13, generator=g), torch.randn(16, 3, generator=g)


def backward_and_step(opt: RemoteOptimizer, loss: torch.Tensor, terms: int, mode: str, armed: Any = None) -> None:
    """One step, "plain" (backward, then step) or "overlap" (backward inside opt.overlap();
    `armed(opt)` runs between the block and step())."""
    if mode == "plain":
        loss.backward()
        opt.step(loss_terms=terms)
        return
    with opt.overlap(loss_terms=terms):
        loss.backward()
    if armed is not None:
        armed(opt)
    opt.step()


def pushed_during_backward(opt: RemoteOptimizer) -> None:
    flight = opt._inflight
    assert flight is not None and len(flight.pushes) >= 2  # started by the hooks, during backward


@pytest.mark.parametrize("wire", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])  # bf16: make test-slow
def test_pushes_started_from_gradient_hooks_equal_plain_steps_bit_for_bit(address: str, jobs: list[str], wire: str) -> None:
    finals = []
    for mode in ("plain", "overlap"):
        jobs.append(job_id := f"ovl-{wire}-{mode}-{uuid.uuid4().hex[:6]}")
        model = Net()
        opt = remote(address, job_id, list(model.named_parameters()), num_shards=3, wire_dtype=wire)
        try:
            for s in range(3):
                x, y = batch(s)
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y, reduction="sum")
                backward_and_step(opt, loss, 16, mode, armed=pushed_during_backward)
                assert opt.version == s + 1 and opt.last_report.outcome == 2
            finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
        finally:
            opt.close()
    assert finals[0].keys() == finals[1].keys()
    for n in finals[0]:
        assert torch.equal(finals[0][n], finals[1][n]), n
    assert torch.equal(finals[1]["unused"], torch.ones(4) * finals[1]["unused"][0])  # zeros pushed: decay only, uniformly


def test_overlap_refuses_what_it_cannot_do(address: str, job_id: str) -> None:
    model = Net()
    opt = remote(address, job_id, list(model.named_parameters()))
    try:
        with pytest.raises(ValueError, match="loss_terms"):
            with opt.overlap():
                pass
        x, y = batch(0)
        with opt.overlap(loss_terms=16):
            torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()
        with pytest.raises(RuntimeError, match="already armed"):
            with opt.overlap(loss_terms=16):
                pass
        with pytest.raises(RuntimeError, match="step\\(\\) alone"):
            opt.step(loss_terms=16)
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))
        with pytest.raises(RuntimeError, match="step\\(\\) alone"):  # GradScaler hands a scale over: refused
            scaler.step(opt)
        del opt.grad_scale, opt.found_inf  # GradScaler leaves them set when step() raises
        opt.step()  # still armed: the refused call consumed nothing
        assert opt.version == 1 and opt.last_report.outcome == 2
    finally:
        opt.close()


def test_a_state_dict_older_than_the_job_rolls_it_back_to_its_snapshot_and_training_replays(address: str, job_id: str) -> None:
    named = make_params()
    opt = remote(address, job_id, named, snapshot_on_save=True)

    def steps(o: RemoteOptimizer, ps: list[tuple[str, torch.nn.Parameter]], which: range) -> None:
        for s in which:
            gs, n = grads(s)
            for (_, p), g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            o.step(loss_terms=n)

    steps(opt, named, range(2))
    sd = opt.state_dict()  # a checkpoint at version 2, with a service snapshot
    assert sd["paramserver"]["version"] == 2 and sd["paramserver"]["snapshot"]
    at2 = [p.detach().clone() for _, p in named]
    steps(opt, named, range(2, 4))  # the run goes on, then crashes
    at4 = [p.detach().clone() for _, p in named]
    opt.close()
    again = make_params(seed=11)
    resumed = remote(address, job_id, again, resume=True, snapshot_on_save=True)
    try:
        assert resumed.version == 4
        resumed.load_state_dict(sd)  # older than the job: rolled back to the checkpoint's snapshot
        assert resumed.version == 2
        for (name, p), w in zip(again, at2, strict=True):
            assert torch.equal(p.detach(), w), name
        with JobClient(address) as jc:
            job = jc.get_job(job_id)
        assert (job.version, job.generation) == (2, 1) and "rollback" in job.recovered_from
        steps(resumed, again, range(2, 4))  # the same steps again: the same parameters, bit for bit
        for (name, p), w in zip(again, at4, strict=True):
            assert torch.equal(p.detach(), w), name
    finally:
        resumed.close()


def test_a_full_state_dict_loads_into_torch_adamw_which_then_trains_like_the_service(address: str, job_id: str, one_thread: None) -> None:
    named = make_params()
    opt = remote(address, job_id, named, full_state=True)
    try:
        for s in range(3):
            gs, n = grads(s)
            for (_, p), g in zip(named, gs, strict=True):
                p.grad = g.clone()
            opt.step(loss_terms=n)
        sd = opt.state_dict()
        assert sd["paramserver"]["version"] == 3 and sd["paramserver"]["snapshot"]
        assert set(sd["state"]) == set(range(len(SHAPES)))
        assert all(set(v) == {"step", "exp_avg", "exp_avg_sq"} and float(v["step"]) == 3.0 for v in sd["state"].values())
        local = [torch.nn.Parameter(p.detach().clone()) for _, p in named]  # the model as saved at version 3
        torch_opt = torch.optim.AdamW(local, lr=1.0, fused=True)
        torch_opt.load_state_dict(sd)  # a plain torch optimizer takes the checkpoint: lr, betas and moments
        assert torch_opt.param_groups[0]["lr"] == HYPER["lr"] and torch_opt.param_groups[0]["weight_decay"] == HYPER["weight_decay"]
        for group in torch_opt.param_groups:  # torch's own implementation flags are not part of a job's groups
            group["fused"] = True
        opt.load_state_dict(sd)  # and RemoteOptimizer takes its own back (same version: nothing moves)
        assert opt.version == 3 and not opt.state
        for s in range(3, 5):
            gs, n = grads(s)
            for (_, p), q, g in zip(named, local, gs, strict=True):
                p.grad = g.clone()
                q.grad = g / n
            opt.step(loss_terms=n)
            torch_opt.step()
        for (name, p), q in zip(named, local, strict=True):
            assert torch.equal(p.detach(), q.detach()), name  # bit for bit
    finally:
        opt.close()
