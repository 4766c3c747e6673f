"""Channel graph: which tensor dimensions of a model share a channel index."""

from chase.graph.types import ChannelGroup, Slot

__all__ = ["ChannelGroup", "Slot"]
