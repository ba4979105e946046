#!/usr/bin/env python
"""Optimizer benchmark: every rule's update rate on a shard next to the fastest torch
implementation of the same rule, measured in the same run (see bench/README.md).

    python bench/bench_optimizers.py            # a 10M-parameter transformer-shaped model
    python bench/bench_optimizers.py --quick    # 0.5M parameters, smoke test

"Ours" is ``ShardState.apply`` on one shard holding the whole model (the shard's real code path:
parameter groups, pieces, per-parameter state), on one thread as in a shard actor. The baseline
runs the reference optimizer's ``step()`` on the same tensors and thread count: fused
torch.optim where torch has the rule, else the pip reference package; rules with no PyTorch
implementation (LAMB, Tiger's full rule, C-AdamW) are shown against fused AdamW for context.
Ratio = our params/s / the baseline's. Medians of interleaved rounds after a warm-up.
It reports; it never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from paramserver.jobconfig import GroupRule, JobConfig
from paramserver.placement import Span
from paramserver.shard import ShardState
from paramserver.steps import Decision


def model(width: int, blocks: int) -> list[tuple[str, tuple[int, ...]]]:
    """A transformer-shaped list of parameters (embeddings, attention, MLP, norms, head)."""
    vocab = 4 * width
    out: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, width))]
    for b in range(blocks):
        p = f"blocks.{b}."
        out += [
            (p + "ln_1.weight", (width,)),
            (p + "attn.qkv.weight", (3 * width, width)),
            (p + "attn.proj.weight", (width, width)),
            (p + "ln_2.weight", (width,)),
            (p + "mlp.up.weight", (4 * width, width)),
            (p + "mlp.up.bias", (4 * width,)),
            (p + "mlp.down.weight", (width, 4 * width)),
        ]
    return [*out, ("ln_f.weight", (width,)), ("head.weight", (vocab, width))]


HIDDEN = ("*attn*", "*mlp*")


@dataclass(frozen=True)
class Case:
    """One rule: our job settings and the baseline that runs the same rule."""

    name: str
    optimizer: str
    hyper: dict[str, Any]
    groups: tuple[GroupRule, ...]
    baseline: str
    make: Callable[[list[torch.Tensor], list[str]], list[torch.optim.Optimizer]] | None
    heavy: bool = False
    """Seconds per step on a CPU: 1 warm-up and 2 timed rounds only."""

    @property
    def context_only(self) -> bool:
        """True when the baseline is another rule (no PyTorch implementation of this one)."""
        return self.baseline.startswith("(")


def _fused_adamw(ps: list[torch.Tensor], names: list[str]) -> list[torch.optim.Optimizer]:
    return [torch.optim.AdamW(ps, lr=1e-3, fused=True)]


def _hidden(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and ("attn" in name or "mlp" in name)


def _split(ps: list[torch.Tensor], names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    hidden = [p for p, n in zip(ps, names, strict=True) if _hidden(n, tuple(p.shape))]
    rest = [p for p, n in zip(ps, names, strict=True) if not _hidden(n, tuple(p.shape))]
    return hidden, rest


def _muon(ps: list[torch.Tensor], names: list[str]) -> list[torch.optim.Optimizer]:
    hidden, rest = _split(ps, names)
    return [torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-3, fused=True)]


def _galore(ps: list[torch.Tensor], names: list[str]) -> list[torch.optim.Optimizer]:
    from galore_torch import GaLoreAdamW

    hidden, rest = _split(ps, names)
    group = {"params": hidden, "rank": 64, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    return [GaLoreAdamW([group], lr=1e-3, no_deprecation_warning=True), torch.optim.AdamW(rest, lr=1e-3, fused=True)]


def _adafactor(ps: list[torch.Tensor], names: list[str]) -> list[torch.optim.Optimizer]:
    return [torch.optim.Adafactor(ps, lr=1e-2, foreach=_ADAFACTOR_FOREACH)]


_ADAFACTOR_FOREACH = True


def _lion(b1: float, b2: float, cautious: bool = False) -> Callable[[list[torch.Tensor], list[str]], list[torch.optim.Optimizer]]:
    def make(ps: list[torch.Tensor], names: list[str]) -> list[torch.optim.Optimizer]:
        if cautious:
            from lion_pytorch.cautious_lion import Lion as CautiousLion

            return [CautiousLion(ps, lr=1e-4, betas=(b1, b2), cautious_factor=0.0)]
        from lion_pytorch import Lion

        return [Lion(ps, lr=1e-4, betas=(b1, b2))]

    return make


def _schedule_free(ps: list[torch.Tensor], names: list[str]) -> list[torch.optim.Optimizer]:
    from schedulefree import AdamWScheduleFree

    opt = AdamWScheduleFree(ps, lr=1e-3)
    opt.train()
    return [opt]


MUON_BF16 = (GroupRule(name="muon", patterns=HIDDEN, ndims=(2,), optimizer="muon", hyperparameters={"lr": 0.02, "ns_dtype": "bfloat16"}),)
MUON_AUTO = (GroupRule(name="muon", patterns=HIDDEN, ndims=(2,), optimizer="muon", hyperparameters={"lr": 0.02}),)
GALORE_GROUPS = (GroupRule(name="galore", patterns=HIDDEN, ndims=(2,), optimizer="galore", hyperparameters={"rank": 64}),)

CASES = [
    Case("adamw", "adamw", {}, (), "torch AdamW fused", _fused_adamw),
    Case("adam", "adam", {}, (), "torch Adam fused", lambda ps, n: [torch.optim.Adam(ps, fused=True)]),
    Case("sgd-nesterov", "sgd", {"momentum": 0.9, "nesterov": True}, (), "torch SGD fused",
         lambda ps, n: [torch.optim.SGD(ps, lr=1e-3, momentum=0.9, nesterov=True, fused=True)]),
    Case("adafactor", "adafactor", {}, (), "torch Adafactor", _adafactor),
    Case("lion", "lion", {}, (), "lion-pytorch", _lion(0.9, 0.99)),
    Case("tiger", "tiger", {}, (), "lion-pytorch b1=b2", _lion(0.965, 0.965)),
    Case("muon+adamw (bf16 NS)", "adamw", {}, MUON_BF16, "torch Muon + AdamW fused", _muon, heavy=True),
    Case("muon+adamw (auto: fp32)", "adamw", {}, MUON_AUTO, "torch Muon (bf16) + AdamW", _muon),
    Case("galore+adamw", "adamw", {}, GALORE_GROUPS, "galore-torch + AdamW fused", _galore),
    Case("c-lion", "lion", {"cautious": True, "cautious_clamp": 1e-5}, (), "lion-pytorch cautious", _lion(0.9, 0.99, True)),
    Case("schedule-free", "adamw_schedulefree", {}, (), "schedulefree", _schedule_free),
    Case("lisa (2 of N layers)", "lisa", {"active_layers": 2}, (), "(torch AdamW fused, all)", _fused_adamw),
    Case("lamb", "lamb", {}, (), "(torch AdamW fused)", _fused_adamw),
    Case("tiger_full", "tiger_full", {}, (), "(torch AdamW fused)", _fused_adamw),
    Case("c-adamw", "adamw", {"cautious": True}, (), "(torch AdamW fused)", _fused_adamw),
]  # fmt: skip


def shard_of(case: Case, params: Sequence[tuple[str, tuple[int, ...]]], flat0: torch.Tensor) -> ShardState:
    cfg = JobConfig(parameters=tuple((n, s, "") for n, s in params), optimizer=case.optimizer, hyperparameters=case.hyper,
                    groups=case.groups)  # fmt: skip
    cfg.validate()
    st = ShardState(cfg, 0, [Span(0, flat0.numel())])
    buf = st.grads.acquire()
    buf.write(0, flat0)  # a complete upload
    st.load(buf)
    return st


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_case(case: Case, params: Sequence[tuple[str, tuple[int, ...]]], warmup: int, repeats: int) -> tuple[float, float]:
    numel = sum(int(torch.Size(s).numel()) for _, s in params)
    gen = torch.Generator().manual_seed(0)
    flat0 = torch.randn(numel, generator=gen) * 0.02
    grad = torch.randn(numel, generator=gen) * 1e-3
    st = shard_of(case, params, flat0)
    names = [n for n, _ in params]
    refs, grads, off = [], [], 0
    for _, s in params:
        n = int(torch.Size(s).numel())
        refs.append(flat0[off : off + n].view(s).clone())
        grads.append(grad[off : off + n].view(s))
        refs[-1].grad = grads[-1].clone()
        off += n
    assert case.make is not None
    opts = case.make(refs, names)
    step = [0]

    def ours() -> None:
        st.set_gradient(grad)
        st.apply(Decision(step[0], True, "", 1.0, 1.0, 1))
        step[0] += 1

    def theirs() -> None:  # the same gradient copy as ours (some rules overwrite the gradient)
        for r, g in zip(refs, grads, strict=True):
            r.grad.copy_(g)  # type: ignore[union-attr]
        for o in opts:
            o.step()

    a, b = [], []
    for i in range(warmup + repeats):
        ta, tb = (timed(ours), timed(theirs)) if i % 2 == 0 else tuple(reversed((timed(theirs), timed(ours))))
        if i >= warmup:
            a.append(ta)
            b.append(tb)
    return numel / statistics.median(a), numel / statistics.median(b)


def main(argv: Sequence[str] | None = None) -> None:
    global _ADAFACTOR_FOREACH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="0.5M parameters, fewer rounds")
    ap.add_argument("--width", type=int, default=0, help="model width (default 256; --quick 96)")
    ap.add_argument("--blocks", type=int, default=0, help="transformer blocks (default 12; --quick 4)")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds per rule (default 7; --quick 3)")
    ap.add_argument("--only", default="", help="comma-separated case names")
    args = ap.parse_args(argv)
    width = args.width or (96 if args.quick else 256)
    blocks = args.blocks or (4 if args.quick else 12)
    repeats = args.repeats or (3 if args.quick else 7)
    torch.set_num_threads(1)  # as in a shard actor
    params = model(width, blocks)
    total = sum(int(torch.Size(s).numel()) for _, s in params)
    print(f"model: {len(params)} tensors, {total / 1e6:.1f}M params (width {width}, {blocks} blocks); 1 thread; "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'rule':<22} {'ours Mparam/s':>14} {'baseline':<28} {'base Mparam/s':>14} {'ratio':>6}")
    wanted = {s.strip() for s in args.only.split(",") if s.strip()}
    for case in CASES:
        if wanted and case.name not in wanted:
            continue
        if case.name == "adafactor":  # the faster of torch's two Adafactor paths is the baseline
            _ADAFACTOR_FOREACH = True
            _, fe = run_case(case, params, 1, max(1, repeats // 2))
            _ADAFACTOR_FOREACH = False
            _, single = run_case(case, params, 1, max(1, repeats // 2))
            _ADAFACTOR_FOREACH = fe >= single
        ours, theirs = run_case(case, params, 1, 2) if case.heavy else run_case(case, params, 2, repeats)
        ratio = f"{ours / theirs:6.2f}" + (" (context)" if case.context_only else "")
        print(f"{case.name:<22} {ours / 1e6:14.1f} {case.baseline:<28} {theirs / 1e6:14.1f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
