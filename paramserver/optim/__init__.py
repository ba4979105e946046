"""Pure optimizer math: update rules, schedules and gradient reduction helpers.

Knows nothing of Ray, gRPC or storage.
"""

from paramserver.optim import adam, lion, sgd  # noqa: F401  (registration)
from paramserver.optim.base import Optimizer, State, available, build, register
from paramserver.optim.schedules import Schedule, build_schedule

__all__ = ["Optimizer", "Schedule", "State", "available", "build", "build_schedule", "register"]
