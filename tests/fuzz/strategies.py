"""Hypothesis strategies for the fuzz tier: request messages built field by field from the proto
descriptors, byte mutations of serialized requests, and client streams (a header, then chunks).

A strategy draws a *plan*, not a message: a list of ``(field name, value)`` pairs in which a value
may be a :class:`Ref`, a placeholder for something known only when the case runs (the reference
job's current version, a worker's live lease, the newest snapshot's path, the target shard's
range...). :func:`build` turns a plan into a message against a context dict. Plans keep the
examples small, printable and shrinkable, while the values the service checks deepest (an existing
job, a live lease, the right step, chunks covering a shard exactly once) are hit often.

The generator walks any message descriptor (:func:`message_plans`), so a field added to the protos
is fuzzed without touching this file; :data:`HINTS` only biases fields it knows toward valid or
interesting values, and :data:`VALID` gives each request a valid base that a few generic field
values then spoil (``valid + tweaks``), which reaches the checks behind the first one.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from paramserver.v1 import job_service_pb2 as jpb
from paramserver.v1 import shard_service_pb2 as spb
from paramserver_client.codec import BFLOAT16, FLOAT16, FLOAT32, encode, encode_chunk_message

S = st.SearchStrategy
Plan = list[tuple[str, Any]]

U32 = 2**32 - 1
U64 = 2**64 - 1
I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)

# ---- placeholders ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """A value taken from the case's context when the message is built: ``ctx[name]`` (+ delta for
    numbers, + suffix for strings)."""

    name: str
    delta: int = 0
    suffix: str = ""


@dataclass(frozen=True)
class Many:
    """A repeated field of `count` copies of `item` (a size limit probe, e.g. 100,001 parameters);
    a message item is a plan whose string values get the copy's index appended (unique names)."""

    count: int
    item: Any


class EmptyValue:
    """A google.protobuf.Value with no kind set (what a JSON mapping cannot express)."""

    def __repr__(self) -> str:
        return "EmptyValue()"


EMPTY_VALUE = EmptyValue()

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: I32,
    FieldDescriptor.TYPE_SINT32: I32,
    FieldDescriptor.TYPE_SFIXED32: I32,
    FieldDescriptor.TYPE_ENUM: I32,
    FieldDescriptor.TYPE_INT64: I64,
    FieldDescriptor.TYPE_SINT64: I64,
    FieldDescriptor.TYPE_SFIXED64: I64,
    FieldDescriptor.TYPE_UINT32: (0, U32),
    FieldDescriptor.TYPE_FIXED32: (0, U32),
    FieldDescriptor.TYPE_UINT64: (0, U64),
    FieldDescriptor.TYPE_FIXED64: (0, U64),
}


def resolve(value: Any, ctx: Mapping[str, Any], field: FieldDescriptor | None = None) -> Any:
    """A plan value with its Ref resolved (numbers clamped to the field's range)."""
    if not isinstance(value, Ref):
        return value
    base = ctx[value.name]
    if isinstance(base, str):
        return base + value.suffix
    if isinstance(base, list):
        return list(base)
    out = int(base) + value.delta
    if field is not None and field.type in _INT_RANGES:
        lo, hi = _INT_RANGES[field.type]
        out = min(max(out, lo), hi)
    return out


# ---- scalars --------------------------------------------------------------------------------------


def ints(lo: int, hi: int) -> S[int]:
    """Integers of a range, with its edges and small values often."""
    edges = sorted({v for v in (lo, hi, 0, 1, 2, -1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63) if lo <= v <= hi})
    return st.one_of(st.sampled_from(edges), st.integers(max(lo, -8), min(hi, 16)), st.integers(lo, hi))


FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-8, 1e308, -1e308, 1.7976931348623157e308, 5e-324, 2.0**53, 2.0**64, 1e20, 3.4e38, 65504.0]
floats_any: S[float] = st.one_of(
    st.sampled_from([*FLOAT_EDGES, math.nan, math.inf, -math.inf]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10, 10),
)

# Strings: printable, unicode, control characters, path-like, huge.
WEIRD_STRINGS = ["", " ", ".", "..", "../..", "/", "a/b", "\x00", "x\x00y", "*", "[", "%s%n", "é", "\u202e", "\ufeff", ":latest", "\n"]
short_text: S[str] = st.text(max_size=24)
strings_any: S[str] = st.one_of(
    st.sampled_from(WEIRD_STRINGS),
    short_text,
    st.integers(60, 70).map(lambda n: "j" * n),  # around the 64-byte job id limit
    st.sampled_from([255, 256, 1024, 1025, 4096, 70000]).map(lambda n: "n" * n),  # names, path components
    st.text(min_size=100, max_size=300),
)
bytes_any: S[bytes] = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff" * 9]), st.integers(0, 70000).map(bytes))


