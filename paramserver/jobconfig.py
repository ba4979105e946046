"""A job's validated configuration (plain data, no gRPC, no Ray)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from paramserver.errors import ConfigError
from paramserver.optim import Optimizer, Schedule, build, build_schedule
from paramserver.placement import ParamLayout, Span, layout, plan

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything needed to build a job's shards; equal configs describe the same job."""

    parameters: tuple[tuple[str, tuple[int, ...], str], ...]
    """(name, shape, group) in flat-space order."""
    optimizer: str
    """Registered optimizer name."""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """Raw optimizer hyperparameters (validated by :meth:`validate`)."""
    schedule: str = "constant"
    """Schedule name."""
    schedule_parameters: Mapping[str, Any] = field(default_factory=dict)
    """Raw schedule parameters."""
    num_workers: int = 1
    """Gradients per synchronous step."""
    num_shards: int = 1
    """Shard actors."""
    max_grad_norm: float = 0.0
    """Global L2 clipping threshold; 0 = off."""
    shard_num_cpus: float = 0.0
    """Ray CPUs reserved per shard actor."""
    shard_num_gpus: float = 0.0
    """Ray GPUs per shard actor."""
    param_dtypes: tuple[int, ...] = ()
    """The wire DType value each parameter has in the model (informational)."""
    snapshot_every_steps: int = 0
    """Snapshot every this many steps (0 = only on demand)."""
    snapshot_keep_last: int = 0
    """Newest snapshots kept (0 = all)."""
    snapshot_every_seconds: float = 0.0
    """Also snapshot when this many seconds passed since the last one (0 = off)."""
    spike_window: int = 0
    """Spike guard: rolling window of pre-clip gradient norms (0 = off)."""
    spike_warmup: int = 64
    """Spike guard: norms seen before it decides anything."""
    spike_threshold_std: float = 6.0
    """Spike guard: a norm above mean + this many std of the window is skipped."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (for snapshot manifests)."""
        d = dataclasses.asdict(self)
        d["parameters"] = [[n, list(s), g] for n, s, g in self.parameters]
        d["hyperparameters"] = dict(self.hyperparameters)
        d["schedule_parameters"] = dict(self.schedule_parameters)
        d["param_dtypes"] = list(self.param_dtypes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobConfig:
        """The inverse of to_dict (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["parameters"] = tuple((str(n), tuple(int(x) for x in s), str(g)) for n, s, g in d["parameters"])
        kw["param_dtypes"] = tuple(int(x) for x in d.get("param_dtypes", ()))
        return cls(**kw)

    def key(self) -> str:
        """A canonical string of the whole configuration (hashable, for idempotency checks)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def build_optimizer(self) -> Optimizer:
        """The optimizer (raises ConfigError naming the bad field)."""
        return build(self.optimizer, self.hyperparameters, "spec.optimizer")

    def build_schedule(self) -> Schedule:
        """The lr schedule (raises ConfigError naming the bad field)."""
        return build_schedule(self.schedule, self.schedule_parameters, "spec.schedule")

    def layout(self) -> list[ParamLayout]:
        """Where each parameter lies in the flat space."""
        return layout([(n, s) for n, s, _ in self.parameters])

    @property
    def total_elements(self) -> int:
        """Size of the flat space."""
        return sum(p.numel for p in self.layout())

    def plan(self) -> list[list[Span]]:
        """The placement plan: the spans each shard owns."""
        opt = self.build_optimizer()
        lay = self.layout()
        return plan(lay, self.num_shards, None if opt.elementwise else [True] * len(lay))

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        if self.num_workers < 1:
            raise ConfigError("spec.num_workers", "must be >= 1")
        if self.num_shards < 1:
            raise ConfigError("spec.num_shards", "must be >= 1")
        if not (self.max_grad_norm >= 0.0):
            raise ConfigError("spec.max_grad_norm", "must be >= 0 (0 disables clipping)")
        if self.shard_num_cpus < 0:
            raise ConfigError("spec.shard_num_cpus", "must be >= 0")
        if self.shard_num_gpus < 0:
            raise ConfigError("spec.shard_num_gpus", "must be >= 0")
        if self.spike_window < 0 or (self.spike_window and self.spike_window < 2):
            raise ConfigError("spec.spike_guard.window", "must be 0 (off) or >= 2")
        if self.spike_window and not self.spike_threshold_std > 0:
            raise ConfigError("spec.spike_guard.threshold_std", "must be > 0")
        self.build_optimizer()
        self.build_schedule()
        self.plan()


def check_job_id(job_id: str) -> None:
    """Raise ConfigError unless job_id matches [A-Za-z0-9._-]{1,64}."""
    if not JOB_ID_PATTERN.match(job_id):
        raise ConfigError("job_id", f"must match {JOB_ID_PATTERN.pattern}, got {job_id!r}")
