"""A job's scalar settings are defined once (jobconfig.SETTINGS): every JobSpec field is covered,
the conversions round-trip, defaults agree, and the client's make_spec follows the proto."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from paramserver.convert import HAND_CONVERTED, config_to_spec, restore_overrides, spec_to_config
from paramserver.errors import ConfigError
from paramserver.jobconfig import SETTINGS, SETTINGS_BY_NAME, JobConfig, Setting
from paramserver.v1 import job_service_pb2 as pb
from paramserver_client import make_spec
from paramserver_client.aio import SPEC_SETTINGS

PARAMS = (("w", (64, 8), ""), ("b", (8,), ""))
SHAPES = [(n, s) for n, s, _ in PARAMS]
#: JobConfig fields that are not scalar settings (converted by hand, or not on the wire).
NOT_SETTINGS = {"parameters", "optimizer", "hyperparameters", "schedule", "schedule_parameters", "param_dtypes", "groups", "labels"}
#: What a restore may override today (CreateJobRequest.spec with restore_from).
RESTORABLE = {
    "num_workers",
    "num_shards",
    "shard_num_cpus",
    "shard_num_gpus",
    "shard_memory_budget_bytes",
    "shard_device_memory_budget_bytes",
    "snapshot_every_steps",
    "snapshot_keep_last",
    "snapshot_every_seconds",
    "min_workers",
    "max_workers",
    "worker_timeout_s",
    "on_worker_lost",
    "replica_every_steps",
    "grace_window_s",
}
#: Settings whose values are an enum's: a valid non-default value each.
ENUM_VALUES = {"on_worker_lost": 3}


def _scalar_paths(desc: Descriptor, prefix: str = "") -> dict[str, FieldDescriptor]:
    """Every scalar field of a message, nested messages' included, by dotted path; the top-level
    fields converted by hand are left out."""
    out: dict[str, FieldDescriptor] = {}
    for f in desc.fields:
        path = prefix + f.name
        if not prefix and f.name in HAND_CONVERTED:
            continue
        if f.message_type is not None and not f.is_repeated:
            out.update(_scalar_paths(f.message_type, path + "."))
        else:
            out[path] = f  # a repeated or map field here is unmapped: the test below fails on it
    return out


def _value(s: Setting, k: int) -> int | float:
    """A valid non-default value for a setting, distinct for each setting."""
    if s.name in ENUM_VALUES:
        return ENUM_VALUES[s.name]
    return s.default + 2 + k if isinstance(s.default, int) else s.default + 0.5 + k


def _config(skip: str = "", **kw: Any) -> JobConfig:
    """A config with every setting but `skip` at a non-default value."""
    values = {s.name: _value(s, k) for k, s in enumerate(SETTINGS) if s.name != skip}
    return JobConfig(parameters=PARAMS, optimizer="adamw", param_dtypes=(1, 1), **{**values, **kw})


def _settings_of(c: JobConfig) -> dict[str, Any]:
    return {s.name: getattr(c, s.name) for s in SETTINGS}


def test_every_jobspec_scalar_field_is_a_setting_or_converted_by_hand() -> None:
    paths = _scalar_paths(pb.JobSpec.DESCRIPTOR)
    table = {s.path for s in SETTINGS}
    assert set(paths) - table == set(), "JobSpec fields nobody maps: add them to jobconfig.SETTINGS"
    assert table - set(paths) == set(), "SETTINGS entries with no JobSpec field"
    assert HAND_CONVERTED <= set(pb.JobSpec.DESCRIPTOR.fields_by_name), "stale HAND_CONVERTED entries"
    assert len({s.name for s in SETTINGS}) == len(SETTINGS) == len(table)


def test_settings_match_jobconfig_and_the_proto_types() -> None:
    fields = {f.name: f for f in dataclasses.fields(JobConfig)}
    assert set(fields) == NOT_SETTINGS | set(SETTINGS_BY_NAME), "a JobConfig field that is neither a setting nor a special case"
    paths = _scalar_paths(pb.JobSpec.DESCRIPTOR)
    for s in SETTINGS:
        assert fields[s.name].default == s.default and type(fields[s.name].default) is type(s.default), s.name
        is_float = paths[s.path].cpp_type in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)
        assert isinstance(s.default, float) == is_float, f"{s.name}: the default's type does not match {s.path}"
        assert not s.only_with or s.only_with in SETTINGS_BY_NAME, s.name


@pytest.mark.parametrize("skip", ["", "shard_device_memory_budget_bytes"])
def test_config_to_spec_to_config_round_trips_every_setting(skip: str) -> None:
    config = _config(skip)
    config.validate()
    assert all(getattr(config, s.name) != s.default for s in SETTINGS if s.name != skip)
    assert spec_to_config(config_to_spec(config)) == config
    assert JobConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("setting", SETTINGS, ids=[s.name for s in SETTINGS])
def test_each_setting_alone_round_trips_and_lands_on_its_proto_field(setting: Setting) -> None:
    value = _value(setting, 0)
    kw: dict[str, Any] = {setting.name: value}
    if setting.only_with:
        kw[setting.only_with] = 8
    if setting.name == "shard_device_memory_budget_bytes":  # a device budget needs GPU shards
        kw["shard_num_gpus"] = 1.0
    config = JobConfig(parameters=PARAMS, optimizer="adamw", param_dtypes=(1, 1), **kw)
    spec = config_to_spec(config)
    message: Any = spec
    for part in setting.path.split("."):
        message = getattr(message, part)
    assert message == value
    assert spec_to_config(spec) == config


def test_an_empty_spec_means_the_jobconfig_defaults() -> None:
    spec = pb.JobSpec()
    for n, shape in SHAPES:
        spec.parameters.add(name=n, shape=list(shape))
    spec.optimizer.name = "adamw"
    for s in SETTINGS:
        if s.required:  # no wire default: 0 is rejected, naming the field
            with pytest.raises(ConfigError) as err:
                spec_to_config(spec)
            assert err.value.field in {r.spec_field for r in SETTINGS if r.required}
            setattr(spec, s.path, s.default)
    config = spec_to_config(spec)
    defaults = JobConfig(parameters=PARAMS, optimizer="adamw")
    assert _settings_of(config) == _settings_of(defaults)
    assert config.schedule == defaults.schedule
    # and what a default config sends: no spike_guard message while the guard is off
    assert not config_to_spec(defaults).HasField("spike_guard")


def test_make_spec_defaults_are_the_jobconfig_defaults() -> None:
    config = spec_to_config(make_spec(SHAPES))
    assert _settings_of(config) == _settings_of(JobConfig(parameters=PARAMS, optimizer="adamw"))


def test_make_spec_keywords_are_the_settings() -> None:
    assert dict(SPEC_SETTINGS) == {s.name: s.path for s in SETTINGS}
    config = _config()
    spec = make_spec(SHAPES, **_settings_of(config))
    assert _settings_of(spec_to_config(spec)) == _settings_of(config)


def test_make_spec_rejects_an_unknown_keyword_naming_it() -> None:
    with pytest.raises(TypeError, match="max_grad_nrom"):
        make_spec(SHAPES, max_grad_nrom=1.0)
    with pytest.raises(TypeError, match="spike_guard"):
        make_spec(SHAPES, spike_guard=8)
    with pytest.raises(TypeError, match="num_workers"):
        make_spec(SHAPES, num_workers=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="snapshot_keep_last"):
        make_spec(SHAPES, snapshot_keep_last=-1)


def test_make_spec_maps_the_spike_guard_keywords_to_its_message() -> None:
    spec = make_spec(SHAPES, spike_window=16, spike_warmup=6, spike_threshold_std=4.0)
    assert (spec.spike_guard.window, spec.spike_guard.warmup, spec.spike_guard.threshold_std) == (16, 6, 4.0)


def test_restore_overrides_are_todays_set_and_sent_as_is() -> None:
    assert {s.name for s in SETTINGS if s.restorable} == RESTORABLE
    assert restore_overrides(pb.JobSpec()) == dict.fromkeys(RESTORABLE, 0)  # 0 = keep the snapshot's
    spec = make_spec(SHAPES, num_workers=3, num_shards=5, snapshot_every_seconds=2.5, max_grad_norm=1.0, spike_window=8)
    assert restore_overrides(spec) == {**dict.fromkeys(RESTORABLE, 0), "num_workers": 3, "num_shards": 5, "snapshot_every_seconds": 2.5}


def test_remote_optimizer_rejects_an_unknown_setting_before_connecting() -> None:
    torch = pytest.importorskip("torch")
    from paramserver_client.torch_optim import RemoteOptimizer

    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="max_grad_nrom"):
        RemoteOptimizer(model.named_parameters(), "127.0.0.1:1", "job", create=False, max_grad_nrom=1.0)


def test_labels_round_trip_and_are_checked() -> None:
    """JobSpec.labels are kept through JobConfig (and its dict form, the journal's) and refused
    out of their stated limits, naming the label."""
    spec = make_spec([("w", (2, 3))], optimizer="sgd", hyperparameters={"lr": 0.1}, labels={"diloco.inner_steps": "20", "team/a": "x y"})
    config = spec_to_config(spec)
    assert dict(config.labels) == {"diloco.inner_steps": "20", "team/a": "x y"}
    assert dict(config_to_spec(config).labels) == dict(spec.labels)
    assert JobConfig.from_dict(config.to_dict()) == config
    bad = {
        "Upper": ("v", "spec.labels['Upper']"),
        "-lead": ("v", "spec.labels['-lead']"),
        "k" * 64: ("v", "spec.labels['" + "k" * 64 + "']"),
        "ok": ("x" * 1025, "spec.labels['ok']"),
        "ctl": ("a\nb", "spec.labels['ctl']"),
    }
    for key, (value, field) in bad.items():
        with pytest.raises(ConfigError) as err:
            spec_to_config(make_spec([("w", (2,))], optimizer="sgd", hyperparameters={"lr": 0.1}, labels={key: value}))
        assert err.value.field == field, key
    with pytest.raises(ConfigError) as err:
        spec_to_config(make_spec([("w", (2,))], optimizer="sgd", hyperparameters={"lr": 0.1}, labels={f"k{i}": "" for i in range(65)}))
    assert err.value.field == "spec.labels"
