"""A training worker as its own process (``python -m tests.cluster.worker_process ADDRESS JOB NAME
START END [hang]``), for fault tests that SIGKILL it: it joins under NAME, then for each step s in
[START, END) pulls version s and pushes the seeded gradient of step s, printing "pushed s"; then
pulls version END. With "hang" it then prints "hanging" and sleeps (a stuck process to kill)."""

from __future__ import annotations

import sys
import time

from paramserver_client import Worker
from tests.cluster.test_parity import worker_grads


def main() -> None:
    address, job_id, name, start, end = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    with Worker(address, job_id, name) as w:
        print(f"joined {w.worker_id}", flush=True)
        for s in range(start, end):
            w.pull(s)
            w.push(s, *worker_grads(s, w.worker_id))
            print(f"pushed {s}", flush=True)
        w.pull(end)
        if sys.argv[6:] == ["hang"]:
            print("hanging", flush=True)
            time.sleep(3600)


if __name__ == "__main__":
    main()
