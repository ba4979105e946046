"""A job's validated configuration (plain data, no gRPC, no Ray)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from paramserver.errors import ConfigError, ParamServerError, Reason
from paramserver.membership import CONTINUE, FAIL, WAIT
from paramserver.optim import Optimizer, Param, Schedule, build, build_schedule
from paramserver.placement import ParamLayout, Span, layout, plan

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True, kw_only=True)
class GroupRule:
    """A parameter group: which parameters it takes, and its optimizer settings."""

    name: str
    """Unique, non-empty name."""
    patterns: tuple[str, ...] = ()
    """Shell-style patterns (fnmatch) on parameter names; empty = any name."""
    ndims: tuple[int, ...] = ()
    """Accepted numbers of dimensions; empty = any."""
    optimizer: str = ""
    """Optimizer name; "" = the job's optimizer."""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """With the job's optimizer: overrides of the job's hyperparameters; otherwise the group's own."""

    def matches(self, name: str, ndim: int) -> bool:
        """Whether a parameter falls in this group by the rules (a group with neither patterns
        nor ndims takes only the parameters that name it)."""
        if not self.patterns and not self.ndims:
            return False
        by_name = not self.patterns or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)
        return by_name and (not self.ndims or ndim in self.ndims)


@dataclass(frozen=True)
class Setting:
    """One scalar setting of a job: a :class:`JobConfig` field, the JobSpec field it travels in
    and its default. :data:`SETTINGS` lists them all; the conversions to and from the wire and the
    restore overrides (``paramserver.convert``) walk it. The client, which cannot import this,
    derives the same keywords from the JobSpec descriptor (``paramserver_client.aio.SPEC_SETTINGS``;
    tests/unit/test_settings.py checks that both agree with the proto)."""

    name: str
    """The JobConfig field; also the client's keyword (``make_spec(spike_window=...)``)."""
    path: str
    """The JobSpec field, dotted through nested messages (``"spike_guard.window"``)."""
    default: int | float
    """JobConfig's default. Unless `required`, an unset (0) wire field means this value."""
    required: bool = False
    """The wire has no default: 0 is read as 0, which :meth:`JobConfig.validate` rejects."""
    restorable: bool = False
    """A restore (``CreateJobRequest.restore_from``) takes it from the request's spec when it is
    non-zero (0 keeps the snapshot's value)."""
    only_with: str = ""
    """Sent on the wire only when this other setting is non-zero (it means nothing without it)."""

    @property
    def spec_field(self) -> str:
        """The field's name in error messages (``"spec.spike_guard.window"``)."""
        return f"spec.{self.path}"


#: Every scalar setting of a job, in JobSpec order. The JobSpec fields not listed here are
#: converted by hand (see ``paramserver.convert.HAND_CONVERTED``).
SETTINGS: tuple[Setting, ...] = (
    Setting("num_workers", "num_workers", 1, required=True, restorable=True),
    Setting("num_shards", "num_shards", 1, required=True, restorable=True),
    Setting("max_grad_norm", "max_grad_norm", 0.0),
    Setting("shard_num_cpus", "shard_num_cpus", 0.0, restorable=True),
    Setting("shard_num_gpus", "shard_num_gpus", 0.0, restorable=True),
    Setting("snapshot_every_steps", "snapshot_every_steps", 0, restorable=True),
    Setting("snapshot_keep_last", "snapshot_keep_last", 0, restorable=True),
    Setting("snapshot_every_seconds", "snapshot_every_seconds", 0.0, restorable=True),
    Setting("spike_window", "spike_guard.window", 0),
    Setting("spike_warmup", "spike_guard.warmup", 64, only_with="spike_window"),
    Setting("spike_threshold_std", "spike_guard.threshold_std", 6.0, only_with="spike_window"),
    Setting("shard_memory_budget_bytes", "shard_memory_budget_bytes", 0, restorable=True),
    Setting("shard_device_memory_budget_bytes", "shard_device_memory_budget_bytes", 0, restorable=True),
    Setting("min_workers", "min_workers", 0, restorable=True),
    Setting("max_workers", "max_workers", 0, restorable=True),
    Setting("worker_timeout_s", "worker_timeout_s", 60.0, restorable=True),
    Setting("on_worker_lost", "on_worker_lost", 1, restorable=True),
    Setting("replica_every_steps", "replica_every_steps", 0, restorable=True),
    Setting("grace_window_s", "grace_window_s", 0.0, restorable=True),
)
#: The settings by name.
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}
#: The schedule of a job that names none.
DEFAULT_SCHEDULE = "constant"

