"""What ``paramserver jobs`` and ``paramserver status JOB`` show: rich renderables built from Job messages.

Pure: every function takes ``paramserver.v1.job_service_pb2.Job`` messages (as GetJob and ListJobs
answer them) and returns a renderable or a string; nothing here calls the service or prints.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import json_format
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from paramserver.v1 import job_service_pb2 as jpb

#: Characters of a Ray node id (56 hex digits) shown: enough to tell a cluster's nodes apart.
NODE_CHARS = 12

_STATE_STYLES: dict[int, str] = {
    jpb.JOB_STATE_RUNNING: "green",
    jpb.JOB_STATE_AWAITING_PARAMETERS: "yellow",
    jpb.JOB_STATE_CREATING: "yellow",
    jpb.JOB_STATE_RECOVERING: "magenta",
    jpb.JOB_STATE_FAILED: "bold red",
}
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
NONE = "-"


# ---- small formatters ------------------------------------------------------------------------


def state_name(state: int) -> str:
    """A JobState without its prefix: "RUNNING", "AWAITING_PARAMETERS", ... ("UNKNOWN(n)" for a
    number this build does not know)."""
    try:
        return jpb.JobState.Name(jpb.JobState.ValueType(state)).removeprefix("JOB_STATE_")
    except ValueError:
        return f"UNKNOWN({state})"


def state_text(state: int) -> Text:
    """The state's name, coloured (green running, yellow starting, magenta recovering, red failed)."""
    return Text(state_name(state), style=_STATE_STYLES.get(state, ""))


def short_node(node: str) -> str:
    """A Ray node id cut to its first NODE_CHARS characters ("-" outside a cluster)."""
    return node[:NODE_CHARS] if node else NONE


def human_bytes(n: int) -> str:
    """Bytes in binary units: "512 B", "1.5 KiB", "3.0 GiB"."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def human_age(seconds: float) -> str:
    """A duration: "0.4s", "12s", "3m05s", "2h01m", "3d04h"."""
    s = max(0.0, seconds)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    whole = int(s)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def rate(steps_per_s: float) -> str:
    """Steps per second, two decimals."""
    return f"{steps_per_s:.2f}"


def version_text(job: jpb.Job) -> str:
    """The published version, over the schedule's total_steps when it has one: "12/1000"."""
    return f"{job.version}/{job.total_steps}" if job.total_steps else str(job.version)


def last_step_text(progress: jpb.StepProgress) -> str:
    """How long ago the last step was decided ("-" before the first)."""
    return f"{human_age(progress.last_step_age_s)} ago" if progress.last_step_age_s > 0 else NONE


def last_snapshot_text(progress: jpb.StepProgress) -> str:
    """The newest committed snapshot: "v12, 3m05s ago" ("-" when none)."""
    if not progress.last_snapshot and not progress.last_snapshot_version:
        return NONE
    return f"v{progress.last_snapshot_version}, {human_age(progress.last_snapshot_age_s)} ago"


def workers_text(job: jpb.Job) -> Text:
    """Members live and lost: "2 live" or "1 live, 1 lost" (the lost part red)."""
    lost = sum(1 for m in job.members if m.lost)
    text = Text(f"{len(job.members) - lost} live")
    if lost:
        text.append(", ")
        text.append(f"{lost} lost", style="red")
    return text


def shards_text(job: jpb.Job) -> Text:
    """The shard count, with the unreachable ones in red: "4" or "4 (1 unreachable)"."""
    down = sum(1 for s in job.shards if s.unreachable)
    text = Text(str(len(job.shards)))
    if down:
        text.append(f" ({down} unreachable)", style="red")
    return text


def step_counts_text(progress: jpb.StepProgress) -> Text:
    """Members of the open step that pushed / it waits for / are missing: "1/1/0"."""
    text = Text()
    text.append(str(len(progress.pushed)), style="green" if progress.pushed else "")
    text.append("/")
    text.append(str(len(progress.waiting)), style="yellow" if progress.waiting else "")
    text.append("/")
    text.append(str(len(progress.missing)), style="red" if progress.missing else "")
    return text


# ---- jobs ------------------------------------------------------------------------------------


def jobs_table(jobs: Sequence[jpb.Job]) -> Table:
    """One row per job, sorted by id: id, tenant, state, version[/total_steps], steps/s, members,
    shards, the open step's pushed/waiting/missing counts and the last snapshot."""
    table = Table(title="jobs", title_justify="left", caption=None if jobs else "no jobs")
    table.add_column("job", no_wrap=True, style="bold")
    table.add_column("tenant")
    table.add_column("state")
    table.add_column("version", justify="right")
    table.add_column("steps/s", justify="right")
    table.add_column("workers")
    table.add_column("shards")
    table.add_column("pushed/waiting/missing", justify="center")
    table.add_column("last snapshot")
    for job in sorted(jobs, key=lambda j: j.job_id):
        table.add_row(
            job.job_id,
            job.tenant or NONE,
            state_text(job.state),
            version_text(job),
            rate(job.progress.steps_per_s),
            workers_text(job),
            shards_text(job),
            step_counts_text(job.progress),
            last_snapshot_text(job.progress),
        )
    return table


# ---- one job ---------------------------------------------------------------------------------


