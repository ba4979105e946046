"""How the service's log lines look (``serve --log-format text|json``), wherever they were
logged: the front door's own records and those relayed from the coordinator and the shards
(paramserver.log_relay) carry the same fields: job, shard, step, worker, node and source when
known."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from paramserver.telemetry import fields_of

#: The formats ``serve --log-format`` accepts.
FORMATS = ("text", "json")
#: Record attributes shown as fields, in this order.
FIELDS = ("source", "node", "job", "shard", "step", "worker")


def _fields(record: logging.LogRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    parsed = fields_of(record)
    for key in FIELDS:
        value = getattr(record, key, None)
        if value is None:
            value = parsed.get(key)
        if value is not None and value != "":
            out[key] = value
    return out


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: message [job=... shard=... step=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The line, with the record's fields appended."""
        line = super().format(record)
        relayed = getattr(record, "exc", None)
        if relayed:  # an actor's exception, already formatted
            line = f"{line}\n{relayed}"
        fields = _fields(record)
        if not fields:
            return line
        first, nl, rest = line.partition("\n")
        tail = " [" + " ".join(f"{k}={str(v)[:12] if k == 'node' else v}" for k, v in fields.items()) + "]"
        return first + tail + nl + rest


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the fields and,
    for an exception, exc."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line."""
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif getattr(record, "exc", None):
            entry["exc"] = getattr(record, "exc")  # noqa: B009 - set by the relay, unknown to LogRecord's type
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at `level` in `fmt` (ValueError naming the choices when unknown)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