def scalar(field: FieldDescriptor) -> S[Any]:
    """Any value of a scalar field's type (open enums take undefined numbers too)."""
    t = field.type
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return floats_any
    if t == FieldDescriptor.TYPE_STRING:
        return strings_any
    if t == FieldDescriptor.TYPE_BYTES:
        return bytes_any
    if t == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.sampled_from([max(values) + 1, 99, 2**31 - 1, -1, -(2**31)]))
    lo, hi = _INT_RANGES[t]
    return ints(lo, hi)


# ---- google.protobuf.Struct ----------------------------------------------------------------------

#: Names the service reads from Structs: every optimizer's hyperparameters, every schedule's parameters.
HYPER_KEYS = [
    "lr", "betas", "eps", "weight_decay", "momentum", "dampening", "nesterov", "amsgrad", "beta", "shrink_ratio", "gain_pattern",
    "bias_pattern", "embedding_pattern", "beta2_decay", "d", "relative_step", "scale_parameter", "beta1", "relative_weight_decay",
    "ns_steps", "ns_coefficients", "adjust_lr", "ns_dtype", "bias_correction", "adapt", "correct_bias", "rank", "update_proj_gap",
    "scale", "active_layers", "interval_steps", "seed", "layer_pattern", "warmup_steps", "r", "weight_lr_power", "cautious",
    "cautious_normalization", "cautious_clamp",
]  # fmt: skip
SCHEDULE_KEYS = ["warmup_steps", "total_steps", "min_lr_ratio", "stable_steps", "decay_steps", "decay_shape", "timescale"]
OPTIMIZERS = ["sgd", "adam", "adamw", "lion", "tiger", "tiger_full", "adafactor", "muon", "lamb", "galore", "lisa", "adamw_schedulefree"]
SCHEDULES = ["constant", "linear_warmup", "warmup_cosine", "warmup_linear", "linear_decay", "wsd", "inverse_sqrt"]
#: Regular expressions (the *_pattern hyperparameters): valid, invalid, and backtracking-prone ones.
PATTERNS = ["", ".*", r"blocks\.(\d+)\.", "(", "[", "*", "(?P<x", r"(a+)+$", r"(\w+\s?)*$", "w", "(b)"]

json_scalar: S[Any] = st.one_of(
    st.none(),
    st.booleans(),
    floats_any,
    st.sampled_from([1e-3, 0.9, 0.999, 2.0, 5.0, 10.0, 128.0, 1e6, 2.0**63, 2.0**64, -5.0]),
    short_text,
    st.sampled_from(["mean", "count", "original", "match_rms_adamw", "bfloat16", "float32", "linear", "cosine", "sqrt", *PATTERNS]),
)
json_values: S[Any] = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(HYPER_KEYS), short_text), inner, max_size=3),
    ),
    max_leaves=8,
)
struct_value: S[Any] = st.one_of(json_values, st.just(EMPTY_VALUE))


def struct_plans(keys: Sequence[str]) -> S[dict[str, Any]]:
    """A Struct as a dict: known keys (with plausible and broken values) and random ones."""
    key = st.one_of(st.sampled_from(list(keys)), st.sampled_from(list(keys)), short_text)
    return st.dictionaries(key, struct_value, max_size=5)


#: Values of numeric, list and boolean settings: numbers of every kind first.
setting_values: S[Any] = st.one_of(floats_any, st.lists(floats_any, max_size=3), st.booleans(), json_values)


def settings_plans(keys: Sequence[str]) -> S[dict[str, Any]]:
    """A Struct of one or two settings the common rules (or schedules) read, with odd values."""
    return st.dictionaries(st.sampled_from(list(keys)), setting_values, min_size=1, max_size=2)


STRUCT_NAMES = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}


# ---- messages from descriptors --------------------------------------------------------------------


def field_values(field: FieldDescriptor, depth: int) -> S[Any]:
    """Generic values of one field (a list for a repeated one), hints first when there are some."""
    hint = HINTS.get(f"{field.containing_type.name}.{field.name}", HINTS.get(field.name))
    generic = _generic(field, depth)
    return generic if hint is None else st.one_of(hint, generic)


