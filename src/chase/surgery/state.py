"""Which channels and tensor positions are still alive: the bookkeeping behind channel surgery.

Groups (:class:`chase.graph.types.ChannelGroup`) index channels in ORIGINAL coordinates. Physical removal
shrinks tensors, so surgery keeps, for every ``(tensor, dim)`` that any group carries, a bool vector over the
original positions; the current tensor holds exactly the alive positions, in original order. Several groups
may share one ``(tensor, dim)`` (a conv consuming a concat), which is why the vector lives per tensor
dimension and not per group.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from chase.graph.types import ChannelGroup, Slot

STATE_VERSION = 1

ChannelIds = Union[torch.Tensor, Sequence[int]]
"""Original channel ids of one group: a LongTensor (any device) or a sequence of ints."""


@dataclass
class RemovalPlan:
    """What one removal event changes, computed before anything is mutated.

    Attributes:
        channels: group name -> new alive-channel vector (only groups that lose channels).
        alive: tensor name -> dim -> new alive-position vector over original positions.
        keep: tensor name -> dim -> positions of the CURRENT tensor to keep (LongTensor, CPU).
    """

    channels: dict[str, torch.Tensor] = field(default_factory=dict)
    alive: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    keep: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.channels)


def _lookup_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called ``name`` (a fully qualified name) in ``model``."""
    mod_name, _, local = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError as e:
        raise ValueError(f"no module {mod_name!r} owning tensor {name!r}") from e
    tensor = module._parameters.get(local)
    if tensor is None:
        tensor = module._buffers.get(local)
    if tensor is None:
        raise ValueError(f"{name!r} is neither a parameter nor a buffer of the model")
    return tensor


