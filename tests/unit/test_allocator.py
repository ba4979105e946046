"""The shard process's allocator settings apply on glibc and leave other C libraries alone."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys

import pytest

from paramserver import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")
def test_glibc_takes_the_settings_and_then_keeps_freed_heap() -> None:
    """In a fresh process: mallopt accepts the three settings; afterwards sixteen freed 1 MiB
    blocks (a step's chunk messages) stay in the process for the next step, where glibc's
    defaults return them to the kernel (resident memory drops), to be faulted in again."""
    probe = """
import ctypes, os, sys
from paramserver.allocator import keep_freed_memory
fd = os.open("/proc/self/statm", os.O_RDONLY)
def rss():  # no heap allocation of its own above the blocks
    return int(os.pread(fd, 100, 0).split()[1]) * 4096
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 1 << 20
libc.free(libc.malloc(size))  # glibc's dynamic rule: 1 MiB blocks now come from the heap
blocks = [libc.malloc(size) for _ in range(16)]
for b in blocks:
    ctypes.memset(b, 1, size)
before = rss()
for b in reversed(blocks):
    libc.free(b)
print(before - rss())
"""
    dropped = {
        mode: int(subprocess.run([sys.executable, "-c", probe, mode], check=True, capture_output=True, text=True).stdout)
        for mode in ("tuned", "default")
    }
    assert dropped["tuned"] < 1 << 20, dropped
    assert dropped["default"] >= 8 << 20, dropped


def test_without_a_c_library_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert allocator.keep_freed_memory() is False
