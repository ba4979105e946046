"""`paramserver demo --diloco H --quick`: synchronous training and DiLoCo through a real service
(its own local Ray), both trained, DiLoCo sending about H times fewer bytes per token."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
H = 10

#: A row of the demo's table: run, syncs, initial loss, final loss, loss/sync, bytes/token,
#: sync/bytes, us/token, time/sync.
ROW = re.compile(
    r"^(?P<run>sync|DiLoCo H=\d+(?: \w+)?)\s+(?P<syncs>\d+)\s+(?P<initial>\S+)\s+(?P<final>\S+)\s+(?P<loss_ratio>\S+)\s+"
    r"(?P<bytes>\S+)\s+(?P<fewer>\S+)x\s+(?P<us>\S+)\s+(?P<time_ratio>\S+)$",
    re.MULTILINE,
)


def _cli() -> list[str]:
    exe = shutil.which("paramserver", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "paramserver.cli"]


def _env() -> dict[str, str]:
    # Ray's socket paths must stay under 107 bytes: use a short temp dir, not pytest's.
    ray_tmp = Path(tempfile.mkdtemp(prefix="psr-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    return dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=str(ray_tmp))


@pytest.mark.slow  # a service of its own: in make test-slow (CI runs it)
def test_diloco_demo_quick_trains_both_and_diloco_sends_h_times_fewer_bytes() -> None:
    out = subprocess.run(
        [*_cli(), "demo", "--diloco", str(H), "--quick"], capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    rows = {m["run"]: {k: float(v) for k, v in m.groupdict().items() if k != "run"} for m in ROW.finditer(text)}
    assert set(rows) == {"sync", f"DiLoCo H={H}"}, text
    sync, dil = rows["sync"], rows[f"DiLoCo H={H}"]
    steps = int(sync["syncs"])
    assert steps > 0 and dil["syncs"] == steps // H  # one push per step; one per H steps
    for r in (sync, dil):
        assert math.isfinite(r["final"]) and math.isfinite(r["initial"]), text
        assert r["final"] < r["initial"] - 0.1, text  # it trained (ln 14 = 2.64 at the start)
        assert r["bytes"] > 0, text
    assert sync["initial"] == dil["initial"]  # the same model, the same held-out set
    assert dil["bytes"] < sync["bytes"], text
    # the same pushes and pulls of the whole model, H times fewer of them (framing aside)
    assert dil["fewer"] >= 0.95 * H, text
    assert math.isclose(dil["loss_ratio"], dil["final"] / sync["final"], rel_tol=2e-3, abs_tol=2e-3), text
    assert re.search(r"loss ratio DiLoCo/sync [0-9.]+; bytes per token [0-9.]+x fewer", text), text
