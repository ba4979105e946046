"""The paramserver client library: needs only grpcio, protobuf and numpy.

* :class:`JobClient`, :class:`Worker`: blocking clients over numpy arrays.
* :mod:`paramserver_client.aio`: the same on asyncio (grpc.aio).
* :class:`RemoteOptimizer` (:mod:`paramserver_client.torch_optim`): a
  ``torch.optim.Optimizer`` whose update runs in the service (needs torch;
  imported on first use, so numpy-only workers never import torch).

Errors are :class:`ServiceError` with a machine-readable ``reason``.
"""

from paramserver_client.aio import (
    AsyncJobClient,
    AsyncWorker,
    OptimizerState,
    StepResult,
    galore_param_groups,
    make_spec,
    muon_param_groups,
    no_decay_for_biases_and_norms,
    param_group,
)
from paramserver_client.client import JobClient, Worker
from paramserver_client.codec import BFLOAT16, EVAL, FLOAT16, FLOAT32, TRAIN
from paramserver_client.credentials import Credentials
from paramserver_client.errors import JobRolledBack, ServiceError
from paramserver_client.reasons import Reason
from paramserver_client.retry import RetryPolicy

TYPE_CHECKING = False
if TYPE_CHECKING:
    from paramserver_client.torch_optim import RemoteOptimizer


def __getattr__(name: str) -> object:
    """``RemoteOptimizer`` is imported on first use (it needs torch)."""
    if name == "RemoteOptimizer":
        from paramserver_client.torch_optim import RemoteOptimizer

        return RemoteOptimizer
    raise AttributeError(f"module 'paramserver_client' has no attribute {name!r}")


__all__ = [
    "BFLOAT16",
    "EVAL",
    "FLOAT16",
    "FLOAT32",
    "TRAIN",
    "AsyncJobClient",
    "AsyncWorker",
    "Credentials",
    "JobClient",
    "JobRolledBack",
    "OptimizerState",
    "Reason",
    "RemoteOptimizer",
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
