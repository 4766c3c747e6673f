"""chase: channel-aware dynamic sparse training for PyTorch."""

from chase.analysis import ChannelStats, channel_stats
from chase.flops import FlopReport, count_flops, training_flops
from chase.graph import channel_groups
from chase.pretrained import from_pretrained, push_to_hub, save_pretrained
from chase.slim import load_slim, save_slim
from chase.sparsifier import (
    MEST,
    SET,
    Budget,
    ChannelSpec,
    Chase,
    LatencyTable,
    PrunedChannels,
    RigL,
    Sparsifier,
    Static,
    StepInfo,
    prune_channels,
    untrained_slim,
)

__version__ = "0.2.0"
"""The version of chase-dst (PEP 440). pyproject.toml reads it from here; a release bumps it here and in
CITATION.cff (docs/release.md)."""

__all__ = [
    "MEST",
    "SET",
    "Budget",
    "ChannelSpec",
    "ChannelStats",
    "Chase",
    "FlopReport",
    "LatencyTable",
    "PrunedChannels",
    "RigL",
    "Sparsifier",
    "Static",
    "StepInfo",
    "__version__",
    "channel_groups",
    "channel_stats",
    "count_flops",
    "from_pretrained",
    "load_slim",
    "prune_channels",
    "push_to_hub",
    "save_pretrained",
    "save_slim",
    "training_flops",
    "untrained_slim",
]