def _generic(field: FieldDescriptor, depth: int) -> S[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.lists(st.tuples(_single(key_f, depth + 1), _single(value_f, depth + 1)), max_size=4)
    one = _single(field, depth)
    if not field.is_repeated:
        return one
    sizes = st.one_of(st.lists(one, max_size=4), st.lists(one, min_size=5, max_size=40))
    if field.message_type is None:  # a long list of scalars now and then (bounded: 3,000 elements)
        sizes = st.one_of(sizes, st.integers(100, 3000).flatmap(lambda n: st.lists(one, min_size=n, max_size=n)))
    return sizes


def _single(field: FieldDescriptor, depth: int) -> S[Any]:
    if field.message_type is None:
        return scalar(field)
    if field.message_type.full_name == "google.protobuf.Struct":
        return st.one_of(struct_plans(HYPER_KEYS), st.just({}))
    if field.message_type.full_name == "google.protobuf.Value":
        return struct_value
    if field.message_type.full_name == "google.protobuf.ListValue":
        return st.lists(json_values, max_size=4)
    if depth >= 4:
        return st.just([])
    return message_plans(field.message_type, depth + 1)


@functools.cache
def message_plans(desc: Descriptor, depth: int = 0) -> S[Plan]:
    """A plan of any message type: any subset of its fields, in any order, a field sometimes twice
    (the later value wins; of a oneof's fields, the one set last). Both members of a oneof on the
    wire, and repeated singular fields, come from the byte mutations ("duplicate")."""
    fields = list(desc.fields)

    @st.composite
    def draw(draw: Callable[[S[Any]], Any]) -> Plan:
        plan: Plan = []
        chosen = draw(st.lists(st.sampled_from(fields), max_size=len(fields) + 1)) if fields else []
        for f in chosen:
            plan.append((f.name, draw(field_values(f, depth))))
        return plan

    return draw()


@functools.cache
def tweaks(desc: Descriptor, depth: int = 0) -> S[tuple[tuple[str, ...], Any]]:
    """One (field path, generic value) pair of a message: a tweak of a valid plan. The path goes
    down into singular nested messages (e.g. ``spec.optimizer.hyperparameters``), so that a valid
    request is spoiled in one deep place and reaches the checks behind the shallow ones."""
    fields = list(desc.fields)
    fields += [f for f in fields if f.message_type is not None] * 3  # nested messages hold most checks

    def one(f: FieldDescriptor) -> S[tuple[tuple[str, ...], Any]]:
        here = field_values(f, depth + 1).map(lambda v: ((f.name,), v))
        nested = f.message_type is not None and not f.is_repeated and f.message_type.full_name not in STRUCT_NAMES
        if not nested or depth >= 3:
            return here
        deeper = tweaks(f.message_type, depth + 1).map(lambda pv: ((f.name, *pv[0]), pv[1]))
        return st.one_of(deeper, deeper, deeper, here)

    return st.sampled_from(fields).flatmap(one)


def apply_tweak(plan: Plan, path: Sequence[str], value: Any) -> Plan:
    """A plan with the field at `path` set to `value` (appended: it replaces an earlier value)."""
    head, *rest = path
    if not rest:
        return [*plan, (head, value)]
    inner = next((v for k, v in reversed(plan) if k == head and isinstance(v, list)), [])
    return [*plan, (head, apply_tweak(inner, rest, value))]


def spoiled(valid: S[Plan], desc: Descriptor) -> S[Plan]:
    """Valid plans with one or two fields (at any depth) given a generic value."""

    def spoil(vt: tuple[Plan, list[tuple[tuple[str, ...], Any]]]) -> Plan:
        plan = vt[0]
        for path, value in vt[1]:
            plan = apply_tweak(plan, path, value)
        return plan

    return st.tuples(valid, st.lists(tweaks(desc), min_size=1, max_size=2)).map(spoil)


@functools.cache
def request_plans(desc: Descriptor) -> S[Plan]:
    """Plans of a request: wholly generic, valid, or valid with one or two fields spoiled."""
    generic = message_plans(desc)
    valid = VALID.get(desc.name)
    if valid is None or not desc.fields:
        return generic
    tweaked = spoiled(valid, desc)
    return st.one_of(tweaked, tweaked, tweaked, valid, generic)


def build(desc: Descriptor, plan: Plan, ctx: Mapping[str, Any]) -> Message:
    """The message a plan describes, with its Refs taken from `ctx`."""
    msg = message_factory.GetMessageClass(desc)()
    fill(msg, plan, ctx)
    return msg


def fill(msg: Message, plan: Any, ctx: Mapping[str, Any]) -> None:
    """Set a message's fields from a plan (see :func:`build`)."""
    name = msg.DESCRIPTOR.full_name
    if name == "google.protobuf.Struct":
        _fill_struct(msg, plan)
        return
    if name == "google.protobuf.Value":
        _set_value(msg, plan)
        return
    if name == "google.protobuf.ListValue":
        msg.extend([None if v is EMPTY_VALUE else v for v in plan])  # type: ignore[attr-defined]
        return
    for key, value in plan:
        f = msg.DESCRIPTOR.fields_by_name[key]
        msg.ClearField(key)  # a later entry replaces an earlier one
        if isinstance(value, Many):
            _fill_many(msg, f, value, ctx)
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            target = getattr(msg, key)
            value_f = f.message_type.fields_by_name["value"]
            for k, v in value:
                if value_f.message_type is None:
                    target[resolve(k, ctx)] = resolve(v, ctx, value_f)
                else:
                    fill(target[resolve(k, ctx)], v, ctx)
        elif f.is_repeated:
            target = getattr(msg, key)
            for v in resolve(value, ctx):
                if f.message_type is None:
                    target.append(resolve(v, ctx, f))
                else:
                    fill(target.add(), v, ctx)
        elif f.message_type is not None:
            sub = getattr(msg, key)
            sub.SetInParent()
            fill(sub, value, ctx)
        else:
            setattr(msg, key, resolve(value, ctx, f))


def _fill_many(msg: Message, f: FieldDescriptor, many: Many, ctx: Mapping[str, Any]) -> None:
    target = getattr(msg, f.name)
    if f.message_type is None:
        target.extend([resolve(many.item, ctx, f)] * many.count)
        return
    for i in range(many.count):
        item = [(k, f"{v}{i}" if isinstance(v, str) else v) for k, v in many.item]
        fill(target.add(), item, ctx)


def _fill_struct(msg: Any, d: Mapping[str, Any]) -> None:
    for k, v in d.items():
        _set_value(msg.fields[k], v)


def _set_value(value: Any, v: Any) -> None:
    if v is EMPTY_VALUE:
        value.Clear()
    elif isinstance(v, dict):
        value.struct_value.Clear()
        _fill_struct(value.struct_value, v)
    elif isinstance(v, list):
        value.list_value.Clear()
        for item in v:
            _set_value(value.list_value.values.add(), item)
    elif v is None:
        value.null_value = 0
    elif isinstance(v, bool):
        value.bool_value = v
    elif isinstance(v, int | float):
        value.number_value = float(v)
    else:
        value.string_value = v


# ---- hints: values the service checks, biased toward valid ------------------------------------------

#: A request id of its own per case (hypothesis draws the same uuid again and again, which would
#: make most cases REQUEST_ID_REUSED), or a reused, empty or odd one.
uuid_ids: S[Any] = st.just(Ref("request_id"))
request_ids: S[Any] = st.one_of(uuid_ids, uuid_ids, st.sampled_from(["", "dup-1", "dup-2"]), strings_any)
job_ids: S[Any] = st.one_of(
    st.sampled_from([Ref("job"), Ref("job"), Ref("other_job"), Ref("fresh_job"), Ref("foreign_job")]),
    st.sampled_from(["", "no-such-job", "..", ".", "a/b", "j" * 64, "j" * 65, "\x00", "ref/../ref"]),
    strings_any,
)
snapshots: S[Any] = st.one_of(
    st.sampled_from(
        [
            Ref("snapshot"),
            Ref("snapshot"),
            Ref("job", suffix=":latest"),
            Ref("job"),
            Ref("foreign_snapshot"),
            Ref("other_job", suffix=":latest"),
            Ref("snapshot", suffix="/.."),
            Ref("snapshot", suffix="x"),
            Ref("snapshot_root"),
            Ref("foreign_job", suffix=":latest"),
        ]
    ),
    st.sampled_from(["", "/", "/tmp", "/etc", "/proc/self", ".", "..", "nope:latest", "s3://bucket/prefix/j/v1", "x" * 300, "\x00"]),
    strings_any,
)
versions: S[Any] = st.one_of(
    st.sampled_from([Ref("version"), Ref("version"), Ref("version"), Ref("version", -1), Ref("version", 1), Ref("version", 2)]),
    ints(0, U64),
)
worker_ids: S[Any] = st.one_of(st.sampled_from([Ref("worker_id"), Ref("worker_id"), Ref("worker_id2"), Ref("worker_id", 1)]), ints(0, U32))
leases: S[Any] = st.one_of(
    st.sampled_from([Ref("lease"), Ref("lease"), Ref("lease2"), Ref("lease", 1), Ref("lease", -1), Ref("lease2", 1)]), ints(0, U64)
)
generations: S[Any] = st.one_of(
    st.sampled_from([Ref("generation"), Ref("generation"), Ref("generation", 1), Ref("generation", -1)]), ints(0, U64)
)
lr_lists: S[Any] = st.one_of(
    st.just(Ref("lrs")),
    st.just([]),
    st.lists(st.floats(0, 1), min_size=1, max_size=1),
    st.lists(floats_any, max_size=4),
    st.integers(65, 200).map(lambda n: [0.01] * n),
)
dtypes: S[int] = st.one_of(st.sampled_from([FLOAT32, FLOAT32, BFLOAT16, FLOAT16, 0, 4, 99, 2**31 - 1, -1]))
small_dims: S[list[int]] = st.lists(st.integers(1, 9), max_size=3)
#: Shapes: small ones, and ones over a limit that are refused (never accepted huge ones: the service
#: would allocate them; see ``conftest.too_big_to_create``).
shapes: S[list[int]] = st.one_of(
    small_dims,
    small_dims,
    st.sampled_from([[U64], [0], [4, 0], [1] * 9, [2**31], [2**31 - 1, 2**31 - 1, 2**31 - 1], [2**18, 2**17], [2**40, 2**40], [2**63]]),
)
parameter_specs: S[Plan] = st.tuples(st.sampled_from(["w", "b", "p0", "p1", "blocks.0.w"]), small_dims).map(
    lambda ns: [("name", ns[0]), ("shape", ns[1])]
)
parameter_lists: S[Any] = st.one_of(
    st.lists(parameter_specs, min_size=1, max_size=4, unique_by=lambda p: p[0][1]),
    st.tuples(
        st.lists(parameter_specs, min_size=1, max_size=3, unique_by=lambda p: p[0][1]),
        st.integers(0, 3),
        st.deferred(lambda: message_plans(jpb.ParameterSpec.DESCRIPTOR, 2)),
    ).map(lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] :]]),
    st.sampled_from([Many(100_001, [("name", "p"), ("shape", [1])]), Many(2000, [("name", "p"), ("shape", [2**31 - 1, 8])])]),
)
counts: S[int] = st.one_of(st.integers(0, 4), st.sampled_from([U32, 2**31, 1000, 65_536, 65_537]), ints(0, U32))
group_plans: S[Any] = st.one_of(
    st.lists(
        st.tuples(st.sampled_from(["g0", "g1", ""]), st.lists(st.sampled_from(["*", "w*", "b", "[", "*.w"]), max_size=3)).map(
            lambda np_: [("name", np_[0]), ("patterns", np_[1])]
        ),
        max_size=3,
    ),
    st.just(Many(65, [("name", "g")])),
)

