"""A shard whose state does not fit its memory budget: ShardState's interface over spill files
(pure torch and files; no Ray, no gRPC).

What lives where:

* **Tile stores** (:class:`paramserver.spill.TileStore`), one per parameter group: the columns
  ``params`` and the group's flat state (``exp_avg``, ``exp_avg_sq``, ...) over tiles. A tile is a
  run of one parameter piece, at most :data:`TILE` elements and cut on multiples of
  ``placement.ALIGN`` from the piece's start (so the bits do not change), or the whole piece for
  rules that need whole tensors. Tiles stay resident, in order, while they fit the budget; the rest live
  in a preallocated O_DIRECT file, read ahead and written behind through a ring of buffers.
* **Gradients**: a push is written chunk by chunk to a preallocated gradient file (buffered I/O:
  the page cache absorbs it, the process does not grow). The reduction reads the workers' files
  block by block, sums them in worker-id order and writes the sum back to the first.
* **Publications**: every update writes the new version's parameters (and the evaluation point
  when a rule has one) to the other of two publication files; pulls read chunks from there outside
  the lock, and a pull overtaken by two newer versions is ABORTED, never served torn values.
* **Resident**: resident tiles, the I/O rings, 0-d scalars and per-tensor state (Adafactor's
  factors, GaLore's projections), plus a fixed allowance of :data:`OVERHEAD_BYTES` for block
  buffers and gRPC messages. Their sum never exceeds the budget: a budget too small for the rings
  is INVALID_ARGUMENT at job creation.

The rule runs once per tile. 0-d state shared by a group (step counters) and a parameter's own
0-d state are set back to their values before the update for every tile, so each tile sees the
counters the in-memory update sees once for all pieces: a spilled shard gives the same bits.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paramserver import snapshot_names as names
from paramserver.errors import ConfigError, ParamServerError, Reason
from paramserver.gradnorm import NormPart
from paramserver.jobconfig import JobConfig
from paramserver.optim.base import Piece, State, Step
from paramserver.placement import Span
from paramserver.shard import (
    Contribution,
    Landed,
    ShardState,
    SnapshotSource,
    Staging,
    wire_bytes,
    wire_tensor,
)
from paramserver.spill import SpillFile, TileStore
from paramserver.steps import Decision, Outcome, ShardStats, StepReport
from paramserver.tensor_file import TensorStream
from paramserver_client.codec import EVAL, FLOAT32, TRAIN, chunk_elements, encode_chunk_message

#: Elements per block of the reduction's pass over the gradient files (and of the norm's reads).
REDUCE_BLOCK = 1 << 20
#: Largest tile of a split-able piece, in elements (12 MB records for AdamW's three columns).
TILE = 1 << 20
#: Smallest tile a small budget may force.
MIN_TILE = 1 << 14
#: Buffers of a tile store's I/O ring (one read ahead, one being updated, one written behind).
DEPTH = 3
#: The part of the budget kept for block buffers (the reduction's and the update's gradient
#: blocks, a pull's chunk, snapshot blocks) and gRPC's message buffers.
OVERHEAD_BYTES = 96 << 20


def in_memory_bytes(config: JobConfig, index: int, spans: Sequence[Span]) -> int:
    """What the in-memory ShardState holds for this shard: parameters, flat state, the gradient,
    the workers' scratch buffers and the cached fp32 encoding of a version."""
    probe = ShardState(config, index, spans)
    state = sum(
        4 * grp.numel * sum(1 for v in probe.optimizers[g].init_state(torch.zeros(1)).values() if v.dim() == 1)
        for g, grp in probe.groups.items()
    )
    return 4 * probe.numel * (config.num_workers + 3) + state


def trim_heap() -> None:
    """Give freed heap memory back to the system (glibc): a spilled shard's budget counts what the
    process holds, not what it uses."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True)
class _Tile:
    """Where a tile's elements lie."""

    local: int
    """Its first element in the shard's local space."""
    piece: Piece
    """The tile as a piece of its parameter (segment 0: its state views are the tile's own)."""
    glob: int
    """Its first element in the flat parameter space."""


class _Publication:
    """One of the two files holding a published version's parameters (and evaluation point)."""

    def __init__(self, train: SpillFile, evaluation: SpillFile | None) -> None:
        self.files = {TRAIN: train, EVAL: evaluation if evaluation is not None else train}
        self.generation = 0


