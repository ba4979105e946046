"""DiLoCo through the service (paramserver_client.diloco; real Ray, real service, 3 shards, 2
workers on threads): the run equals, bit for bit, a reference DiLoCo written here from the paper's
formulas in one process (fp32): H inner AdamW steps per worker, pseudo-gradients Δ_i = θ_start -
θ_i, their token-weighted mean, Nesterov SGD (lr 0.7, momentum 0.9) as the outer step; with one
fragment and with two (Streaming DiLoCo: each fragment its own job, its rounds staggered)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from paramserver_client import JobClient
from paramserver_client.compression import ErrorFeedback, encode_pieces
from paramserver_client.diloco import OUTER_DEFAULTS, DiLoCo, create_jobs, due, fragment_ids, split

H, ROUNDS, WORKERS, DIM = 5, 3, 2, 16
SHARDS = 3


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def batch(worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Worker `worker`'s batch of inner step `step`: inputs, targets and its token count (the
    workers' batches have different sizes, so the token weighting matters)."""
    g = torch.Generator().manual_seed(1000 * worker + step)
    n = 6 + 3 * worker + step % 2
    return torch.randn(n, DIM, generator=g), torch.randn(n, 4, generator=g), n


def inner_step(model: torch.nn.Module, opt: torch.optim.Optimizer, worker: int, step: int) -> int:
    x, y, n = batch(worker, step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y, reduction="sum").div(n).backward()
    opt.step()
    return n


def flat(model: torch.nn.Module) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()


class Sent:
    """What the reference's compressed workers sent: per worker, the sum over rounds of the
    decoded pushes and of the uncompressed n·Δ (float64), and the error-feedback residuals."""

    def __init__(self, fragments: int) -> None:
        self.decoded: list[list[np.ndarray]] = [[] for _ in range(WORKERS)]
        self.meant: list[list[np.ndarray]] = [[] for _ in range(WORKERS)]
        self.feedback: list[list[ErrorFeedback]] = []


