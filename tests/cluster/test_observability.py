"""What a service shows while it trains (real Ray, real front door, real shards): the Prometheus
endpoint's values move with training, the shards' and coordinator's log records reach the front
door's log with their job, shard and step, and shard data ports come from the configured range."""

from __future__ import annotations

import logging
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from paramserver.metric_names import CATALOG
from paramserver.server import BackgroundService, ServiceConfig
from paramserver.spread import PortRange
from paramserver_client import JobClient, Reason, ServiceError, Worker, param_group
from tests.conftest import SNAPSHOT_DIR, SPILL_DIR, STATE_DIR

SHAPES = [("w", (64, 64)), ("b", (64,)), ("head.w", (64, 32))]
TOTAL = sum(int(np.prod(s)) for _, s in SHAPES)
PORTS = PortRange(21470, 21477)


@pytest.fixture(scope="module")
def observed(ray_session: None) -> Iterator[BackgroundService]:
    """A second front door (its own coordinator) with metrics on a free port and shard ports
    from PORTS."""
    svc = BackgroundService(
        ServiceConfig(host="127.0.0.1", port=0, snapshot_dir=str(SNAPSHOT_DIR), spill_dir=str(SPILL_DIR), state_dir=str(STATE_DIR),
                      name=f"obs-{uuid.uuid4().hex[:6]}", metrics_port=0, shard_port_range=PORTS, warm_shards=0),
        own_ray=False,
    )  # fmt: skip
    yield svc
    svc.stop()


