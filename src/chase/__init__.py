"""chase: channel-aware dynamic sparse training for PyTorch."""

from chase.analysis import ChannelStats, channel_stats
from chase.export import load_slim
from chase.flops import FlopReport, count_flops, training_flops
from chase.graph import channel_groups
from chase.sparsifier import MEST, SET, Chase, RigL, Sparsifier, Static, StepInfo

__version__ = "0.1.0"

__all__ = [
    "MEST",
    "SET",
    "ChannelStats",
    "Chase",
    "FlopReport",
    "RigL",
    "Sparsifier",
    "Static",
    "StepInfo",
    "__version__",
    "channel_groups",
    "channel_stats",
    "count_flops",
    "load_slim",
    "training_flops",
]
