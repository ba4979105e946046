"""The optimizer interface, hyperparameter parsing and the registry.

An optimizer is a frozen hyperparameter dataclass plus a few functions over
fp32 tensors (optax's shape, in place for speed):

    state = opt.init_state(template)                   # flat tensors over the group's elements
    tstate = opt.init_tensor_state(piece, device)      # per-parameter tensors of any shape
    opt.update(params, grads, state, step)             # mutates params and state

It knows nothing of Ray, gRPC or storage. ``state`` is a ``dict[str, Tensor]``
of flat tensors (or 0-d scalars) so that snapshots save it by name and
resharding is a range copy; per-parameter state (Adafactor's factors,
GaLore's projection, per-tensor step counts) lives in ``step.tensors`` keyed
by the parameter's index. ``params`` and ``grads`` are lists of flat views,
one per :class:`Piece` (the part of one parameter this shard owns); a rule
whose :attr:`Optimizer.whole_tensors` is True gets whole parameters only and
may view them with their shapes. Element-wise rules run torch's kernels once
per piece, exactly as torch.optim does once per parameter, which keeps
results bit-identical to torch whatever the shard count (see
placement.ALIGN). Adding an optimizer is one module that subclasses
:class:`Optimizer`, decorates it with :func:`register`, and a parity test.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch

from paramserver.errors import ConfigError, Reason

State = dict[str, torch.Tensor]

H = TypeVar("H")


@dataclass(frozen=True)
class Param:
    """A parameter of the model description."""

    index: int
    """Its position in the model description (unique in a job)."""
    name: str
    """Its name."""
    shape: tuple[int, ...]
    """Its shape (empty for a scalar)."""

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Piece:
    """The part of one parameter that a shard holds (all of it when :attr:`whole`)."""

    param: Param
    """The parameter."""
    start: int
    """First element of the piece within the parameter."""
    length: int
    """Number of elements."""
    segment: int
    """Where the piece starts in its group's flat state tensors."""

    @property
    def whole(self) -> bool:
        """True when the piece is the whole parameter."""
        return self.start == 0 and self.length == self.param.numel


@dataclass
class Step:
    """What one update needs besides the tensors."""

    lr: float
    """The scheduled learning rate of this group."""
    pieces: Sequence[Piece]
    """One per params/grads view, in order."""
    tensors: dict[int, State] = field(default_factory=dict)
    """Per-parameter state by Param.index (mutable; created by init_tensor_state)."""
    count: int = 0
    """Updates applied before this one (the schedule position s)."""

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(start, length) of each piece in the group's flat state tensors."""
        return [(p.segment, p.length) for p in self.pieces]

    def tensor_state(self, piece: Piece) -> State:
        """The per-parameter state of a piece's parameter."""
        return self.tensors[piece.param.index]


