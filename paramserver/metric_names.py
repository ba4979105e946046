"""The catalogue of the service's Prometheus metrics: names, kinds, labels and help (pure data).

The front door's ``/metrics`` endpoint (``serve --metrics-port``) serves all of them: its own
(``paramserver_rpc_*``) and, gathered from the coordinator and every shard actor at each scrape,
the jobs' and shards'. A job's id is the label ``job_id`` (Prometheus keeps ``job`` for the scrape
job). The Grafana dashboard in ``deploy/grafana/`` queries only names listed here
(a test checks it), and the README's metrics table is this list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

#: Step phases timed by ``paramserver_step_phase_seconds`` (label ``phase``):
#: push: a push stream, first message to last chunk stored (per worker);
#: reduce: summing the workers' gradients and the norm part (per shard, per step);
#: decision: from the shard's stats to the coordinator's decision (clip factor, skip);
#: update: the optimizer rule over the shard's ranges;
#: publish: making the new version readable by pulls;
#: pull: a pull stream, request to last chunk sent (per worker).
PHASES = ("push", "reduce", "decision", "update", "publish", "pull")

#: Histogram buckets of step phases, in seconds (100 us to 60 s).
PHASE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Histogram buckets of snapshot durations, in seconds.
SNAPSHOT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its full name (counters without the ``_total`` suffix Prometheus adds)."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str


SHARD = ("job_id", "shard", "node")

CATALOG: tuple[MetricSpec, ...] = (
    # --- the front door ---------------------------------------------------------------------
    MetricSpec("paramserver_rpc", "counter", ("service", "method", "code"), "Calls answered by the front door, by status code."),
    MetricSpec("paramserver_rpc_seconds", "histogram", ("service", "method"), "Front-door call latency."),
    MetricSpec("paramserver_scrape_errors", "counter", ("source",), "Actors that did not answer a scrape in time."),
    # --- per job (the coordinator) ------------------------------------------------------------
    MetricSpec("paramserver_job_version", "gauge", ("job_id",), "The job's latest decided version (steps processed)."),
    MetricSpec("paramserver_job_steps", "counter", ("job_id",), "Steps decided (applied or skipped)."),
    MetricSpec("paramserver_job_skipped_steps", "counter", ("job_id", "reason"), "Steps skipped, by reason."),
    MetricSpec(
        "paramserver_job_clipped_steps",
        "counter",
        ("job_id",),
        "Steps whose gradient was clipped (clip rate: rate of this / rate of steps).",
    ),
    MetricSpec("paramserver_job_workers", "gauge", ("job_id", "state"), "Members by state: live, lost."),
    MetricSpec("paramserver_job_workers_waiting", "gauge", ("job_id",), "Workers the open step still waits for."),
    MetricSpec("paramserver_job_workers_pushed", "gauge", ("job_id",), "Workers that pushed the open step."),
    MetricSpec("paramserver_job_recoveries", "counter", ("job_id",), "Recoveries (lost shards, rollbacks)."),
    MetricSpec(
        "paramserver_job_grad_norm",
        "gauge",
        ("job_id", "group"),
        "The last step's gradient norm per parameter group (after averaging, before clipping).",
    ),
    MetricSpec(
        "paramserver_job_update_rms_ratio",
        "gauge",
        ("job_id", "group"),
        "The last step's RMS(update) / RMS(parameters) per parameter group.",
    ),
    MetricSpec("paramserver_snapshot_seconds", "histogram", ("job_id",), "Snapshot durations (from request to committed)."),
    MetricSpec("paramserver_snapshot_bytes", "counter", ("job_id",), "Bytes written by snapshots."),
    # --- per shard ----------------------------------------------------------------------------
    MetricSpec("paramserver_step_phase_seconds", "histogram", (*SHARD, "phase"), "Step latency by phase (see PHASES)."),
    MetricSpec(
        "paramserver_shard_received_bytes", "counter", SHARD, "Payload bytes received by the shard's data port (uploads and pushes)."
    ),
    MetricSpec("paramserver_shard_sent_bytes", "counter", SHARD, "Payload bytes sent by the shard's data port (pulls)."),
    MetricSpec("paramserver_shard_version", "gauge", SHARD, "The version the shard has published."),
    MetricSpec(
        "paramserver_shard_memory_bytes",
        "gauge",
        (*SHARD, "kind"),
        (
            "Shard memory by kind: resident (parameters and state in memory), spilled (in spill files), "
            "buffer (gradient, I/O and message buffers), rss (the process's resident set)."
        ),
    ),
    MetricSpec("paramserver_shard_spill_read_bytes", "counter", SHARD, "Bytes read from spill files."),
    MetricSpec("paramserver_shard_spill_write_bytes", "counter", SHARD, "Bytes written to spill files."),
    MetricSpec("paramserver_shard_streams", "gauge", SHARD, "Open data-plane streams (uploads, pushes and pulls)."),
)

#: Every metric name as Prometheus exposes it (counters with ``_total``; histograms with
#: ``_bucket``, ``_sum`` and ``_count``).
EXPOSED: frozenset[str] = frozenset(
    n
    for m in CATALOG
    for n in (
        (f"{m.name}_total",)
        if m.kind == "counter"
        else (f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count")
        if m.kind == "histogram"
        else (m.name,)
    )
)


def spec(name: str) -> MetricSpec:
    """The catalogue entry of `name` (KeyError when it is not one)."""
    for m in CATALOG:
        if m.name == name:
            return m
    raise KeyError(name)
