"""Gradient buffers: where an incoming stream lands, chunk by chunk, and where a step's reduced
gradient is read from; in memory or in a preallocated file (pure torch and files; no Ray, no gRPC).

One interface, two kinds; nothing outside this module asks which one it holds:

* :class:`MemoryGrad`: an fp32 tensor of the shard's elements (reads are views).
* :class:`FileGrad`: a preallocated buffered file of fp32 values (a spilled shard: the page cache
  absorbs pushes, the process does not grow); reads fill the caller's block buffer.

:class:`GradPool` lends buffers to streams and keeps up to ``num_workers + 1`` for reuse. A buffer
is given back exactly once, by whoever holds it last (the runtime's push stream, or the state
once a reduction has consumed it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from paramserver.spill import SpillFile, disk_full, free_bytes

#: Elements per block when a file buffer is summed or copied.
BLOCK = 1 << 20


class GradBuffer(Protocol):
    """fp32 values over a shard's local elements."""

    numel: int

    def write(self, local: int, values: torch.Tensor) -> None:
        """Store `values` (any float dtype, converted exactly to fp32) at local offset `local`."""
        ...

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """fp32 elements of each (local start, count) range: views of the buffer, or of a block
        buffer it fills (valid until its next read)."""
        ...

    def assign_sum(self, parts: Sequence[GradBuffer], divisor: int) -> None:
        """self = (parts[0] + parts[1] + ...) / divisor, element-wise in that order (the same bits
        whatever the kind); no division when divisor is 0. The parts are left unchanged."""
        ...

    def close(self) -> None:
        """Release what the buffer holds outside memory."""
        ...


class MemoryGrad:
    """A gradient buffer in memory."""

    def __init__(self, numel: int) -> None:
        self.numel = numel
        self.values = torch.empty(numel, dtype=torch.float32)

    def write(self, local: int, values: torch.Tensor) -> None:
        """Copy (and convert) `values` in."""
        self.values[local : local + values.numel()].copy_(values)

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Views."""
        return [self.values[a : a + n] for a, n in ranges]

    def assign_sum(self, parts: Sequence[GradBuffer], divisor: int) -> None:
        """Sum in order into this buffer, then divide (one pass over each part)."""
        first = parts[0].read([(0, self.numel)])[0]
        if len(parts) == 1:
            if divisor:
                torch.div(first, divisor, out=self.values)
            else:
                self.values.copy_(first)
            return
        torch.add(first, parts[1].read([(0, self.numel)])[0], out=self.values)
        for o in parts[2:]:
            (values,) = o.read([(0, self.numel)])
            self.values.add_(values)
        if divisor:
            self.values.div_(divisor)

    def close(self) -> None:
        """Nothing to release."""
        return None


class FileGrad:
    """A gradient buffer in a preallocated file."""

    def __init__(self, path: Path, numel: int) -> None:
        self.numel = numel
        self.file = SpillFile(path, 4 * numel, direct=False)
        self._block = torch.empty(0)

    def write(self, local: int, values: torch.Tensor) -> None:
        """Write the fp32 bytes of `values` at their place."""
        v = values if values.dtype == torch.float32 else values.to(torch.float32)
        self.file.write_from(4 * local, v.contiguous().numpy().view(np.uint8))

    def read(self, ranges: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Read the ranges into this buffer's block buffer (grown as needed)."""
        total = sum(n for _, n in ranges)
        if self._block.numel() < total:
            self._block = torch.empty(total)
        out, pos = [], 0
        for a, n in ranges:
            self._read_into(a, self._block[pos : pos + n])
            out.append(self._block[pos : pos + n])
            pos += n
        return out

    def _read_into(self, local: int, out: torch.Tensor) -> None:
        self.file.read_into(4 * local, out.numpy().view(np.uint8))

    def assign_sum(self, parts: Sequence[GradBuffer], divisor: int) -> None:
        """Block by block: read the first part, add the others' blocks in order, divide, write."""
        n = min(BLOCK, self.numel)
        acc = torch.empty(n)
        for k in range(0, self.numel, BLOCK):
            m = min(BLOCK, self.numel - k)
            acc[:m].copy_(parts[0].read([(k, m)])[0])
            for o in parts[1:]:
                (part,) = o.read([(k, m)])
                acc[:m].add_(part)
            if divisor:
                acc[:m].div_(divisor)
            self.write(k, acc[:m])

    def close(self) -> None:
        """Delete the file."""
        self.file.close()


#: Gradient files a spilled shard creates up front; the disk's room for the rest of its `keep` is
#: checked instead of creating them (one open file each: a job of thousands of members would
#: otherwise run the shard out of file descriptors at creation).
PREALLOCATED_FILES = 8


class GradPool:
    """Lends gradient buffers of one kind and keeps up to `keep` of them for reuse."""

    def __init__(self, make: Callable[[int], GradBuffer], keep: int, preallocate: int = 0) -> None:
        """`preallocate`: buffers made now (files: whether the disk holds them shows at creation)."""
        self._make = make
        self._keep = keep
        self._made = 0
        self._free: list[GradBuffer] = []
        self._all: list[GradBuffer] = []
        self._lock = threading.Lock()
        self._free = [self._new() for _ in range(min(preallocate, keep))]

    def _new(self) -> GradBuffer:
        with self._lock:
            k = self._made
            self._made += 1
        buf = self._make(k)
        with self._lock:
            self._all.append(buf)
        return buf

    def acquire(self) -> GradBuffer:
        """A buffer (reused if one is free)."""
        with self._lock:
            buf = self._free.pop() if self._free else None
        return buf if buf is not None else self._new()

    def release(self, buf: GradBuffer) -> None:
        """Give a buffer back (closed if the pool already keeps enough)."""
        with self._lock:
            if buf in self._free:
                return
            if len(self._free) < self._keep:
                self._free.append(buf)
                return
            self._all.remove(buf)
        buf.close()

    def close(self) -> None:
        """Release every buffer ever lent."""
        with self._lock:
            bufs, self._all, self._free = list(self._all), [], []
        for b in bufs:
            b.close()


def memory_pool(numel: int, keep: int) -> GradPool:
    """Buffers in memory."""
    return GradPool(lambda k: MemoryGrad(numel), keep)


def file_pool(directory: Path, prefix: str, numel: int, keep: int) -> GradPool:
    """Files ``DIRECTORY/PREFIX-grad-K.spill``: the first PREALLOCATED_FILES made now, the others
    when needed; RESOURCE_EXHAUSTED (SPILL_DISK_FULL) now if the disk cannot hold `keep` of them."""
    pool = GradPool(lambda k: FileGrad(directory / f"{prefix}-grad-{k}.spill", numel), keep, preallocate=PREALLOCATED_FILES)
    rest = max(0, keep - PREALLOCATED_FILES) * 4 * numel
    free = free_bytes(directory)
    if rest and free is not None and free < rest:
        pool.close()
        raise disk_full(directory / f"{prefix}-grad-*.spill", rest, free, f"{keep} gradient buffers of the job's members")
    return pool