def scrape(svc: BackgroundService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    assert svc.service.metrics is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.service.metrics.port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


def train(address: str, job: str, steps: range, *, clip_every: int = 0) -> None:
    with Worker(address, job, "a") as wa, Worker(address, job, "b") as wb:
        ws = sorted([wa, wb], key=lambda w: w.worker_id)
        if steps.start == 0:
            ws[0].upload(np.random.default_rng(0).standard_normal(TOTAL).astype(np.float32))
        for s in steps:
            for w in ws:
                g = np.random.default_rng(10 * s + w.worker_id).standard_normal(TOTAL).astype(np.float32)
                w.push(s, g * (100.0 if clip_every and s % clip_every == 0 else 0.01), 4)
            ws[1].pull(s + 1)
            ws[0].pull(s + 1)


def test_the_metrics_endpoint_moves_with_training(observed: BackgroundService) -> None:
    job = f"obs-{uuid.uuid4().hex[:6]}"
    address = observed.address
    with JobClient(address) as jc:
        head = param_group("head", patterns=["head.w"], optimizer="adamw", hyperparameters={"lr": 1e-3})
        settings = {"optimizer": "adamw", "hyperparameters": {"lr": 1e-2}, "num_workers": 2, "num_shards": 2, "max_grad_norm": 1.0}
        jc.create_job(SHAPES, job_id=job, param_groups=[head], **settings)
        try:
            train(address, job, range(0, 2), clip_every=2)
            before = scrape(observed)
            train(address, job, range(2, 12), clip_every=2)
            jc.create_snapshot(job)
            after = scrape(observed)
        finally:
            jc.delete_job(job)
    names = {n for n, _ in after}
    for m in CATALOG:  # every family the service can show is there, but those that need an event
        if m.name in ("paramserver_scrape_errors", "paramserver_job_skipped_steps"):
            continue
        base = m.name + ("_total" if m.kind == "counter" else "_count" if m.kind == "histogram" else "")
        assert base in names, base
    assert value(after, "paramserver_job_version", job_id=job) == 12 and value(before, "paramserver_job_version", job_id=job) == 2
    assert value(after, "paramserver_job_steps_total", job_id=job) - value(before, "paramserver_job_steps_total", job_id=job) == 10
    # every other step's gradient is 100x: clipped; the others are not (clip rate 1/2)
    assert (
        value(after, "paramserver_job_clipped_steps_total", job_id=job) - value(before, "paramserver_job_clipped_steps_total", job_id=job)
        == 5
    )
    for phase in ("push", "reduce", "decision", "update", "publish", "pull"):
        moved = value(after, "paramserver_step_phase_seconds_count", job_id=job, phase=phase) - value(
            before, "paramserver_step_phase_seconds_count", job_id=job, phase=phase
        )
        per_shard = {"push": 2 * 10, "pull": 2 * 10}.get(phase, 10)  # each step: 2 workers push and pull, 1 reduce, 1 update
        assert moved == 2 * per_shard, (phase, moved)  # on both shards
    grew = value(after, "paramserver_shard_received_bytes_total", job_id=job) - value(
        before, "paramserver_shard_received_bytes_total", job_id=job
    )
    assert grew >= 10 * 2 * TOTAL * 4  # 10 steps of 2 fp32 gradients, framing on top
    sent = value(after, "paramserver_shard_sent_bytes_total", job_id=job) - value(before, "paramserver_shard_sent_bytes_total", job_id=job)
    assert sent >= 10 * 2 * TOTAL * 4  # each step both workers pull the whole model
    assert value(after, "paramserver_snapshot_seconds_count", job_id=job) == 1
    assert value(after, "paramserver_snapshot_bytes_total", job_id=job) > 3 * TOTAL * 4  # params and two moments
    for kind in ("resident", "rss"):
        assert value(after, "paramserver_shard_memory_bytes", job_id=job, kind=kind) > 0
    assert value(after, "paramserver_shard_memory_bytes", job_id=job, kind="spilled") == 0
    # optimizer health of step 10 (measured every 10 steps), per group
    for group in ("default", "head"):
        norm = value(after, "paramserver_job_grad_norm", job_id=job, group=group)
        ratio = value(after, "paramserver_job_update_rms_ratio", job_id=job, group=group)
        assert norm > 0 and 0 < ratio < 1, (group, norm, ratio)
    assert value(after, "paramserver_job_workers", job_id=job, state="live") == 2
    assert value(after, "paramserver_job_workers_waiting", job_id=job) == 2  # step 12 is open, nobody pushed
    assert value(after, "paramserver_rpc_total", method="CreateSnapshot", code="OK") >= 1
    # a deleted job's series are gone
    assert value(scrape(observed), "paramserver_job_version", job_id=job) == 0


def test_shard_ports_come_from_the_range_and_logs_reach_the_front_door(
    observed: BackgroundService, caplog: pytest.LogCaptureFixture
) -> None:
    job = f"logs-{uuid.uuid4().hex[:6]}"
    caplog.set_level(logging.INFO)
    with JobClient(observed.address) as jc:
        created = jc.create_job(SHAPES, job_id=job, optimizer="sgd", hyperparameters={"lr": 0.1}, num_workers=2, num_shards=3)
        try:
            ports = sorted(int(s.address.rsplit(":", 1)[1]) for s in created.shards)
            assert all(PORTS.low <= p <= PORTS.high for p in ports) and len(set(ports)) == 3, ports
            train(observed.address, job, range(0, 1))
            jc.create_snapshot(job)
            deadline = time.monotonic() + 30
            relayed: list[Any] = []
            while time.monotonic() < deadline:
                relayed = [r for r in caplog.records if getattr(r, "job", None) == job and getattr(r, "source", None)]
                shards_seen = {getattr(r, "shard", None) for r in relayed} >= {0, 1, 2}
                if shards_seen and any("snapshot" in r.getMessage() for r in relayed if r.source == "coordinator"):
                    break  # every line the asserts below look for has been relayed (not merely the first)
                time.sleep(0.2)
        finally:
            jc.delete_job(job)
    shard_lines = [r for r in relayed if getattr(r, "shard", None) is not None]
    assert {r.shard for r in shard_lines} == {0, 1, 2}, [r.getMessage() for r in relayed]
    assert any(re.search(r"shard \d serving 127\.0\.0\.1:214\d\d", r.getMessage()) for r in shard_lines)
    assert any("snapshot" in r.getMessage() for r in relayed if r.source == "coordinator")


def test_a_node_out_of_ports_in_the_range_refuses_the_job_and_creates_nothing(ray_session: None) -> None:
    narrow = PortRange(21490, 21491)
    svc = BackgroundService(
        ServiceConfig(host="127.0.0.1", port=0, snapshot_dir=str(SNAPSHOT_DIR), spill_dir=str(SPILL_DIR), state_dir=str(STATE_DIR),
                      name=f"ports-{uuid.uuid4().hex[:6]}", shard_port_range=narrow, warm_shards=0),
        own_ray=False,
    )  # fmt: skip
    try:
        with JobClient(svc.address) as jc:
            with pytest.raises(ServiceError) as info:
                jc.create_job(SHAPES, job_id="three", optimizer="sgd", num_shards=3)
            err = info.value
            assert (err.code, err.reason, err.metadata.get("field")) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.SHARDS_UNSCHEDULABLE,
                "shard_port_range",
            )
            assert "21490-21491" in err.message
            assert [j.job_id for j in jc.list_jobs()] == []
            two = jc.create_job(SHAPES, job_id="two", optimizer="sgd", num_shards=2)  # the ports were given back
            assert sorted(int(s.address.rsplit(":", 1)[1]) for s in two.shards) == [21490, 21491]
            jc.delete_job("two")
    finally:
        svc.stop()


def test_with_tls_the_metrics_endpoint_is_https_with_the_services_certificate(tls_service: Any) -> None:
    import ssl

    metrics = tls_service.background.service.metrics
    assert metrics is not None
    trusted = ssl.create_default_context(cafile=tls_service.ca_file)
    trusted.check_hostname = False  # the test certificate names localhost; we dial 127.0.0.1
    with urllib.request.urlopen(f"https://127.0.0.1:{metrics.port}/metrics", timeout=30, context=trusted) as r:
        assert "paramserver_rpc" in r.read().decode()
    with pytest.raises(OSError):  # plaintext on the TLS port gets no answer
        urllib.request.urlopen(f"http://127.0.0.1:{metrics.port}/metrics", timeout=10).read()
    with pytest.raises(OSError):  # nor does a client that does not trust the service's CA
        urllib.request.urlopen(f"https://127.0.0.1:{metrics.port}/metrics", timeout=10, context=ssl.create_default_context()).read()
