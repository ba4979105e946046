"""Conversions between the wire messages of the control plane and plain Python values."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from paramserver.coordinator import CREATING, FAILED, RECOVERING, JobView
from paramserver.errors import ConfigError, ParamServerError, Reason
from paramserver.jobconfig import DEFAULT_SCHEDULE, MAX_PARAMETERS, SETTINGS, GroupRule, JobConfig, Setting
from paramserver.v1 import job_service_pb2 as pb
from paramserver.v1 import tensor_pb2
from paramserver_client.codec import ITEMSIZE

#: The JobSpec fields converted by hand (lists, Structs, names without a default); every other
#: field, nested messages' included, is a :data:`~paramserver.jobconfig.SETTINGS` entry.
HAND_CONVERTED = frozenset({"parameters", "optimizer", "schedule", "param_groups", "labels"})


def _parent(message: Message, path: str) -> tuple[Message, str]:
    """The message holding a dotted field path, and the field's name in it."""
    *outer, leaf = path.split(".")
    for name in outer:
        message = getattr(message, name)
    return message, leaf


def spec_value(spec: pb.JobSpec, setting: Setting) -> Any:
    """A setting's value as the wire carries it (0 when unset)."""
    message, leaf = _parent(spec, setting.path)
    return getattr(message, leaf)


def restore_overrides(spec: pb.JobSpec) -> dict[str, Any]:
    """The settings a restore takes from ``CreateJobRequest.spec``, as sent: the restorable ones
    (:attr:`Setting.restorable`); a 0 keeps the snapshot's value."""
    return {s.name: spec_value(spec, s) for s in SETTINGS if s.restorable}


def struct_values(struct: Any, field: str) -> dict[str, Any]:
    """A Struct as a dict; a non-finite number anywhere in it is INVALID_ARGUMENT naming its key."""

    def check(value: Any, where: str) -> None:
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            raise ConfigError(where, f"must be a finite number, not {value.number_value!r}")
        if kind == "list_value":
            for i, v in enumerate(value.list_value.values):
                check(v, f"{where}[{i}]")
        if kind == "struct_value":
            for k, v in value.struct_value.fields.items():
                check(v, f"{where}.{k}")

    for key, value in struct.fields.items():
        check(value, f"{field}.{key}")
    out: dict[str, Any] = json_format.MessageToDict(struct)
    return out


def spec_to_config(spec: pb.JobSpec) -> JobConfig:
    """Validate a JobSpec's shape-level fields and turn it into a JobConfig."""
    if len(spec.parameters) > MAX_PARAMETERS:  # before anything is built per parameter
        raise ParamServerError(
            "RESOURCE_EXHAUSTED",
            Reason.LIMIT_EXCEEDED,
            f"{len(spec.parameters)} parameters; at most {MAX_PARAMETERS}",
            {"field": "spec.parameters", "limit": MAX_PARAMETERS},
        )
    params = []
    dtypes = []
    for i, p in enumerate(spec.parameters):
        if p.dtype and p.dtype not in ITEMSIZE:
            raise ConfigError(f"spec.parameters[{i}].dtype", f"unsupported dtype {p.dtype}")
        params.append((p.name, tuple(int(d) for d in p.shape), p.group))
        dtypes.append(int(p.dtype or tensor_pb2.DTYPE_FLOAT32))
    if not spec.HasField("optimizer") or not spec.optimizer.name:
        raise ConfigError("spec.optimizer.name", "an optimizer is required (sgd, adam, adamw)")
    settings: dict[str, Any] = {}
    for s in SETTINGS:
        value = spec_value(spec, s)
        settings[s.name] = value if value or s.required else s.default
    config = JobConfig(
        parameters=tuple(params),
        optimizer=spec.optimizer.name,
        hyperparameters=struct_values(spec.optimizer.hyperparameters, "spec.optimizer.hyperparameters"),
        schedule=spec.schedule.name or DEFAULT_SCHEDULE,
        schedule_parameters=struct_values(spec.schedule.parameters, "spec.schedule.parameters"),
        param_dtypes=tuple(dtypes),
        labels=dict(spec.labels),
        groups=tuple(
            GroupRule(
                name=g.name,
                patterns=tuple(g.patterns),
                ndims=tuple(int(d) for d in g.ndims),
                optimizer=g.optimizer.name,
                hyperparameters=struct_values(g.optimizer.hyperparameters, f"spec.param_groups[{i}].optimizer.hyperparameters"),
            )
            for i, g in enumerate(spec.param_groups)
        ),
        **settings,
    )
    config.validate()
    return config


