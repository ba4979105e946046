"""The values a shard's compressed pulls hand out (DiLoCo-style rounds; numpy only, no torch, Ray
or gRPC): see ``PullParametersRequest.base_version`` in shard_service.proto.

A :class:`Broadcast` holds, for one compressed dtype, the values every worker that follows the
compressed pulls holds (its "broadcast values", local order), their version, and the chunk
messages of the last update. At a new version it moves them by the decoded update
``encode(parameters - broadcast)``, encoded chunk by chunk as the wire carries it: error feedback on
the service's side, so the broadcast stays within one quantisation step of the last update of the
parameters and never drifts. A worker holding the previous broadcast version gets that update (to
add, one fp32 addition per element); any other gets the broadcast values whole, in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from paramserver_client import compression
from paramserver_client.codec import COMPRESSED, FLOAT32, chunk_elements, encode_chunk_message, split


@dataclass(frozen=True)
class Piece:
    """One contiguous run of a shard's elements: its flat start, local start and length."""

    start: int
    local: int
    length: int


@dataclass
class Broadcast:
    """A shard's broadcast values for one compressed dtype (see the module docstring)."""

    dtype: int
    pieces: Sequence[Piece]
    values: np.ndarray
    """fp32, local order: what the workers following the compressed pulls hold."""
    version: int
    came_from: int | None = None
    """The version the last update moved the values from (None: no update yet)."""
    update: list[bytes] = field(default_factory=list)
    """That update's chunk messages (compressed dtype, flat offsets)."""

    @classmethod
    def start(cls, dtype: int, pieces: Sequence[Piece], current: np.ndarray, version: int) -> Broadcast:
        """Broadcast values starting as the parameters `current` (local order) of `version`."""
        if dtype not in COMPRESSED or COMPRESSED[dtype] == "topk":
            raise ValueError(f"dtype {dtype} is not a broadcast dtype (int8 or int4 blocks)")
        return cls(dtype, list(pieces), np.array(current, dtype=np.float32, copy=True), version)

    def advance(self, current: np.ndarray, version: int) -> None:
        """Move the values to the parameters `current` of `version` by their encoded update."""
        if version <= self.version:
            raise ValueError(f"version {version} is not after {self.version}")
        method = COMPRESSED[self.dtype]
        step = compression.chunk_elements(method)
        diff = np.subtract(current, self.values, dtype=np.float32)
        update = []
        for p in self.pieces:
            for offset, n in split(p.start, p.length, step):
                at = p.local + offset - p.start
                data = compression.encode(diff[at : at + n], method)
                np.add(self.values[at : at + n], compression.decode(data, n, method), out=self.values[at : at + n])
                update.append(encode_chunk_message(offset, n, self.dtype, data))
        self.came_from, self.version, self.update = self.version, version, update

    def answer(self, base_version: int | None) -> list[bytes]:
        """The chunk messages for a worker holding the broadcast values of `base_version`: the
        last update when it moved them from there, else the values whole in fp32."""
        if base_version is not None and base_version == self.came_from:
            return self.update
        step = chunk_elements(FLOAT32)
        return [
            encode_chunk_message(offset, n, FLOAT32, self.values[p.local + offset - p.start : p.local + offset - p.start + n].tobytes())
            for p in self.pieces
            for offset, n in split(p.start, p.length, step)
        ]
