"""Pure parts of placement and observability: the spread policy, shard port ranges, an actor's
telemetry and log ring, the log formats and the Prometheus families built from exports."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest
from prometheus_client.core import Metric

from paramserver.log_format import JsonFormatter, TextFormatter, configure
from paramserver.log_relay import emit
from paramserver.metrics import families
from paramserver.spread import Node, PortRange, bind_in_range, candidates, spread
from paramserver.telemetry import LOG_RING, LogRing, Telemetry, fields_of

NODES = [
    Node("n-b", "10.0.0.2", 8, 0),
    Node("n-gpu", "10.0.0.3", 8, 2),
    Node("n-head", "10.0.0.9", 4, 0, is_head=True),
    Node("n-a", "10.0.0.1", 8, 0),
]


def test_spread_goes_round_robin_over_the_nodes_that_fit_head_first() -> None:
    order = [n.node_id for n in candidates(NODES, 0, 0)]
    assert order == ["n-head", "n-a", "n-b"]  # no GPU asked: GPU nodes kept for those who need them
    assert spread(NODES, 0, 0, [0, 1, 2, 3]) == {0: "n-head", 1: "n-a", 2: "n-b", 3: "n-head"}
    assert spread(NODES, 0, 0, [0, 1], start=1) == {0: "n-a", 1: "n-b"}  # the next job starts further along
    assert spread(NODES, 6, 0, [0, 1, 2]) == {0: "n-a", 1: "n-b", 2: "n-a"}  # the head has 4 CPUs only
    assert spread(NODES, 1, 1, [0, 1]) == {0: "n-gpu", 1: "n-gpu"}  # GPU shards: GPU nodes only
    assert spread(NODES, 1, 4, [0]) == {}  # nothing fits: Ray reports it
    assert spread([Node("g", "x", 8, 1)], 0, 0, [0]) == {0: "g"}  # only GPU nodes: used


def test_a_port_range_parses_iterates_once_and_names_itself_when_full() -> None:
    r = PortRange.parse("52000-52003")
    assert (r.low, r.high, len(r), str(r)) == (52000, 52003, 4, "52000-52003")
    assert sorted(r.ports(random.Random(3))) == [52000, 52001, 52002, 52003]
    assert PortRange.parse("7000") == PortRange(7000, 7000)
    for bad in ("", "a-b", "9-1", "0-10", "1-70000", "1-2-3"):
        with pytest.raises(ValueError):
            PortRange.parse(bad)
    taken = {52000, 52002}

    def bind(port: int) -> int:
        if port in taken:
            raise RuntimeError("in use")
        return port

    assert bind_in_range(bind, r) in (52001, 52003)
    with pytest.raises(OSError, match="52000-52003"):
        bind_in_range(lambda p: 0, r)


def test_telemetry_counts_times_and_drops_a_jobs_series() -> None:
    t = Telemetry({"job": "j"})
    t.inc("c", 2, reason="x")
    t.inc("c", 3, reason="x")
    t.set("g", 7.5)
    t.observe("h", 0.003, bounds=(0.001, 0.01))
    t.observe("h", 5.0, bounds=(0.001, 0.01))
    got = {s.name: s for s in t.export()}
    assert got["c"].value == 5 and got["c"].labels == (("job", "j"), ("reason", "x"))
    assert got["g"].value == 7.5
    hist = got["h"].hist
    assert hist is not None and hist.counts == [0, 1, 1] and hist.count == 2 and math.isclose(hist.total, 5.003)
    t.drop("job", "j")
    assert t.export() == []


def test_log_records_carry_the_job_shard_and_step_they_name() -> None:
    def record(msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("paramserver.x", logging.INFO, "f", 1, msg, args, None)

    assert fields_of(record("job %s shard %d: step %d failed", "j1", 2, 7)) == {"job": "j1", "shard": 2, "step": 7}
    assert fields_of(record("job %s: %d%% done at step %d", "j", 50, 3)) == {"job": "j", "step": 3}
    assert fields_of(record("no fields %s", "x")) == {}
    ring = LogRing({"node": "n1"})
    logger = logging.getLogger("paramserver.test_ring")
    logger.addHandler(ring)
    logger.setLevel(logging.INFO)
    try:
        logger.info("job %s shard %d serving %s", "j9", 1, "h:1")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("job %s: failed", "j9")
        first, second = ring.since(0)
        assert (first["job"], first["shard"], first["node"], first["message"]) == ("j9", 1, "n1", "job j9 shard 1 serving h:1")
        assert "ValueError: boom" in str(second["exc"]) and ring.since(int(second["seq"])) == []
        for k in range(LOG_RING + 5):
            logger.info("line %d", k)
        assert ring.dropped == 7 and len(ring.since(0)) == LOG_RING
    finally:
        logger.removeHandler(ring)


def test_relayed_records_keep_their_fields_in_both_formats(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    entry = {"seq": 1, "time": 1.5e9, "level": "WARNING", "logger": "paramserver.shard_runtime", "message": "slow",
             "job": "j", "shard": 0, "step": 4, "node": "abcdef0123456789"}  # fmt: skip
    assert emit("paramserver-j-shard-0", entry)
    (rec,) = [r for r in caplog.records if r.getMessage() == "slow"]
    assert (rec.name, rec.levelno, rec.created) == ("paramserver.shard_runtime", logging.WARNING, 1.5e9)
    line = json.loads(JsonFormatter().format(rec))
    assert {k: line[k] for k in ("level", "logger", "message", "job", "shard", "step", "source")} == {
        "level": "WARNING", "logger": "paramserver.shard_runtime", "message": "slow", "job": "j", "shard": 0, "step": 4, "source": "shard",
    }  # fmt: skip
    assert line["time"].startswith("2017-07-14T02:40:00")
    assert TextFormatter().format(rec).endswith("slow [source=shard node=abcdef012345 job=j shard=0 step=4]")
    assert not emit("x", {**entry, "level": "DEBUG", "message": "hidden"})  # below the level: dropped
    with pytest.raises(ValueError, match="log format"):
        configure("INFO", "xml")
    with pytest.raises(ValueError, match="log level"):
        configure("LOUD", "text")


def test_families_combine_the_shards_into_job_values() -> None:
    shard = Telemetry({"job_id": "j", "shard": "0", "node": "n"})
    shard.set("paramserver_shard_version", 3)
    shard.observe("paramserver_step_phase_seconds", 0.002, phase="update")
    other = Telemetry({"job_id": "j", "shard": "1", "node": "n"})
    other.set("paramserver_shard_version", 3)
    exports = {
        "coordinator": {"samples": [], "shards": {}},
        "s0": {"job": "j", "step": 3, "pushed": [0, 1], "members": [0, 1, 2], "samples": shard.export(),
               "health": {"default": (0, 9.0, 1.0, 100.0), "head": (0, 16.0, 0.0, 4.0)}},
        "s1": {"job": "j", "step": 3, "pushed": [1], "members": [0, 1, 2], "samples": other.export(),
               "health": {"default": (0, 16.0, 3.0, 300.0)}},
        "gone": None,
    }  # fmt: skip
    by_name: dict[str, Metric] = {f.name: f for f in families(exports)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in by_name.values() for s in f.samples}
    assert samples[("paramserver_job_workers_pushed", (("job_id", "j"),))] == 1  # pushed to every shard: worker 1 only
    assert samples[("paramserver_job_workers_waiting", (("job_id", "j"),))] == 2
    assert samples[("paramserver_job_grad_norm", (("group", "default"), ("job_id", "j")))] == 5.0  # sqrt(9 + 16)
    assert samples[("paramserver_job_update_rms_ratio", (("group", "default"), ("job_id", "j")))] == 0.1  # sqrt(4 / 400)
    assert samples[("paramserver_job_grad_norm", (("group", "head"), ("job_id", "j")))] == 4.0
    buckets = [s for s in by_name["paramserver_step_phase_seconds"].samples if s.name.endswith("_bucket")]
    assert [b.value for b in buckets if b.labels["le"] in ("0.001", "0.0025", "+Inf")] == [0, 1, 1]
    assert by_name["paramserver_shard_version"].type == "gauge"


def test_the_endpoint_counts_an_actor_that_did_not_answer_and_serves_the_others() -> None:
    import asyncio
    import threading
    import urllib.request
    from collections.abc import Mapping
    from typing import Any

    from prometheus_client.parser import text_string_to_metric_families

    from paramserver.metrics import MetricsEndpoint

    shard = Telemetry({"job_id": "j", "shard": "0", "node": "n"})
    shard.set("paramserver_shard_version", 7)

    class Source:  # a coordinator that answers and a shard that did not (None), as Cluster.telemetry says
        async def telemetry(self, log_since: Mapping[str, int] | None, timeout: float = 5.0) -> dict[str, dict[str, Any] | None]:
            assert log_since is None  # a scrape asks for no log records
            return {"coordinator": {"samples": shard.export(), "shards": {}}, "paramserver-j-shard-1": None}

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    endpoint = MetricsEndpoint()
    try:
        port = endpoint.start("127.0.0.1", 0, Source(), loop)
        endpoint.observe("JobService", "GetJob", "NOT_FOUND", 0.002)
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        assert samples[("paramserver_scrape_errors_total", (("source", "shard"),))] == 2
        assert samples[("paramserver_shard_version", (("job_id", "j"), ("node", "n"), ("shard", "0")))] == 7
        assert samples[("paramserver_rpc_total", (("code", "NOT_FOUND"), ("method", "GetJob"), ("service", "JobService")))] == 1
    finally:
        endpoint.stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
