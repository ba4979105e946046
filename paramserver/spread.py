"""Where shards go (pure logic; cluster.py turns the choice into Ray scheduling strategies).

Two policies, chosen by ``serve --placement``:

- ``spread`` (the default): the shards of a job go round-robin over the cluster's alive nodes
  that could hold one (enough CPUs and GPUs in total), so a job of N shards on M nodes puts
  ceil(N/M) or floor(N/M) shards on each. Nodes are ordered head first, then by address and id,
  and each job starts one node further along than the previous one, so small jobs do not all
  pile onto the head. Shards that ask for GPUs only consider GPU nodes; shards that ask for none
  prefer nodes without GPUs (the GPUs stay free for the shards that need them) and use GPU
  nodes only when there are no others. The choice is a soft affinity: a node that is full when
  the shard starts (or dies) lets Ray place the shard elsewhere.
- ``pack``: Ray's default scheduling (no affinity).

The port a shard's data port binds comes from ``serve --shard-port-range LO-HI`` when given
(``PortRange``), else any free port.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

#: The placement policies ``serve --placement`` accepts.
POLICIES = ("spread", "pack")


@dataclass(frozen=True)
class Node:
    """One alive node as the placement sees it."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    is_head: bool = False


def candidates(nodes: Sequence[Node], cpu: float, gpu: float) -> list[Node]:
    """The nodes that could hold a shard asking for `cpu` CPUs and `gpu` GPUs, in placement order
    (head first, then by address and id); without GPUs asked for, nodes without GPUs first."""
    fit = [n for n in nodes if n.cpus + 1e-9 >= cpu and n.gpus + 1e-9 >= gpu]
    order = sorted(fit, key=lambda n: (not n.is_head, n.address, n.node_id))
    if gpu <= 0:
        plain = [n for n in order if n.gpus <= 0]
        if plain:
            return plain
    return order


def spread(nodes: Sequence[Node], cpu: float, gpu: float, indices: Sequence[int], start: int = 0) -> dict[int, str]:
    """Shard index -> node id for the shards `indices` of one job, round-robin over the
    candidates from `start` (see the module doc). Empty when no node qualifies (Ray then
    reports the shards as unschedulable)."""
    pool = candidates(nodes, cpu, gpu)
    if not pool:
        return {}
    return {i: pool[(start + k) % len(pool)].node_id for k, i in enumerate(sorted(indices))}


@dataclass(frozen=True)
class PortRange:
    """An inclusive range of TCP ports for shard data ports (``serve --shard-port-range``)."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not (1 <= self.low <= self.high <= 65535):
            raise ValueError(f"{self.low}-{self.high}: expected LOW-HIGH with 1 <= LOW <= HIGH <= 65535")

    @classmethod
    def parse(cls, text: str) -> PortRange:
        """``"52000-52999"`` (or a single port ``"52000"``); ValueError when malformed."""
        low, sep, high = text.strip().partition("-")
        try:
            return cls(int(low), int(high) if sep else int(low))
        except ValueError:
            raise ValueError(f"{text!r}: expected LOW-HIGH, e.g. 52000-52999") from None

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"

    def __len__(self) -> int:
        return self.high - self.low + 1

    def ports(self, rng: random.Random | None = None) -> Iterator[int]:
        """Every port of the range once, from a random one on (shards starting at once on a
        node rarely race for the same port), wrapping around."""
        first = (rng or random.Random()).randrange(len(self))
        for k in range(len(self)):
            yield self.low + (first + k) % len(self)


def bind_in_range(bind: Callable[[int], int], ports: PortRange, rng: random.Random | None = None) -> int:
    """Bind the first free port of `ports` with `bind` (which returns the bound port, or 0 or
    raises RuntimeError when the port is taken); OSError naming the range when none is free."""
    for port in ports.ports(rng):
        try:
            if bind(port):
                return port
        except RuntimeError:
            continue
    raise OSError(f"no free port in the shard port range {ports} ({len(ports)} ports, all taken on this node)")
