"""A spilled shard (state streamed from files within a memory budget) and an in-memory shard fed the
same uploads and pushes hold the same bits: parameters, every moment and counter, publications."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from paramserver.errors import ConfigError
from paramserver.jobconfig import GroupRule, JobConfig
from paramserver.shard import ShardState, Storage
from paramserver.steps import decide
from paramserver_client.codec import BFLOAT16, EVAL, FLOAT32, TRAIN, parse_chunk_message
from tests.helpers import flat_params, pulled, stage

PARAMS = (("embed.weight", (300, 40), ""), ("blocks.0.attn.w", (40, 40), ""), ("blocks.0.ln.weight", (40,), ""),
          ("blocks.1.mlp.w", (40, 160), ""), ("blocks.1.mlp.bias", (160,), ""), ("head.weight", (40, 7), ""))  # fmt: skip
GALORE = GroupRule(name="g", patterns=("*mlp.w",), optimizer="galore", hyperparameters={"rank": 4, "update_proj_gap": 2})
CASES: list[tuple[str, dict[str, Any], tuple[GroupRule, ...], float]] = [
    ("adamw", {"lr": 1e-2, "amsgrad": True}, (), 1.0),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}, (), 0.0),
    ("lion", {"lr": 1e-3, "weight_decay": 0.1}, (), 0.5),
    ("adamw_schedulefree", {"lr": 1e-2, "warmup_steps": 2}, (), 0.0),
    ("lisa", {"lr": 1e-2, "active_layers": 1, "interval_steps": 2}, (), 1.0),
    ("lamb", {"lr": 1e-2, "weight_decay": 0.01}, (), 0.0),
    ("adam", {"lr": 1e-2, "weight_decay": 0.1, "cautious": True}, (), 1.0),
    ("tiger", {"lr": 1e-3}, (), 0.0),
    ("adamw", {"lr": 1e-2}, (GroupRule(name="m", patterns=("blocks.*.w",), optimizer="muon", hyperparameters={"lr": 0.02}),
                             GroupRule(name="a", patterns=("embed.*",), optimizer="adafactor"),
                             GALORE,
                             GroupRule(name="t", ndims=(1,), optimizer="tiger_full")), 1.0),
]  # fmt: skip
IDS = ["adamw-amsgrad-clip", "sgd-nesterov", "lion-clip", "schedule-free", "lisa-clip", "lamb", "c-adam-clip", "tiger",
       "muon-adafactor-galore-tiger-full"]  # fmt: skip


def config(name: str, hyper: dict[str, Any], groups: tuple[GroupRule, ...], clip: float, shards: int = 2) -> JobConfig:
    cfg = JobConfig(parameters=PARAMS, optimizer=name, hyperparameters=hyper, groups=groups, num_workers=2, num_shards=shards,
                    max_grad_norm=clip)  # fmt: skip
    cfg.validate()
    return cfg


def feed(state: ShardState, values: np.ndarray, dtype: int = FLOAT32, seed: int = 0) -> Any:
    """Stage a stream of this shard's elements (chunks in a shuffled order) as a push would."""
    return stage(state, values, dtype, seed)


