"""What `paramserver jobs` and `paramserver status JOB` render, on hand-built Job messages (no service)."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console, RenderableType

from paramserver import status_view as view
from paramserver.v1 import job_service_pb2 as jpb

NODE = "a1b2c3d4e5f6" + "0" * 44  # Ray node ids are 56 hex digits
OTHER_NODE = "ffeeddccbbaa" + "9" * 44
TOKEN = "psj.train-7.s3cr3t-never-printed"


def text(renderable: RenderableType) -> str:
    console = Console(record=True, width=200, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def lines_with(out: str, needle: str) -> list[str]:
    return [line for line in out.splitlines() if needle in line]


def cells(line: str) -> list[str]:
    """A table row's cells, stripped."""
    return [c.strip() for c in line.strip().strip("│").split("│")]


def row_of(out: str, needle: str) -> list[str]:
    """The cells of the one row containing `needle`."""
    (line,) = lines_with(out, needle)
    return cells(line)


def training_job() -> jpb.Job:
    """A running job at version 12 of 1000: worker 0 pushed step 12, worker 1 is waited for,
    worker 2 was lost (policy WAIT); shard 1 spills; a snapshot at version 10."""
    job = jpb.Job(
        job_id="train-7",
        tenant="team-a",
        state=jpb.JOB_STATE_RUNNING,
        version=12,
        total_steps=1000,
        generation=1,
        recoveries=1,
        recovered_from="replica at version 8",
        worker_token=TOKEN,
        spec=jpb.JobSpec(num_workers=3, num_shards=2),
        progress=jpb.StepProgress(
            step=12,
            pushed=[0],
            waiting=[1],
            missing=[2],
            steps_per_s=1.25,
            last_step_age_s=0.4,
            last_snapshot_version=10,
            last_snapshot="snapshots/train-7/v10",
            last_snapshot_age_s=185,
        ),
    )
    job.members.add(worker_id=0, name="host-a:101", lease=3, idle_s=0.2)
    job.members.add(worker_id=1, name="host-b:202", lease=4, idle_s=1.5)
    job.members.add(worker_id=2, name="host-c:303", lease=5, idle_s=75, lost=True)
    job.workers.extend([0, 1, 2])
    job.shards.add(
        index=0,
        address="10.0.0.1:40001",
        node=NODE,
        version=12,
        initialized=True,
        memory=jpb.ShardMemory(resident_bytes=3 * 1024**3, buffer_bytes=0),
    )
    job.shards.add(
        index=1,
        address="10.0.0.2:40002",
        node=OTHER_NODE,
        version=12,
        initialized=True,
        memory=jpb.ShardMemory(
            budget_bytes=2 * 1024**3, resident_bytes=1536 * 1024**2, buffer_bytes=96 * 1024**2, spilled_bytes=5 * 1024**3
        ),
    )
    job.skipped_steps["GRADIENT_SPIKE"] = 2
    job.skipped_steps["NON_FINITE_GRADIENT"] = 1
    return job


def fresh_job(job_id: str = "fresh") -> jpb.Job:
    """A job just created: no parameters, no members, progress all zeros."""
    job = jpb.Job(job_id=job_id, state=jpb.JOB_STATE_AWAITING_PARAMETERS, spec=jpb.JobSpec(num_workers=1, num_shards=1))
    job.shards.add(index=0, address="127.0.0.1:40003")
    return job


# ---- formatters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (96 * 1024**2, "96.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (5 * 1024**4 + 1024**4 // 2, "5.5 TiB"),
        (2**64 - 1, "16.0 EiB"),
    ],
)
def test_bytes_are_shown_in_binary_units(n: int, shown: str) -> None:
    assert view.human_bytes(n) == shown


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0.0s"), (0.44, "0.4s"), (12.4, "12s"), (185, "3m05s"), (7260, "2h01m"), (3 * 86400 + 4 * 3600 + 59, "3d04h"), (-1, "0.0s")],
)
def test_ages_are_short(seconds: float, shown: str) -> None:
    assert view.human_age(seconds) == shown