class SurgeryState:
    """Alive channels per group and alive positions per ``(tensor, dim)``, in original coordinates.

    Built from the FULL-size model the groups were discovered on. All vectors live on the CPU (they are
    small, and CPU bookkeeping never synchronises with an accelerator).

    Args:
        model: the model whose tensors the groups index (at its original size).
        groups: the channel groups; their names must be unique.
    """

    def __init__(self, model: nn.Module, groups: Iterable[ChannelGroup]) -> None:
        self.groups: dict[str, ChannelGroup] = {}
        # group -> [(tensor, dim, index LongTensor[width, k] on CPU)]
        self._slots: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
        self._channels: dict[str, torch.Tensor] = {}
        self._alive: dict[str, dict[int, torch.Tensor]] = {}
        for group in groups:
            if group.name in self.groups:
                raise ValueError(f"duplicate channel group name {group.name!r}")
            self.groups[group.name] = group
            self._channels[group.name] = torch.ones(group.width, dtype=torch.bool)
            self._slots[group.name] = [self._add_slot(model, group, s) for s in group.slots]

    def _add_slot(self, model: nn.Module, group: ChannelGroup, slot: Slot) -> tuple[str, int, torch.Tensor]:
        tensor = _lookup_tensor(model, slot.tensor)
        if not -tensor.dim() <= slot.dim < tensor.dim():
            raise ValueError(f"group {group.name!r}: dim {slot.dim} out of range for {slot.tensor!r}")
        dim = slot.dim % tensor.dim()
        index = torch.as_tensor(slot.index, dtype=torch.long).cpu()
        if index.dim() == 1:
            index = index.unsqueeze(1)
        size = tensor.shape[dim]
        if index.dim() != 2 or index.shape[0] != group.width:
            raise ValueError(
                f"group {group.name!r}: index of {slot.tensor!r} has shape {tuple(index.shape)}, "
                f"expected [{group.width}, k]"
            )
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
            raise ValueError(f"group {group.name!r}: index of {slot.tensor!r} out of range [0, {size})")
        dims = self._alive.setdefault(slot.tensor, {})
        if dim in dims and dims[dim].numel() != size:
            raise ValueError(f"{slot.tensor!r} dim {dim}: inconsistent sizes across groups")
        dims.setdefault(dim, torch.ones(size, dtype=torch.bool))
        return slot.tensor, dim, index

    # ----------------------------------------------------------------------------------------- queries
    def alive_channels(self, group_name: str) -> torch.Tensor:
        """Bool vector over the group's ORIGINAL channel ids: True where the channel is alive (a copy)."""
        return self._channels[group_name].clone()

    def current_width(self, group_name: str) -> int:
        """Number of alive channels of the group."""
        return int(self._channels[group_name].sum())

    def original_width(self, group_name: str) -> int:
        """Number of channels of the group at discovery time."""
        return self._channels[group_name].numel()

    def slot_positions(self, group_name: str, tensor_name: str, *, sliced: bool) -> torch.Tensor:
        """Where the group's alive channels sit in ``tensor_name`` (its first slot in the group), in
        channel-id order: ``LongTensor[alive, k]`` of positions along the slot's dim, in the CURRENT
        tensor when it is physically ``sliced``, else in original coordinates.

        A slot may cover only part of its tensor (a conv whose output is a concatenation, or that feeds
        an add with a concatenation): its positions are offsets into the larger tensor, never 0..width.
        """
        alive = self._channels[group_name]
        for tensor, dim, index in self._slots[group_name]:
            if tensor != tensor_name:
                continue
            positions = index[alive]
            if not sliced:
                return positions
            # The current tensor holds the alive original positions in order.
            current = self._alive[tensor][dim].long().cumsum(0) - 1
            return current[positions]
        raise ValueError(f"group {group_name!r} has no slot on {tensor_name!r}")

    def tensor_alive(self, tensor_name: str) -> dict[int, torch.Tensor]:
        """dim -> alive-position vector over original positions, for every dim groups carry (copies).

        Empty when no group carries the tensor.
        """
        return {d: a.clone() for d, a in self._alive.get(tensor_name, {}).items()}

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Names of all tensors that some group carries."""
        return tuple(self._alive)

    # ------------------------------------------------------------------------------------ transitions
    def plan(self, removals: Mapping[str, ChannelIds]) -> RemovalPlan:
        """Compute the effect of removing ``removals`` (group -> ORIGINAL channel ids) without mutating.

        Channels that are already removed are ignored. Raises ValueError for unknown groups, ids out of
        range, or a removal that would leave a group with no channel.
        """
        plan = RemovalPlan()
        for name, ids in removals.items():
            if name not in self._channels:
                raise ValueError(f"unknown channel group {name!r}")
            alive = self._channels[name]
            ids = torch.as_tensor(ids, dtype=torch.long).flatten().cpu()
            if ids.numel() == 0:
                continue
            if int(ids.min()) < 0 or int(ids.max()) >= alive.numel():
                raise ValueError(f"group {name!r}: channel ids out of range [0, {alive.numel()})")
            ids = ids[alive[ids]].unique()  # already-removed channels are a no-op
            if ids.numel() == 0:
                continue
            new = alive.clone()
            new[ids] = False
            if not bool(new.any()):
                raise ValueError(f"removal would leave channel group {name!r} with no channel")
            plan.channels[name] = new
            for tensor, dim, index in self._slots[name]:
                dims = plan.alive.setdefault(tensor, {})
                if dim not in dims:
                    dims[dim] = self._alive[tensor][dim].clone()
                # One vectorised scatter per slot: every position of every removed channel at once.
                dims[dim][index[ids].flatten()] = False
        for tensor, dims in plan.alive.items():
            for dim, new in dims.items():
                old = self._alive[tensor][dim]
                # Positions of the current tensor are the alive originals in order: keep those still alive.
                keep = new[old].nonzero().flatten()
                if keep.numel() != int(old.sum()):
                    plan.keep.setdefault(tensor, {})[dim] = keep
        return plan

    def commit(self, plan: RemovalPlan) -> None:
        """Record a plan from :meth:`plan` as done (call after the tensors were sliced or masked)."""
        self._channels.update(plan.channels)
        for tensor, dims in plan.alive.items():
            self._alive[tensor].update(dims)

    def mark_removed(self, removals: Mapping[str, ChannelIds]) -> RemovalPlan:
        """Record channels as removed WITHOUT touching any tensor (mask-only mode; see ``alive_mask``)."""
        plan = self.plan(removals)
        self.commit(plan)
        return plan

    # ---------------------------------------------------------------------------------- serialisation
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and strings only, so ``torch.load(weights_only=True)`` reads it back.

        This is also the *history* :func:`chase.surgery.replay` needs to reshape a fresh model.
        """
        return {
            "version": STATE_VERSION,
            "channels": {g: a.clone() for g, a in self._channels.items()},
            "tensors": {t: {d: a.clone() for d, a in dims.items()} for t, dims in self._alive.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore alive vectors saved by :meth:`state_dict` (groups must match in names and sizes)."""
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"unsupported surgery state version {version!r}")
        channels, tensors = state_dict["channels"], state_dict["tensors"]
        if set(channels) != set(self._channels):
            raise ValueError(
                f"channel groups differ: saved {sorted(channels)} vs current {sorted(self._channels)}"
            )
        if set(tensors) != set(self._alive):
            raise ValueError("the saved state carries a different set of tensors than the current groups")
        for g, a in channels.items():
            if a.shape != self._channels[g].shape:
                raise ValueError(f"group {g!r}: saved width {a.numel()} != {self._channels[g].numel()}")
        for t, dims in tensors.items():
            if {int(d) for d in dims} != set(self._alive[t]):
                raise ValueError(f"{t!r}: saved dims {sorted(dims)} != {sorted(self._alive[t])}")
            for d, a in dims.items():
                if a.shape != self._alive[t][int(d)].shape:
                    raise ValueError(f"{t!r} dim {d}: saved size {a.numel()} differs")
        self._channels = {g: a.to("cpu", torch.bool).clone() for g, a in channels.items()}
        self._alive = {
            t: {int(d): a.to("cpu", torch.bool).clone() for d, a in dims.items()}
            for t, dims in tensors.items()
        }

    def __repr__(self) -> str:
        widths = ", ".join(f"{g}: {self.current_width(g)}/{self.original_width(g)}" for g in self._channels)
        return f"SurgeryState({widths})"
