"""The sparsifiers: the one stateful object a user holds, the typed channel options, and one-shot channel
pruning."""

from chase.sparsifier.algorithms import MEST, SET, RigL, Static
from chase.sparsifier.base import Sparsifier, StepInfo
from chase.sparsifier.chase import Chase
from chase.sparsifier.latency import LatencyTable
from chase.sparsifier.one_shot import PrunedChannels, prune_channels, untrained_slim
from chase.sparsifier.specs import Budget, ChannelSpec

__all__ = [
    "MEST",
    "SET",
    "Budget",
    "ChannelSpec",
    "Chase",
    "LatencyTable",
    "PrunedChannels",
    "RigL",
    "Sparsifier",
    "Static",
    "StepInfo",
    "prune_channels",
    "untrained_slim",
]
