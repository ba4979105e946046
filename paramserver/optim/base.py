"""The optimizer interface, hyperparameter parsing and the registry.

An optimizer is a frozen hyperparameter dataclass plus two functions over
flat fp32 tensors (optax's shape, in place for speed):

    state = opt.init_state(template)                       # flat tensors of the template's size
    opt.update(params, grads, state, lr, segments)         # mutates params and state

It knows nothing of Ray, gRPC or storage. ``state`` is a ``dict[str, Tensor]``
of flat tensors (or scalars) so that snapshots can save it by name and
resharding is a range copy. ``params`` and ``grads`` are lists of views, one
per parameter tensor (or the part of it this shard owns); ``segments[i]`` is
the (start, length) of piece i in the flat state tensors. Element-wise rules
run torch's kernels once per piece, exactly as torch.optim does once per
parameter, which keeps results bit-identical to torch whatever the shard
count (see placement.ALIGN). Adding an optimizer is one module that
subclasses :class:`Optimizer`, decorates it with :func:`register`, and a parity
test.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import torch

from paramserver.errors import ConfigError, Reason

State = dict[str, torch.Tensor]

H = TypeVar("H")


class Optimizer(ABC):
    """An update rule over a flat fp32 tensor.

    Attributes:
        name: the registry name ("adamw").
        elementwise: True when any slice of the flat space may be updated on
            its own (the placement may split tensors); False when the rule
            needs whole tensors.
        hyper: the parsed hyperparameters (a frozen dataclass with an ``lr``).
    """

    name: ClassVar[str]
    elementwise: ClassVar[bool] = True
    Hyper: ClassVar[type[Any]]

    def __init__(self, hyper: Any) -> None:
        self.hyper = hyper

    @property
    def lr(self) -> float:
        """The base learning rate (before the schedule)."""
        return float(self.hyper.lr)

    @abstractmethod
    def init_state(self, params: torch.Tensor) -> State:
        """Return the initial state for a flat fp32 tensor of this size and device."""

    @abstractmethod
    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, lr: float, segments: Segments) -> None:
        """Apply one update in place with learning rate `lr` (already scheduled), piece by piece."""


_REGISTRY: dict[str, type[Optimizer]] = {}

OptT = TypeVar("OptT", bound=type[Optimizer])


def register(cls: OptT) -> OptT:
    """Class decorator: make an optimizer available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"optimizer {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Registered optimizer names, sorted."""
    return sorted(_REGISTRY)


def build(name: str, hyperparameters: Mapping[str, object], field: str = "optimizer") -> Optimizer:
    """Build an optimizer from its name and raw hyperparameters (validated)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"{field}.name", f"unknown optimizer {name!r}; available: {', '.join(available())}", Reason.UNKNOWN_NAME)
    hyper = parse_hyper(cls.Hyper, hyperparameters, f"{field}.hyperparameters")
    opt = cls(hyper)
    check = getattr(opt, "check", None)
    if callable(check):
        check(f"{field}.hyperparameters")
    return opt


def parse_hyper(hyper_cls: type[H], raw: Mapping[str, object], field: str) -> H:
    """Parse a mapping into a frozen hyperparameter dataclass, naming any bad field.

    Accepted field types: float (ints accepted), bool, int, str, tuple[float, ...]
    (lists accepted). Unknown names are rejected.
    """
    fields = {f.name: f for f in dataclasses.fields(hyper_cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(hyper_cls)
    values: dict[str, object] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{field}.{key}", f"unknown hyperparameter; known: {', '.join(sorted(fields))}", Reason.UNKNOWN_NAME)
        values[key] = _coerce(value, hints[key], f"{field}.{key}")
    return hyper_cls(**values)


def _coerce(value: object, hint: object, field: str) -> object:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(field, f"expected a boolean, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(field, f"expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(field, f"must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"expected a string, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or float(value) != int(value):
            raise ConfigError(field, f"expected an integer, got {value!r}")
        return int(value)
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(field, f"expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    raise TypeError(f"unsupported hyperparameter type {hint!r}")  # a bug in an optimizer module


def require(cond: bool, field: str, message: str) -> None:
    """Raise ConfigError(field, message) unless cond."""
    if not cond:
        raise ConfigError(field, message)


def fused_supported(t: torch.Tensor) -> bool:
    """Whether torch's fused optimizer kernels run on this tensor's device."""
    return t.device.type in ("cpu", "cuda")


Check = Callable[[str], None]

#: (start, length) pieces of a flat buffer.
Segments = Sequence[tuple[int, int]]


def views(t: torch.Tensor, segments: Segments) -> list[torch.Tensor]:
    """The segments of a flat tensor as views."""
    return [t[a : a + n] for a, n in segments]
