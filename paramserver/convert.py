"""Conversions between the wire messages of the control plane and plain Python values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from paramserver.coordinator import JobView
from paramserver.errors import ConfigError
from paramserver.jobconfig import GroupRule, JobConfig
from paramserver.v1 import job_service_pb2 as pb
from paramserver.v1 import tensor_pb2
from paramserver_client.codec import ITEMSIZE


def spec_to_config(spec: pb.JobSpec) -> JobConfig:
    """Validate a JobSpec's shape-level fields and turn it into a JobConfig."""
    params = []
    dtypes = []
    for i, p in enumerate(spec.parameters):
        if p.dtype and p.dtype not in ITEMSIZE:
            raise ConfigError(f"spec.parameters[{i}].dtype", f"unsupported dtype {p.dtype}")
        params.append((p.name, tuple(int(d) for d in p.shape), p.group))
        dtypes.append(int(p.dtype or tensor_pb2.DTYPE_FLOAT32))
    if not spec.HasField("optimizer") or not spec.optimizer.name:
        raise ConfigError("spec.optimizer.name", "an optimizer is required (sgd, adam, adamw)")
    config = JobConfig(
        parameters=tuple(params),
        optimizer=spec.optimizer.name,
        hyperparameters=json_format.MessageToDict(spec.optimizer.hyperparameters),
        schedule=spec.schedule.name or "constant",
        schedule_parameters=json_format.MessageToDict(spec.schedule.parameters),
        num_workers=spec.num_workers,
        num_shards=spec.num_shards,
        max_grad_norm=spec.max_grad_norm,
        shard_num_cpus=spec.shard_num_cpus,
        shard_num_gpus=spec.shard_num_gpus,
        shard_memory_budget_bytes=spec.shard_memory_budget_bytes,
        param_dtypes=tuple(dtypes),
        snapshot_every_steps=spec.snapshot_every_steps,
        snapshot_keep_last=spec.snapshot_keep_last,
        snapshot_every_seconds=spec.snapshot_every_seconds,
        spike_window=spec.spike_guard.window,
        spike_warmup=spec.spike_guard.warmup or 64,
        spike_threshold_std=spec.spike_guard.threshold_std or 6.0,
        groups=tuple(
            GroupRule(
                name=g.name,
                patterns=tuple(g.patterns),
                ndims=tuple(int(d) for d in g.ndims),
                optimizer=g.optimizer.name,
                hyperparameters=json_format.MessageToDict(g.optimizer.hyperparameters),
            )
            for g in spec.param_groups
        ),
    )
    config.validate()
    return config


def config_to_spec(c: JobConfig) -> pb.JobSpec:
    """The JobSpec a JobConfig came from."""
    spec = pb.JobSpec(
        num_workers=c.num_workers,
        num_shards=c.num_shards,
        max_grad_norm=c.max_grad_norm,
        shard_num_cpus=c.shard_num_cpus,
        shard_num_gpus=c.shard_num_gpus,
        shard_memory_budget_bytes=c.shard_memory_budget_bytes,
        snapshot_every_steps=c.snapshot_every_steps,
        snapshot_keep_last=c.snapshot_keep_last,
        snapshot_every_seconds=c.snapshot_every_seconds,
    )
    for g in c.groups:
        pg = spec.param_groups.add(name=g.name, patterns=list(g.patterns), ndims=list(g.ndims))
        pg.optimizer.name = g.optimizer
        pg.optimizer.hyperparameters.update(dict(g.hyperparameters))
    if c.spike_window:
        spec.spike_guard.window = c.spike_window
        spec.spike_guard.warmup = c.spike_warmup
        spec.spike_guard.threshold_std = c.spike_threshold_std
    for i, (name, shape, group) in enumerate(c.parameters):
        dtype = c.param_dtypes[i] if i < len(c.param_dtypes) else tensor_pb2.DTYPE_FLOAT32
        spec.parameters.add(name=name, shape=list(shape), dtype=dtype, group=group)
    spec.optimizer.name = c.optimizer
    spec.optimizer.hyperparameters.update(dict(c.hyperparameters))
    spec.schedule.name = c.schedule
    spec.schedule.parameters.update(dict(c.schedule_parameters))
    return spec


def job_to_pb(v: JobView) -> pb.Job:
    """A JobView as a Job message."""
    job = pb.Job(
        job_id=v.job_id,
        spec=config_to_spec(v.config),
        state=pb.JOB_STATE_RUNNING if v.initialized else pb.JOB_STATE_AWAITING_PARAMETERS,
        version=v.version,
        workers=list(v.workers),
        skipped_steps=dict(v.skips),
    )
    total = 0
    for p in v.config.layout():
        job.layout.add(name=p.name, offset=p.offset, numel=p.numel)
        total += p.numel
    job.total_elements = total
    for s in v.shards:
        info = job.shards.add(index=s.index, address=s.address, version=s.version, initialized=s.initialized)
        for key, value in s.memory.items():
            setattr(info.memory, key, value if key.endswith("_per_second") else int(value))
        for span in s.spans:
            info.ranges.add(start=span.start, length=span.length)
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