def header_panel(job: jpb.Job) -> Panel:
    """The job at a glance: state (and why), version, generation, recoveries, pace, snapshot."""
    p = job.progress
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    state = state_text(job.state)
    if job.state_reason:
        state.append(f"  {job.state_reason}", style="red" if job.state == jpb.JOB_STATE_FAILED else "")
    grid.add_row("state", state)
    grid.add_row("version", version_text(job))
    grid.add_row("open step", str(p.step))
    grid.add_row("generation", str(job.generation))
    recoveries = str(job.recoveries)
    if job.recovered_from:
        recoveries += f" (last from {job.recovered_from})"
    grid.add_row("recoveries", recoveries)
    grid.add_row("steps/s", rate(p.steps_per_s))
    grid.add_row("last step", last_step_text(p))
    snapshot = last_snapshot_text(p)
    if p.last_snapshot:
        snapshot += f"  {p.last_snapshot}"
    grid.add_row("last snapshot", snapshot)
    grid.add_row("workers", _membership(job))
    title = Text(job.job_id, style="bold")
    if job.tenant:
        title.append(f"  tenant {job.tenant}", style="dim")
    return Panel(grid, title=title, title_align="left", expand=False)


def _membership(job: jpb.Job) -> Text:
    s = job.spec
    text = workers_text(job)
    text.append(f" of {s.num_workers} per step")
    if s.min_workers or s.max_workers:
        text.append(f" (min {s.min_workers or s.num_workers}, max {s.max_workers or s.num_workers})", style="dim")
    return text


def step_state(worker_id: int, progress: jpb.StepProgress, lost: bool = False) -> Text:
    """Where a member stands in the open step: "lost" (red), "pushed" (green), "waiting"
    (yellow), or "-" when the progress names it nowhere."""
    if lost or worker_id in progress.missing:
        return Text("lost", style="bold red")
    if worker_id in progress.pushed:
        return Text("pushed", style="green")
    if worker_id in progress.waiting:
        return Text("waiting", style="yellow")
    return Text(NONE, style="dim")


def workers_table(job: jpb.Job) -> Table:
    """One row per member (and per worker id the open step waits for or misses that is not a
    member): id, name, lease, where it stands in the open step, seconds since its lease was renewed."""
    p = job.progress
    table = Table(title=f"workers (step {p.step})", title_justify="left", caption=None if job.members else "no members")
    table.add_column("id", justify="right")
    table.add_column("name")
    table.add_column("lease", justify="right")
    table.add_column("this step")
    table.add_column("idle", justify="right")
    members = {m.worker_id: m for m in job.members}
    for m in sorted(job.members, key=lambda m: m.worker_id):
        idle = Text(human_age(m.idle_s), style="red" if m.lost else "")
        table.add_row(str(m.worker_id), m.name or NONE, str(m.lease), step_state(m.worker_id, p, m.lost), idle)
    for wid in sorted({*p.waiting, *p.missing} - members.keys()):
        table.add_row(str(wid), Text("(not joined)", style="dim"), NONE, step_state(wid, p), NONE)
    return table


def memory_texts(memory: jpb.ShardMemory) -> tuple[str, str, str, str]:
    """A shard's resident, spilled and buffer bytes and its budget ("unlimited" for 0)."""
    budget = human_bytes(memory.budget_bytes) if memory.budget_bytes else "unlimited"
    return human_bytes(memory.resident_bytes), human_bytes(memory.spilled_bytes), human_bytes(memory.buffer_bytes), budget


def shards_table(job: jpb.Job) -> Table:
    """One row per shard: index, address, node (cut to NODE_CHARS), version, memory, and whether
    it answered."""
    table = Table(title="shards", title_justify="left")
    table.add_column("shard", justify="right")
    table.add_column("address", overflow="fold")
    table.add_column("node", no_wrap=True)
    table.add_column("version", justify="right")
    table.add_column("resident", justify="right")
    table.add_column("spilled", justify="right")
    table.add_column("buffer", justify="right")
    table.add_column("budget", justify="right")
    table.add_column("status")
    for s in sorted(job.shards, key=lambda s: s.index):
        if s.unreachable:
            status = Text("UNREACHABLE", style="bold red")
        elif not s.initialized:
            status = Text("no parameters", style="yellow")
        else:
            status = Text("ok", style="green")
        version = str(s.version) if s.initialized else NONE
        table.add_row(str(s.index), s.address, short_node(s.node), version, *memory_texts(s.memory), status)
    return table


def skipped_view(job: jpb.Job) -> RenderableType:
    """Steps skipped so far by reason (a dim line when none)."""
    if not any(job.skipped_steps.values()):
        return Text("skipped steps: none", style="dim")
    table = Table(title="skipped steps", title_justify="left")
    table.add_column("reason")
    table.add_column("steps", justify="right")
    for reason, count in sorted(job.skipped_steps.items()):
        table.add_row(reason, str(count))
    return table


def job_status(job: jpb.Job) -> Group:
    """The whole of ``paramserver status JOB``: header, workers, shards, skipped steps."""
    return Group(header_panel(job), workers_table(job), shards_table(job), skipped_view(job))


# ---- JSON ------------------------------------------------------------------------------------


def redacted(job: jpb.Job) -> jpb.Job:
    """A copy of `job` without its worker_token (a secret: never printed)."""
    out = jpb.Job()
    out.CopyFrom(job)
    out.worker_token = ""
    return out


def job_json(job: jpb.Job) -> str:
    """The job as proto3 JSON (every field, zeros included; worker_token blanked)."""
    return json_format.MessageToJson(redacted(job), always_print_fields_with_no_presence=True)


def jobs_json(jobs: Sequence[jpb.Job]) -> str:
    """The jobs as a ListJobsResponse in proto3 JSON ({"jobs": [...]}; worker tokens blanked)."""
    response = jpb.ListJobsResponse(jobs=[redacted(j) for j in sorted(jobs, key=lambda j: j.job_id)])
    return json_format.MessageToJson(response, always_print_fields_with_no_presence=True)