def config_to_spec(c: JobConfig) -> pb.JobSpec:
    """The JobSpec a JobConfig came from."""
    spec = pb.JobSpec()
    for s in SETTINGS:
        value = getattr(c, s.name)
        # zeros are not written (the same on the wire, and a nested message stays absent)
        if value and (not s.only_with or getattr(c, s.only_with)):
            message, leaf = _parent(spec, s.path)
            setattr(message, leaf, value)
    for g in c.groups:
        pg = spec.param_groups.add(name=g.name, patterns=list(g.patterns), ndims=list(g.ndims))
        pg.optimizer.name = g.optimizer
        pg.optimizer.hyperparameters.update(dict(g.hyperparameters))
    for i, (name, shape, group) in enumerate(c.parameters):
        dtype = c.param_dtypes[i] if i < len(c.param_dtypes) else tensor_pb2.DTYPE_FLOAT32
        spec.parameters.add(name=name, shape=list(shape), dtype=dtype, group=group)
    spec.optimizer.name = c.optimizer
    spec.optimizer.hyperparameters.update(dict(c.hyperparameters))
    spec.schedule.name = c.schedule
    spec.schedule.parameters.update(dict(c.schedule_parameters))
    spec.labels.update(dict(c.labels))
    return spec


_STATES: Mapping[str, pb.JobState.ValueType] = {
    CREATING: pb.JOB_STATE_CREATING,
    RECOVERING: pb.JOB_STATE_RECOVERING,
    FAILED: pb.JOB_STATE_FAILED,
}


def job_state_pb(state: str, initialized: bool) -> pb.JobState.ValueType:
    """The JobState of a coordinator state (RUNNING is AWAITING_PARAMETERS until every shard has them)."""
    if state in _STATES:
        return _STATES[state]
    return pb.JOB_STATE_RUNNING if initialized else pb.JOB_STATE_AWAITING_PARAMETERS


def job_to_pb(v: JobView) -> pb.Job:
    """A JobView as a Job message."""
    job = pb.Job(
        job_id=v.job_id,
        spec=config_to_spec(v.config),
        state=job_state_pb(v.state, v.initialized),
        version=v.version,
        workers=list(v.workers),
        skipped_steps=dict(v.skips),
        state_reason=v.state_reason,
        generation=v.generation,
        recoveries=v.recoveries,
        recovered_from=v.recovered_from,
        tenant=v.tenant,
    )
    for m in v.members:
        job.members.add(worker_id=m.worker_id, name=m.name, lease=m.lease, idle_s=m.idle_s, lost=m.lost)
    total = 0
    for p, group in zip(v.config.layout(), v.config.assign(), strict=True):
        job.layout.add(name=p.name, offset=p.offset, numel=p.numel, group=group)
        total += p.numel
    job.total_elements = total
    for name, rule, lr, hyper in v.config.group_infos():
        group_info = job.groups.add(name=name, optimizer=rule, lr=lr)
        group_info.hyperparameters.update(hyper)
    job.total_steps = int(v.config.schedule_parameters.get("total_steps", 0) or 0)
    for s in v.shards:
        info = job.shards.add(
            index=s.index, address=s.address, version=s.version, initialized=s.initialized, unreachable=not s.reachable, node=s.node
        )
        for f in dataclasses.fields(s.memory):
            setattr(info.memory, f.name, getattr(s.memory, f.name))
        for span in s.spans:
            info.ranges.add(start=span.start, length=span.length)
    job.progress.CopyFrom(pb.StepProgress(**dataclasses.asdict(v.progress)))
    return job


def snapshot_to_pb(s: Mapping[str, Any]) -> pb.Snapshot:
    """A snapshot summary (snapshot_store.summary) as a Snapshot message."""
    return pb.Snapshot(
        path=str(s["path"]),
        job_id=str(s["job_id"]),
        version=int(s["version"]),
        applied_steps=int(s["applied"]),
        shards=int(s["shards"]),
        bytes=int(s["bytes"]),
        created_at=str(s["created_at"]),
    )