def test_a_ray_node_id_is_cut_to_twelve_characters_and_a_missing_one_is_a_dash() -> None:
    assert view.short_node(NODE) == "a1b2c3d4e5f6"
    assert view.short_node("") == "-"
    assert view.short_node("abc") == "abc"


def test_state_names_lose_their_prefix_and_unknown_numbers_still_render() -> None:
    assert view.state_name(jpb.JOB_STATE_AWAITING_PARAMETERS) == "AWAITING_PARAMETERS"
    assert view.state_name(jpb.JOB_STATE_FAILED) == "FAILED"
    assert view.state_name(99) == "UNKNOWN(99)"


# ---- jobs ------------------------------------------------------------------------------------


def test_the_jobs_table_has_a_row_per_job_with_its_numbers() -> None:
    failed = fresh_job("broken")
    failed.state = jpb.JOB_STATE_FAILED
    failed.shards[0].unreachable = True
    out = text(view.jobs_table([training_job(), fresh_job(), failed]))
    header = lines_with(out, "job")[1]
    for column in ("tenant", "state", "version", "steps/s", "workers", "shards", "pushed/waiting/missing", "last snapshot"):
        assert column in header
    assert row_of(out, "train-7") == ["train-7", "team-a", "RUNNING", "12/1000", "1.25", "2 live, 1 lost", "2", "1/1/1", "v10, 3m05s ago"]
    assert row_of(out, "fresh") == ["fresh", "-", "AWAITING_PARAMETERS", "0", "0.00", "0 live", "1", "0/0/0", "-"]
    assert row_of(out, "broken")[2:7] == ["FAILED", "0", "0.00", "0 live", "1 (1 unreachable)"]
    # sorted by id
    assert out.index("broken") < out.index("fresh") < out.index("train-7")


def test_no_jobs_says_so() -> None:
    assert "no jobs" in text(view.jobs_table([]))


def test_the_version_has_no_total_when_the_schedule_has_none() -> None:
    job = training_job()
    job.total_steps = 0
    assert row_of(text(view.jobs_table([job])), "train-7")[3] == "12"


# ---- one job ---------------------------------------------------------------------------------


def test_the_header_shows_state_version_generation_recoveries_pace_and_snapshot() -> None:
    job = training_job()
    out = text(view.header_panel(job))
    assert "train-7" in out and "tenant team-a" in out
    assert lines_with(out, "state")[0].split("│")[1].split() == ["state", "RUNNING"]
    assert "12/1000" in lines_with(out, "version")[0]
    assert "12" in lines_with(out, "open step")[0]
    assert "1" in lines_with(out, "generation")[0]
    assert "1 (last from replica at version 8)" in lines_with(out, "recoveries")[0]
    assert "1.25" in lines_with(out, "steps/s")[0]
    assert "0.4s ago" in lines_with(out, "last step")[0]
    assert "v10, 3m05s ago  snapshots/train-7/v10" in lines_with(out, "last snapshot")[0]
    assert "2 live, 1 lost of 3 per step" in out


def test_a_failed_job_shows_why() -> None:
    job = training_job()
    job.state = jpb.JOB_STATE_FAILED
    job.state_reason = "WORKER_LOST: worker 2's lease expired"
    out = text(view.header_panel(job))
    assert "FAILED  WORKER_LOST: worker 2's lease expired" in out


def test_a_job_before_its_first_step_shows_dashes_not_zeros_for_ages() -> None:
    out = text(view.header_panel(fresh_job()))
    assert lines_with(out, "last step")[0].split("│")[1].split() == ["last", "step", "-"]
    assert lines_with(out, "last snapshot")[0].split("│")[1].split() == ["last", "snapshot", "-"]
    assert "AWAITING_PARAMETERS" in out


