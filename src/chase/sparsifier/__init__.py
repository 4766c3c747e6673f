"""The sparsifiers: the one stateful object a user holds, and one-shot channel pruning."""

from chase.sparsifier.algorithms import MEST, SET, RigL, Static
from chase.sparsifier.base import Sparsifier, StepInfo
from chase.sparsifier.channel_pruning import PrunedChannels, prune_channels, untrained_slim
from chase.sparsifier.chase import Chase

__all__ = [
    "MEST",
    "SET",
    "Chase",
    "PrunedChannels",
    "RigL",
    "Sparsifier",
    "Static",
    "StepInfo",
    "prune_channels",
    "untrained_slim",
]
