"""Pure optimizer math: update rules, schedules and gradient reduction helpers.

Knows nothing of Ray, gRPC or storage.
"""

from paramserver.optim import adafactor, adam, galore, lamb, lion, lisa, muon, schedule_free, sgd, tiger  # noqa: F401  (registration)
from paramserver.optim.base import Optimizer, Param, Piece, State, Step, available, build, register
from paramserver.optim.schedules import Schedule, build_schedule

__all__ = ["Optimizer", "Param", "Piece", "Schedule", "State", "Step", "available", "build", "build_schedule", "register"]
