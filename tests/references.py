"""Independent references written from the formulas of shared/optimizers.md, for rules whose
original is not a pip package (float64 numpy ports). Shared by the unit and service tests."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np


class TfaLamb:
    """tensorflow-addons' LAMB (_resource_apply_dense), in float64."""

    def __init__(self, params: Sequence[np.ndarray], b1: float, b2: float, eps: float, wd: float, adapt: bool = True) -> None:
        self.p = [np.asarray(x, dtype=np.float64).copy() for x in params]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.b1, self.b2, self.eps, self.wd, self.adapt, self.t = b1, b2, eps, wd, adapt, 0

    def step(self, grads: Sequence[np.ndarray], lr: float) -> None:
        """One update of every tensor."""
        self.t += 1
        for i, g in enumerate(grads):
            g = np.asarray(g, dtype=np.float64)
            self.m[i] = self.m[i] * self.b1 + g * (1 - self.b1)
            self.v[i] = self.v[i] * self.b2 + g * g * (1 - self.b2)
            update = (self.m[i] / (1 - self.b1**self.t)) / (np.sqrt(self.v[i] / (1 - self.b2**self.t)) + self.eps)
            if self.wd:
                update = update + self.wd * self.p[i]
            ratio = 1.0
            if self.adapt:
                w_norm, g_norm = np.linalg.norm(self.p[i]), np.linalg.norm(update)
                ratio = w_norm / g_norm if w_norm > 0 and g_norm > 0 else 1.0
            self.p[i] = self.p[i] - ratio * lr * update


def tf_tiger_step(var: np.ndarray, m: np.ndarray, grad: np.ndarray, tf_name: str, lr: float, beta: float, d: float, s: float) -> None:
    """bojone/tiger tiger.py's _resource_apply with grad_accum_steps 1, in float64, in place; the
    role comes from the original's TF names ("gamma", "beta", "bias", "embeddings")."""
    is_nan = bool(np.isnan(grad).any())
    b1 = 1.0 if is_nan else beta
    g = np.zeros_like(grad) if is_nan else grad
    c = 0.0
    if re.findall("bias|beta|gamma", tf_name):
        lr, d = lr * 0.5, 0.0
        if "gamma" in tf_name:
            c = 1.0
    elif "embeddings" in tf_name:
        lr = lr * np.sqrt(np.mean(var**2, axis=-1, keepdims=True))
    else:
        lr = lr * np.sqrt(np.mean(var**2))
    m[...] = b1 * m + (1 - beta) * g
    u = (np.sign(m) + d * var) * lr
    var[...] = (var - c) * s + c if is_nan else var - u


class CautiousAdamW:
    """C-AdamW as optimizers.md section 8 writes it, on torch AdamW's eps placement, in float64."""

    def __init__(self, params: Sequence[np.ndarray], b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, wd: float = 0.01) -> None:
        self.p = [np.asarray(x, dtype=np.float64).copy() for x in params]
        self.m = [np.zeros_like(x) for x in self.p]
        self.v = [np.zeros_like(x) for x in self.p]
        self.b1, self.b2, self.eps, self.wd, self.t = b1, b2, eps, wd, 0

    def step(self, grads: Sequence[np.ndarray], lr: float, how: str = "mean", clamp: float = 1e-3) -> None:
        """One update of every tensor."""
        self.t += 1
        for i, g in enumerate(grads):
            g = np.asarray(g, dtype=np.float64)
            self.p[i] = self.p[i] * (1 - lr * self.wd)
            self.m[i] = self.m[i] * self.b1 + g * (1 - self.b1)
            self.v[i] = self.v[i] * self.b2 + g * g * (1 - self.b2)
            u = (self.m[i] / (1 - self.b1**self.t)) / (np.sqrt(self.v[i] / (1 - self.b2**self.t)) + self.eps)
            phi = (u * g > 0).astype(np.float64)
            s = phi * phi.size / (phi.sum() + 1) if how == "count" else phi / max(phi.mean(), clamp)
            self.p[i] = self.p[i] - lr * u * s
