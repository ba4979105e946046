"""A shard's state: fp32 master parameters and optimizer state for its spans, over tiles that live in
memory or in spill files (pure torch and files; no Ray, no gRPC, no wire encoding).

The runtime (shard_runtime.py) calls these methods from worker threads and serialises them with
:attr:`ShardState.lock`; it decodes what arrives into gradient buffers and encodes what it
publishes: the state takes and gives (offset, fp32 tensor) blocks.

Where things live (:class:`Storage` and the job's ``shard_memory_budget_bytes`` decide, once):

* **Tiles** (:class:`paramserver.spill.TileStore`, one per parameter group): the columns
  ``params`` and the group's flat optimizer state (``exp_avg``, ...) over tiles, each a run of the
  group's pieces. When everything fits (no budget, or a budget above what the shard holds in
  memory) a group is one resident tile on the shard's device, and the rule runs once over all its
  pieces. Otherwise pieces are cut into tiles of at most :data:`TILE` elements on multiples of
  ``placement.ALIGN`` from the piece's start (whole pieces for rules that need whole tensors);
  tiles stay resident, in order, while they fit the budget, the rest live in a preallocated
  O_DIRECT file streamed with read-ahead and write-behind (ZeRO-Infinity's pipelined swap).
* **Gradients** (:mod:`paramserver.grad_buffers`): in memory, or in preallocated files.
* **Snapshots**: a resident shard copies its state to host buffers under the lock (the pause);
  a spilled one freezes its tiles (copy-on-write to a side file) and is read while training goes on.
* **Publications**: a resident shard publishes views of its tiles (the runtime encodes them once
  per version, under the lock); a spilled one writes each version's parameters (and evaluation
  point) to one of two publication files during the update, read by pulls outside the lock (a
  pull overtaken by two newer versions is ABORTED).

The rule runs once per tile. When a group has several tiles, its 0-d state (step counters) and a
parameter's own 0-d state are set back before each tile, so every tile sees the counters the
single-tile update sees: the same bits, whatever the tiling (tests: spilled = in memory).
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import json
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from paramserver import snapshot_names as names
from paramserver.errors import ConfigError, ParamServerError, Reason
from paramserver.grad_buffers import GradBuffer, GradPool, file_pool, memory_pool
from paramserver.gradnorm import NormPart
from paramserver.gradnorm_kernel import norm_part
from paramserver.jobconfig import JobConfig
from paramserver.optim.base import Optimizer, Piece, State, Step
from paramserver.placement import Span
from paramserver.shard_types import ShardMemory
from paramserver.spill import FrozenTiles, SpillFile, TileStore
from paramserver.steps import Decision, Outcome, ShardStats, StepReport
from paramserver.tensor_file import TensorStream
from paramserver_client.codec import EVAL, TRAIN

#: Reads a gradient's local ranges as fp32 tensors (views, or filled block buffers).
_Reader = Callable[[Sequence[tuple[int, int]]], list[torch.Tensor]]

# torch.frombuffer on an immutable `bytes` warns once per process; we only read.
warnings.filterwarnings("ignore", message="The given buffer is not writable")

#: Largest tile of a split-able piece when a shard spills, in elements.
TILE = 1 << 20
#: Smallest tile a small budget may force.
MIN_TILE = 1 << 14
#: Elements per block a spilled shard's snapshot reads at a time.
SNAPSHOT_BLOCK = 1 << 18
#: Buffers of a spilled tile store's I/O ring (one read ahead, one being updated, one written behind).
DEPTH = 3
#: The part of a spilled shard's budget kept for block buffers (the reduction's and the update's
#: gradient blocks, a pull's chunk, snapshot blocks) and gRPC's message buffers.
OVERHEAD_BYTES = 96 << 20


@dataclass(frozen=True)
class Storage:
    """Where a shard may keep its state."""

    budget: int = 0
    """Bytes of memory for parameters and optimizer state (0 = unlimited: everything resident)."""
    directory: Path | None = None
    """Where spill files go when the state does not fit the budget."""
    tile: int = TILE
    """Largest tile of a split-able piece when spilling."""
    overhead: int = OVERHEAD_BYTES
    """The part of the budget kept for block and message buffers when spilling."""
    spill: bool | None = None
    """None: spill when the in-memory footprint exceeds the budget; True or False: as told (tests)."""
    device_budget: int = 0
    """Bytes of GPU memory for tiles on a GPU shard (0 = unlimited); the rest live in host memory."""
    stage: bool = False
    """Plan device and host tiers on a CPU shard too, staging host tiles through a copy (tests of
    the GPU tiers on machines without one)."""


@dataclass(frozen=True)
class Landed:
    """Where a validated chunk landed: `count` elements at local offset `local`."""

    local: int
    count: int


@dataclass(frozen=True)
class Contribution:
    """One worker's gradient for one step, validated and complete."""

    worker_id: int
    loss_terms: int
    buffer: GradBuffer
    lease: int = 0
    """The worker's lease when it pushed (the shards agree on (worker, lease) pairs)."""
    lrs: tuple[float, ...] = ()
    """The group lrs the worker sent (empty = the job's schedule)."""