#: The longest worker lease a job may ask for, seconds (a day).
MAX_WORKER_TIMEOUT_S = 86400.0

#: Limits of a job description (stated in job_service.proto and the README). A shape or name out
#: of range is INVALID_ARGUMENT naming the field; a job over a size limit RESOURCE_EXHAUSTED
#: (LIMIT_EXCEEDED).
MAX_PARAMETERS = 100_000
MAX_DIMS = 8
MAX_DIMENSION = 2**31 - 1
MAX_PARAM_ELEMENTS = 2**34
MAX_JOB_ELEMENTS = 2**36
MAX_NAME_BYTES = 1024
MAX_GROUPS = 64
MAX_PATTERNS = 64
#: Most workers a job may count (num_workers, min_workers, max_workers): JoinJob looks for a free
#: id among max_workers slots and each shard keeps a gradient buffer per member, so an unbounded
#: count (up to 2^32 - 1 on the wire) made a join run for minutes and a spilled shard preallocate a
#: file per slot.
MAX_WORKERS = 65_536

_T = TypeVar("_T", int, float)


def _default(name: str, kind: type[_T]) -> _T:
    d = SETTINGS_BY_NAME[name].default
    if not isinstance(d, kind):
        raise TypeError(f"SETTINGS[{name!r}].default must be a {kind.__name__}, got {d!r}")
    return d


