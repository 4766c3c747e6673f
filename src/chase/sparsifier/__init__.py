"""The sparsifiers: the one stateful object a user holds."""

from chase.sparsifier.algorithms import MEST, SET, RigL, Static
from chase.sparsifier.base import Sparsifier, StepInfo
from chase.sparsifier.chase import Chase

__all__ = ["MEST", "SET", "Chase", "RigL", "Sparsifier", "Static", "StepInfo"]