HINTS: dict[str, S[Any]] = {
    "request_id": request_ids,
    "job_id": job_ids,
    "snapshot": snapshots,
    "restore_from": st.one_of(st.just(""), snapshots),
    "worker_name": st.one_of(st.sampled_from([Ref("observer_name"), Ref("observer_name2"), ""]), strings_any),
    "worker_id": worker_ids,
    "lease": leases,
    "generation": generations,
    "step": versions,
    "min_version": versions,
    "loss_terms": st.one_of(st.integers(0, 4), st.just(U64), ints(0, U64)),
    "group_lrs": lr_lists,
    "dtype": dtypes,
    "previous_valid_s": floats_any,
    "Range.start": st.one_of(st.sampled_from([Ref("shard_start"), Ref("shard_start", 1), Ref("shard_end"), Ref("total")]), ints(0, U64)),
    "Range.length": st.one_of(st.sampled_from([Ref("shard_len"), Ref("shard_len", -1), Ref("shard_len", 1), 1, 0]), ints(0, U64)),
    "TensorChunk.offset": st.one_of(st.sampled_from([Ref("shard_start"), Ref("shard_end"), Ref("shard_start", -1)]), ints(0, U64)),
    "TensorChunk.count": st.one_of(st.sampled_from([Ref("shard_len"), 1, 0]), ints(0, U64)),
    "ParameterSpec.name": st.one_of(st.sampled_from(["w", "b", "p0", ""]), strings_any),
    "ParameterSpec.shape": shapes,
    "ParameterSpec.group": st.one_of(st.sampled_from(["", "", "g0", "nope"]), strings_any),
    "JobSpec.parameters": parameter_lists,
    "JobSpec.num_workers": counts,
    "JobSpec.num_shards": counts,
    "JobSpec.min_workers": counts,
    "JobSpec.max_workers": counts,
    "JobSpec.param_groups": group_plans,
    "JobSpec.shard_memory_budget_bytes": st.one_of(st.sampled_from([0, 1, 4096, 96 << 20, (96 << 20) + 4096, 1 << 30, U64]), ints(0, U64)),
    "JobSpec.worker_timeout_s": st.one_of(st.sampled_from([0.0, 0.001, 60.0, 86400.0, 86400.5]), floats_any),
    "OptimizerConfig.name": st.one_of(st.sampled_from(OPTIMIZERS), st.sampled_from(["", "SGD", "adamw ", "nope"]), short_text),
    "OptimizerConfig.hyperparameters": st.one_of(
        settings_plans(["lr", "betas", "eps", "weight_decay", "amsgrad", "momentum", "nesterov", "dampening"]),
        settings_plans(["lr", "betas", "eps", "weight_decay", "amsgrad", "momentum", "nesterov", "dampening"]),
        struct_plans(HYPER_KEYS),
        st.tuples(st.sampled_from(["gain_pattern", "bias_pattern", "embedding_pattern", "layer_pattern"]), st.sampled_from(PATTERNS)).map(
            lambda kv: {kv[0]: kv[1]}
        ),
    ),
    "ScheduleConfig.name": st.one_of(st.sampled_from(SCHEDULES), st.sampled_from(["", "nope"]), short_text),
    "CreateJobRequest.spec": st.deferred(lambda: spoiled(valid_spec, jpb.JobSpec.DESCRIPTOR)),
    "ScheduleConfig.parameters": st.one_of(settings_plans(SCHEDULE_KEYS), struct_plans(SCHEDULE_KEYS)),
    "ParamGroup.ndims": st.lists(st.one_of(st.integers(0, 3), st.sampled_from([8, 9, U32])), max_size=10),
}