def _spec_field(name: str) -> str:
    return SETTINGS_BY_NAME[name].spec_field


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything needed to build a job's shards; equal configs describe the same job."""

    parameters: tuple[tuple[str, tuple[int, ...], str], ...]
    """(name, shape, group) in flat-space order."""
    optimizer: str
    """Registered optimizer name."""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    """Raw optimizer hyperparameters (validated by :meth:`validate`)."""
    schedule: str = DEFAULT_SCHEDULE
    """Schedule name."""
    schedule_parameters: Mapping[str, Any] = field(default_factory=dict)
    """Raw schedule parameters."""
    num_workers: int = _default("num_workers", int)
    """Gradients per synchronous step."""
    num_shards: int = _default("num_shards", int)
    """Shard actors."""
    max_grad_norm: float = _default("max_grad_norm", float)
    """Global L2 clipping threshold; 0 = off."""
    shard_num_cpus: float = _default("shard_num_cpus", float)
    """Ray CPUs reserved per shard actor."""
    shard_num_gpus: float = _default("shard_num_gpus", float)
    """Ray GPUs per shard actor."""
    shard_memory_budget_bytes: int = _default("shard_memory_budget_bytes", int)
    """Host memory a shard may use for its state (0 = unlimited); the rest is spilled to disk."""
    shard_device_memory_budget_bytes: int = _default("shard_device_memory_budget_bytes", int)
    """GPU memory a GPU shard may use for its state (0 = unlimited); the rest lives in host memory."""
    param_dtypes: tuple[int, ...] = ()
    """The wire DType value each parameter has in the model (informational)."""
    snapshot_every_steps: int = _default("snapshot_every_steps", int)
    """Snapshot every this many steps (0 = only on demand)."""
    snapshot_keep_last: int = _default("snapshot_keep_last", int)
    """Newest snapshots kept (0 = all)."""
    snapshot_every_seconds: float = _default("snapshot_every_seconds", float)
    """Also snapshot when this many seconds passed since the last one (0 = off)."""
    spike_window: int = _default("spike_window", int)
    """Spike guard: rolling window of pre-clip gradient norms (0 = off)."""
    spike_warmup: int = _default("spike_warmup", int)
    """Spike guard: norms seen before it decides anything."""
    spike_threshold_std: float = _default("spike_threshold_std", float)
    """Spike guard: a norm above mean + this many std of the window is skipped."""
    min_workers: int = _default("min_workers", int)
    """Members a step needs at least (0 = num_workers); see :attr:`min_members`."""
    max_workers: int = _default("max_workers", int)
    """Most members at once (0 = num_workers); see :attr:`max_members`."""
    worker_timeout_s: float = _default("worker_timeout_s", float)
    """Seconds a member's lease lasts without a heartbeat, push or pull."""
    replica_every_steps: int = _default("replica_every_steps", int)
    """Copy every shard's state into memory (Ray's object store, held by the coordinator) every this many steps (0 = off)."""
    grace_window_s: float = _default("grace_window_s", float)
    """Quorum mode: seconds a step waits, once min_workers pushed, for the other members (0 = off)."""
    on_worker_lost: int = _default("on_worker_lost", int)
    """What a lost member does: WAIT (1), CONTINUE (2) or FAIL (3) (paramserver.v1.WorkerLossPolicy)."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Free-form labels recorded with the job (JobSpec.labels; see :func:`check_labels`)."""
    groups: tuple[GroupRule, ...] = ()
    """Parameter groups; a parameter goes to the group its ParameterSpec.group names, else to
    the first rule that matches it, else to the default group (index 0: the job's optimizer)."""

    @property
    def min_members(self) -> int:
        """Members a step needs at least."""
        return self.min_workers or self.num_workers

    @property
    def max_members(self) -> int:
        """Most members at once (worker ids are below it)."""
        return self.max_workers or max(self.num_workers, self.min_members)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (for snapshot manifests)."""
        d = dataclasses.asdict(self)
        d["parameters"] = [[n, list(s), g] for n, s, g in self.parameters]
        d["hyperparameters"] = dict(self.hyperparameters)
        d["schedule_parameters"] = dict(self.schedule_parameters)
        d["param_dtypes"] = list(self.param_dtypes)
        d["labels"] = dict(self.labels)
        d["groups"] = [
            {
                "name": g.name,
                "patterns": list(g.patterns),
                "ndims": list(g.ndims),
                "optimizer": g.optimizer,
                "hyperparameters": dict(g.hyperparameters),
            }
            for g in self.groups
        ]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobConfig:
        """The inverse of to_dict (unknown keys are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["parameters"] = tuple((str(n), tuple(int(x) for x in s), str(g)) for n, s, g in d["parameters"])
        kw["param_dtypes"] = tuple(int(x) for x in d.get("param_dtypes", ()))
        kw["labels"] = {str(k): str(v) for k, v in dict(d.get("labels", {})).items()}
        kw["groups"] = tuple(
            GroupRule(
                name=str(g["name"]),
                patterns=tuple(g.get("patterns", ())),
                ndims=tuple(int(x) for x in g.get("ndims", ())),
                optimizer=str(g.get("optimizer", "")),
                hyperparameters=dict(g.get("hyperparameters", {})),
            )
            for g in d.get("groups", ())
        )
        return cls(**kw)

    def key(self) -> str:
        """A canonical string of the whole configuration (hashable, for idempotency checks)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    def build_optimizers(self) -> list[Optimizer]:
        """One optimizer per group: index 0 is the default group, i the (i-1)-th rule; each is
        bound to its parameters after checking it applies to them (raises ConfigError naming the
        bad field)."""
        fields = [f for _, _, _, f in self.group_settings()]
        out = [build(rule, hyper, f) for _, rule, hyper, f in self.group_settings()]
        members: list[list[Param]] = [[] for _ in out]
        for p, k in zip(self.params(), self.assign(), strict=True):
            out[k].check_param(p, f"spec.parameters[{p.index}]")
            members[k].append(p)
        for opt, params, name in zip(out, members, fields, strict=True):
            opt.bind(params, f"{name}.hyperparameters")
        return out

    def group_settings(self) -> list[tuple[str, str, dict[str, Any], str]]:
        """(name, rule, hyperparameters, spec field) of every group: the default group ("default")
        first, then the rules in order; a group on the job's rule takes the job's hyperparameters
        with its own on top."""
        out = [("default", self.optimizer, dict(self.hyperparameters), "spec.optimizer")]
        for i, g in enumerate(self.groups):
            rule = g.optimizer or self.optimizer
            hyper = {**self.hyperparameters, **g.hyperparameters} if rule == self.optimizer else dict(g.hyperparameters)
            out.append((g.name, rule, hyper, f"spec.param_groups[{i}].optimizer"))
        return out

    def group_infos(self) -> list[tuple[str, str, float, dict[str, Any]]]:
        """(name, rule, base lr, hyperparameters as the rule reads them: defaults filled in, tuples
        as lists) of every group, the default group first; each rule is built once."""
        out = []
        for name, rule, hyper, f in self.group_settings():
            opt = build(rule, hyper, f)
            resolved = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(opt.hyper).items()}
            out.append((name, rule, opt.lr, resolved))
        return out

    def trains_like(self, other: JobConfig) -> bool:
        """Whether `other` describes the same training (model, rules, schedule, clipping): equal
        once the operational settings a restore may change (``Setting.restorable``) are ignored."""
        ours = {s.name: getattr(self, s.name) for s in SETTINGS if s.restorable}
        return dataclasses.replace(other, **ours) == self

    def params(self) -> list[Param]:
        """The model's parameters as the optimizers see them."""
        return [Param(i, name, tuple(shape)) for i, (name, shape, _) in enumerate(self.parameters)]

    def nan_handled_by_optimizers(self) -> bool:
        """True when every parameter's rule deals with NaN gradients itself (Tiger's guard), so a
        NaN gradient norm does not skip the step."""
        opts = self.build_optimizers()
        return all(opts[g].handles_nan for g in set(self.assign()))

    def assign(self) -> list[int]:
        """The group index of every parameter (0 = the default group)."""
        names = {g.name: i + 1 for i, g in enumerate(self.groups)}
        out = []
        for k, (name, shape, group) in enumerate(self.parameters):
            if group:
                if group not in names:
                    raise ConfigError(f"spec.parameters[{k}].group", f"no parameter group named {group!r}")
                out.append(names[group])
                continue
            out.append(next((i + 1 for i, g in enumerate(self.groups) if g.matches(name, len(shape))), 0))
        return out

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
        opts = self.build_optimizers()
        lay = self.layout()
        whole = [opts[g].whole_tensors for g in self.assign()]
        return plan(lay, self.num_shards, whole if any(whole) else None)

    def check_limits(self) -> None:
        """The description's sizes and numbers: shapes, names, counts within the limits above, and
        every float setting finite (raise ConfigError naming the field, or LIMIT_EXCEEDED)."""
        if len(self.parameters) > MAX_PARAMETERS:
            raise _too_big("spec.parameters", f"{len(self.parameters)} parameters; at most {MAX_PARAMETERS}", MAX_PARAMETERS)
        total = 0
        for i, (name, shape, group) in enumerate(self.parameters):
            if not name or len(name.encode()) > MAX_NAME_BYTES:
                raise ConfigError(f"spec.parameters[{i}].name", f"must be 1 to {MAX_NAME_BYTES} bytes")
            if len(group.encode()) > MAX_NAME_BYTES:
                raise ConfigError(f"spec.parameters[{i}].group", f"must be at most {MAX_NAME_BYTES} bytes")
            if len(shape) > MAX_DIMS or any(not 1 <= d <= MAX_DIMENSION for d in shape):
                raise ConfigError(f"spec.parameters[{i}].shape", f"at most {MAX_DIMS} dimensions, each in [1, {MAX_DIMENSION}]")
            n = math.prod(shape)
            if n > MAX_PARAM_ELEMENTS:
                raise _too_big(f"spec.parameters[{i}].shape", f"{n} elements; a parameter holds at most {MAX_PARAM_ELEMENTS}",
                               MAX_PARAM_ELEMENTS)  # fmt: skip
            total += n
        if total > MAX_JOB_ELEMENTS:
            raise _too_big("spec.parameters", f"{total} elements in all; a job holds at most {MAX_JOB_ELEMENTS}", MAX_JOB_ELEMENTS)
        for setting in ("num_workers", "min_workers", "max_workers"):
            workers = getattr(self, setting)
            if workers > MAX_WORKERS:
                raise _too_big(_spec_field(setting), f"{workers} workers; at most {MAX_WORKERS}", MAX_WORKERS)
        if len(self.groups) > MAX_GROUPS:
            raise _too_big("spec.param_groups", f"{len(self.groups)} groups; at most {MAX_GROUPS}", MAX_GROUPS)
        for i, g in enumerate(self.groups):
            if len(g.name.encode()) > MAX_NAME_BYTES:
                raise ConfigError(f"spec.param_groups[{i}].name", f"must be at most {MAX_NAME_BYTES} bytes")
            if len(g.patterns) > MAX_PATTERNS or any(len(p.encode()) > MAX_NAME_BYTES for p in g.patterns):
                raise ConfigError(f"spec.param_groups[{i}].patterns", f"at most {MAX_PATTERNS} patterns of {MAX_NAME_BYTES} bytes")
            if len(g.ndims) > MAX_DIMS + 1 or any(not 0 <= d <= MAX_DIMS for d in g.ndims):
                raise ConfigError(f"spec.param_groups[{i}].ndims", f"values in [0, {MAX_DIMS}]")
        for s in SETTINGS:
            value = getattr(self, s.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(s.spec_field, f"must be a finite number, not {value!r}")

    def validate(self) -> None:
        """Check every field; raise ConfigError naming the first bad one."""
        self.check_limits()
        if self.num_workers < 1:
            raise ConfigError(_spec_field("num_workers"), "must be >= 1")
        if self.num_shards < 1:
            raise ConfigError(_spec_field("num_shards"), "must be >= 1")
        if not (self.max_grad_norm >= 0.0):
            raise ConfigError(_spec_field("max_grad_norm"), "must be >= 0 (0 disables clipping)")
        if self.shard_num_cpus < 0:
            raise ConfigError(_spec_field("shard_num_cpus"), "must be >= 0")
        if self.shard_num_gpus < 0:
            raise ConfigError(_spec_field("shard_num_gpus"), "must be >= 0")
        if self.shard_memory_budget_bytes < 0:
            raise ConfigError(_spec_field("shard_memory_budget_bytes"), "must be >= 0 (0 = unlimited)")
        if self.shard_device_memory_budget_bytes < 0:
            raise ConfigError(_spec_field("shard_device_memory_budget_bytes"), "must be >= 0 (0 = unlimited)")
        if self.shard_device_memory_budget_bytes and not self.shard_num_gpus > 0:
            raise ConfigError(_spec_field("shard_device_memory_budget_bytes"), "needs GPU shards (shard_num_gpus > 0)")
        if self.min_members > self.max_members:
            raise ConfigError(_spec_field("min_workers"), f"must be <= max_workers ({self.max_members})")
        if self.num_workers > self.max_members:
            raise ConfigError(_spec_field("max_workers"), f"must be 0 or >= num_workers ({self.num_workers})")
        if not (0 < self.worker_timeout_s <= MAX_WORKER_TIMEOUT_S):
            raise ConfigError(_spec_field("worker_timeout_s"), f"must be in (0, {MAX_WORKER_TIMEOUT_S:g}] seconds (0 = 60)")
        if not (0 <= self.grace_window_s <= MAX_WORKER_TIMEOUT_S):
            raise ConfigError(_spec_field("grace_window_s"), f"must be in [0, {MAX_WORKER_TIMEOUT_S:g}] seconds (0 = off)")
        if self.replica_every_steps < 0:
            raise ConfigError(_spec_field("replica_every_steps"), "must be >= 0 (0 = no replicas)")
        if self.on_worker_lost not in (WAIT, CONTINUE, FAIL):
            raise ConfigError(_spec_field("on_worker_lost"), "must be WAIT (1), CONTINUE (2) or FAIL (3)")
        check_labels(self.labels)
        if self.spike_window < 0 or (self.spike_window and self.spike_window < 2):
            raise ConfigError(_spec_field("spike_window"), "must be 0 (off) or >= 2")
        if self.spike_window and not self.spike_threshold_std > 0:
            raise ConfigError(_spec_field("spike_threshold_std"), "must be > 0")
        seen: set[str] = set()
        for i, g in enumerate(self.groups):
            if not g.name or g.name in seen:
                raise ConfigError(f"spec.param_groups[{i}].name", "must be non-empty and unique")
            seen.add(g.name)
        self.layout()
        self.build_optimizers()
        self.assign()
        self.build_schedule()
        self.plan()


#: Most labels a job may carry, and the longest value (bytes of UTF-8).
MAX_LABELS = 64
MAX_LABEL_VALUE_BYTES = 1024
_LABEL_KEY = re.compile(r"[a-z0-9][a-z0-9._/-]{0,62}")


def check_labels(labels: Mapping[str, str]) -> None:
    """JobSpec.labels within their limits (INVALID_ARGUMENT naming ``spec.labels[KEY]``)."""
    if len(labels) > MAX_LABELS:
        raise ConfigError("spec.labels", f"{len(labels)} labels; at most {MAX_LABELS}")
    for key, value in sorted(labels.items()):
        if not _LABEL_KEY.fullmatch(key):
            raise ConfigError(f"spec.labels[{key[:64]!r}]", "a key is 1-63 bytes of [a-z0-9._/-], starting with a letter or digit")
        if len(value.encode()) > MAX_LABEL_VALUE_BYTES or any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value):
            raise ConfigError(f"spec.labels[{key!r}]", f"a value is at most {MAX_LABEL_VALUE_BYTES} bytes without control characters")


def _too_big(field: str, message: str, limit: int) -> ParamServerError:
    return ParamServerError("RESOURCE_EXHAUSTED", Reason.LIMIT_EXCEEDED, message, {"field": field, "limit": limit})


def check_job_id(job_id: str) -> None:
    """Raise ConfigError unless job_id matches [A-Za-z0-9._-]{1,64}."""
    if not JOB_ID_PATTERN.match(job_id):
        raise ConfigError("job_id", f"must match {JOB_ID_PATTERN.pattern}, got {job_id!r}")