def budgeted(cfg: JobConfig, index: int, spans: Any, directory: Path) -> ShardState:
    """A spilled shard whose budget holds the rings and about a third of the state (no allowance
    for message buffers, so that a small model spills)."""
    probe = ShardState(cfg, index, spans, storage=Storage(1 << 40, directory, tile=1024, overhead=0, spill=True))
    fixed = probe.ring_bytes + probe.tensor_bytes
    state = sum(t.length * 4 * len(probe.columns[g]) for g, tiles in probe.tiles.items() for t in tiles)
    probe.close()
    return ShardState(cfg, index, spans, storage=Storage(fixed + state // 3, directory, tile=1024, overhead=0, spill=True))


@pytest.mark.parametrize(("name", "hyper", "groups", "clip"), CASES, ids=IDS)
def test_spilled_shards_hold_the_same_bits_as_in_memory_ones(tmp_path: Path, name: str, hyper: dict[str, Any],
                                                             groups: tuple[GroupRule, ...], clip: float) -> None:  # fmt: skip
    from paramserver.shard import Contribution

    cfg = config(name, hyper, groups, clip)
    total = cfg.total_elements
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(total).astype(np.float32)
    pairs = []
    for i, spans in enumerate(cfg.plan()):
        mem = ShardState(cfg, i, spans)
        spilled = budgeted(cfg, i, spans, tmp_path / f"s{i}")
        assert sum(s.spilled_bytes for s in spilled.stores.values()) > 0
        if not any(o.whole_tensors for o in spilled.optimizers):  # (a whole matrix may not fit the third)
            assert spilled.memory().resident_bytes > 0
        for st in (mem, spilled):
            st.load(feed(st, p0))
        assert not mem.spilled
        pairs.append((mem, spilled))
    for step in range(6):
        grads = [(rng.standard_normal(total) * (1 + step % 3) * 10).astype(np.float32) for _ in range(2)]
        terms = [int(rng.integers(1, 9)), int(rng.integers(1, 9))]
        results = []
        for which in (0, 1):
            stats = []
            for pair in pairs:
                st = pair[which]
                contributions = [Contribution(w, terms[w], feed(st, grads[w], BFLOAT16 if w else FLOAT32, seed=w)) for w in (1, 0)]
                stats.append(st.reduce(contributions))
            decision = decide(step, stats, cfg.max_grad_norm)
            results.append(decision)
            for pair in pairs:
                pair[which].apply(decision)
        assert results[0] == results[1]  # the same norm, clip coefficient and decision
    for mem, spilled in pairs:
        a, b = mem.snapshot_tensors(), spilled.snapshot_tensors()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
        for dtype, point in ((FLOAT32, TRAIN), (BFLOAT16, TRAIN), (FLOAT32, EVAL)):
            assert pulled(mem, dtype, point) == pulled(spilled, dtype, point)
        assert mem.frozen_parameters() == spilled.frozen_parameters()
        spilled.close()
        assert spilled.storage.directory is not None
        assert not any(p.suffix == ".spill" for p in spilled.storage.directory.iterdir())


def test_a_pull_overtaken_by_two_versions_is_aborted(tmp_path: Path) -> None:
    from paramserver.errors import ParamServerError
    from paramserver.shard import Contribution

    cfg = JobConfig(parameters=(("w", (600, 1000), ""),), optimizer="sgd", hyperparameters={"lr": 0.1}, num_workers=2)
    (spans,) = cfg.plan()  # 600K elements: three 1 MiB chunks
    st = budgeted(cfg, 0, spans, tmp_path)
    st.load(feed(st, np.zeros(cfg.total_elements, dtype=np.float32)))
    from paramserver.wire import encode_blocks

    with st.lock:
        chunks = encode_blocks(st.publication().blocks, FLOAT32)
        first = next(chunks)
    assert parse_chunk_message(first[2]) is not None
    for step in range(2):
        g = np.ones(cfg.total_elements, dtype=np.float32)
        stats = st.reduce([Contribution(w, 1, feed(st, g)) for w in (0, 1)])
        st.apply(decide(step, [stats], 0.0))
    with pytest.raises(ParamServerError) as err:
        next(chunks)
    assert err.value.code == "ABORTED" and err.value.metadata["current_version"] == "2"
    st.close()


def test_a_budget_below_the_rings_names_the_field(tmp_path: Path) -> None:
    cfg = config("adamw", {}, (), 0.0, shards=1)
    (spans,) = cfg.plan()
    with pytest.raises(ConfigError) as err:
        ShardState(cfg, 0, spans, storage=Storage(1 << 20, tmp_path, overhead=96 << 20, spill=True))
    assert err.value.field == "spec.shard_memory_budget_bytes"
    assert not list(tmp_path.glob("*.spill"))


def test_snapshots_of_spilled_shards_restore_anywhere(tmp_path: Path) -> None:
    """A spilled shard's streamed snapshot file is the in-memory format: it restores onto in-memory
    and spilled shards of another shard count, and both continue bit for bit."""
    from paramserver import snapshot_names as names
    from paramserver.manifest import Manifest, ShardEntry
    from paramserver.shard import Contribution
    from paramserver.snapshot_store import DirectoryStore, SnapshotReader, SnapshotRef

    name, hyper, groups, _ = CASES[-1]  # every per-tensor state kind
    clip = 1.0  # the norm has the same bits on any shard count (paramserver.gradnorm)
    cfg = config(name, hyper, groups, clip, shards=2)
    total = cfg.total_elements
    shards = [budgeted(cfg, i, spans, tmp_path / f"a{i}") for i, spans in enumerate(cfg.plan())]
    for st in shards:
        st.load(feed(st, np.linspace(-1, 1, total, dtype=np.float32)))

    def train(states: list[ShardState], steps: range) -> None:
        for step in steps:
            g = np.random.default_rng(step).standard_normal(total).astype(np.float32)
            stats = [st.reduce([Contribution(w, 2, feed(st, g * (w + 1))) for w in (0, 1)]) for st in states]
            d = decide(step, stats, cfg.max_grad_norm)
            for st in states:
                st.apply(d)

    train(shards, range(3))
    store, ref = DirectoryStore(tmp_path / "snaps"), SnapshotRef("j", "v3")
    store.begin(ref)
    entries = []
    for st in shards:
        ranges = tuple((s.start, s.length) for s in st.spans)
        meta = {names.META_SHARD: str(st.index), names.META_RANGES: json.dumps(ranges), **st.snapshot_metadata()}
        with st.lock:
            tensors = st.open_snapshot()
        try:
            e = store.write_file(ref, names.shard_file(st.index), tensors, meta)
        finally:
            st.close_snapshot()
        entries.append(ShardEntry(st.index, e.file, e.size, e.sha256, ranges, 3))
    store.commit(ref, Manifest.build("j", 3, cfg, entries))
    reader = SnapshotReader(store, ref, store.read_manifest(ref))
    other = config(name, hyper, groups, clip, shards=3)
    mem = [ShardState(other, i, spans) for i, spans in enumerate(other.plan())]
    disk = [budgeted(other, i, spans, tmp_path / f"b{i}") for i, spans in enumerate(other.plan())]
    for st in mem + disk:
        st.restore(reader, 3, 3)
    for states in (shards, mem, disk):
        train(states, range(3, 5))

    assert np.array_equal(flat_params(mem), flat_params(disk)) and np.array_equal(flat_params(mem), flat_params(shards))
    for a, b in zip(mem, disk, strict=True):
        ta, tb = a.snapshot_tensors(), b.snapshot_tensors()
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    for st in shards + disk:
        st.close()


def loaded_spilled(directory: Path) -> tuple[JobConfig, Any, ShardState]:
    """A one-shard spilled AdamW (AMSGrad, clipped) job with its parameters loaded."""
    name, hyper, groups, clip = CASES[0]
    cfg = config(name, hyper, groups, clip, shards=1)
    (spans,) = cfg.plan()
    st = budgeted(cfg, 0, spans, directory)
    st.load(feed(st, np.linspace(-1, 1, cfg.total_elements, dtype=np.float32)))
    return cfg, spans, st


@pytest.mark.parametrize("when", ["steps-before-the-write", "steps-after-the-write"])
def test_a_spilled_snapshot_holds_its_version_while_training_goes_on(tmp_path: Path, when: str) -> None:
    """The snapshot is opened at version 2 (the only pause); two more steps run before (or after)
    the file is written: it holds version 2's bits, and the tiles were copied aside only when the
    steps came first."""
    from paramserver import snapshot_names as names
    from paramserver.manifest import Manifest, ShardEntry
    from paramserver.shard import Contribution
    from paramserver.snapshot_store import DirectoryStore, SnapshotReader, SnapshotRef

    cfg, spans, st = loaded_spilled(tmp_path / "spill")
    total = cfg.total_elements

    def step(k: int) -> None:
        g = np.random.default_rng(k).standard_normal(total).astype(np.float32)
        st.apply(decide(k, [st.reduce([Contribution(w, 1, feed(st, g)) for w in (0, 1)])], cfg.max_grad_norm))

    for k in range(2):
        step(k)
    expect = st.snapshot_tensors()
    store, ref = DirectoryStore(tmp_path / "snaps"), SnapshotRef("j", "v2")
    store.begin(ref)
    with st.lock:
        tensors = st.open_snapshot()
    if when == "steps-before-the-write":
        step(2)
        step(3)
    ranges = tuple((s.start, s.length) for s in st.spans)
    e = store.write_file(ref, names.shard_file(0), tensors, {names.META_RANGES: json.dumps(ranges), **st.snapshot_metadata()})
    copied = st.close_snapshot()
    assert (copied > 0) == (when == "steps-before-the-write")
    assert not list((tmp_path / "spill").glob("*.frozen"))
    if when == "steps-after-the-write":
        step(2)
    store.commit(ref, Manifest.build("j", 2, cfg, [ShardEntry(0, e.file, e.size, e.sha256, ranges, 2)]))
    fresh = ShardState(cfg, 0, spans)
    fresh.restore(SnapshotReader(store, ref, store.read_manifest(ref)), 2, 2)
    got = fresh.snapshot_tensors()
    assert got.keys() == expect.keys()
    assert [k for k in expect if not torch.equal(got[k], expect[k])] == []
    st.close()


def test_a_failed_copy_aside_fails_the_snapshot_never_the_step(tmp_path: Path) -> None:
    """The side file cannot be written (here: its directory is gone): the step that needed the
    copy still applies, and the snapshot's write fails with SNAPSHOT_FAILED."""
    from paramserver.errors import ParamServerError, Reason
    from paramserver.shard import Contribution
    from paramserver.snapshot_store import DirectoryStore, SnapshotRef

    cfg, _spans, st = loaded_spilled(tmp_path / "spill")
    total = cfg.total_elements
    with st.lock:
        tensors = st.open_snapshot()
    for frozen in st._frozen.values():
        frozen.side_path = tmp_path / "gone" / "side.frozen"
    g = np.ones(total, dtype=np.float32)
    report = st.apply(decide(0, [st.reduce([Contribution(w, 1, feed(st, g)) for w in (0, 1)])], 0.0))
    assert report.outcome.name == "APPLIED" and st.version == 1
    store, ref = DirectoryStore(tmp_path / "snaps"), SnapshotRef("j", "v0")
    store.begin(ref)
    with pytest.raises(ParamServerError) as err:
        store.write_file(ref, "shard-00000.safetensors", tensors, {})
    assert err.value.reason == Reason.SNAPSHOT_FAILED
    st.close_snapshot()
    st.close()


def tiered(cfg: JobConfig, index: int, spans: Any, directory: Path, disk: bool) -> ShardState:
    """A shard with the GPU tiers, simulated on the CPU (host tiles staged through a copy): a third
    of the state on the "device", the rest in host memory, or (disk=True) partly in spill files."""
    probe = ShardState(cfg, index, spans, storage=Storage(1 << 40, directory, tile=1024, overhead=0, spill=True))
    state = sum(t.length * 4 * len(probe.columns[g]) for g, tiles in probe.tiles.items() for t in tiles)
    largest = max(t.length for tiles in probe.tiles.values() for t in tiles)
    ncols = max(len(c) for c in probe.columns.values())
    fixed = probe.ring_bytes + probe.tensor_bytes
    probe.close()
    device = state // 3 + 4 * largest * (ncols + 1) + probe.tensor_bytes
    host = fixed + state // 3 if disk else 0
    storage = Storage(host, directory, tile=1024, overhead=0, spill=disk, device_budget=device, stage=True)
    return ShardState(cfg, index, spans, storage=storage)


@pytest.mark.parametrize("disk", [False, True], ids=["device-and-host", "device-host-and-disk"])
@pytest.mark.parametrize(("name", "hyper", "groups", "clip"), CASES[:5], ids=IDS[:5])  # split rules: several tiles per tensor
def test_tiles_across_device_host_and_disk_hold_the_same_bits(tmp_path: Path, name: str, hyper: dict[str, Any],
                                                              groups: tuple[GroupRule, ...], clip: float, disk: bool) -> None:  # fmt: skip
    """The GPU tiers' logic (tiles on the device within its budget, the rest in host memory or spill
    files, staged to the device for each use) gives the bits of a resident shard."""
    from paramserver.shard import Contribution

    cfg = config(name, hyper, groups, clip)
    total = cfg.total_elements
    rng = np.random.default_rng(1)
    p0 = rng.standard_normal(total).astype(np.float32)
    pairs = []
    for i, spans in enumerate(cfg.plan()):
        mem, tier = ShardState(cfg, i, spans), tiered(cfg, i, spans, tmp_path / f"t{i}", disk)
        assert tier.device_tiers and sum(s.host_bytes for s in tier.stores.values()) > 0
        assert (sum(s.spilled_bytes for s in tier.stores.values()) > 0) == disk
        for st in (mem, tier):
            st.load(feed(st, p0))
        pairs.append((mem, tier))
    for step in range(5):
        grads = [(rng.standard_normal(total) * (1 + step % 3) * 10).astype(np.float32) for _ in range(2)]
        decisions = []
        for which in (0, 1):
            stats = [pair[which].reduce([Contribution(w, 2, feed(pair[which], grads[w], seed=w)) for w in (0, 1)]) for pair in pairs]
            decisions.append(decide(step, stats, cfg.max_grad_norm))
            for pair in pairs:
                pair[which].apply(decisions[-1])
        assert decisions[0] == decisions[1]
    for mem, tier in pairs:
        a, b = mem.snapshot_tensors(), tier.snapshot_tensors()
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
        for dtype, point in ((FLOAT32, TRAIN), (FLOAT32, EVAL)):
            assert pulled(mem, dtype, point) == pulled(tier, dtype, point)
        tier.close()


def test_a_device_budget_below_one_staged_tile_names_the_field(tmp_path: Path) -> None:
    cfg = config("adamw", {}, (), 0.0, shards=1)
    (spans,) = cfg.plan()
    with pytest.raises(ConfigError) as err:
        ShardState(cfg, 0, spans, storage=Storage(0, tmp_path, tile=1024, device_budget=1024, stage=True))
    assert err.value.field == "spec.shard_device_memory_budget_bytes"