# ---- valid requests (with Refs) ------------------------------------------------------------------

valid_spec: S[Plan] = st.tuples(
    st.sampled_from(["adamw", "sgd", "adam", "lion", "lamb", "adafactor", "muon"]),
    st.sampled_from([1, 2]),
    st.sampled_from(["constant", "warmup_cosine"]),
).map(
    lambda t: [
        ("parameters", [[("name", "w"), ("shape", [4, 3])], [("name", "b"), ("shape", [3])]]),
        ("optimizer", [("name", t[0]), ("hyperparameters", {"lr": 0.01})]),
        ("schedule", [("name", t[2]), ("parameters", {"total_steps": 100.0} if t[2] != "constant" else {})]),
        ("num_workers", 1),
        ("num_shards", t[1]),
    ]
)

#: A valid base plan of each request (by message name); tweaks spoil it.
VALID: dict[str, S[Plan]] = {
    "CreateJobRequest": st.tuples(
        uuid_ids, st.sampled_from([Ref("fresh_job"), Ref("fresh_job"), Ref("job")]), valid_spec, st.booleans()
    ).map(lambda t: [("request_id", t[0]), ("job_id", t[1]), ("spec", t[2]), ("resume", t[3])]),
    "GetJobRequest": st.just([("job_id", Ref("job"))]),
    "ListJobsRequest": st.just([]),
    "JoinJobRequest": st.tuples(uuid_ids, st.one_of(st.sampled_from([Ref("observer_name"), ""]), short_text)).map(
        lambda t: [("request_id", t[0]), ("job_id", Ref("job")), ("worker_name", t[1])]
    ),
    "LeaveJobRequest": uuid_ids.map(
        lambda r: [("request_id", r), ("job_id", Ref("job")), ("worker_id", Ref("worker_id2")), ("lease", Ref("lease2"))]
    ),
    "HeartbeatRequest": st.just([("job_id", Ref("job")), ("worker_id", Ref("worker_id")), ("lease", Ref("lease"))]),
    "DeleteJobRequest": st.tuples(uuid_ids, st.sampled_from([Ref("other_job"), Ref("job")])).map(
        lambda t: [("request_id", t[0]), ("job_id", t[1])]
    ),
    "CreateSnapshotRequest": uuid_ids.map(lambda r: [("request_id", r), ("job_id", Ref("job"))]),
    "ListSnapshotsRequest": st.just([("job_id", Ref("job"))]),
    "RollbackJobRequest": uuid_ids.map(lambda r: [("request_id", r), ("job_id", Ref("job")), ("snapshot", Ref("snapshot"))]),
    "ReadOptimizerStateRequest": st.tuples(uuid_ids, st.sampled_from([Ref("snapshot"), ""])).map(
        lambda t: [("request_id", t[0]), ("job_id", Ref("job")), ("snapshot", t[1])]
    ),
    "RotateJobTokenRequest": uuid_ids.map(lambda r: [("request_id", r), ("job_id", Ref("job")), ("previous_valid_s", 60.0)]),
    "UploadHeader": uuid_ids.map(lambda r: [("job_id", Ref("job")), ("request_id", r)]),
    "PushHeader": st.tuples(uuid_ids, st.integers(0, 3)).map(
        lambda t: [
            ("job_id", Ref("job")),
            ("worker_id", Ref("worker_id")),
            ("step", Ref("version")),
            ("request_id", t[0]),
            ("loss_terms", t[1]),
            ("lease", Ref("lease")),
            ("generation", Ref("generation")),
        ]
    ),
    "PullParametersRequest": st.tuples(st.sampled_from([0, FLOAT32, BFLOAT16, FLOAT16]), st.sampled_from([0, 1, 2])).map(
        lambda t: [
            ("job_id", Ref("job")),
            ("min_version", Ref("version")),
            ("dtype", t[0]),
            ("point", t[1]),
            ("worker_id", Ref("worker_id")),
            ("lease", Ref("lease")),
            ("generation", Ref("generation")),
        ]
    ),
}


