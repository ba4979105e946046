"""A tiny character-level transformer learning addition ("123+45=168"), with generated data.

Everything is deterministic from seeds, so the local reference in run.py
sees exactly the batches the workers saw. Answers have different lengths, so
each worker's batch has a different number of loss terms (the tokens after
"="): exactly the case that needs token-count averaging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = "0123456789+=\n_"
PAD = VOCAB.index("_")
EQ = VOCAB.index("=")
IGNORE = -100


@dataclass(frozen=True)
class TaskConfig:
    """Model and data sizes."""

    digits: int = 3
    d_model: int = 48
    n_layers: int = 2
    n_heads: int = 4
    batch_sizes: tuple[int, ...] = (24, 40)
    """Per-worker batch sizes (uneven on purpose)."""
    seed: int = 1234

    @property
    def context(self) -> int:
        """Sequence length: a+b=c and a newline."""
        return 3 * self.digits + 4


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        out: torch.Tensor = x + self.out(F.gelu(self.fc(self.ln2(x))))
        return out


class TinyGPT(nn.Module):
    """Embedding, position embedding, blocks, head."""

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(len(VOCAB), cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, len(VOCAB))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = blk(x)
        out: torch.Tensor = self.head(self.ln(x))
        return out


def make_model(cfg: TaskConfig) -> TinyGPT:
    """The model with its seeded initial weights (identical in every process)."""
    torch.manual_seed(cfg.seed)
    return TinyGPT(cfg)


def batch(cfg: TaskConfig, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of `worker` at `step`; targets are IGNORE except the answer."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + worker)
    n = cfg.batch_sizes[worker]
    hi = 10**cfg.digits
    a = torch.randint(0, hi, (n,), generator=g)
    b = torch.randint(0, hi, (n,), generator=g)
    rows = []
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        s = f"{x}+{y}={x + y}\n"
        rows.append([VOCAB.index(c) for c in s] + [PAD] * (cfg.context + 1 - len(s)))
    seq = torch.tensor(rows)
    inp, tgt = seq[:, :-1].clone(), seq[:, 1:].clone()
    eq_pos = (inp == EQ).int().argmax(dim=1, keepdim=True)
    after_eq = torch.arange(inp.shape[1]).unsqueeze(0) >= eq_pos
    tgt[~after_eq | (tgt == PAD)] = IGNORE
    return inp, tgt


def summed_loss(model: nn.Module, inp: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of token cross-entropies, number of loss terms)."""
    logits = model(inp)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((tgt != IGNORE).sum())
