"""A shard's state: fp32 master parameters and optimizer state for its spans (pure torch).

No Ray, no gRPC, no asyncio: the runtime (shard_runtime.py) calls these
methods from worker threads and serialises them with :attr:`ShardState.lock`.

Local layout: the shard's spans are concatenated in increasing global
offset into one flat local buffer, so an element-wise optimizer runs once
over the whole shard with torch's fused kernels.
"""

from __future__ import annotations

import bisect
import json
import threading
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from paramserver import snapshot_names as names
from paramserver.errors import ParamServerError, Reason
from paramserver.gradnorm import NormPart
from paramserver.gradnorm_kernel import GradReader, norm_part
from paramserver.jobconfig import JobConfig
from paramserver.optim.base import Piece, State, Step, views
from paramserver.placement import Span
from paramserver.steps import Decision, Outcome, ShardStats, StepReport
from paramserver.tensor_file import TensorStream
from paramserver_client.codec import (
    BFLOAT16,
    EVAL,
    FLOAT16,
    FLOAT32,
    ITEMSIZE,
    MAX_CHUNK_BYTES,
    TRAIN,
    chunk_elements,
    encode_chunk_message,
)

_TORCH_DTYPE = {FLOAT32: torch.float32, BFLOAT16: torch.bfloat16, FLOAT16: torch.float16}

# torch.frombuffer on an immutable `bytes` warns once per process; we only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


@dataclass(frozen=True)
class Landed:
    """Where a validated chunk landed: `count` elements at local offset `local`."""

    local: int
    count: int


@dataclass
class Staging:
    """A scratch fp32 buffer that one incoming stream fills chunk by chunk.

    Nothing of the shard's state changes while it fills: a stream that turns out
    bad just gives its buffer back.
    """

    buffer: torch.Tensor
    pieces: list[Landed]


@dataclass(frozen=True)
class Contribution:
    """One worker's gradient for one step, validated and complete."""

    worker_id: int
    loss_terms: int
    buffer: torch.Tensor


def wire_bytes(values: torch.Tensor, dtype: int) -> memoryview:
    """The little-endian wire bytes of fp32 host values in `dtype` (a view for fp32)."""
    if dtype != FLOAT32:
        values = values.to(_TORCH_DTYPE[dtype]).view(torch.int16)
    return values.numpy().data.cast("B")


def wire_tensor(data: bytes | memoryview, dtype: int) -> torch.Tensor:
    """A zero-copy, read-only tensor over little-endian wire bytes, in its wire dtype
    (copying it into an fp32 tensor converts bf16/fp16 exactly)."""
    return torch.frombuffer(data, dtype=_TORCH_DTYPE[dtype])