def reference(
    steps: int,
    fragments: int,
    compression: str | None = None,
    pieces: list[list[tuple[int, int]]] | None = None,
    sent: Sent | None = None,
    broadcast: str | None = None,
    pull_bf16: bool = False,
) -> list[np.ndarray]:
    """DiLoCo from the formulas: per fragment k and round, θ_k <- OuterSGD(θ_k, Σ n_i Δ_i / Σ n_i)
    with Δ_i = θ_k(start) - θ_k(worker i), n_i the tokens worker i trained on since the fragment's
    last round; every worker then starts from the new θ_k. fp32, sums in worker order. Returns each
    worker's final parameters (with fragments, a fragment synchronised before the last step has
    local steps on top). With `compression`, worker i sends n_i Δ_i + r_i encoded chunk by chunk
    (`pieces[k]`: fragment k's chunks, as the job's shards cut them), the sum is over what they
    decode to, and r_i keeps what the encoding dropped (error feedback). With `broadcast`, workers
    start each round from the service's broadcast values b_k, moved each round by
    decode(encode(θ_k - b_k)) chunk by chunk, instead of θ_k itself; with `pull_bf16`, from θ_k
    rounded to bf16 (to nearest even). Either way Δ is measured from the values a round started from."""
    models = [make_model() for _ in range(WORKERS)]
    inners = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in models]
    parts = [[p for _, p in part] for part in split(list(models[0].named_parameters()), fragments)]
    outer_params = [[torch.nn.Parameter(p.detach().clone()) for p in part] for part in parts]
    # fused: torch's fused kernel is what a shard runs (paramserver.optim.sgd), bit for bit
    outer = [torch.optim.SGD(ps, lr=0.7, momentum=0.9, nesterov=True, fused=True) for ps in outer_params]
    names = [[n for n, _ in part] for part in split(list(models[0].named_parameters()), fragments)]
    tokens = [[0] * WORKERS for _ in range(fragments)]
    feedback = [[ErrorFeedback(sum(p.numel() for p in part)) for _ in range(WORKERS)] for part in parts]
    bcast = [torch.cat([p.detach().reshape(-1) for p in ps]).numpy().copy() for ps in outer_params]
    if sent is not None:
        sent.feedback = feedback
    for t in range(1, steps + 1):
        for w in range(WORKERS):
            n = inner_step(models[w], inners[w], w, t)
            for k in range(fragments):
                tokens[k][w] += n
        for k in range(fragments):
            if not due(t, k, fragments, H):
                continue
            start = bcast[k] if broadcast or pull_bf16 else torch.cat([p.detach().reshape(-1) for p in outer_params[k]]).numpy()
            pushed = []
            for w in range(WORKERS):
                local = dict(models[w].named_parameters())
                theta = torch.cat([local[n].detach().reshape(-1) for n in names[k]]).numpy()
                delta = np.subtract(start, theta, dtype=np.float32)
                meant = np.multiply(delta, np.float32(tokens[k][w]), dtype=np.float32)
                if compression is not None:
                    assert pieces is not None
                    _, decoded = feedback[k][w].compress_pieces(
                        meant, compression, pieces[k], ratio=0.25 if compression == "topk" else None
                    )
                    if sent is not None:
                        sent.decoded[w].append(decoded.astype(np.float64))
                        sent.meant[w].append(meant.astype(np.float64))
                    meant = decoded
                pushed.append(torch.from_numpy(meant))
            grad = torch.add(pushed[0], pushed[1]).div_(sum(tokens[k]))  # the service's reduction, worker order
            at = 0
            for p in outer_params[k]:
                p.grad = grad[at : at + p.numel()].view(p.shape).clone()
                at += p.numel()
            outer[k].step()
            new = torch.cat([p.detach().reshape(-1) for p in outer_params[k]]).numpy()
            if broadcast:
                assert pieces is not None
                _, update = encode_pieces(np.subtract(new, bcast[k], dtype=np.float32), pieces[k], broadcast)
                bcast[k] = np.add(bcast[k], update, dtype=np.float32)
                new = bcast[k]
            elif pull_bf16:
                bcast[k] = new = torch.from_numpy(new.copy()).to(torch.bfloat16).to(torch.float32).numpy()
            for w in range(WORKERS):
                local = dict(models[w].named_parameters())
                at = 0
                with torch.no_grad():
                    for n in names[k]:
                        numel = local[n].numel()
                        local[n].copy_(torch.from_numpy(new[at : at + numel].copy()).view(local[n].shape))
                        at += numel
            tokens[k] = [0] * WORKERS
    return [flat(m) for m in models]


def on_threads(worker: Callable[[int], None]) -> None:
    """Run worker(w) for every worker on a thread of its own; re-raise what any of them raised."""
    errors: list[BaseException] = []

    def guarded(w: int) -> None:
        try:
            worker(w)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(w,)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def run_service(
    address: str, job: str, steps: int, fragments: int, compression: str | None = None, pull_dtype: str = "fp32"
) -> list[dict[str, Any]]:
    """Both workers on threads, each with its own model and inner AdamW."""
    results: list[dict[str, Any]] = [{} for _ in range(WORKERS)]
    models = [make_model() for _ in range(WORKERS)]  # here: make_model seeds torch's global generator

    def worker(w: int) -> None:
        model = models[w]
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        options: dict[str, Any] = {"compression": compression, "topk_ratio": 0.25, "pull_dtype": pull_dtype}
        with DiLoCo(model.named_parameters(), inner, address, job, f"w{w}", inner_steps=H, fragments=fragments, **options) as d:
            synced = []
            for t in range(1, steps + 1):
                synced.append(d.step(inner_step(model, inner, w, t)))
            results[w] = {"params": flat(model), "synced": synced, "rounds": d.rounds, "bytes": d.bytes_pushed,
                          "versions": [f.version for f in d.fragments], "state": d.state_dict(),
                          "pieces": [f.worker.pieces(d.dtype) for f in d.fragments] if compression else None,
                          "pulled": d.bytes_pulled}  # fmt: skip

    on_threads(worker)
    return results


