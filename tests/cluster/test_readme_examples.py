"""Every README example marked ``# example: NAME`` runs, as a whole script, against the real service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCK = re.compile(r"```python\n# example: (\w+)\n(.*?)```", re.S)
EXAMPLES = {name: code for name, code in BLOCK.findall(README.read_text())}


def test_the_readme_has_an_example_per_integration() -> None:
    assert {"plain_loop", "torch_scheduler", "amp", "overlap", "hf_trainer", "lightning"} <= set(EXAMPLES), sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_a_readme_example_runs(address: str, jobs: list[str], tmp_path: Path, name: str) -> None:
    jobs.append(job_id := f"readme-{name.replace('_', '-')}-{uuid.uuid4().hex[:6]}")
    script = tmp_path / f"{name}.py"
    script.write_text(f"# example: {name}\n{EXAMPLES[name]}")
    env = {**os.environ, "PARAMSERVER_ADDRESS": address, "PARAMSERVER_JOB": job_id, "PARAMSERVER_WORKDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