class Optimizer(ABC):
    """An update rule over fp32 tensors.

    Attributes:
        name: the registry name ("adamw").
        hyper: the parsed hyperparameters (a frozen dataclass with an ``lr``).
        whole: True when the rule always needs whole tensors (see :attr:`whole_tensors`).
        freezes: True when some updates leave some parameters out (see :meth:`trains`).
        handles_nan: True when the rule itself deals with NaN gradients (Tiger's guard); a job
            whose every group handles them does not skip steps with a NaN gradient norm.
        eval_keys: the group state names that :meth:`eval_point` reads (none: x is the params).
    """

    name: ClassVar[str]
    Hyper: ClassVar[type[Any]]
    whole: ClassVar[bool] = False
    freezes: ClassVar[bool] = False
    handles_nan: ClassVar[bool] = False
    eval_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hyper: Any) -> None:
        self.hyper = hyper

    @property
    def lr(self) -> float:
        """The base learning rate (before the schedule)."""
        return float(self.hyper.lr)

    @property
    def whole_tensors(self) -> bool:
        """True when the rule needs each parameter whole on one shard (matrix rules, per-tensor
        scalars); the placement then never splits this group's parameters."""
        return self.whole

    def check(self, field: str) -> None:
        """Validate the hyperparameters' ranges (raise ConfigError naming the field)."""
        require(self.hyper.lr >= 0, f"{field}.lr", "must be >= 0")

    def check_param(self, param: Param, field: str) -> None:
        """Validate that the rule applies to this parameter (e.g. matrices only)."""
        return None

    def bind(self, params: Sequence[Param], field: str) -> None:
        """Called once with the group's parameters before any update (e.g. LISA's layer map);
        `field` names the group's hyperparameters for errors."""
        return None

    def trains(self, param: Param, count: int) -> bool:
        """Whether the update with index `count` trains this parameter (a frozen one is left out
        of the clip norm and the non-finite check, as torch leaves out parameters with no grad)."""
        return True

    def init_state(self, params: torch.Tensor) -> State:
        """The initial flat state for the group's elements (the template's size and device)."""
        return {}

    def restored(self, state: State, loaded: set[str]) -> None:
        """Called after a snapshot filled the group's flat state; `loaded` names the keys it had
        (a chance to read older snapshot layouts)."""
        return None

    def init_tensor_state(self, piece: Piece, device: torch.device) -> State:
        """The initial per-parameter state of a piece's parameter."""
        return {}

    @abstractmethod
    def update(self, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], state: State, step: Step) -> None:
        """Apply one update in place with learning rate ``step.lr`` (already scheduled), piece by
        piece. ``grads`` may be overwritten."""

    def eval_point(self, params: Sequence[torch.Tensor], state: Mapping[str, torch.Tensor], segments: Sequence[tuple[int, int]]) -> None:
        """Turn training-point values (piece views) into the evaluation point in place; the same
        point for every rule but Schedule-Free. ``state`` holds at least :attr:`eval_keys` (flat
        tensors over the pieces at ``segments``, or 0-d)."""
        return None


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
    opt.check(f"{field}.hyperparameters")
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


def check_nonnegative(hyper: Any, field: str, *names: str) -> None:
    """Each named hyperparameter >= 0."""
    for name in names:
        require(getattr(hyper, name) >= 0, f"{field}.{name}", "must be >= 0")


def require_one_of(value: str, choices: Sequence[str], field: str) -> None:
    """Raise ConfigError(field) unless value is one of choices."""
    require(value in choices, field, f"must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_betas(betas: Sequence[float], field: str, closed: bool = False) -> None:
    """Each beta in [0, 1) (or [0, 1] when closed)."""
    for i, b in enumerate(betas):
        require(0 <= b <= 1 if closed else 0 <= b < 1, f"{field}[{i}]", f"must be in [0, 1{']' if closed else ')'}")


#: Elements per block of the element-wise rules that make several passes over a tensor: a 512 KiB
#: block stays in cache from one pass to the next (the reference implementations stream whole
#: tensors through memory once per operation). A multiple of every SIMD width, so each block's
#: vector loop and scalar tail fall where they would over the whole tensor: the bits do not change.
BLOCK = 1 << 17


def blocks(n: int, size: int = BLOCK) -> list[tuple[int, int]]:
    """[start, end) blocks of `size` elements covering n elements."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def shaped(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """A whole parameter's flat view with the parameter's shape."""
    return t.view(piece.param.shape)


def as_matrix(t: torch.Tensor, piece: Piece) -> torch.Tensor:
    """A whole parameter of >= 2 dimensions viewed as (rows, everything else) (conv weights)."""
    shape = piece.param.shape
    return t.view(shape[0], -1)


def fused_supported(t: torch.Tensor) -> bool:
    """Whether torch's fused optimizer kernels run on this tensor's device."""
    return t.device.type in ("cpu", "cuda")


#: (start, length) pieces of a flat buffer.
Segments = Sequence[tuple[int, int]]


def views(t: torch.Tensor, segments: Segments) -> list[torch.Tensor]:
    """The segments of a flat tensor as views."""
    return [t[a : a + n] for a, n in segments]