@pytest.mark.parametrize("fragments", [pytest.param(1, marks=pytest.mark.slow), 2])  # F=1 in make test-slow; F=2 here
def test_diloco_through_the_service_equals_the_reference_bit_for_bit(address: str, fragments: int) -> None:
    job = f"diloco-{uuid.uuid4().hex[:6]}"
    steps = H * ROUNDS
    model = make_model()
    ids = create_jobs(address, job, model.named_parameters(), fragments=fragments, num_workers=WORKERS, num_shards=SHARDS)
    assert ids == fragment_ids(job, fragments)
    try:
        with JobClient(address) as jc:
            for jid in ids:
                spec = jc.get_job(jid).spec
                assert (spec.optimizer.name, spec.num_shards) == (OUTER_DEFAULTS["optimizer"], SHARDS)
        got = run_service(address, job, steps, fragments)
    finally:
        with JobClient(address) as jc:
            for jid in ids:
                jc.delete_job(jid)
    want = reference(steps, fragments)
    for w in range(WORKERS):
        assert np.array_equal(got[w]["params"], want[w]), (w, float(np.abs(got[w]["params"] - want[w]).max()))
        assert got[w]["rounds"] == ROUNDS * fragments and got[w]["versions"] == [ROUNDS] * fragments
        # each fragment synchronised on its own schedule: fragment k after steps t with t % H == (k+1)H/F % H
        expected = [[k for k in range(fragments) if due(t, k, fragments, H)] for t in range(1, steps + 1)]
        assert got[w]["synced"] == expected
        # a round sends each fragment once: F fragments of 1/F of the model every H steps (fp32
        # data, plus each chunk message's framing)
        n = sum(p.numel() for p in model.parameters())
        assert ROUNDS * n * 4 < got[w]["bytes"] < ROUNDS * (n * 4 + 32 * SHARDS * fragments)
    if fragments == 1:  # the last round synchronised the whole model
        assert np.array_equal(got[0]["params"], got[1]["params"])
    assert not np.array_equal(want[0], flat(make_model()))  # it trained


