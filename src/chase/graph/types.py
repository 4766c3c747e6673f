"""The data a channel graph hands to surgery and to the sparsifier.

A *channel group* is a set of tensor dimensions that share one channel index: removing channel ``j`` of
the group removes, in every member tensor, the positions ``slot.index[j]`` along ``slot.dim``. Indices are
always in ORIGINAL coordinates (the tensor as it was when the group was discovered), so groups stay valid
while surgery physically removes channels; surgery keeps the map from original to current positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Role = Literal["producer", "depthwise", "consumer", "param"]
"""What a slot is to its group.

- ``producer``: dim 0 of a conv/linear weight with ``groups == 1``: its rows ARE the group's channels
  (they are scored by UMM).
- ``depthwise``: dim 0 of a depthwise conv weight (``groups == in_channels == out_channels``), which is
  both produced and consumed channel-by-channel; surgery also updates the module's ``groups``.
- ``consumer``: dim 1 of a conv/linear weight (its input columns).
- ``param``: any other parameter or buffer carrying the channels: biases, norm weight/bias/running
  statistics, layer-scale parameters.
"""


@dataclass(frozen=True)
class Slot:
    """One dimension of one tensor (parameter or buffer) that carries a group's channels.

    Attributes:
        tensor: fully qualified name of the parameter or buffer, e.g. ``"layer1.0.bn1.running_mean"``.
        module: fully qualified name of the module that owns it (``""`` for the root module).
        dim: the dimension along which the channels lie.
        index: ``LongTensor[width, k]``: channel ``j`` occupies positions ``index[j]`` along ``dim``
            (``k`` is 1
            except behind a flatten, where one channel feeds ``k = H*W`` input features of a linear layer).
        role: see :data:`Role`.
    """

    tensor: str
    module: str
    dim: int
    index: torch.Tensor
    role: Role


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together, across all layers that share them.

    Attributes:
        name: a readable, stable name (the first producer's module name).
        width: number of channels in the group at discovery time.
        slots: every tensor dimension that carries these channels.
        prunable: whether the channels may be removed under the options the graph was built with.
        residual: True when the channels cross an elementwise add (the residual stream).
        reason: why the group is not prunable (empty when it is).
        ops: names of the non-layer torch ops the channels pass through (``relu``, ``add``, ``cat``, ...).
        exact: True when zeroing a channel's producer rows and consumer columns is exactly the same function
            as slicing it out. False when a norm mixes channels (a LayerNorm over the channel dim,
            GroupNorm with one group): removal then changes the normalization statistics of the others.
        kind: ``"channels"``, or ``"heads"`` for the heads of an attention module (one entry per key/value
            head with the query heads that share it; :mod:`chase.graph.heads`).
        unit_channels: channels one entry counts as in channel sparsity (a head: its query width);
            0 when derived from the producers (see :attr:`unit`).
    """

    name: str
    width: int
    slots: tuple[Slot, ...]
    prunable: bool
    residual: bool = False
    reason: str = ""
    ops: tuple[str, ...] = field(default=())
    exact: bool = True
    kind: Literal["channels", "heads"] = "channels"
    unit_channels: int = 0

    @property
    def producers(self) -> tuple[Slot, ...]:
        """Slots whose rows define the channels (scored by UMM)."""
        return tuple(s for s in self.slots if s.role == "producer")

    @property
    def unit(self) -> int:
        """Channels removed together as one of the group's ``width`` entries: 1, a grouped conv's
        ``groups`` (the same in-group channel of every conv group goes at once), or a head's width."""
        if self.unit_channels:
            return self.unit_channels
        producers = self.producers
        return int(producers[0].index.shape[1]) if producers else 1

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of all modules touched by this group, in slot order, without repeats."""
        return tuple(dict.fromkeys(s.module for s in self.slots))

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"kept ({self.reason})"
        kind = "residual " if self.residual else ""
        units = f" (units of {self.unit} channels)" if self.unit > 1 else ""
        if self.kind == "heads":
            units = f" heads (units of {self.unit} channels)"
        noun = "" if self.kind == "heads" else " channels"
        lines = [f"ChannelGroup {self.name!r}: {self.width}{noun}{units}, {kind}{state}"]
        for s in self.slots:
            lines.append(f"    {s.role:<9} {s.tensor} [dim {s.dim}]")
        return "\n".join(lines)
