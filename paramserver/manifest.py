"""A snapshot's manifest: built by the coordinator, written last as the commit marker, read and
validated before anything is loaded (pure: JSON and plain data).

The JSON layout is the one every snapshot since the first was written with (format version 1), so
old snapshots load: unknown keys are ignored and keys that older writers left out take defaults.
A manifest that is not JSON, not ours, or inconsistent (shard ranges that do not tile the flat
space exactly once, a bad checksum field...) is DATA_LOSS naming it; a newer format version is
FAILED_PRECONDITION (SNAPSHOT_INCOMPATIBLE).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from paramserver.errors import ParamServerError, Reason
from paramserver.jobconfig import JobConfig

FORMAT = "paramserver-snapshot"
FORMAT_VERSION = 1

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: The digest of a replica's file: held in memory only (never stored or verified), it is not hashed.
UNHASHED = "0" * 64


def data_loss(where: str, message: str) -> ParamServerError:
    """DATA_LOSS (SNAPSHOT_CORRUPT) naming the file."""
    return ParamServerError("DATA_LOSS", Reason.SNAPSHOT_CORRUPT, f"{where}: {message}", {"file": where})


@dataclass(frozen=True)
class ShardEntry:
    """One shard's file in a snapshot."""

    index: int
    file: str
    """Its name inside the snapshot."""
    size: int
    """Bytes."""
    sha256: str
    """Hex digest of the whole file."""
    ranges: tuple[tuple[int, int], ...]
    """(start, length) of the flat space the shard held, in its local order."""
    applied: int
    """Applied (not skipped) updates at the snapshot's version."""

    @property
    def numel(self) -> int:
        """Elements of the flat space in this file."""
        return sum(n for _, n in self.ranges)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {"index": self.index, "file": self.file, "size": self.size, "sha256": self.sha256,
                "ranges": [list(r) for r in self.ranges], "applied": self.applied}  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    """What a committed snapshot holds and where."""

    job_id: str
    version: int
    """Every shard had published this version."""
    applied: int
    """Applied updates at that version (the schedule's position)."""
    config: Mapping[str, Any]
    """The job's configuration (JobConfig.to_dict)."""
    shards: tuple[ShardEntry, ...]
    total_elements: int
    layout: tuple[Mapping[str, Any], ...] = ()
    """Each parameter's name, shape, offset and numel (for exports without this project)."""
    created_at: str = ""
    spike_norms: tuple[float, ...] = ()
    """The spike guard's window at this version."""
    skips: Mapping[str, int] = field(default_factory=dict)
    """Skipped steps by reason at this version."""

    @classmethod
    def build(
        cls,
        job_id: str,
        version: int,
        config: JobConfig,
        entries: Sequence[ShardEntry],
        spike_norms: Sequence[float] = (),
        skips: Mapping[str, int] | None = None,
    ) -> Manifest:
        """The manifest of a snapshot whose shard files are `entries`."""
        layout = tuple({"name": p.name, "shape": list(p.shape), "offset": p.offset, "numel": p.numel} for p in config.layout())
        return cls(
            job_id=job_id,
            version=version,
            applied=entries[0].applied if entries else 0,
            config=config.to_dict(),
            shards=tuple(sorted(entries, key=lambda e: e.index)),
            total_elements=config.total_elements,
            layout=layout,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            spike_norms=tuple(float(x) for x in spike_norms),
            skips=dict(skips or {}),
        )

    def job_config(self) -> JobConfig:
        """The job's configuration as it was."""
        return JobConfig.from_dict(self.config)

    def to_json(self) -> bytes:
        """The manifest file's bytes."""
        d = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "job_id": self.job_id,
            "version": self.version,
            "applied": self.applied,
            "created_at": self.created_at,
            "config": dict(self.config),
            "layout": [dict(p) for p in self.layout],
            "total_elements": self.total_elements,
            "shards": [e.to_dict() for e in self.shards],
            "spike_norms": list(self.spike_norms),
            "skips": dict(self.skips),
        }
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate a manifest file's bytes (DATA_LOSS naming `where` when it is bad)."""
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise data_loss(where, f"unreadable ({exc})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise data_loss(where, "not a paramserver snapshot manifest")
        if d.get("format_version") != FORMAT_VERSION:
            raise ParamServerError(
                "FAILED_PRECONDITION",
                Reason.SNAPSHOT_INCOMPATIBLE,
                f"{where}: format version {d.get('format_version')}, this build reads {FORMAT_VERSION}",
                {"file": where},
            )
        for key in ("job_id", "version", "config", "shards"):
            if key not in d:
                raise data_loss(where, f"field {key!r} missing")
        try:
            shards = tuple(
                ShardEntry(
                    index=_int(s["index"]),
                    file=str(s["file"]),
                    size=_int(s["size"]),
                    sha256=str(s["sha256"]),
                    ranges=tuple((_int(a), _int(n)) for a, n in s["ranges"]),
                    applied=_int(s.get("applied", d.get("applied", 0))),
                )
                for s in d["shards"]
            )
            config = d["config"]
            if not isinstance(config, dict):
                raise TypeError("config is not an object")
            total = _int(d["total_elements"]) if "total_elements" in d else JobConfig.from_dict(config).total_elements
            m = cls(
                job_id=str(d["job_id"]),
                version=_int(d["version"]),
                applied=_int(d.get("applied", 0)),
                config=config,
                shards=shards,
                total_elements=total,
                layout=tuple(dict(p) for p in d.get("layout", [])),
                created_at=str(d.get("created_at", "")),
                spike_norms=tuple(float(x) for x in d.get("spike_norms", [])),
                skips={str(k): _int(v) for k, v in d.get("skips", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise data_loss(where, f"malformed ({type(exc).__name__}: {exc})") from None
        m.validate(where)
        return m

    def validate(self, where: str) -> None:
        """Check the manifest's own consistency (DATA_LOSS naming `where`)."""
        if self.version < 0 or self.applied < 0 or self.applied > self.version:
            raise data_loss(where, f"version {self.version} with {self.applied} applied updates")
        if [e.index for e in self.shards] != list(range(len(self.shards))) or not self.shards:
            raise data_loss(where, f"shard indices {[e.index for e in self.shards]} are not 0..n-1")
        names = set()
        for e in self.shards:
            if not _SHA256.match(e.sha256) or e.size < 8 or "/" in e.file or e.file.startswith(".") or e.file in names:
                raise data_loss(where, f"bad entry for shard {e.index} (file {e.file!r}, size {e.size})")
            names.add(e.file)
        pieces = sorted(r for e in self.shards for r in e.ranges)
        pos = 0
        for start, length in pieces:
            if start != pos or length <= 0:
                raise data_loss(where, f"the shards' ranges do not cover the flat space exactly once (at element {min(start, pos)})")
            pos += length
        if pos != self.total_elements:
            raise data_loss(where, f"the shards' ranges cover {pos} of {self.total_elements} elements")

    def summary(self, path: str) -> dict[str, Any]:
        """A short description for listings."""
        return {
            "path": path,
            "job_id": self.job_id,
            "version": self.version,
            "applied": self.applied,
            "shards": len(self.shards),
            "bytes": sum(e.size for e in self.shards),
            "created_at": self.created_at,
            "optimizer": self.config.get("optimizer", ""),
        }


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{v!r} is not an integer")
    return v