@pytest.mark.parametrize(
    "compression", ["int8", pytest.param("int4", marks=pytest.mark.slow), pytest.param("topk", marks=pytest.mark.slow)]
)
def test_compressed_diloco_equals_the_reference_and_keeps_the_error_feedback_identity(address: str, compression: str) -> None:
    """Compressed pseudo-gradients (3 shards x 2 workers, 2 fragments): the service equals, bit for
    bit, the reference whose workers send encode(n·Δ + r) chunk by chunk and keep r; each worker's
    residual in DiLoCo.state_dict() is the reference's, bit for bit; and over the rounds, the sum of
    what a worker sent plus its final residual equals the sum of its uncompressed n·Δ (up to the
    float32 rounding of adding the residual each round). The jobs record H, the inner optimizer and
    the compression as labels."""
    fragments = 2
    job = f"diloco-{compression}-{uuid.uuid4().hex[:6]}"
    steps = H * ROUNDS
    model = make_model()
    ids = create_jobs(address, job, model.named_parameters(), fragments=fragments, num_workers=WORKERS, num_shards=SHARDS,
                      inner_steps=H, inner_optimizer="AdamW(lr=0.01)", compression=compression)  # fmt: skip
    try:
        with JobClient(address) as jc:
            for k, jid in enumerate(ids):
                labels = dict(jc.get_job(jid).spec.labels)
                assert labels == {"diloco.inner_steps": str(H), "diloco.inner_optimizer": "AdamW(lr=0.01)", "diloco.fragment": str(k),
                                  "diloco.fragments": str(fragments), "diloco.compression": compression}  # fmt: skip
        got = run_service(address, job, steps, fragments, compression)
    finally:
        with JobClient(address) as jc:
            for jid in ids:
                jc.delete_job(jid)
    sent = Sent(fragments)
    want = reference(steps, fragments, compression, got[0]["pieces"], sent)
    n = sum(p.numel() for p in model.parameters())
    for w in range(WORKERS):
        assert got[w]["pieces"] == got[0]["pieces"]
        assert np.array_equal(got[w]["params"], want[w]), (w, float(np.abs(got[w]["params"] - want[w]).max()))
        for k, f in enumerate(got[w]["state"]["fragments"]):
            assert np.array_equal(f["residual"].numpy(), sent.feedback[k][w].residual)
        # fewer bytes than fp32: int8 ~ 1/4, int4 ~ 1/8, top-k at 1/4 of the elements ~ 1/2
        assert got[w]["bytes"] < ROUNDS * n * 4 * {"int8": 0.4, "int4": 0.3, "topk": 0.6}[compression]
        # the identity: per fragment, Σ decoded + r_final == Σ n·Δ up to float32 rounding of c = n·Δ + r
        for k in range(fragments):
            rounds = [i for i in range(len(sent.decoded[w])) if i % fragments == k]
            total_sent = np.sum([sent.decoded[w][i] for i in rounds], axis=0)
            total_meant = np.sum([sent.meant[w][i] for i in rounds], axis=0)
            residual = sent.feedback[k][w].residual.astype(np.float64)
            assert np.abs(residual).max() > 0  # something was compressed away, and is kept
            scale = max(float(np.abs(total_meant).max()), 1e-30)
            np.testing.assert_allclose(total_sent + residual, total_meant, rtol=0, atol=len(rounds) * scale * 2**-23)
    # compression changed the run (the test would not notice a service that ignored it otherwise)
    assert not np.array_equal(want[0], reference(steps, fragments)[0])