@dataclass(frozen=True)
class Published:
    """What a pull serves: the version and its parameters as (global offset, fp32 values) blocks in
    flat order. When `under_lock`, the blocks are views of the state, valid only while the caller
    holds the lock (encode them there, once per version); otherwise they are read as iterated,
    outside the lock, and raise ABORTED if the version was replaced meanwhile."""

    version: int
    blocks: Iterable[tuple[int, torch.Tensor]]
    under_lock: bool


@dataclass
class _Group:
    """One parameter group's pieces on a shard (a piece = the part of one parameter here)."""

    local: list[tuple[int, int]]
    """(start, length) in the shard's local space."""
    pieces: list[Piece]
    """The pieces, with their parameters and their offsets in the group's flat state."""
    global_pieces: list[tuple[int, int]]
    """(start, length) in the flat parameter space."""

    @property
    def segments(self) -> list[tuple[int, int]]:
        """(start, length) in the group's flat state (the pieces laid end to end)."""
        return [(p.segment, p.length) for p in self.pieces]

    @property
    def numel(self) -> int:
        """Elements of the group on this shard."""
        return sum(n for _, n in self.local)


@dataclass(frozen=True)
class _Tile:
    """A tile: a run of a group's flat state, and the pieces (parts of parameters) in it."""

    segment: int
    """Its first element in the group's flat state."""
    length: int
    pieces: list[Piece]
    """Its pieces, their segments relative to the tile's start."""
    local: list[tuple[int, int]]
    """(start, length) of each piece in the shard's local space."""
    glob: list[tuple[int, int]]
    """(start, length) of each piece in the flat space."""


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


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), from every thread's arena: a spilled
    shard's budget counts what the process holds, not what it uses; and after each reduction the
    step's message buffers, freed in whichever arenas their threads used, would otherwise stay held
    there and add up step after step (bench/bench_fanin.py)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class ShardState:
    """Parameters, gradient buffers and optimizer state of one shard (see the module docstring)."""

    def __init__(self, config: JobConfig, index: int, spans: Sequence[Span], device: torch.device | None = None,
                 storage: Storage | None = None) -> None:  # fmt: skip
        self.config = config
        self.index = index
        self.spans = list(spans)
        self.device = device or torch.device("cpu")
        self.storage = storage or Storage(budget=config.shard_memory_budget_bytes)
        self.numel = sum(s.length for s in self.spans)
        self.total = config.total_elements
        self._starts = [s.start for s in self.spans]
        self._local_starts = list(itertools.accumulate((s.length for s in self.spans), initial=0))[:-1]
        self.optimizers: list[Optimizer] = config.build_optimizers()
        """One per parameter group (index 0: the default group)."""
        self.groups = _groups(config, self.spans)
        """Per group with pieces here: its pieces in local order; the rule runs once per tile."""
        self.schedule = config.build_schedule()
        self.version = 0
        self.applied = 0
        self.last_report: StepReport | None = None
        self.lock = threading.Lock()
        self.opt_state: dict[int, State] = {}
        """Per group: its 0-d state (counters); the flat state lives in the tiles."""
        self.tensor_state: dict[int, State] = {}
        """Per parameter (by index) with a piece here: the rule's own tensors of any shape."""
        self._loaded = False
        self._grad: GradBuffer | None = None
        self._capture_buffers: dict[str, torch.Tensor] = {}
        self._frozen: dict[int, FrozenTiles] = {}
        self.columns: dict[int, list[str]] = {}
        self.scalar_keys: dict[int, list[str]] = {}
        for g in self.groups:
            template = self.optimizers[g].init_state(torch.zeros(1))
            self.columns[g] = [names.PARAMS, *(k for k, v in template.items() if v.dim() == 1)]
            self.scalar_keys[g] = [k for k, v in template.items() if v.dim() == 0]
        self.tensor_bytes = sum(
            v.numel() * v.element_size()
            for g, grp in self.groups.items()
            for p in grp.pieces
            for v in self.optimizers[g].init_tensor_state(p, torch.device("cpu")).values()
        )
        spill = self.storage.spill
        self.spilled = spill if spill is not None else bool(self.storage.budget) and in_memory_bytes(self) > self.storage.budget
        """Whether tiles, gradients and publications use spill files (the host budget is exceeded)."""
        self.device_tiers = self.storage.device_budget > 0 and (self.device.type != "cpu" or self.storage.stage)
        """Whether tiles are placed on the device within its budget, the rest in host memory."""
        over_device = self.device_tiers and device_bytes(self) > self.storage.device_budget
        self.stores: dict[int, TileStore] = {}
        self._pubs: list[_PublicationFiles] = []
        self._pub = 0
        try:
            if self.spilled or over_device:
                self._plan_tiles()
            else:
                self._plan_resident()
        except BaseException:
            self.close()
            raise

    # ---- storage plans --------------------------------------------------------------------------

    def _plan_resident(self) -> None:
        """Everything in memory: one resident tile per group, gradients in memory."""
        self.tiles = {
            g: [_Tile(0, grp.numel, list(grp.pieces), list(grp.local), list(grp.global_pieces))] for g, grp in self.groups.items()
        }
        for g, grp in self.groups.items():
            self.stores[g] = TileStore(self.columns[g], [(grp.numel, True)], Path("/nonexistent"), DEPTH, device=self.device)
        self.ring_bytes = 0
        self.grads: GradPool = memory_pool(self.numel, self.config.max_members + 1)

    def _plan_tiles(self) -> None:
        """Tiles within the budgets: cut the pieces; in order, each tile goes to the device while it
        fits the device budget (GPU tiers), else to host memory while it fits the host budget, else
        to the spill file."""
        if self.spilled and self.storage.directory is None:
            raise ConfigError("spec.shard_memory_budget_bytes", "this shard has no spill directory")
        for g in self.groups:
            template = self.optimizers[g].init_state(torch.zeros(1))
            if any(v.dim() == 1 and bool(v.any()) for v in template.values()):
                raise ConfigError("spec.shard_memory_budget_bytes", f"the state of {self.optimizers[g].name!r} cannot be spilled")
        budget = self.storage.budget
        ncols = sum(len(c) for c in self.columns.values())
        tile = self.storage.tile
        while self.spilled and tile > MIN_TILE and DEPTH * 4 * tile * ncols > budget // 4:
            tile //= 2
        self.tile = tile
        self.tiles = {}
        for g, group in self.groups.items():
            size = None if self.optimizers[g].whole_tensors else tile
            tiles = []
            for (local, n), piece, (glob, _) in zip(group.local, group.pieces, group.global_pieces, strict=True):
                step = size or n
                for off in range(0, n, step):
                    m = min(step, n - off)
                    tiles.append(
                        _Tile(piece.segment + off, m, [Piece(piece.param, piece.start + off, m, 0)], [(local + off, m)], [(glob + off, m)])
                    )
            self.tiles[g] = tiles
        self.ring_bytes = sum(DEPTH * 4 * len(self.columns[g]) * max(t.length for t in tiles) for g, tiles in self.tiles.items())
        fixed = self.ring_bytes + self.tensor_bytes + self.storage.overhead
        if not self.spilled:
            self.ring_bytes, fixed, budget = 0, 0, 0
        if fixed > budget:
            big = max((t for tiles in self.tiles.values() for t in tiles), key=lambda t: t.length)
            raise ConfigError(
                "spec.shard_memory_budget_bytes",
                f"{budget} bytes is below shard {self.index}'s minimum of {fixed}: I/O rings {self.ring_bytes} "
                f"(largest tile: {big.length} elements of {big.pieces[0].param.name!r}), per-tensor state {self.tensor_bytes}, "
                f"buffers {self.storage.overhead}",
            )
        host_left = budget - fixed if self.spilled else None  # None: host memory is not budgeted
        largest = max(t.length for tiles in self.tiles.values() for t in tiles)
        # the device holds its tiles, one staged record and one staged gradient block, per-tensor state
        device_left = self.storage.device_budget - 4 * largest * (ncols + 1) - self.tensor_bytes if self.device_tiers else 0
        if self.device_tiers and device_left < 0:
            raise ConfigError(
                "spec.shard_device_memory_budget_bytes",
                f"{self.storage.device_budget} bytes is below shard {self.index}'s minimum of "
                f"{self.storage.device_budget - device_left} (one staged tile of {largest} elements, per-tensor state)",
            )
        directory = self.storage.directory or Path("/nonexistent")
        if self.spilled:
            directory.mkdir(parents=True, exist_ok=True)
        for g, tiles in self.tiles.items():  # in order: the device while a tile fits, then host memory, then the file
            per = 4 * len(self.columns[g])
            spec, host = [], []
            for t in tiles:
                size = t.length * per
                on_device = self.device_tiers and size <= device_left
                device_left -= size if on_device else 0
                in_host = not on_device and (host_left is None or size <= host_left)
                if in_host and host_left is not None:
                    host_left -= size
                spec.append((t.length, on_device or in_host))
                host.append(in_host and self.device_tiers)
            self.stores[g] = TileStore(
                self.columns[g], spec, directory / f"shard-{self.index}-group-{g}.spill", DEPTH, device=self.device, host=host,
                stage=self.device_tiers or self.device.type != "cpu",
            )  # fmt: skip
        if not self.spilled:
            self.grads = memory_pool(self.numel, self.config.max_members + 1)
            return
        has_eval = any(self.optimizers[g].eval_keys for g in self.groups)
        for k in range(2):
            train = self._file(f"pub-{k}")
            self._pubs.append(_PublicationFiles(train, self._file(f"pub-{k}-eval") if has_eval else None))
        self.grads = file_pool(directory, f"shard-{self.index}", self.numel, self.config.max_members + 1)

    def _file(self, name: str) -> SpillFile:
        assert self.storage.directory is not None
        return SpillFile(self.storage.directory / f"shard-{self.index}-{name}.spill", 4 * self.numel, direct=False)

    # ---- status -----------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """True once parameters were uploaded or restored."""
        return self._loaded

    def memory(self) -> ShardMemory:
        """Budget, resident and spilled bytes, and the spill files' traffic and I/O rates."""
        files = [s.file for s in self.stores.values() if s.file is not None]
        busy_r, busy_w = sum(f.stats.read_seconds for f in files), sum(f.stats.write_seconds for f in files)
        read, written = sum(f.stats.bytes_read for f in files), sum(f.stats.bytes_written for f in files)
        return ShardMemory(
            budget_bytes=self.storage.budget,
            resident_bytes=sum(s.resident_bytes for s in self.stores.values()) + self.tensor_bytes,
            buffer_bytes=self.ring_bytes + (self.storage.overhead if self.spilled else 0),
            spilled_bytes=sum(s.spilled_bytes for s in self.stores.values()),
            read_bytes=read,
            written_bytes=written,
            read_bytes_per_second=read / busy_r if busy_r else 0.0,
            write_bytes_per_second=written / busy_w if busy_w else 0.0,
        )

    # ---- validation -------------------------------------------------------------------------------

    def local_of(self, offset: int, count: int) -> int | None:
        """The local offset of flat elements [offset, offset + count), or None if they are not all
        inside one of this shard's spans."""
        k = bisect.bisect_right(self._starts, offset) - 1
        if k < 0 or count <= 0 or offset + count > self.spans[k].end:
            return None
        return self._local_starts[k] + (offset - self.spans[k].start)

    def owned(self) -> str:
        """This shard's spans, for messages."""
        return ", ".join(f"[{s.start}, {s.end})" for s in self.spans)

    def check_coverage(self, pieces: Sequence[Landed]) -> None:
        """The pieces must cover the shard's local space exactly once."""
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

    # ---- mutation (call under self.lock) -----------------------------------------------------------

    def load(self, buffer: GradBuffer) -> None:
        """Take a complete, validated buffer as the initial parameters; version 0."""
        for g, store in self.stores.items():
            for tile in store.stream():
                info = self.tiles[g][tile.index]
                for piece, (local, n) in zip(info.pieces, info.local, strict=True):
                    tile.columns[names.PARAMS][piece.segment : piece.segment + n].copy_(buffer.read([(local, n)])[0])
                for c in self.columns[g][1:]:
                    tile.columns[c].zero_()
        self.grads.release(buffer)
        self._init_small_state()
        self.version, self.applied = 0, 0
        self._publish()
        self._loaded = True

    def _init_small_state(self) -> None:
        """0-d group state and per-parameter state, as the rules create them."""
        self.opt_state = {}
        for g in self.groups:
            template = self.optimizers[g].init_state(torch.zeros(1, device=self.device))
            self.opt_state[g] = {k: template[k] for k in self.scalar_keys[g]}
        self.tensor_state = {
            p.param.index: self.optimizers[g].init_tensor_state(p, self.device) for g, grp in self.groups.items() for p in grp.pieces
        }

    def reduce(self, contributions: Sequence[Contribution], *, keep: bool = False) -> ShardStats:
        """Sum the workers' gradients in worker-id order (deterministic) into the step's gradient
        buffer, divide by the total loss-term count, and return this shard's scalars. The
        contributions' buffers are given back, unless `keep` (the runtime keeps them until the
        coordinator agrees on the set of contributions: see :meth:`settle`)."""
        ordered = sorted(contributions, key=lambda c: c.worker_id)
        n = sum(c.loss_terms for c in ordered)
        if self._grad is not None:
            self.grads.release(self._grad)
        total = self._grad = self.grads.acquire()
        total.assign_sum([c.buffer for c in ordered], n)
        if not keep:
            self.settle(ordered)
        contributors = tuple((c.worker_id, c.lease) for c in ordered)
        lrs = tuple(sorted({c.lrs for c in ordered}))
        if n == 0:
            return ShardStats(self.index, NormPart(), 0, contributors, lrs=lrs)
        stats = ShardStats(self.index, self.norm_part(total), n, contributors, lrs=lrs)
        trim_heap()  # the step's transport buffers are free now: give them back (see trim_heap)
        return stats

    def settle(self, contributions: Sequence[Contribution]) -> None:
        """Give back the buffers of reduced contributions (their sum is the step's gradient)."""
        for c in contributions:
            self.grads.release(c.buffer)

    def step_gradient(self) -> GradBuffer | None:
        """The step's reduced gradient (G / N) once reduced, for inspection (optimizer health)."""
        return self._grad

    def set_gradient(self, local: torch.Tensor) -> None:
        """Make `local` (this shard's elements, local order) the step's reduced gradient, without
        a reduction (benchmarks of the update alone)."""
        if self._grad is None:
            self._grad = self.grads.acquire()
        self._grad.write(0, local)

    def norm_part(self, grad: GradBuffer) -> NormPart:
        """This shard's share of the global norm of `grad` (see gradnorm). The parameters the next
        update does not train (a rule freezes them, as LISA does) count as zeros: like frozen torch
        parameters, whose grad is None, they are outside the clip norm and the non-finite check."""
        spans = [(s.start, s.length) for s in self.spans]
        return norm_part(lambda a, count: grad.read([(a, count)])[0], spans, self.total, self.frozen_ranges(), self.device)

    def frozen_ranges(self) -> list[tuple[int, int]]:
        """[start, end) local ranges of the parameters the next update does not train, in order."""
        out: list[tuple[int, int]] = []
        for g, group in self.groups.items():
            opt = self.optimizers[g]
            if opt.freezes:
                out += [(a, a + n) for (a, n), p in zip(group.local, group.pieces, strict=True) if not opt.trains(p.param, self.applied)]
        return sorted(out)

    def apply(self, decision: Decision) -> StepReport:
        """Apply (or skip) the decided step and publish the next version. The reduced gradient is
        kept (the next reduction gives it back), so the same step can be timed again (benchmarks)."""
        factor = self.schedule(self.applied)
        lrs = decision.lrs or tuple(opt.lr * factor for opt in self.optimizers)  # the loop's lrs, else the schedule's
        if decision.apply:
            assert self._grad is not None
            grad = self._grad
            if self.device_tiers or (self.device.type != "cpu" and self.spilled):  # the gradient tile by tile

                def read(ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
                    return [t.to(self.device) for t in grad.read(ranges)]
            elif self.device.type != "cpu":  # one copy of the whole gradient to the device
                on_device = grad.read([(0, self.numel)])[0].to(self.device)

                def read(ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
                    return [on_device[a : a + n] for a, n in ranges]
            else:
                read = grad.read
            pub = self._next_publication()
            for g, store in self.stores.items():
                self._update_group(g, store, read, decision.clip_coef, lrs[g], pub)
            self.applied += 1
            outcome = Outcome.APPLIED
            self._pub = 1 - self._pub if pub is not None else self._pub
        else:
            outcome = Outcome.SKIPPED
        if self.spilled:
            trim_heap()
        report = StepReport(
            decision.step, outcome, decision.skip_reason, decision.grad_norm, decision.clip_coef, lrs[0], decision.loss_terms,
            decision.workers, decision.missing,
        )  # fmt: skip
        self.version = decision.step + 1
        self.last_report = report
        return report

    def _update_group(self, g: int, store: TileStore, read: _Reader, clip_coef: float, lr: float, pub: _PublicationFiles | None) -> None:
        opt, scalars = self.optimizers[g], self.opt_state[g]
        tiles = self.tiles[g]
        several = len(tiles) > 1
        if several:  # each tile sees the counters as they were before the update
            shared = {k: v.clone() for k, v in scalars.items()}
            own = {
                i: {k: v.clone() for k, v in self.tensor_state[i].items() if v.dim() == 0}
                for i in {p.param.index for t in tiles for p in t.pieces}
            }
        frozen = self._frozen.get(g)
        for tile in store.stream():
            info = tiles[tile.index]
            if frozen is not None:  # a snapshot is reading this version: keep a copy of the tile first
                frozen.before_update(tile.index, tile.record)
            if several:
                for k, v in shared.items():
                    scalars[k].copy_(v)
                for piece in info.pieces:
                    for k, v in own[piece.param.index].items():
                        self.tensor_state[piece.param.index][k].copy_(v)
            grads = read(info.local)
            if clip_coef != 1.0:
                for gr in grads:
                    gr.mul_(clip_coef)
            params = tile.columns[names.PARAMS]
            state: State = {**{c: tile.columns[c] for c in self.columns[g][1:]}, **scalars}
            opt.update(
                [params[p.segment : p.segment + p.length] for p in info.pieces],
                grads,
                state,
                Step(lr, info.pieces, self.tensor_state, self.applied),
            )
            if pub is not None:
                self._publish_tile(pub, g, info, tile.columns)  # in the same pass: no second read

    # ---- publications --------------------------------------------------------------------------

    def _next_publication(self) -> _PublicationFiles | None:
        """The publication file the next version goes to (the one not being served), if any."""
        if not self._pubs:
            return None
        pub = self._pubs[1 - self._pub]
        pub.generation += 1  # a pull still reading it (two versions old) sees this and aborts
        return pub

    def _eval(self, g: int, info: _Tile, columns: dict[str, torch.Tensor]) -> torch.Tensor:
        """The evaluation point of a tile's parameters (a copy; the parameters when the rule has none)."""
        params = columns[names.PARAMS]
        opt = self.optimizers[g]
        if not opt.eval_keys:
            return params
        x = params.clone()
        state = {**{c: columns[c] for c in self.columns[g][1:]}, **self.opt_state[g]}
        opt.eval_point([x[p.segment : p.segment + p.length] for p in info.pieces], state, [(p.segment, p.length) for p in info.pieces])
        return x

    def _publish_tile(self, pub: _PublicationFiles, g: int, info: _Tile, columns: dict[str, torch.Tensor]) -> None:
        params = columns[names.PARAMS]
        x = self._eval(g, info, columns) if pub.files[EVAL] is not pub.files[TRAIN] else params
        for piece, (local, n) in zip(info.pieces, info.local, strict=True):
            pub.files[TRAIN].write_from(4 * local, params[piece.segment : piece.segment + n].cpu().numpy().view(np.uint8))
            if x is not params:
                pub.files[EVAL].write_from(4 * local, x[piece.segment : piece.segment + n].cpu().numpy().view(np.uint8))

    def _publish(self) -> None:
        """After a load or a restore: write the current parameters to the next publication file (if
        this shard publishes through files; updates publish tile by tile as they go)."""
        pub = self._next_publication()
        if pub is None:
            return
        for g, store in self.stores.items():
            for tile in store.stream(write=False):
                self._publish_tile(pub, g, self.tiles[g][tile.index], tile.columns)
        self._pub = 1 - self._pub

    def publication(self, ranges: Sequence[Span] = (), point: int = TRAIN) -> Published:
        """The current version's parameters (at `point`: EVAL serves Schedule-Free's x) in flat
        order, all of this shard's or the requested `ranges` (see :class:`Published`)."""
        wanted = []
        for r in sorted(ranges) if ranges else self.spans:
            local = self.local_of(r.start, r.length)
            if local is None:
                raise ParamServerError.invalid(
                    "ranges", f"[{r.start}, {r.end}) is not inside this shard's ranges {self.owned()}", Reason.CHUNK_OUT_OF_RANGE
                )
            wanted.append((r.start, local, r.length))
        if self._pubs:
            return Published(self.version, self._read_publication(wanted, point), False)
        return Published(self.version, self._resident_blocks(wanted, point), True)

    def _resident_blocks(self, wanted: list[tuple[int, int, int]], point: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Views of the resident parameters (or evaluation point) over the wanted local ranges, in order."""
        runs: list[tuple[int, int, torch.Tensor]] = []  # (local start, length, values) of every piece
        for g, store in self.stores.items():
            for tile in store.stream(write=False):
                info = self.tiles[g][tile.index]
                values = self._eval(g, info, tile.columns) if point == EVAL else tile.columns[names.PARAMS]
                if store.stage:  # a staged tile's views are reused by the next one: keep a host copy
                    values = values.to("cpu", copy=True)
                runs += [(local, n, values[p.segment : p.segment + n]) for p, (local, n) in zip(info.pieces, info.local, strict=True)]
        runs.sort(key=lambda r: r[0])
        starts = [r[0] for r in runs]
        for glob, local, length in wanted:
            k = bisect.bisect_right(starts, local) - 1
            pos = local
            while pos < local + length:
                a, n, values = runs[k]
                m = min(a + n, local + length) - pos
                yield glob + pos - local, values[pos - a : pos - a + m]
                pos += m
                k += 1

    def _read_publication(self, wanted: list[tuple[int, int, int]], point: int) -> Iterator[tuple[int, torch.Tensor]]:
        pub = self._pubs[self._pub]
        generation, version = pub.generation, self.version
        f = pub.files[EVAL if point == EVAL else TRAIN]
        block = 1 << 18
        buf = torch.empty(block)
        for glob, local, length in wanted:
            for i in range(0, length, block):
                n = min(block, length - i)
                f.read_into(4 * (local + i), buf[:n].numpy().view(np.uint8))
                if pub.generation != generation:
                    raise ParamServerError(
                        "ABORTED",
                        Reason.STEP_ALREADY_APPLIED,
                        f"version {version} was replaced while it was being read; pull again (now {self.version})",
                        {"current_version": self.version},
                    )
                yield glob + i, buf[:n]

    def frozen_parameters(self) -> list[int]:
        """Indices of the parameters with a piece here that the next update does not train."""
        out = []
        for g, group in self.groups.items():
            opt = self.optimizers[g]
            if opt.freezes:
                out += [p.param.index for p in group.pieces if not opt.trains(p.param, self.applied)]
        return sorted(set(out))

    # ---- snapshots ---------------------------------------------------------------------------------

    def open_snapshot(self) -> dict[str, np.ndarray | TensorStream]:
        """The snapshot's tensors at the current version (call under self.lock; write them without
        it; then call :meth:`close_snapshot`). A resident shard copies its state to host buffers
        now (the pause). A spilled one freezes its tiles instead: the tensors stream from the tiles
        as they were, while the next steps update them (a tile is copied to a side file just before
        its first update, unless the snapshot already read it for the last time); the pause is the
        copy of the 0-d and per-parameter state."""
        if not self.spilled:
            return {k: v.numpy() for k, v in self.capture().items()}
        assert self.storage.directory is not None
        block = SNAPSHOT_BLOCK
        reads = {
            g: {
                k: sum(-(-p.length // block) for p in t.pieces) + (len(self.columns[g]) - 1) * -(-t.length // block)
                for k, t in enumerate(tiles)
            }
            for g, tiles in self.tiles.items()
        }
        frozen = {
            g: FrozenTiles(store, self.storage.directory / f"shard-{self.index}-group-{g}.frozen", reads[g])
            for g, store in self.stores.items()
        }
        self._frozen = frozen
        order = sorted(
            (loc, g, k, p)
            for g, tiles in self.tiles.items()
            for k, t in enumerate(tiles)
            for p, (loc, _) in zip(t.pieces, t.local, strict=True)
        )

        def params() -> Iterator[memoryview]:
            buf = np.empty(block, dtype=np.float32)
            for _, g, k, p in order:
                for off in range(0, p.length, block):
                    m = min(block, p.length - off)
                    yield frozen[g].read(k, names.PARAMS, p.segment + off, m, buf).data.cast("B")

        def column(g: int, c: str) -> TensorStream:
            def blocks() -> Iterator[memoryview]:
                buf = np.empty(block, dtype=np.float32)
                for k, t in enumerate(self.tiles[g]):
                    for off in range(0, t.length, block):
                        m = min(block, t.length - off)
                        yield frozen[g].read(k, c, off, m, buf).data.cast("B")

            return TensorStream("F32", (self.groups[g].numel,), blocks)

        tensors: dict[str, np.ndarray | TensorStream] = {names.PARAMS: TensorStream("F32", (self.numel,), params)}
        for g in self.groups:
            for c in self.columns[g][1:]:
                tensors[names.group_state(g, c)] = column(g, c)
            for k, v in self.opt_state[g].items():
                tensors[names.group_state(g, k)] = v.detach().cpu().numpy().copy()
        for i, st in self.tensor_state.items():
            for k, v in st.items():
                tensors[names.param_state(i, k)] = v.detach().cpu().numpy().copy()
        return tensors

    def close_snapshot(self) -> int:
        """End the snapshot opened last (any thread): stop copying tiles aside, delete the side
        files; the bytes that were copied aside."""
        frozen, self._frozen = self._frozen, {}
        for f in frozen.values():
            f.close()
        return sum(f.copied_bytes for f in frozen.values())

    def capture(self, buffers: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Host copies of the parameters and optimizer state, by snapshot name: the only pause of a
        snapshot (call under self.lock). "params" covers the shard's spans in order, a group's flat
        state its pieces in order; scalars stay 0-d.

        The host buffers are kept and reused by the next capture (a copy into memory already
        faulted in is ~5x faster than into fresh pages), at the price of one host copy of the
        shard's state kept between snapshots. Do not hold the result across two captures.
        `buffers`: another set of such buffers (replicas keep their own, so that a snapshot and a
        replica never share one).
        """
        out: dict[str, torch.Tensor] = {}
        kept = self._capture_buffers if buffers is None else buffers

        def buffer(name: str, like: torch.Tensor) -> torch.Tensor:
            buf = kept.get(name)
            if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
                buf = torch.empty(like.shape, dtype=like.dtype, device="cpu")
                kept[name] = buf
            out[name] = buf
            return buf

        params = buffer(names.PARAMS, torch.empty(self.numel))
        for g, store in self.stores.items():
            flats = {c: buffer(names.group_state(g, c), torch.empty(self.groups[g].numel)) for c in self.columns[g][1:]}
            for tile in store.stream(write=False):
                info = self.tiles[g][tile.index]
                for p, (local, n) in zip(info.pieces, info.local, strict=True):
                    params[local : local + n].copy_(tile.columns[names.PARAMS][p.segment : p.segment + n])
                for c, flat in flats.items():
                    flat[info.segment : info.segment + info.length].copy_(tile.columns[c])
            for k, v in self.opt_state[g].items():
                buffer(names.group_state(g, k), v).copy_(v)
        for i, st in self.tensor_state.items():
            for k, v in st.items():
                buffer(names.param_state(i, k), v).copy_(v)
        return out

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the parameters and optimizer state on the host, by snapshot name (tests, inspection)."""
        return {k: v.clone() for k, v in self.capture().items()}

    def restore(self, source: SnapshotSource, version: int, applied: int) -> None:
        """Load parameters and optimizer state for this shard's tiles from a snapshot taken with
        any shard count and any memory budget (resharding is a range copy)."""
        stored = {n: p for n in source.names() if (p := names.parse(n)) is not None}
        self._init_small_state()
        for g, store in self.stores.items():
            keys = {p.key for n, p in stored.items() if p.kind == "group" and p.index == g}
            loaded = keys & set(self.columns[g][1:] + self.scalar_keys[g])
            for tile in store.stream():
                info = self.tiles[g][tile.index]
                for piece, (glob, n) in zip(info.pieces, info.glob, strict=True):
                    dst = tile.columns[names.PARAMS][piece.segment : piece.segment + n]
                    dst.copy_(torch.from_numpy(source.read(names.PARAMS, glob, n)))
                for c in self.columns[g][1:]:
                    col = tile.columns[c]
                    if c not in loaded:
                        col.zero_()
                        continue
                    for piece, (glob, n) in zip(info.pieces, info.glob, strict=True):
                        col[piece.segment : piece.segment + n].copy_(torch.from_numpy(source.read(names.group_state(g, c), glob, n)))
            for k in self.scalar_keys[g]:
                if k in loaded:
                    self.opt_state[g][k] = torch.from_numpy(np.array(source.scalar(names.group_state(g, k)))).to(self.device)
            state = {**self.opt_state[g]}
            self.optimizers[g].restored(state, loaded)
            self.opt_state[g] = {k: state[k] for k in self.scalar_keys[g]}
        for index, st in self.tensor_state.items():
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
        self.version, self.applied = version, applied
        self._publish()
        self._loaded = True

    def snapshot_metadata(self) -> dict[str, str]:
        """Where each group's flat state lies in the flat space: "ranges.GROUP" is a JSON list of
        [start, length] pieces, in the order of the tensor's elements."""
        return {names.group_ranges(g): json.dumps([list(p) for p in group.global_pieces]) for g, group in self.groups.items()}

    # ---- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Release every file of this shard (spill files are deleted)."""
        for store in self.stores.values():
            store.close()
        for pub in self._pubs:
            for f in {id(v): v for v in pub.files.values()}.values():
                f.close()
        grads = getattr(self, "grads", None)
        if grads is not None:
            grads.close()


class _PublicationFiles:
    """One of the two files holding a published version's parameters (and evaluation point)."""

    def __init__(self, train: SpillFile, evaluation: SpillFile | None) -> None:
        self.files = {TRAIN: train, EVAL: evaluation if evaluation is not None else train}
        self.generation = 0


def device_bytes(state: ShardState) -> int:
    """What a GPU shard holds on its device when every tile is there: parameters, flat state, a copy
    of the gradient and per-tensor state."""
    flat = sum(4 * grp.numel * len(state.columns[g]) for g, grp in state.groups.items())
    return flat + 4 * state.numel + state.tensor_bytes


def in_memory_bytes(state: ShardState) -> int:
    """What the shard holds when nothing is spilled: parameters, flat state, the gradient, the
    workers' scratch buffers and the cached fp32 encoding of a version."""
    flat = sum(4 * grp.numel * (len(state.columns[g]) - 1) for g, grp in state.groups.items())
    return 4 * state.numel * (state.config.max_members + 3) + flat


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