def test_the_workers_table_shows_who_pushed_who_is_waited_for_and_who_is_lost() -> None:
    out = text(view.workers_table(training_job()))
    assert "workers (step 12)" in out
    assert row_of(out, "host-a:101") == ["0", "host-a:101", "3", "pushed", "0.2s"]
    assert row_of(out, "host-b:202") == ["1", "host-b:202", "4", "waiting", "1.5s"]
    assert row_of(out, "host-c:303") == ["2", "host-c:303", "5", "lost", "1m15s"]


def test_a_worker_id_the_step_waits_for_that_is_not_a_member_is_listed() -> None:
    job = training_job()
    job.progress.waiting.append(7)
    assert row_of(text(view.workers_table(job)), "(not joined)") == ["7", "(not joined)", "-", "waiting", "-"]


def test_members_without_progress_show_a_dash_for_this_step() -> None:
    job = training_job()
    job.ClearField("progress")
    out = text(view.workers_table(job))
    assert row_of(out, "host-a:101")[3] == "-"
    assert row_of(out, "host-c:303")[3] == "lost"  # from the member itself


def test_the_shards_table_shows_short_nodes_versions_and_memory() -> None:
    job = training_job()
    job.shards[1].unreachable = True
    out = text(view.shards_table(job))
    header = lines_with(out, "address")[0]
    for column in ("shard", "node", "version", "resident", "spilled", "buffer", "budget", "status"):
        assert column in header
    assert row_of(out, "10.0.0.1:40001") == ["0", "10.0.0.1:40001", "a1b2c3d4e5f6", "12", "3.0 GiB", "0 B", "0 B", "unlimited", "ok"]
    assert row_of(out, "10.0.0.2:40002") == [
        "1",
        "10.0.0.2:40002",
        "ffeeddccbbaa",
        "12",
        "1.5 GiB",
        "5.0 GiB",
        "96.0 MiB",
        "2.0 GiB",
        "UNREACHABLE",
    ]
    assert NODE not in out


def test_a_shard_without_parameters_or_node_says_so() -> None:
    assert row_of(text(view.shards_table(fresh_job())), "127.0.0.1:40003") == [
        "0", "127.0.0.1:40003", "-", "-", "0 B", "0 B", "0 B", "unlimited", "no parameters"
    ]  # fmt: skip


def test_skipped_steps_are_listed_by_reason() -> None:
    out = text(view.skipped_view(training_job()))
    assert row_of(out, "GRADIENT_SPIKE") == ["GRADIENT_SPIKE", "2"]
    assert row_of(out, "NON_FINITE_GRADIENT") == ["NON_FINITE_GRADIENT", "1"]
    assert "none" in text(view.skipped_view(fresh_job()))


def test_the_status_view_has_every_part_and_no_token() -> None:
    out = text(view.job_status(training_job()))
    for part in ("train-7", "workers (step 12)", "shards", "skipped steps", "host-c:303", "a1b2c3d4e5f6"):
        assert part in out
    assert TOKEN not in out and "s3cr3t" not in out


# ---- JSON ------------------------------------------------------------------------------------


def test_json_of_one_job_parses_has_every_field_and_never_the_worker_token() -> None:
    job = training_job()
    raw = view.job_json(job)
    assert "s3cr3t" not in raw
    data = json.loads(raw)
    assert data["jobId"] == "train-7" and data["version"] == "12" and data["workerToken"] == ""
    assert data["progress"]["waiting"] == [1] and data["progress"]["lastSnapshotVersion"] == "10"
    assert data["shards"][0]["node"] == NODE  # the full id for scripts
    assert job.worker_token == TOKEN  # the caller's message is untouched


def test_json_of_the_jobs_list_parses_and_never_has_a_worker_token() -> None:
    other = fresh_job()
    other.worker_token = "psj.fresh.another-s3cr3t"
    raw = view.jobs_json([training_job(), other])
    assert "s3cr3t" not in raw
    data = json.loads(raw)
    assert [j["jobId"] for j in data["jobs"]] == ["fresh", "train-7"]
    assert data["jobs"][0]["version"] == "0"  # zeros are printed, for scripts
    assert json.loads(view.jobs_json([])) == {"jobs": []}