@pytest.mark.slow  # ~40-50 s: in make test-slow (CI runs it)
def test_a_round_closes_with_a_quorum_and_the_late_pseudo_gradient_is_folded_into_the_next(address: str) -> None:
    """3 workers, min_workers 2, a grace window: in round 1 worker 2 pushes only after the round
    closed (it waits for version 1), so its push is ABORTED; DiLoCo folds its n·Δ, with its
    tokens, into its round-2 push. Equals, bit for bit, the reference written from that rule: round
    1 = (n0Δ0 + n1Δ1) / (n0 + n1); round 2 = (n0Δ0' + n1Δ1' + (n2Δ2' + n2Δ2)) / (n0' + n1' + n2' + n2)."""
    workers, rounds, late_round = 3, 3, 1
    job = f"diloco-quorum-{uuid.uuid4().hex[:6]}"
    model = make_model()
    (jid,) = create_jobs(address, job, model.named_parameters(), num_workers=workers, num_shards=2, min_workers=2, grace_window_s=2.0)
    models = [make_model() for _ in range(workers)]
    barrier = threading.Barrier(workers, timeout=120)
    results: list[dict[str, Any]] = [{} for _ in range(workers)]
    errors: list[BaseException] = []

    def worker(w: int) -> None:
        try:
            inner = torch.optim.AdamW(models[w].parameters(), lr=1e-2)
            with DiLoCo(models[w].named_parameters(), inner, address, job, f"w{w}", inner_steps=H) as d, JobClient(address) as jc:
                for t in range(1, H * rounds + 1):
                    n = inner_step(models[w], inner, w, t)
                    if w == 2 and t == H * late_round:
                        while jc.get_job(jid).version < late_round:  # the round closes without it
                            threading.Event().wait(0.05)
                    if d.step(n):
                        barrier.wait()  # every worker starts the next round together
                results[w] = {"params": flat(models[w]), "folded": d.folded, "rounds": d.rounds, "id": d.fragments[0].worker.worker_id}
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert not errors, errors
        with JobClient(address) as jc:
            assert jc.get_job(jid).version == rounds
    finally:
        with JobClient(address) as jc:
            jc.delete_job(jid)
    assert [r["folded"] for r in results] == [0, 0, 1] and all(r["rounds"] == rounds for r in results)

    # the reference
    ref = [make_model() for _ in range(workers)]
    inners = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in ref]
    outer_params = [torch.nn.Parameter(p.detach().clone()) for p in ref[0].parameters()]
    outer = torch.optim.SGD(outer_params, lr=0.7, momentum=0.9, nesterov=True, fused=True)
    carry: list[tuple[np.ndarray, int] | None] = [None] * workers
    t = 0
    for r in range(1, rounds + 1):
        tokens = [0] * workers
        for _ in range(H):
            t += 1
            for w in range(workers):
                tokens[w] += inner_step(ref[w], inners[w], w, t)
        start = torch.cat([p.detach().reshape(-1) for p in outer_params]).numpy()
        sent = []
        for w in range(workers):
            meant = np.multiply(np.subtract(start, flat(ref[w]), dtype=np.float32), np.float32(tokens[w]), dtype=np.float32)
            n = tokens[w]
            if carry[w] is not None:
                c, cn = carry[w]  # type: ignore[misc]
                meant, n = np.add(meant, c, dtype=np.float32), n + cn
            sent.append((meant, n))
        # the service sums in worker-id order (ids follow the joins, not the threads)
        counted = sorted((w for w in range(workers) if not (r == late_round and w == 2)), key=lambda w: results[w]["id"])
        total = torch.from_numpy(sent[counted[0]][0]).clone()
        for w in counted[1:]:
            total = torch.add(total, torch.from_numpy(sent[w][0]))
        grad = total.div_(sum(sent[w][1] for w in counted))
        at = 0
        for p in outer_params:
            p.grad = grad[at : at + p.numel()].view(p.shape).clone()
            at += p.numel()
        outer.step()
        carry = [None if w in counted else sent[w] for w in range(workers)]
        for m in ref:
            with torch.no_grad():
                for p, q in zip(m.parameters(), outer_params, strict=True):
                    p.copy_(q)
    for w in range(workers):
        assert np.array_equal(results[w]["params"], flat(ref[w])), (w, float(np.abs(results[w]["params"] - flat(ref[w])).max()))


