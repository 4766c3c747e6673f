"""The sparsifiers: the one stateful object a user holds."""

from chase.sparsifier.algorithms import MEST, SET, RigL, Static
from chase.sparsifier.base import Sparsifier, StepInfo

__all__ = ["MEST", "SET", "RigL", "Sparsifier", "Static", "StepInfo"]
