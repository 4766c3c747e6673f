"""Channel graph: which tensor dimensions of a model share a channel index."""

from chase.graph.channel_graph import ChannelGraph
from chase.graph.discover import RESIDUAL_REASON, channel_groups
from chase.graph.trace import unwrap_model
from chase.graph.types import ChannelGroup, Slot

__all__ = ["RESIDUAL_REASON", "ChannelGraph", "ChannelGroup", "Slot", "channel_groups", "unwrap_model"]