def run_rounds(
    address: str, job: str, models: list[torch.nn.Module], steps: range, states: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Both workers (threads) take inner steps `steps` through DiLoCo; with `states`, each first
    loads its DiLoCo state_dict (a resumed run). Returns each worker's params and state."""
    results: list[dict[str, Any]] = [{} for _ in range(WORKERS)]

    def worker(w: int) -> None:
        inner = torch.optim.AdamW(models[w].parameters(), lr=1e-2)
        with DiLoCo(models[w].named_parameters(), inner, address, job, f"w{w}", inner_steps=H) as d:
            if states is not None:
                d.load_state_dict(states[w])
            reports = []
            for t in steps:
                if d.step(inner_step(models[w], inner, w, t)):
                    reports.append(d.fragments[0].worker.pull(d.fragments[0].version)[2])
            results[w] = {"params": flat(models[w]), "state": d.state_dict(), "reports": reports}

    on_threads(worker)
    return results


@pytest.mark.slow  # ~40-50 s: in make test-slow (CI runs it)
def test_diloco_with_clipping_resumes_from_a_snapshot_on_another_shard_count_bit_for_bit(address: str) -> None:
    """The outer step is a job's ordinary step: with global clipping on (it clips the mean
    pseudo-gradient), two rounds on 3 shards, a snapshot, the job restored on 2 shards and a third
    round from the workers' DiLoCo state_dicts equal three uninterrupted rounds, bit for bit."""
    settings: dict[str, Any] = {"num_workers": WORKERS, "max_grad_norm": 0.05}
    straight, resumed = f"diloco-a-{uuid.uuid4().hex[:6]}", f"diloco-b-{uuid.uuid4().hex[:6]}"
    model = make_model()
    create_jobs(address, straight, model.named_parameters(), num_shards=SHARDS, **settings)
    create_jobs(address, resumed, model.named_parameters(), num_shards=SHARDS, **settings)
    try:
        want = run_rounds(address, straight, [make_model() for _ in range(WORKERS)], range(1, 3 * H + 1), None)
        assert all(r.clip_coef < 1 for r in want[0]["reports"]), [r.clip_coef for r in want[0]["reports"]]  # clipping was on
        models = [make_model() for _ in range(WORKERS)]
        first = run_rounds(address, resumed, models, range(1, 2 * H + 1), None)
        with JobClient(address) as jc:
            jc.create_snapshot(resumed)
            jc.delete_job(resumed)
            restored = jc.restore_job(f"{resumed}:latest", job_id=resumed, num_shards=2)
            assert (restored.version, len(restored.shards)) == (2, 2)
        got = run_rounds(address, resumed, models, range(2 * H + 1, 3 * H + 1), [r["state"] for r in first])
    finally:
        with JobClient(address) as jc:
            for jid in (straight, resumed):
                jc.delete_job(jid)
    for w in range(WORKERS):
        assert np.array_equal(got[w]["params"], want[w]["params"]), (w, float(np.abs(got[w]["params"] - want[w]["params"]).max()))


def test_diloco_with_int8_both_ways_equals_the_reference_bit_for_bit(address: str) -> None:
    """int8 pushes with error feedback and the service's int8 broadcast of each round's result
    (2 fragments, 3 shards x 2 workers): equal, bit for bit, to the reference whose workers start
    every round from the broadcast values; about a quarter of the bytes each way."""
    fragments = 2
    job = f"diloco-int8-both-{uuid.uuid4().hex[:6]}"
    steps = H * ROUNDS
    model = make_model()
    ids = create_jobs(address, job, model.named_parameters(), fragments=fragments, num_workers=WORKERS, num_shards=SHARDS)
    try:
        got = run_service(address, job, steps, fragments, "int8", pull_dtype="int8")
    finally:
        with JobClient(address) as jc:
            for jid in ids:
                jc.delete_job(jid)
    want = reference(steps, fragments, "int8", got[0]["pieces"], broadcast="int8")
    n = sum(p.numel() for p in model.parameters())
    for w in range(WORKERS):
        assert np.array_equal(got[w]["params"], want[w]), (w, float(np.abs(got[w]["params"] - want[w]).max()))
        # the first pull is whole (fp32), every round's an int8 update
        assert got[w]["pulled"] < n * 4 * 1.2 + ROUNDS * n * 4 * 0.4
    assert not np.array_equal(want[0], reference(steps, fragments, "int8", got[0]["pieces"]))  # the broadcast mattered


def test_diloco_with_bf16_pulls_equals_the_reference_bit_for_bit(address: str) -> None:
    """pull_dtype="bf16": every round starts from the outer parameters rounded to bf16 (the service
    keeps them in fp32): equal, bit for bit, to the reference doing so; half the bytes pulled."""
    job = f"diloco-bf16-{uuid.uuid4().hex[:6]}"
    steps = H * ROUNDS
    model = make_model()
    ids = create_jobs(address, job, model.named_parameters(), num_workers=WORKERS, num_shards=SHARDS)
    try:
        got = run_service(address, job, steps, 1, pull_dtype="bf16")
    finally:
        with JobClient(address) as jc:
            for jid in ids:
                jc.delete_job(jid)
    want = reference(steps, 1, pull_bf16=True)
    n = sum(p.numel() for p in model.parameters())
    for w in range(WORKERS):
        assert np.array_equal(got[w]["params"], want[w]), (w, float(np.abs(got[w]["params"] - want[w]).max()))
        assert got[w]["pulled"] < n * 4 * 1.1 + ROUNDS * n * 2 * 1.1  # the first pull fp32, the rounds' bf16
    assert not np.array_equal(want[0], reference(steps, 1)[0])  # the rounding mattered