class ShardState:
    """Parameters, gradient buffer and optimizer state of one shard."""

    def __init__(self, config: JobConfig, index: int, spans: Sequence[Span], device: torch.device | None = None) -> None:
        self.config = config
        self.index = index
        self.spans = list(spans)
        self.device = device or torch.device("cpu")
        self.numel = sum(s.length for s in self.spans)
        self._starts = [s.start for s in self.spans]
        self._local_starts: list[int] = []
        pos = 0
        for s in self.spans:
            self._local_starts.append(pos)
            pos += s.length
        self.optimizers = config.build_optimizers()
        """One per parameter group (index 0: the default group)."""
        self.groups = _groups(config, self.spans)
        """Per group: its parameter pieces on this shard; the optimizer runs once per piece."""
        self.schedule = config.build_schedule()
        self.params: torch.Tensor | None = None
        self.opt_state: dict[int, State] = {}
        """Per group with pieces here: flat state tensors over the group's pieces, in order."""
        self.tensor_state: dict[int, State] = {}
        """Per parameter (by index) with a piece here: the rule's own tensors of any shape."""
        self.grad = torch.empty(0)
        self.version = 0
        self.applied = 0
        self.last_report: StepReport | None = None
        self.lock = threading.Lock()
        self._cache: dict[tuple[int, int], tuple[int, list[tuple[int, int, bytes]]]] = {}
        self._free: list[torch.Tensor] = []
        self._capture_buffers: dict[str, torch.Tensor] = {}
        self._free_lock = threading.Lock()

    @property
    def initialized(self) -> bool:
        """True once parameters were uploaded."""
        return self.params is not None

    # ---- validation -------------------------------------------------------------------

    def check_chunk(self, offset: int, count: int, dtype: int, nbytes: int, index: int) -> int:
        """Validate one chunk; return its local offset. Raises ParamServerError naming the field."""
        if dtype not in ITEMSIZE:
            raise ParamServerError.invalid("chunk.dtype", f"unsupported wire dtype {dtype}", Reason.DTYPE_UNSUPPORTED, chunk_index=index)
        if nbytes > MAX_CHUNK_BYTES:
            raise ParamServerError(
                "RESOURCE_EXHAUSTED",
                Reason.MESSAGE_TOO_LARGE,
                f"chunk.data: {nbytes} bytes is over the {MAX_CHUNK_BYTES}-byte limit per chunk",
                {"field": "chunk.data", "limit": MAX_CHUNK_BYTES, "chunk_index": index},
            )
        if count == 0:
            raise ParamServerError.invalid("chunk.count", "must be > 0", chunk_index=index)
        if nbytes != count * ITEMSIZE[dtype]:
            raise ParamServerError.invalid(
                "chunk.data",
                f"{nbytes} bytes for {count} elements of {ITEMSIZE[dtype]} bytes",
                Reason.LENGTH_MISMATCH,
                chunk_index=index,
            )
        k = bisect.bisect_right(self._starts, offset) - 1
        if k < 0 or offset + count > self.spans[k].end:
            owned = ", ".join(f"[{s.start}, {s.end})" for s in self.spans)
            raise ParamServerError.invalid(
                "chunk.offset",
                f"elements [{offset}, {offset + count}) are not inside this shard's ranges {owned}",
                Reason.CHUNK_OUT_OF_RANGE,
                offset=offset,
                count=count,
                chunk_index=index,
            )
        return self._local_starts[k] + (offset - self.spans[k].start)

    def check_coverage(self, pieces: Sequence[Landed]) -> None:
        """The pieces must cover the shard's local buffer exactly once."""
        pos = 0
        for p in sorted(pieces, key=lambda p: p.local):
            if p.local != pos:
                what = "overlap" if p.local < pos else "gap"
                raise ParamServerError.invalid(
                    "chunks",
                    f"the chunks do not cover this shard's ranges exactly once ({what} at local element {min(pos, p.local)})",
                    Reason.LAYOUT_MISMATCH,
                )
            pos += p.count
        if pos != self.numel:
            raise ParamServerError.invalid(
                "chunks", f"the chunks cover {pos} of this shard's {self.numel} elements", Reason.LAYOUT_MISMATCH
            )

    # ---- staging (any thread; touches no state) ---------------------------------------------

    def stage(self) -> Staging:
        """A scratch buffer for one incoming stream (reused across steps)."""
        with self._free_lock:
            buf = self._free.pop() if self._free else None
        return Staging(buf if buf is not None else torch.empty(self.numel, dtype=torch.float32), [])

    def release(self, buffer: torch.Tensor) -> None:
        """Give a scratch buffer back (at most num_workers + 1 are kept)."""
        if buffer.numel() != self.numel or buffer.device.type != "cpu":
            return
        with self._free_lock:
            if len(self._free) <= self.config.num_workers:
                self._free.append(buffer)

    def write(self, staging: Staging, local: int, count: int, dtype: int, data: bytes | memoryview) -> None:
        """Decode a validated chunk into the staging buffer."""
        staging.buffer[local : local + count].copy_(wire_tensor(data, dtype))
        staging.pieces.append(Landed(local, count))

    # ---- mutation (call under self.lock) ----------------------------------------------

    def load(self, staging: Staging) -> None:
        """Take a complete, validated staging buffer as the initial parameters; version 0."""
        self.params = staging.buffer if self.device.type == "cpu" else staging.buffer.to(self.device)
        self.opt_state, self.tensor_state = self._init_states()
        self.grad = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self.version = 0
        self.applied = 0
        self._cache.clear()

    def reduce(self, contributions: Sequence[Contribution]) -> ShardStats:
        """Sum the workers' gradients (in worker-id order, so the result is deterministic),
        divide by the total loss-term count, and return this shard's scalars."""
        assert self.params is not None
        ordered = sorted(contributions, key=lambda c: c.worker_id)
        n = sum(c.loss_terms for c in ordered)
        total = ordered[0].buffer  # G_0 + G_1 + ... summed into worker 0's scratch buffer
        for c in ordered[1:]:
            total.add_(c.buffer)
            self.release(c.buffer)
        if self.device.type == "cpu":
            self.release(self.grad)
            self.grad = total
        else:
            self.grad.copy_(total)
            self.release(total)
        if n == 0:
            return ShardStats(self.index, NormPart(), 0)
        self.grad.div_(n)
        return ShardStats(self.index, self.norm_part(lambda a, count: self.grad[a : a + count]), n)

    def norm_part(self, read: GradReader) -> NormPart:
        """This shard's share of the global norm of the gradient `read` gives (see gradnorm). The
        parameters the next update does not train (a rule freezes them, as LISA does) count as
        zeros: like frozen torch parameters, whose grad is None, they are outside the clip norm
        and the non-finite check."""
        spans = [(s.start, s.length) for s in self.spans]
        return norm_part(read, spans, self.config.total_elements, self.frozen_ranges(), self.device)

    def frozen_ranges(self) -> list[tuple[int, int]]:
        """[start, end) local ranges of the parameters the next update does not train, in order."""
        out: list[tuple[int, int]] = []
        for g, group in self.groups.items():
            opt = self.optimizers[g]
            if opt.freezes:
                out += [(a, a + n) for (a, n), p in zip(group.local, group.pieces, strict=True) if not opt.trains(p.param, self.applied)]
        return sorted(out)

    def apply(self, decision: Decision) -> StepReport:
        """Apply (or skip) the decided step and publish the next version."""
        assert self.params is not None
        factor = self.schedule(self.applied)
        lr = self.optimizers[0].lr * factor
        if decision.apply:
            if decision.clip_coef != 1.0:
                self.grad.mul_(decision.clip_coef)
            for g, group in self.groups.items():
                opt = self.optimizers[g]
                step = Step(opt.lr * factor, group.pieces, self.tensor_state, self.applied)
                opt.update(views(self.params, group.local), views(self.grad, group.local), self.opt_state[g], step)
            self.applied += 1
            outcome = Outcome.APPLIED
        else:
            outcome = Outcome.SKIPPED
        report = StepReport(decision.step, outcome, decision.skip_reason, decision.grad_norm, decision.clip_coef, lr, decision.loss_terms)
        self.version = decision.step + 1
        self.last_report = report
        self._cache.clear()
        return report

    # ---- reading (call under self.lock) -------------------------------------------------

    #: Whether snapshots are written under the lock from :meth:`stream_snapshot` (a spilled shard)
    #: instead of captured to host memory and written in the background.
    streams_snapshots = False

    def publication(self, dtype: int, ranges: Sequence[Span] = (), point: int = TRAIN) -> tuple[int, Iterable[tuple[int, int, bytes]]]:
        """(version, [(global offset, count, message)]) of the current parameters in `dtype`.

        Each message is a serialised ``PullParametersResponse{chunk}``, built with one
        copy of the data. The whole-shard encoding is cached per dtype and point until the
        next version, so several workers pulling the same version share one encoding. With
        `point` EVAL, groups whose rule has an evaluation point (Schedule-Free) serve it.
        """
        assert self.params is not None
        key = (dtype, point)
        if not ranges:
            cached = self._cache.get(key)
            if cached is not None and cached[0] == self.version:
                return cached
        wanted = list(ranges) or self.spans
        host = self.params if point != EVAL else self.eval_params()
        host = host if host.device.type == "cpu" else host.cpu()
        step = chunk_elements(dtype)
        out: list[tuple[int, int, bytes]] = []
        for r in sorted(wanted):
            local = self._local(r)
            data = wire_bytes(host[local : local + r.length], dtype)
            size = ITEMSIZE[dtype]
            for i in range(0, r.length, step):
                n = min(step, r.length - i)
                out.append((r.start + i, n, encode_chunk_message(r.start + i, n, dtype, data[i * size : (i + n) * size])))
        result = (self.version, out)
        if not ranges:
            self._cache[key] = result
        return result

    def frozen_parameters(self) -> list[int]:
        """Indices of the parameters with a piece here that the next update does not train."""
        out = []
        for g, group in self.groups.items():
            opt = self.optimizers[g]
            if opt.freezes:
                out += [p.param.index for p in group.pieces if not opt.trains(p.param, self.applied)]
        return sorted(set(out))

    def eval_params(self) -> torch.Tensor:
        """The parameters at the evaluation point (the parameters themselves unless some group's
        rule has one, e.g. Schedule-Free's x); a copy when it differs."""
        assert self.params is not None
        groups = [(g, group) for g, group in self.groups.items() if self.optimizers[g].eval_keys]
        if not groups:
            return self.params
        out = self.params.clone()
        for g, group in groups:
            self.optimizers[g].eval_point(views(out, group.local), self.opt_state[g], group.segments)
        return out

    def _local(self, r: Span) -> int:
        k = bisect.bisect_right(self._starts, r.start) - 1
        if k < 0 or r.end > self.spans[k].end or r.length == 0:
            owned = ", ".join(f"[{s.start}, {s.end})" for s in self.spans)
            raise ParamServerError.invalid(
                "ranges", f"[{r.start}, {r.end}) is not inside this shard's ranges {owned}", Reason.CHUNK_OUT_OF_RANGE
            )
        return self._local_starts[k] + (r.start - self.spans[k].start)

    def capture(self) -> dict[str, torch.Tensor]:
        """Host copies of the parameters and optimizer state: the only pause of a snapshot
        (call under self.lock). Scalars stay 0-d; flat tensors cover the shard's spans in order.

        The host buffers are kept and reused by the next capture (a copy into memory already
        faulted in is ~5x faster than into fresh pages), at the price of one host copy of the
        shard's state kept between snapshots. Do not hold the result across two captures.
        """
        assert self.params is not None
        sources = {names.PARAMS: self.params, **self._state_tensors()}
        out: dict[str, torch.Tensor] = {}
        for name, src in sources.items():
            buf = self._capture_buffers.get(name)
            if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
                buf = torch.empty(src.shape, dtype=src.dtype, device="cpu")
                self._capture_buffers[name] = buf
            buf.copy_(src.detach())
            out[name] = buf
        return out

    def restore(self, source: SnapshotSource, version: int, applied: int) -> None:
        """Load parameters and optimizer state for this shard's spans from a snapshot taken with
        any shard count (resharding is a range copy of the flat tensors)."""

        def flat(name: str) -> torch.Tensor:
            out = np.empty(self.numel, dtype=np.float32)
            pos = 0
            for s in self.spans:
                source.read(name, s.start, s.length, out[pos : pos + s.length])
                pos += s.length
            return torch.from_numpy(out).to(self.device)

        self.params = flat(names.PARAMS)
        states, tensors = self._init_states()
        stored = {n: p for n in source.names() if (p := names.parse(n)) is not None}
        for g, group in self.groups.items():
            loaded = set()
            for name in sorted(n for n, p in stored.items() if p.kind == "group" and p.index == g):
                key = stored[name].key
                loaded.add(key)
                if source.is_scalar(name):
                    states[g][key] = torch.from_numpy(np.array(source.scalar(name))).to(self.device)
                    continue
                out = np.empty(group.numel, dtype=np.float32)
                for (start, length), (pos, _) in zip(group.global_pieces, group.segments, strict=True):
                    source.read(name, start, length, out[pos : pos + length])
                states[g][key] = torch.from_numpy(out).to(self.device)
            self.optimizers[g].restored(states[g], loaded)
        for index, st in tensors.items():
            for name in sorted(n for n, p in stored.items() if p.kind == "param" and p.index == index):
                key = stored[name].key
                value = torch.from_numpy(np.array(source.tensor(name))).to(self.device)
                if key in st and (st[key].shape != value.shape or st[key].dtype != value.dtype):
                    raise ParamServerError(
                        "DATA_LOSS",
                        Reason.SNAPSHOT_CORRUPT,
                        f"{name}: {tuple(value.shape)} {value.dtype} in the snapshot, {tuple(st[key].shape)} {st[key].dtype} expected",
                        {"tensor": name},
                    )
                st[key] = value
        self.tensor_state = tensors
        self.opt_state = states
        self.grad = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self.version = version
        self.applied = applied
        self._cache.clear()

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters and optimizer state on the host (for tests and snapshots)."""
        assert self.params is not None
        out = {names.PARAMS: self.params.detach().cpu().clone()}
        for k, v in self._state_tensors().items():
            out[k] = v.detach().cpu().clone()
        return out

    def _init_states(self) -> tuple[dict[int, State], dict[int, State]]:
        """(flat state per group, per-parameter state by parameter index)."""
        flat = {
            g: self.optimizers[g].init_state(torch.empty(group.numel, dtype=torch.float32, device=self.device))
            for g, group in self.groups.items()
        }
        tensors = {
            p.param.index: self.optimizers[g].init_tensor_state(p, self.device) for g, group in self.groups.items() for p in group.pieces
        }
        return flat, tensors

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer state by snapshot name: "state.GROUP.KEY" for a group's flat tensors and
        scalars, "param.INDEX.KEY" for a parameter's own tensors."""
        out = {names.group_state(g, k): v for g, st in self.opt_state.items() for k, v in st.items()}
        out.update({names.param_state(i, k): v for i, st in self.tensor_state.items() for k, v in st.items()})
        return out

    def stream_snapshot(self) -> dict[str, np.ndarray | TensorStream]:
        """The snapshot file's tensors as streams (only for shards that stream their snapshots)."""
        raise NotImplementedError("an in-memory shard captures its state; see capture()")

    def memory(self) -> dict[str, float]:
        """Bytes of the shard's state in memory (all of it: nothing is spilled)."""
        state = sum(v.numel() * v.element_size() for v in self._state_tensors().values())
        params = self.params.numel() * 4 if self.params is not None else 0
        return {"budget_bytes": float(self.config.shard_memory_budget_bytes), "resident_bytes": float(params + state), "buffer_bytes": 0.0,
                "spilled_bytes": 0.0, "read_bytes": 0.0, "written_bytes": 0.0, "read_bytes_per_second": 0.0,
                "write_bytes_per_second": 0.0}  # fmt: skip

    def close(self) -> None:
        """Release what the shard holds outside its memory (nothing here)."""
        return None

    def snapshot_metadata(self) -> dict[str, str]:
        """Where each group's flat state tensors lie in the flat space: "ranges.GROUP" is a JSON
        list of [start, length] pieces, in the order of the tensor's elements."""
        return {names.group_ranges(g): json.dumps([list(p) for p in group.global_pieces]) for g, group in self.groups.items()}


