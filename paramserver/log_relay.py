"""The coordinator's and the shards' log records, relayed into the front door's log.

Each actor keeps its records in a ring (paramserver.telemetry.LogRing); the front door drains
every ring once per INTERVAL_S and hands each record to the logger it was logged with, so
``serve``'s output (and ``--log-format json``) holds the whole service's log, each line with
its job, shard, step and node. Records an actor dropped from its ring before they were drained
(more than telemetry.LOG_RING between two drains) are lost; Ray's own log files under its
session directory keep everything the actors printed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from paramserver.metrics import TelemetrySource

log = logging.getLogger(__name__)

#: Seconds between two drains.
INTERVAL_S = 1.0


def emit(source: str, entry: Mapping[str, Any]) -> bool:
    """Log one relayed record under its own logger name; False when its level is filtered out."""
    logger = logging.getLogger(str(entry.get("logger", "paramserver")))
    level = logging.getLevelName(str(entry.get("level", "INFO")))
    level = level if isinstance(level, int) else logging.INFO
    if not logger.isEnabledFor(level):
        return False
    record = logger.makeRecord(logger.name, level, "(relayed)", 0, str(entry.get("message", "")), (), None)
    record.created = float(entry.get("time", record.created))
    record.msecs = (record.created - int(record.created)) * 1000
    record.source = str(entry.get("source", "shard" if "shard" in entry else source))
    for key in ("job", "shard", "step", "worker", "node", "exc"):
        if key in entry:
            setattr(record, key, entry[key])
    logger.handle(record)
    return True


class LogRelay:
    """Drains every actor's log ring into this process's log, once per INTERVAL_S."""

    def __init__(self, source: TelemetrySource) -> None:
        self.source = source
        self.positions: dict[str, int] = {}
        self.rings: dict[str, str] = {}  # source -> the id of its ring (a restarted coordinator has a new one)
        self.relayed = 0

    async def drain(self) -> int:
        """One pass over every actor; the number of records relayed."""
        exports = await self.source.telemetry(self.positions)
        count = 0
        for name, export in exports.items():
            if export is None:
                continue
            ring = str(export.get("log_ring", ""))
            if self.rings.get(name, ring) != ring:  # a new incarnation: its records start again from 1
                self.positions[name] = 0
            self.rings[name] = ring
            for entry in export.get("logs", ()):
                self.positions[name] = max(self.positions.get(name, 0), int(entry["seq"]))
                count += emit(name, entry)
        for gone in [n for n in self.positions if n not in exports]:
            del self.positions[gone]
            self.rings.pop(gone, None)
        self.relayed += count
        return count

    async def run(self) -> None:
        """Drain until cancelled (a failed pass is logged and retried)."""
        while True:
            try:
                await self.drain()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the coordinator restarting, the loop stopping
                log.debug("log relay pass failed: %s", exc)
            await asyncio.sleep(INTERVAL_S)