class SpilledShardState(ShardState):
    """A shard over spill files within a memory budget (see the module docstring)."""

    def __init__(
        self,
        config: JobConfig,
        index: int,
        spans: Sequence[Span],
        budget: int,
        directory: Path,
        device: torch.device | None = None,
        tile: int = TILE,
    ) -> None:
        super().__init__(config, index, spans, device)
        self.tile = tile
        if self.device.type != "cpu":
            raise ConfigError("spec.shard_memory_budget_bytes", "spilling state to disk is supported on CPU shards only")
        self.budget = budget
        self.directory = Path(directory)
        self._io_lock = threading.Lock()
        self._columns: dict[int, list[str]] = {}
        self._scalar_keys: dict[int, list[str]] = {}
        for g in self.groups:
            template = self.optimizers[g].init_state(torch.zeros(1))
            if any(v.dim() == 1 and bool(v.any()) for v in template.values()):
                raise ConfigError("spec.shard_memory_budget_bytes", f"the state of {self.optimizers[g].name!r} cannot be spilled")
            self._columns[g] = ["params", *(k for k, v in template.items() if v.dim() == 1)]
            self._scalar_keys[g] = [k for k, v in template.items() if v.dim() == 0]
        self._plan()
        self.stores: dict[int, TileStore] = {}
        self._grad_files: list[SpillFile] = []
        self._free_grads: list[SpillFile] = []
        self._grad: SpillFile | None = None
        self._pubs: list[_Publication] = []
        self._pub = 0
        self._loaded = False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for g, tiles in self.tiles.items():
                spec = [(t.piece.length, self.resident[g][k]) for k, t in enumerate(tiles)]
                self.stores[g] = TileStore(self._columns[g], spec, self.directory / f"shard-{index}-group-{g}.spill", DEPTH)
            has_eval = any(self.optimizers[g].eval_keys for g in self.groups)
            for k in range(2):
                train = self._file(f"pub-{k}")
                self._pubs.append(_Publication(train, self._file(f"pub-{k}-eval") if has_eval else None))
            for _ in range(config.num_workers + 1):
                self._grad_files.append(self._file(f"grad-{len(self._grad_files)}"))
            self._free_grads = list(self._grad_files)
        except BaseException:
            self.close()
            raise

    def _file(self, name: str) -> SpillFile:
        """A preallocated buffered file of one fp32 value per local element."""
        return SpillFile(self.directory / f"shard-{self.index}-{name}.spill", 4 * self.numel, direct=False)

    def _plan(self) -> None:
        """Cut every group's pieces into tiles and choose how many stay resident."""
        self.tensor_bytes = sum(
            v.numel() * v.element_size()
            for g, grp in self.groups.items()
            for p in grp.pieces
            for v in self.optimizers[g].init_tensor_state(p, self.device).values()
        )
        ncols = sum(len(c) for c in self._columns.values())
        tile = self.tile
        while tile > MIN_TILE and DEPTH * 4 * tile * ncols > self.budget // 4:
            tile //= 2
        self.tile = tile
        self.tiles: dict[int, list[_Tile]] = {}
        for g, group in self.groups.items():
            size = None if self.optimizers[g].whole_tensors else tile
            tiles = []
            for (local, n), piece, (glob, _) in zip(group.local, group.pieces, group.global_pieces, strict=True):
                step = size or n
                for off in range(0, n, step):
                    m = min(step, n - off)
                    tiles.append(_Tile(local + off, Piece(piece.param, piece.start + off, m, 0), glob + off))
            self.tiles[g] = tiles
        self.ring_bytes = sum(DEPTH * 4 * len(self._columns[g]) * max(t.piece.length for t in tiles) for g, tiles in self.tiles.items())
        fixed = self.ring_bytes + self.tensor_bytes + OVERHEAD_BYTES
        if fixed > self.budget:
            big = max((t for tiles in self.tiles.values() for t in tiles), key=lambda t: t.piece.length)
            raise ConfigError(
                "spec.shard_memory_budget_bytes",
                f"{self.budget} bytes is below shard {self.index}'s minimum of {fixed}: I/O rings {self.ring_bytes} "
                f"(largest tile: {big.piece.length} elements of {big.piece.param.name!r}), per-tensor state {self.tensor_bytes}, "
                f"buffers {OVERHEAD_BYTES}",
            )
        left = self.budget - fixed
        self.resident: dict[int, list[bool]] = {}
        for g, tiles in self.tiles.items():  # in order, every tile that still fits stays resident
            per = 4 * len(self._columns[g])
            flags = []
            for t in tiles:
                fits = t.piece.length * per <= left
                left -= t.piece.length * per if fits else 0
                flags.append(fits)
            self.resident[g] = flags

    # ---- status ------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """True once parameters were uploaded or restored."""
        return self._loaded

    def memory(self) -> dict[str, float]:
        """Budget, resident and spilled bytes, and the spill files' traffic and I/O rates."""
        files = [s.file for s in self.stores.values() if s.file is not None]
        busy_r, busy_w = sum(f.stats.read_seconds for f in files), sum(f.stats.write_seconds for f in files)
        read, written = sum(f.stats.bytes_read for f in files), sum(f.stats.bytes_written for f in files)
        return {
            "budget_bytes": float(self.budget),
            "resident_bytes": float(sum(s.resident_bytes for s in self.stores.values()) + self.tensor_bytes),
            "buffer_bytes": float(self.ring_bytes + OVERHEAD_BYTES),
            "spilled_bytes": float(sum(s.spilled_bytes for s in self.stores.values())),
            "read_bytes": float(read),
            "written_bytes": float(written),
            "read_bytes_per_second": read / busy_r if busy_r else 0.0,
            "write_bytes_per_second": written / busy_w if busy_w else 0.0,
        }

    # ---- staging: uploads and pushes go to gradient files --------------------------------------

    def stage(self) -> Staging:
        """A gradient file for one incoming stream (a new one if every file is in use)."""
        with self._io_lock:
            f = self._free_grads.pop() if self._free_grads else None
        if f is None:
            f = self._file(f"grad-{len(self._grad_files)}")
            with self._io_lock:
                self._grad_files.append(f)
        return Staging(f, [])  # type: ignore[arg-type]

    def release(self, buffer: Any) -> None:
        """Give a gradient file back."""
        if isinstance(buffer, SpillFile):
            with self._io_lock:
                if buffer not in self._free_grads:
                    self._free_grads.append(buffer)

    def write(self, staging: Staging, local: int, count: int, dtype: int, data: bytes | memoryview) -> None:
        """Write a validated chunk into the stream's gradient file (fp32 bytes as they came)."""
        f: SpillFile = staging.buffer  # type: ignore[assignment]
        raw = np.frombuffer(data, dtype=np.uint8) if dtype == FLOAT32 else wire_tensor(data, dtype).to(torch.float32).numpy().view(np.uint8)
        f.write_from(4 * local, raw)
        staging.pieces.append(Landed(local, count))

    @staticmethod
    def _read(f: SpillFile, local: int, out: torch.Tensor) -> None:
        f.read_into(4 * local, out.numpy().view(np.uint8))

    # ---- load, reduce, apply -------------------------------------------------------------------

    def load(self, staging: Staging) -> None:
        """Take the uploaded parameters (in the stream's file) as version 0."""
        f: SpillFile = staging.buffer  # type: ignore[assignment]
        for g, store in self.stores.items():
            for tile in store.stream():
                self._read(f, self.tiles[g][tile.index].local, tile.columns["params"])
                for c in self._columns[g][1:]:
                    tile.columns[c].zero_()
        self.release(f)
        self._init_resident()
        self.version, self.applied = 0, 0
        self._publish()
        self._loaded = True

    def _init_resident(self) -> None:
        self.opt_state = {}
        for g in self.groups:
            template = self.optimizers[g].init_state(torch.zeros(1))
            self.opt_state[g] = {k: template[k] for k in self._scalar_keys[g]}
        self.tensor_state = {
            p.param.index: self.optimizers[g].init_tensor_state(p, self.device) for g, grp in self.groups.items() for p in grp.pieces
        }

    def reduce(self, contributions: Sequence[Contribution]) -> ShardStats:
        """Sum the workers' gradient files block by block in worker-id order into the first one,
        divide by the loss-term count, and return this shard's scalars."""
        ordered = sorted(contributions, key=lambda c: c.worker_id)
        n = sum(c.loss_terms for c in ordered)
        files: list[SpillFile] = [c.buffer for c in ordered]  # type: ignore[misc]
        acc, part = torch.empty(min(REDUCE_BLOCK, self.numel)), torch.empty(min(REDUCE_BLOCK, self.numel))
        for k in range(0, self.numel, REDUCE_BLOCK):
            m = min(REDUCE_BLOCK, self.numel - k)
            self._read(files[0], k, acc[:m])
            for f in files[1:]:
                self._read(f, k, part[:m])
                acc[:m].add_(part[:m])
            if n:
                acc[:m].div_(n)
            files[0].write_from(4 * k, acc[:m].numpy().view(np.uint8))
        for f in files[1:]:
            self.release(f)
        if self._grad is not None:
            self.release(self._grad)
        self._grad = files[0]
        if n == 0:
            return ShardStats(self.index, NormPart(), 0)
        grad = files[0]

        def block(a: int, count: int) -> torch.Tensor:
            self._read(grad, a, part[:count])
            return part[:count]

        stats = ShardStats(self.index, self.norm_part(block), n)
        trim_heap()
        return stats

    def apply(self, decision: Decision) -> StepReport:
        """Stream every tile through its group's rule (or skip), and publish the next version."""
        factor = self.schedule(self.applied)
        lr = self.optimizers[0].lr * factor
        if decision.apply:
            assert self._grad is not None
            grad = torch.empty(max(t.piece.length for tiles in self.tiles.values() for t in tiles))
            pub = self._next_publication()
            for g, store in self.stores.items():
                self._update_group(g, store, grad, decision.clip_coef, self.optimizers[g].lr * factor, pub)
            self.applied += 1
            outcome = Outcome.APPLIED
            self._pub = 1 - self._pub
        else:
            outcome = Outcome.SKIPPED
        self.release(self._grad)
        self._grad = None
        trim_heap()
        report = StepReport(decision.step, outcome, decision.skip_reason, decision.grad_norm, decision.clip_coef, lr, decision.loss_terms)
        self.version = decision.step + 1
        self.last_report = report
        return report

    def _update_group(self, g: int, store: TileStore, grad: torch.Tensor, clip_coef: float, lr: float, pub: _Publication) -> None:
        opt, scalars = self.optimizers[g], self.opt_state[g]
        shared = {k: v.clone() for k, v in scalars.items()}
        own = {
            t.piece.param.index: {k: v.clone() for k, v in self.tensor_state[t.piece.param.index].items() if v.dim() == 0}
            for t in self.tiles[g]
        }
        assert self._grad is not None
        for tile in store.stream():
            info = self.tiles[g][tile.index]
            for k, v in shared.items():  # each tile sees the counters as they were before the update
                scalars[k].copy_(v)
            for k, v in own[info.piece.param.index].items():
                self.tensor_state[info.piece.param.index][k].copy_(v)
            g_tile = grad[: tile.length]
            self._read(self._grad, info.local, g_tile)
            if clip_coef != 1.0:
                g_tile.mul_(clip_coef)
            state: State = {**{c: tile.columns[c] for c in self._columns[g][1:]}, **scalars}
            opt.update([tile.columns["params"]], [g_tile], state, Step(lr, [info.piece], self.tensor_state, self.applied))
            self._publish_tile(pub, g, info.local, tile.columns)  # in the same pass: no second read

    def _next_publication(self) -> _Publication:
        """The publication file the next version goes to (the one not being served)."""
        pub = self._pubs[1 - self._pub]
        pub.generation += 1  # a pull still reading it (two versions old) sees this and aborts
        return pub

    def _publish_tile(self, pub: _Publication, g: int, local: int, columns: dict[str, torch.Tensor]) -> None:
        params = columns["params"]
        pub.files[TRAIN].write_from(4 * local, params.numpy().view(np.uint8))
        if pub.files[EVAL] is not pub.files[TRAIN]:
            x = params.clone()
            opt = self.optimizers[g]
            if opt.eval_keys:
                opt.eval_point([x], {**{c: columns[c] for c in self._columns[g][1:]}, **self.opt_state[g]}, [(0, params.numel())])
            pub.files[EVAL].write_from(4 * local, x.numpy().view(np.uint8))

    def _publish(self) -> None:
        """Write the current parameters to the other publication file and serve it (after a load
        or a restore; updates publish tile by tile as they go)."""
        pub = self._next_publication()
        for g, store in self.stores.items():
            for tile in store.stream(write=False):
                self._publish_tile(pub, g, self.tiles[g][tile.index].local, tile.columns)
        self._pub = 1 - self._pub

    # ---- pulls -----------------------------------------------------------------------------------

    def publication(self, dtype: int, ranges: Sequence[Span] = (), point: int = TRAIN) -> tuple[int, Iterator[tuple[int, int, bytes]]]:
        """(version, chunk messages read lazily from the current publication file); reading raises
        ABORTED (STEP_ALREADY_APPLIED) if two newer versions replaced the file meanwhile."""
        pub = self._pubs[self._pub]
        generation, version = pub.generation, self.version
        f = pub.files[EVAL if point == EVAL else TRAIN]
        wanted = [(r, self._local(r)) for r in sorted(list(ranges) or self.spans)]
        step = chunk_elements(dtype)

        def chunks() -> Iterator[tuple[int, int, bytes]]:
            buf = np.empty(step, dtype=np.float32)
            for r, local in wanted:
                for i in range(0, r.length, step):
                    n = min(step, r.length - i)
                    f.read_into(4 * (local + i), buf[:n].view(np.uint8))
                    if pub.generation != generation:
                        raise ParamServerError(
                            "ABORTED",
                            Reason.STEP_ALREADY_APPLIED,
                            f"version {version} was replaced while it was being read; pull again (now {self.version})",
                            {"current_version": self.version},
                        )
                    yield r.start + i, n, encode_chunk_message(r.start + i, n, dtype, wire_bytes(torch.from_numpy(buf[:n]), dtype))

        return version, chunks()

    # ---- snapshots -------------------------------------------------------------------------------

    streams_snapshots = True
    """Snapshots are written under the lock from the tiles, one record at a time (no host copy)."""

    def stream_snapshot(self) -> dict[str, np.ndarray | TensorStream]:
        """This shard's snapshot tensors: the same names and layout as an in-memory shard's,
        streamed from the tiles (one pass for the parameters, one per state column)."""
        order = sorted((t.local, g, k) for g, tiles in self.tiles.items() for k, t in enumerate(tiles))

        def params() -> Iterator[memoryview]:
            for _, g, k in order:
                yield self.stores[g].read_tile(k)["params"].numpy().data.cast("B")

        def column(g: int, c: str) -> TensorStream:
            def blocks() -> Iterator[memoryview]:
                for tile in self.stores[g].stream(write=False):
                    yield tile.columns[c].numpy().data.cast("B")

            return TensorStream("F32", (self.groups[g].numel,), blocks)

        tensors: dict[str, np.ndarray | TensorStream] = {names.PARAMS: TensorStream("F32", (self.numel,), params)}
        for g in self.groups:
            for c in self._columns[g][1:]:
                tensors[names.group_state(g, c)] = column(g, c)
            for k, v in self.opt_state[g].items():
                tensors[names.group_state(g, k)] = v.numpy()
        for i, st in self.tensor_state.items():
            for k, v in st.items():
                tensors[names.param_state(i, k)] = v.numpy()
        return tensors

    def snapshot_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and optimizer state assembled as an in-memory shard holds them (tests and
        inspection; this is a full host copy)."""
        out: dict[str, torch.Tensor] = {"params": torch.empty(self.numel)}
        for g, store in self.stores.items():
            flat = {c: torch.empty(self.groups[g].numel) for c in self._columns[g][1:]}
            seg = 0
            for tile in store.stream(write=False):
                local = self.tiles[g][tile.index].local
                out["params"][local : local + tile.length].copy_(tile.columns["params"])
                for c, t in flat.items():
                    t[seg : seg + tile.length].copy_(tile.columns[c])
                seg += tile.length
            out.update({names.group_state(g, c): t for c, t in flat.items()})
            out.update({names.group_state(g, k): v.clone() for k, v in self.opt_state[g].items()})
        for i, st in self.tensor_state.items():
            out.update({names.param_state(i, k): v.clone() for k, v in st.items()})
        return out

    def restore(self, source: SnapshotSource, version: int, applied: int) -> None:
        """Load parameters and optimizer state for this shard's tiles from a snapshot taken with
        any shard count and any memory budget."""
        stored = source.names()
        self._init_resident()
        for g, store in self.stores.items():
            loaded = {k for k in itertools.chain(self._columns[g][1:], self._scalar_keys[g]) if names.group_state(g, k) in stored}
            for tile in store.stream():
                info = self.tiles[g][tile.index]
                source.read(names.PARAMS, info.glob, tile.length, tile.columns["params"].numpy())
                for c in self._columns[g][1:]:
                    if c in loaded:
                        source.read(names.group_state(g, c), info.glob, tile.length, tile.columns[c].numpy())
                    else:
                        tile.columns[c].zero_()
            for k in self._scalar_keys[g]:
                if k in loaded:
                    self.opt_state[g][k] = torch.from_numpy(np.array(source.scalar(names.group_state(g, k))))
            self.optimizers[g].restored(self.opt_state[g], loaded)
        for index, st in self.tensor_state.items():
            for name in sorted(stored):
                p = names.parse(name)
                if p is not None and p.kind == "param" and p.index == index:
                    st[p.key] = torch.from_numpy(np.array(source.tensor(name)))
        self.version, self.applied = version, applied
        self._publish()
        self._loaded = True

    def snapshot_metadata(self) -> dict[str, str]:
        """As ShardState: where each group's flat state lies in the flat space."""
        return {names.group_ranges(g): json.dumps([list(p) for p in group.global_pieces]) for g, group in self.groups.items()}

    # ---- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Delete every spill file of this shard."""
        for store in getattr(self, "stores", {}).values():
            store.close()
        for pub in getattr(self, "_pubs", []):
            for f in {id(v): v for v in pub.files.values()}.values():
                f.close()
        for f in getattr(self, "_grad_files", []):
            f.close()
