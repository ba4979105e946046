"""Learning-rate schedules: f(s) multiplies the base lr for the update with index s.

s counts APPLIED updates from 0 (a skipped step does not advance it). The
warmup follows torch's LambdaLR convention (optimizers.md section 14): the
first update uses f(0), which is 0 under linear warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from paramserver.errors import ConfigError, Reason
from paramserver.optim.base import parse_hyper, require


@dataclass(frozen=True, kw_only=True)
class ScheduleParams:
    """Parameters shared by the schedules."""

    warmup_steps: int = 0
    """Linear warmup length W: f(s) = s / W for s < W."""
    total_steps: int = 0
    """Length S of a decaying schedule (required by warmup_cosine and warmup_linear)."""
    min_lr_ratio: float = 0.0
    """Floor r of a decaying schedule, as a fraction of the base lr."""
    stable_steps: int = 0
    """WSD: steps held at 1 after the warmup."""
    decay_steps: int = 0
    """WSD: length D of the decay after the stable phase (required by wsd)."""
    decay_shape: str = "linear"
    """WSD: "linear" (1-q), "cosine" (0.5(1+cos(pi q))) or "sqrt" (1-sqrt(q))."""
    timescale: float = 0.0
    """inverse_sqrt: tau; 0 = warmup_steps (10000 when there is no warmup)."""


@dataclass(frozen=True)
class Schedule:
    """A named schedule with its parameters; call it with the update index."""

    name: str
    params: ScheduleParams
    fn: Callable[[int], float]

    def __call__(self, s: int) -> float:
        """The lr multiplier for update index s (s >= 0)."""
        return self.fn(s)


def _warmup(p: ScheduleParams, s: int) -> float | None:
    if s < p.warmup_steps:
        return s / p.warmup_steps
    return None


def _constant(p: ScheduleParams) -> Callable[[int], float]:
    return lambda s: 1.0


def _linear_warmup(p: ScheduleParams) -> Callable[[int], float]:
    def f(s: int) -> float:
        w = _warmup(p, s)
        return 1.0 if w is None else w

    return f


def _warmup_cosine(p: ScheduleParams) -> Callable[[int], float]:
    def f(s: int) -> float:
        w = _warmup(p, s)
        if w is not None:
            return w
        q = min(1.0, max(0.0, (s - p.warmup_steps) / max(1, p.total_steps - p.warmup_steps)))
        return max(0.0, p.min_lr_ratio + (1.0 - p.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * q)))

    return f


def _warmup_linear(p: ScheduleParams) -> Callable[[int], float]:
    def f(s: int) -> float:
        w = _warmup(p, s)
        if w is not None:
            return w
        q = min(1.0, max(0.0, (s - p.warmup_steps) / max(1, p.total_steps - p.warmup_steps)))
        return p.min_lr_ratio + (1.0 - p.min_lr_ratio) * (1.0 - q)

    return f


_WSD_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda q: 1.0 - q,
    "cosine": lambda q: 0.5 * (1.0 + math.cos(math.pi * q)),
    "sqrt": lambda q: 1.0 - math.sqrt(q),
}


def _wsd(p: ScheduleParams) -> Callable[[int], float]:
    shape = _WSD_SHAPES[p.decay_shape]

    def f(s: int) -> float:
        w = _warmup(p, s)
        if w is not None:
            return w
        if s < p.warmup_steps + p.stable_steps:
            return 1.0
        q = min(1.0, (s - p.warmup_steps - p.stable_steps) / p.decay_steps)
        return p.min_lr_ratio + (1.0 - p.min_lr_ratio) * shape(q)

    return f


def _inverse_sqrt(p: ScheduleParams) -> Callable[[int], float]:
    tau = p.timescale or (p.warmup_steps if p.warmup_steps > 0 else 10000)

    def f(s: int) -> float:
        w = _warmup(p, s)
        if w is not None:
            return w
        return 1.0 / math.sqrt((s + tau - p.warmup_steps) / tau)

    return f


_SCHEDULES: dict[str, Callable[[ScheduleParams], Callable[[int], float]]] = {
    "constant": _constant,
    "linear_warmup": _linear_warmup,
    "warmup_cosine": _warmup_cosine,
    "warmup_linear": _warmup_linear,
    "linear_decay": _warmup_linear,
    "wsd": _wsd,
    "inverse_sqrt": _inverse_sqrt,
}
_DECAYING = {"warmup_cosine", "warmup_linear", "linear_decay"}


def schedule_names() -> list[str]:
    """The available schedule names."""
    return sorted(_SCHEDULES)


def build_schedule(name: str, raw: Mapping[str, object], field: str = "schedule") -> Schedule:
    """Build a schedule by name ("" = constant), validating its parameters."""
    name = name or "constant"
    make = _SCHEDULES.get(name)
    if make is None:
        raise ConfigError(f"{field}.name", f"unknown schedule {name!r}; available: {', '.join(schedule_names())}", Reason.UNKNOWN_NAME)
    p = parse_hyper(ScheduleParams, raw, f"{field}.parameters")
    require(p.warmup_steps >= 0, f"{field}.parameters.warmup_steps", "must be >= 0")
    require(0.0 <= p.min_lr_ratio <= 1.0, f"{field}.parameters.min_lr_ratio", "must be in [0, 1]")
    if name == "wsd":
        require(p.decay_steps > 0, f"{field}.parameters.decay_steps", "required (> 0) for wsd")
        require(p.stable_steps >= 0, f"{field}.parameters.stable_steps", "must be >= 0")
        require(p.decay_shape in _WSD_SHAPES, f"{field}.parameters.decay_shape", f"one of {', '.join(_WSD_SHAPES)}")
    require(p.timescale >= 0, f"{field}.parameters.timescale", "must be >= 0")
    if name in _DECAYING:
        require(p.total_steps > 0, f"{field}.parameters.total_steps", f"required (> 0) for {name}")
        require(p.total_steps >= p.warmup_steps, f"{field}.parameters.total_steps", "must be >= warmup_steps")
    return Schedule(name, p, make(p))
