"""The coordinator's journal folded into its durable state (paramserver.control_state): replay,
compaction and the request ledger, without Ray."""

from __future__ import annotations

from pathlib import Path

from paramserver.control_state import ControlJournal


def fill(cj: ControlJournal) -> None:
    cj.append({"t": "job", "job_id": "j", "config": {"optimizer": "adamw"}, "decided_version": 0, "skips": {}, "norms": []})
    cj.append({"t": "ledger", "id": "r1", "fp": ["create", "j", "k"], "answer": "j"})
    cj.append({"t": "shards", "job_id": "j", "generation": 0, "names": ["s0", "s1"]})
    cj.append({"t": "state", "job_id": "j", "state": "RUNNING"})
    cj.append({"t": "join", "job_id": "j", "worker_id": 0, "name": "a", "lease": 1})
    cj.append({"t": "join", "job_id": "j", "worker_id": 1, "name": "b", "lease": 2})
    cj.append({"t": "ledger", "id": "r2", "fp": ["join", "j", "b"], "answer": [1, 2]})
    for step in range(70):
        cj.append({"t": "decision", "job_id": "j", "step": step, "decision": {"step": step, "apply": True}, "skips": {"X": step},
                   "norms": [float(step)]})  # fmt: skip
    cj.append({"t": "leave", "job_id": "j", "worker_id": 0})
    cj.append({"t": "lost", "job_id": "j", "worker_id": 1, "lost": True})
    cj.append({"t": "job", "job_id": "gone", "config": {}})
    cj.append({"t": "delete", "job_id": "gone"})


def check(cj: ControlJournal) -> None:
    st = cj.state
    assert list(st.jobs) == ["j"]
    job = st.jobs["j"]
    assert (job.state, job.generation, job.shard_names) == ("RUNNING", 0, ["s0", "s1"])
    assert job.members == {1: ["b", 2, True]} and job.next_lease == 3 and job.removed == [0]
    assert job.decided_version == 70 and sorted(job.decisions) == list(range(6, 70))  # the newest 64
    assert job.skips == {"X": 69} and job.norms == [69.0]
    assert st.ledger["r1"] == (("create", "j", "k"), "j") and st.ledger["r2"] == (("join", "j", "b"), (1, 2))  # tuples again


def test_a_reopened_journal_replays_the_same_state(tmp_path: Path) -> None:
    path = tmp_path / "c.journal"
    cj = ControlJournal(path)
    fill(cj)
    check(cj)
    cj.close()
    again = ControlJournal(path)
    check(again)
    again.close()


def test_compaction_keeps_the_state_in_a_few_records(tmp_path: Path) -> None:
    path = tmp_path / "c.journal"
    cj = ControlJournal(path)
    fill(cj)
    size = cj.journal.size_bytes
    cj.journal.compact(cj.state.records())
    assert cj.journal.size_bytes < size
    cj.append({"t": "join", "job_id": "j", "worker_id": 0, "name": "c", "lease": 3})
    cj.close()
    again = ControlJournal(path)
    assert again.state.jobs["j"].members[0] == ["c", 3, False] and again.state.jobs["j"].next_lease == 4
    again.state.jobs["j"].members.pop(0)
    again.state.jobs["j"].removed = [0]
    again.state.jobs["j"].next_lease = 3
    check(again)


def test_a_restored_job_forgets_the_decisions_after_its_snapshot(tmp_path: Path) -> None:
    cj = ControlJournal(tmp_path / "c.journal")
    fill(cj)
    cj.append({"t": "restored", "job_id": "j", "version": 40, "skips": {}, "norms": [1.5]})
    job = cj.state.jobs["j"]
    assert max(job.decisions) == 39 and job.decided_version == 40 and job.norms == [1.5]


def test_tenant_tokens_and_owners_survive_delete_and_compaction() -> None:
    from paramserver.control_state import ControlState

    st = ControlState()
    st.apply({"t": "job", "job_id": "a", "config": {}, "tenant": "team-a", "quota": {"streams": 3}, "secured": True, "tokens": []})
    st.apply({"t": "tokens", "job_id": "a", "tokens": [["h1", 0.0], ["h2", 5.0]]})
    st.apply({"t": "job", "job_id": "b", "config": {}, "tenant": "team-b"})
    st.apply({"t": "delete", "job_id": "b"})
    assert st.jobs["a"].tokens == [["h1", 0.0], ["h2", 5.0]] and st.jobs["a"].quota == {"streams": 3} and st.jobs["a"].secured
    assert st.owners == {"a": "team-a", "b": "team-b"}  # b's snapshots stay team-b's
    again = ControlState()
    for r in st.records():
        again.apply(r)
    assert again.owners == st.owners and again.jobs["a"].tokens == st.jobs["a"].tokens and again.jobs["a"].tenant == "team-a"