# ---- byte mutations --------------------------------------------------------------------------------

#: One mutation of a serialized message: positions are taken modulo its length when applied.
byte_ops: S[tuple[Any, ...]] = st.one_of(
    st.tuples(st.just("bitflip"), st.integers(0, 2**16), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
    st.tuples(st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 8)),
    st.tuples(st.just("overwrite"), st.integers(0, 2**16), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("random"), st.binary(max_size=200)),
    st.tuples(st.just("duplicate")),
    st.tuples(
        st.just("append"),
        st.sampled_from(
            [
                b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
                b"\x0b",
                b"\x0c",
                b"\xfa\xff\xff\xff\x0f\x01\x00",
                b"\x12\x80\x80\x80\x80\x10",
                b"\x07",
                b"\x0a\x05abc",
            ]
        ),
    ),
)
byte_mutations: S[list[tuple[Any, ...]]] = st.lists(byte_ops, min_size=1, max_size=3)


def mutate(raw: bytes, ops: Sequence[tuple[Any, ...]]) -> bytes:
    """Apply byte mutations in order."""
    b = bytearray(raw)
    for op in ops:
        kind = op[0]
        if kind == "bitflip" and b:
            b[op[1] % len(b)] ^= 1 << op[2]
        elif kind == "truncate":
            del b[op[1] % (len(b) + 1) :]
        elif kind == "insert":
            pos = op[1] % (len(b) + 1)
            b[pos:pos] = op[2]
        elif kind == "delete" and b:
            pos = op[1] % len(b)
            del b[pos : pos + op[2]]
        elif kind == "overwrite" and b:
            pos = op[1] % len(b)
            b[pos : pos + len(op[2])] = op[2]
        elif kind == "random":
            b = bytearray(op[1])
        elif kind == "duplicate":
            b += bytes(b)
        elif kind == "append":
            b += op[1]
    return bytes(b)


