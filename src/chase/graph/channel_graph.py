"""``ChannelGraph``: the list of a model's channel groups, with lookup and a readable summary."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from typing import Union

from chase.graph.types import ChannelGroup, Slot


class ChannelGraph:
    """All channel groups of one model, in module order.

    Iterable and indexable (by position or by group name); :meth:`prunable` lists the groups channel
    pruning may act on; ``str(graph)`` is a one-line-per-group summary.
    """

    def __init__(
        self, groups: list[ChannelGroup], *, prune_skip: bool = False, prune_heads: bool = False
    ) -> None:
        self.groups = list(groups)
        self.prune_skip = prune_skip
        self.prune_heads = prune_heads
        self._by_name = {g.name: g for g in self.groups}

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: Union[int, str]) -> ChannelGroup:
        return self.groups[key] if isinstance(key, int) else self._by_name[key]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> ChannelGroup | None:
        """The group called ``name`` (its root layer's FQN, ``"<layer>:in"`` for input-side groups)."""
        return self._by_name.get(name)

    def prunable(self) -> list[ChannelGroup]:
        """Groups whose channels may be removed under the options the graph was built with."""
        return [g for g in self.groups if g.prunable]

    def heads(self) -> list[ChannelGroup]:
        """Groups of attention heads (``kind="heads"``)."""
        return [g for g in self.groups if g.kind == "heads"]

    def residual(self) -> list[ChannelGroup]:
        """Groups of the residual stream (channels summed by an elementwise add)."""
        return [g for g in self.groups if g.residual]

    def why_kept(self, most: int = 4) -> str:
        """Why groups are kept, counted by kind: ``"6 of 14 groups kept: residual stream; pass
        prune_skip=True (5), channels come from the model input (1)"`` ("" when every group is prunable).
        A reason's layer names and numbers are left out to count alike reasons together; ``summary()`` and
        ``chase check --explain`` name them per group."""
        kept = [g for g in self.groups if not g.prunable]
        if not kept:
            return ""
        kinds = Counter(_reason_kind(g.reason) for g in kept)
        shown = ", ".join(f"{k} ({n})" for k, n in kinds.most_common(most))
        more = f", {len(kinds) - most} other reasons" if len(kinds) > most else ""
        return f"{len(kept)} of {len(self)} groups kept: {shown}{more}"

    def slots_of(self, tensor: str) -> list[tuple[ChannelGroup, Slot]]:
        """Every (group, slot) that names parameter or buffer ``tensor``."""
        return [(g, s) for g in self.groups for s in g.slots if s.tensor == tensor]

    def summary(self, max_layers: int = 6) -> str:
        """One line per group: state, name, width, the layers it touches, and why it is kept if it is."""
        n_res = len(self.residual())
        lines = [
            f"ChannelGraph: {len(self)} groups, {len(self.prunable())} prunable, {n_res} residual "
            f"(prune_skip={self.prune_skip}, prune_heads={self.prune_heads})"
        ]
        width = max((len(g.name) for g in self.groups), default=0)
        for g in self.groups:
            mark = "P" if g.prunable else "-"
            flags = ("R" if g.residual else " ") + (" " if g.exact else "~")
            mods = [m or "(model)" for m in g.modules if m != g.name]  # "": the model's own parameters
            shown = ", ".join(mods[:max_layers]) + (
                f", ... (+{len(mods) - max_layers})" if len(mods) > max_layers else ""
            )
            units = f" x{g.unit}" if g.unit > 1 else ""  # grouped-conv units of several channels
            noun = "heads" if g.kind == "heads" else "ch"
            line = (
                f"  [{mark}{flags}] {g.name:<{width}} {g.width:>5}{units} {noun} -> "
                f"{shown or '(no other layer)'}"
            )
            if not g.prunable:
                line += f"  | kept: {g.reason}"
            lines.append(line)
        lines.append("  legend: P prunable, R residual stream, ~ removal changes a channel-mixing norm")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (
            f"ChannelGraph({len(self)} groups, {len(self.prunable())} prunable, prune_skip={self.prune_skip})"
        )


def _reason_kind(reason: str) -> str:
    """A reason without its layer names, numbers and "(+N more)": the same cause in other layers reads
    the same."""
    kind = re.sub(r"\s*\(\+\d+ more\)$", "", reason)
    kind = re.sub(r"'[^']*'", "'…'", kind)
    kind = re.sub(r"\s*\([^()]*'…'[^()]*\)", "", kind)  # "(a layer's name)": where, not why
    kind = re.sub(r"\[[^\]]*\]", "[…]", kind)
    return re.sub(r"\b\d+\b", "N", kind)
