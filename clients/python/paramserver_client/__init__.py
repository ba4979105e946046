"""The paramserver client library: needs only grpcio, protobuf and numpy.

* :class:`JobClient`, :class:`Worker`: blocking clients over numpy arrays.
* :mod:`paramserver_client.aio`: the same on asyncio (grpc.aio).
* :class:`paramserver_client.torch.RemoteOptimizer`: a drop-in for a
  torch.optim optimizer (needs torch).

Errors are :class:`ServiceError` with a machine-readable ``reason``.
"""

from paramserver_client.aio import (
    AsyncJobClient,
    AsyncWorker,
    StepResult,
    galore_param_groups,
    make_spec,
    muon_param_groups,
    no_decay_for_biases_and_norms,
    param_group,
)
from paramserver_client.client import JobClient, Worker
from paramserver_client.codec import BFLOAT16, EVAL, FLOAT16, FLOAT32, TRAIN
from paramserver_client.errors import JobRolledBack, ServiceError
from paramserver_client.reasons import Reason
from paramserver_client.retry import RetryPolicy

__all__ = [
    "BFLOAT16",
    "EVAL",
    "FLOAT16",
    "FLOAT32",
    "TRAIN",
    "AsyncJobClient",
    "AsyncWorker",
    "JobClient",
    "JobRolledBack",
    "Reason",
    "RetryPolicy",
    "ServiceError",
    "StepResult",
    "Worker",
    "galore_param_groups",
    "make_spec",
    "muon_param_groups",
    "no_decay_for_biases_and_norms",
    "param_group",
]