def mutation_kind(ops: Sequence[tuple[Any, ...]]) -> str:
    """A label of a mutation list for the summary (its distinct operations)."""
    return "bytes:" + "+".join(sorted({op[0] for op in ops}))


# ---- client streams ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cover:
    """Chunks that cover the target shard's ranges exactly once: each range cut into `pieces`,
    values of the given kind in wire `dtype`, in shuffled order when `shuffle`."""

    pieces: int
    dtype: int
    values: str
    seed: int
    shuffle: bool


covers: S[Cover] = st.builds(
    Cover,
    pieces=st.integers(1, 4),
    dtype=st.sampled_from([FLOAT32, FLOAT32, BFLOAT16, FLOAT16]),
    values=st.sampled_from(["normal", "normal", "zeros", "nan", "inf", "huge", "tiny"]),
    seed=st.integers(0, 2**16),
    shuffle=st.booleans(),
)


def cover_chunks(cover: Cover, spans: Sequence[tuple[int, int]]) -> list[bytes]:
    """The chunk messages of a Cover over `spans` ((start, length) pairs)."""
    rng = np.random.default_rng(cover.seed)
    out = []
    for start, length in spans:
        cuts = sorted({start, start + length, *(int(c) for c in rng.integers(start, start + length, cover.pieces - 1))})
        for a, b in itertools.pairwise(cuts):
            n = b - a
            if cover.values == "zeros":
                values = np.zeros(n, np.float32)
            elif cover.values == "tiny":
                values = np.full(n, 1e-45, np.float32)
            else:
                values = rng.standard_normal(n).astype(np.float32)
                if cover.values == "nan":
                    values[rng.integers(0, n)] = np.nan
                elif cover.values == "inf":
                    values[rng.integers(0, n)] = -np.inf
                elif cover.values == "huge":
                    with np.errstate(over="ignore"):
                        values *= np.float32(3e38)
            with np.errstate(over="ignore", invalid="ignore"):
                out.append(encode_chunk_message(a, n, cover.dtype, encode(values, cover.dtype)))
    if cover.shuffle:
        order = rng.permutation(len(out))
        out = [out[i] for i in order]
    return out


#: Edits of one message of a materialized stream (index modulo the stream's length; 0 = the header).
stream_ops: S[tuple[Any, ...]] = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 64)),
    st.tuples(st.just("dup"), st.integers(0, 64)),
    st.tuples(st.just("swap"), st.integers(0, 64), st.integers(0, 64)),
    st.tuples(st.just("header-last")),
    st.tuples(st.just("bytes"), st.integers(0, 64), byte_mutations),
    st.tuples(st.just("chunk-offset"), st.integers(1, 64), st.sampled_from([-1, 1, 16, -(2**40), 2**64 - 1])),
    st.tuples(st.just("chunk-count"), st.integers(1, 64), st.sampled_from([-1, 1, 2**32, 2**64 - 1, 0])),
    st.tuples(st.just("chunk-dtype"), st.integers(1, 64), st.sampled_from([0, 1, 2, 3, 4, 2**31 - 1, 2**64 - 1])),
    st.tuples(st.just("chunk-data"), st.integers(1, 64), st.sampled_from([-1, 1, -2, 2, 4])),
    st.tuples(st.just("chunk-big"), st.integers(1, 64)),
    st.tuples(st.just("insert-header"), st.integers(0, 64)),
    st.tuples(st.just("insert-message"), st.integers(0, 64), st.binary(max_size=40)),
)


