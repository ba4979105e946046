"""The names inside a snapshot: its files, the tensors in a shard file and their metadata keys
(pure; the one place these strings are built and parsed).

A shard file holds:

* ``params``: the shard's parameters, its ranges of the flat space laid end to end;
* ``state.GROUP.KEY``: parameter group GROUP's optimizer state KEY, either flat (the group's
  pieces on this shard end to end, listed in the metadata ``ranges.GROUP``) or a 0-d scalar
  (a step counter: equal on every shard);
* ``param.INDEX.KEY``: parameter INDEX's own state of any shape (Adafactor's factors, GaLore's
  projection), whole, written by every shard that holds a piece of the parameter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The flat parameters of a shard file.
PARAMS = "params"
#: The committed snapshot's index, written last (the commit marker).
MANIFEST = "manifest.json"
#: Written first and removed after the commit: a snapshot that has it and no manifest is a save
#: that was cut short, and only such a save may be deleted by a crash cleanup.
IN_PROGRESS = "in-progress"
#: Written next to a snapshot that lost its manifest (never deleted: it holds committed data).
QUARANTINE = "quarantine.json"

#: Metadata keys of a shard file.
META_SHARD = "shard"
META_VERSION = "version"
META_APPLIED = "applied"
META_RANGES = "ranges"
META_LEDGER = "ledger"

_GROUP = re.compile(r"^state\.(\d+)\.([A-Za-z0-9_]+)$")
_PARAM = re.compile(r"^param\.(\d+)\.([A-Za-z0-9_]+)$")
_RANGES = re.compile(r"^ranges\.(\d+)$")
_SHARD_FILE = re.compile(r"^shard-(\d{5,})\.safetensors$")


def group_state(group: int, key: str) -> str:
    """The tensor name of group `group`'s state `key`."""
    return f"state.{group}.{key}"


def param_state(index: int, key: str) -> str:
    """The tensor name of parameter `index`'s own state `key`."""
    return f"param.{index}.{key}"


def group_ranges(group: int) -> str:
    """The metadata key listing where group `group`'s flat state lies in the flat space."""
    return f"ranges.{group}"


def shard_file(index: int) -> str:
    """The file name of shard `index`'s part of a snapshot."""
    return f"shard-{index:05d}.safetensors"


def shard_of_file(name: str) -> int | None:
    """The shard index a file name belongs to, or None if it is not a shard file."""
    m = _SHARD_FILE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class TensorName:
    """A parsed tensor name: kind "params", "group" (index = group) or "param" (index = parameter)."""

    kind: str
    index: int = -1
    key: str = ""


def parse(name: str) -> TensorName | None:
    """The parts of a tensor name, or None if it is not one a snapshot may hold."""
    if name == PARAMS:
        return TensorName("params")
    m = _GROUP.match(name)
    if m:
        return TensorName("group", int(m.group(1)), m.group(2))
    m = _PARAM.match(name)
    if m:
        return TensorName("param", int(m.group(1)), m.group(2))
    return None


def ranges_group(key: str) -> int | None:
    """The group a ``ranges.GROUP`` metadata key names, or None."""
    m = _RANGES.match(key)
    return int(m.group(1)) if m else None
