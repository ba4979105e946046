"""The full Tiger rule against an fp64 port of its author's TensorFlow code (bojone/tiger)."""

from __future__ import annotations

import numpy as np
import torch

from paramserver.jobconfig import GroupRule, JobConfig
from paramserver.optim import build
from paramserver.optim.base import views
from paramserver.optim.tiger import Role, TigerFullHyper, role_of
from tests.helpers import pieces, step
from tests.references import tf_tiger_step

NAMES = ["tok_embeddings.weight", "blocks.0.attn.w", "blocks.0.ln_1.weight", "blocks.0.ln_1.bias", "blocks.0.mlp.bias", "head.weight"]
SHAPES: list[tuple[int, ...]] = [(13, 6), (6, 6), (6,), (6,), (9,), (6, 4)]


# the same parameters under TF names, which the author's regexes read
TF_NAMES = ["embeddings/word", "attn/kernel", "ln_1/gamma", "ln_1/beta", "mlp/bias", "head/kernel"]


def test_roles_of_pytorch_and_tf_names() -> None:
    h = TigerFullHyper()
    assert [role_of(n, h) for n in NAMES] == [Role.EMBEDDING, Role.TENSOR, Role.GAIN, Role.BIAS, Role.BIAS, Role.TENSOR]
    assert [role_of(n, h) for n in TF_NAMES] == [Role.EMBEDDING, Role.TENSOR, Role.GAIN, Role.BIAS, Role.BIAS, Role.TENSOR]
    assert role_of("model.layers.3.input_layernorm.weight", h) is Role.GAIN


def test_matches_the_authors_rule_with_nan_steps() -> None:
    total = sum(int(np.prod(s)) for s in SHAPES)
    p0 = torch.randn(total, generator=torch.Generator().manual_seed(0)) + 1.0
    opt = build("tiger_full", {"lr": 1e-2, "weight_decay": 0.05})
    ps = pieces(SHAPES, names=NAMES)
    opt.bind([p.param for p in ps], "spec.optimizer.hyperparameters")
    flat, state = p0.clone(), opt.init_state(p0)
    segs = step(0, ps).segments
    ref_p = [v.double().numpy().reshape(s).copy() for v, s in zip(views(p0, segs), SHAPES, strict=True)]
    ref_m = [np.zeros_like(v) for v in ref_p]
    gen = torch.Generator().manual_seed(1)
    nan_seen = 0
    for s in range(100):
        lr = 1e-2 * (0.5 + 0.5 * (s % 3))
        g = torch.randn(total, generator=gen)
        if s % 10 == 3:  # a NaN in one tensor: that tensor shrinks, the others train on
            k = (s // 10) % len(SHAPES)
            g[segs[k][0] + 1] = float("nan")
            nan_seen += 1
        opt.update(views(flat, segs), views(g.clone(), segs), state, step(lr, ps))
        for i, name in enumerate(TF_NAMES):
            tf_tiger_step(ref_p[i], ref_m[i], views(g, segs)[i].double().numpy().reshape(SHAPES[i]), name, lr, 0.965, 0.05, 0.99)
    assert nan_seen == 10
    expected = np.concatenate([x.reshape(-1) for x in ref_p])
    assert np.isfinite(flat.numpy()).all() and np.isfinite(state["exp_avg"].numpy()).all()
    assert np.abs(flat.double().numpy() - expected).max() / np.abs(expected).max() <= 1e-6


def test_a_job_of_tiger_full_lets_nan_reach_the_rule() -> None:
    cfg = JobConfig(parameters=(("w", (4, 4), ""),), optimizer="tiger_full")
    assert cfg.nan_handled_by_optimizers()
    mixed = JobConfig(parameters=(("w", (4, 4), ""), ("b", (4,), "")), optimizer="tiger_full",
                      groups=(GroupRule(name="x", ndims=(1,), optimizer="adamw"),))  # fmt: skip
    assert not mixed.nan_handled_by_optimizers()
