"""ArrayFile: a replica's file held as its arrays reads exactly as the file write_tensors writes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from paramserver.memory_store import Blob
from paramserver.tensor_file import ArrayFile, read_header, write_tensors


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "params": rng.standard_normal(1000).astype(np.float32),
        "group.0.step": np.array(7.0),
        "group.0.exp_avg": rng.standard_normal(1000).astype(np.float32),
        "param.2.grid": np.arange(12, dtype=np.int64).reshape(3, 4),
        "empty": np.zeros(0, dtype=np.float32),
    }


def test_every_range_reads_the_bytes_write_tensors_writes() -> None:
    meta = {"version": "4", "ranges": "[[0, 1000]]"}
    blob = Blob()
    written = write_tensors(blob, tensors(), meta)
    held = ArrayFile(tensors(), meta)
    assert held.size == written.size == blob.size
    assert held.read(0, held.size) == blob.to_bytes()
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = int(rng.integers(0, held.size))
        n = int(rng.integers(0, held.size - a + 1))
        assert held.read(a, n) == blob.read(a, n)
    header = read_header(held, "held")
    assert header.metadata == meta and set(header.tensors) == set(tensors())
    assert header.tensors["group.0.step"].shape == () and header.tensors["param.2.grid"].shape == (3, 4)


def test_it_travels_pickled_as_its_arrays_and_keeps_reading_the_same() -> None:
    held = ArrayFile(tensors(), {"k": "v"})
    again = pickle.loads(pickle.dumps(held, protocol=5))
    assert again.size == held.size and again.read(0, again.size) == held.read(0, held.size)


def test_reads_outside_the_file_are_refused() -> None:
    held = ArrayFile(tensors(), {})
    for offset, length in ((-1, 1), (0, held.size + 1), (held.size, 1), (3, -1)):
        with pytest.raises(ValueError, match="beyond"):
            held.read(offset, length)


def test_unsupported_dtypes_are_refused() -> None:
    with pytest.raises(TypeError, match="unsupported dtype"):
        ArrayFile({"x": np.zeros(3, dtype=np.float16)}, {})


def test_a_memory_store_holds_it_as_it_is() -> None:
    held = ArrayFile(tensors(), {})
    assert Blob.hold(held) is held
    assert isinstance(Blob.hold(b"abc"), Blob)