class SnapshotSource(Protocol):
    """What ShardState.restore reads (see snapshot_store.SnapshotReader)."""

    def names(self) -> set[str]:
        """Tensor names."""
        ...

    def is_scalar(self, name: str) -> bool:
        """True for 0-d tensors (equal on every shard)."""
        ...

    def scalar(self, name: str) -> np.ndarray:
        """A 0-d tensor."""
        ...

    def read(self, name: str, start: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements [start, start + length) of a flat tensor."""
        ...

    def tensor(self, name: str) -> np.ndarray:
        """A whole tensor as saved (a parameter's own state; equal in every file that has it)."""
        ...


@dataclass
class _Group:
    """One parameter group's pieces on a shard (a piece = the part of one parameter here)."""

    local: list[tuple[int, int]]
    """(start, length) in the shard's local buffer."""
    pieces: list[Piece]
    """The pieces, with their parameters and their offsets in the group's flat state tensors."""
    global_pieces: list[tuple[int, int]]
    """(start, length) in the flat parameter space."""

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(start, length) in the group's flat state tensors (the pieces laid end to end)."""
        return [(p.segment, p.length) for p in self.pieces]

    @property
    def numel(self) -> int:
        """Elements of the group on this shard."""
        return sum(n for _, n in self.local)


def _groups(config: JobConfig, spans: Sequence[Span]) -> dict[int, _Group]:
    """Every group that has pieces on this shard, with its pieces in local order."""
    groups: dict[int, _Group] = {}
    assignment = config.assign()
    layout = config.layout()
    params = config.params()
    local = 0
    for span in spans:
        for lay, param, g in zip(layout, params, assignment, strict=True):
            a, b = max(span.start, lay.offset), min(span.end, lay.offset + lay.numel)
            if a < b:
                group = groups.setdefault(g, _Group([], [], []))
                group.pieces.append(Piece(param, a - lay.offset, b - a, group.numel))
                group.local.append((local + a - span.start, b - a))
                group.global_pieces.append((a, b - a))
        local += span.length
    return dict(sorted(groups.items()))