@dataclass(frozen=True)
class StreamCase:
    """A client stream: a header plan (None: no header), chunks (a Cover, or generic messages), and
    edits of the materialized stream. With `prime`, the stream without its edits is sent first (a
    valid push or upload, usually), so that the case itself is a retry under the same request id:
    the same content (the first answer), other content (REQUEST_ID_REUSED), another id for the same
    step (DUPLICATE_CONTRIBUTION), an upload after the parameters exist..."""

    header: Plan | None
    cover: Cover | None
    extra: list[Plan]
    ops: list[tuple[Any, ...]]
    prime: bool = False

    def kind(self) -> str:
        """A label for the summary."""
        label = "stream:" + ("+".join(sorted({op[0] for op in self.ops})) or ("structured" if self.cover is not None else "generic"))
        return label + (" after a first send" if self.prime else "")

    def primer(self) -> StreamCase:
        """The stream sent first when `prime` is set: this one without its edits."""
        return dataclasses.replace(self, ops=[], prime=False)


def stream_cases(request_desc: Descriptor, header_desc: Descriptor) -> S[StreamCase]:
    """Streams of a client-stream method: mostly a (tweaked) valid header and a cover of the target
    shard, edited a few times; also wholly generic message lists."""
    headers = request_plans(header_desc)
    edits = st.lists(stream_ops, min_size=1, max_size=3)
    return st.one_of(
        st.builds(StreamCase, header=headers, cover=covers, extra=st.just([]), ops=st.just([]), prime=st.booleans()),
        st.builds(StreamCase, header=headers, cover=covers, extra=st.just([]), ops=edits, prime=st.booleans()),
        st.builds(
            StreamCase,
            header=st.one_of(st.none(), headers),
            cover=st.one_of(st.none(), covers),
            extra=st.lists(message_plans(request_desc), max_size=4),
            ops=st.lists(stream_ops, max_size=2),
        ),
    )


def materialize(
    case: StreamCase, request_desc: Descriptor, header_desc: Descriptor, ctx: Mapping[str, Any], spans: Sequence[tuple[int, int]]
) -> list[bytes]:
    """The serialized messages of a stream case."""
    request_cls = message_factory.GetMessageClass(request_desc)
    messages: list[bytes] = []
    header_bytes = b""
    if case.header is not None:
        header_msg = request_cls()
        header_msg.header.CopyFrom(build(header_desc, case.header, ctx))
        header_bytes = header_msg.SerializeToString()
        messages.append(header_bytes)
    if case.cover is not None:
        messages += cover_chunks(case.cover, spans)
    messages += [build(request_desc, p, ctx).SerializeToString() for p in case.extra]
    for op in case.ops:
        messages = _edit(messages, op, header_bytes)
    return messages


def _edit(messages: list[bytes], op: tuple[Any, ...], header: bytes) -> list[bytes]:
    kind, n = op[0], len(messages)
    out = list(messages)
    if kind == "header-last":
        return out[1:] + out[:1]
    if kind == "insert-header":
        out.insert(op[1] % (n + 1), header or b"\x0a\x00")
        return out
    if kind == "insert-message":
        out.insert(op[1] % (n + 1), op[2])
        return out
    if not n:
        return out
    i = op[1] % n
    if kind == "drop":
        del out[i]
    elif kind == "dup":
        out.insert(i, out[i])
    elif kind == "swap":
        j = op[2] % n
        out[i], out[j] = out[j], out[i]
    elif kind == "bytes":
        out[i] = mutate(out[i], op[2])
    elif kind.startswith("chunk-"):
        out[i] = _edit_chunk(out[i], kind, op)
    return out


def _edit_chunk(raw: bytes, kind: str, op: tuple[Any, ...]) -> bytes:
    """Re-encode a chunk message with one field changed (a message that is no chunk is kept)."""
    msg = spb.PushGradientsRequest()
    try:
        msg.ParseFromString(raw)
    except Exception:  # noqa: BLE001 - an already broken message stays as it is
        return raw
    if msg.WhichOneof("kind") != "chunk":
        return raw
    c = msg.chunk
    offset, count, dtype, data = int(c.offset), int(c.count), int(c.dtype), bytes(c.data)
    if kind == "chunk-offset":
        offset = (offset + op[2]) % 2**64
    elif kind == "chunk-count":
        count = 0 if op[2] == 0 else (count + op[2]) % 2**64
    elif kind == "chunk-dtype":
        dtype = op[2]
    elif kind == "chunk-data":
        data = data[: op[2]] if op[2] < 0 else data + b"\x00" * op[2]
    elif kind == "chunk-big":  # over the 4 MiB limit per chunk, with a matching count
        count, data = (4 << 20) // 4 + 1, bytes((4 << 20) + 4)
        dtype = FLOAT32
    return encode_chunk_message(offset, count, dtype, data)
