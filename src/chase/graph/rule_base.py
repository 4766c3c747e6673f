"""Vocabulary of the op rules: channel positions, a rule's answer, and helpers the rules share.

A rule gets one recorded call, the port the channels arrived at (``0..n-1``: tensor arguments in order,
``-1, -2, ...``: outputs) and their :class:`ChanState` there. It returns an :class:`Effect` with the state
at every port of the call that carries the same channels, or raises :class:`Unsupported` with a reason
naming the layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch import nn

from chase.graph.trace import Call

DATA = ("call", "input")  # tensor kinds that carry activations (not weights or constants)


class Unsupported(Exception):
    """The channels cannot be followed (or safely removed) through this op."""


@dataclass(frozen=True)
class ChanState:
    """The group's channels occupy positions ``[start, stop)`` of dimension ``dim``, ``k`` per channel.

    ``also``: the starts of further blocks of the same length that carry the same channels (channel ``j``
    also sits at ``o + j * k`` for each ``o``): the value and gate halves of a tensor that is split and
    multiplied back together (a GLU) are one channel each, and removing it removes both positions.
    """

    dim: int
    start: int
    stop: int
    k: int = 1
    also: tuple[int, ...] = ()

    @property
    def width(self) -> int:
        return (self.stop - self.start) // self.k

    @property
    def starts(self) -> tuple[int, ...]:
        return (self.start, *self.also)

    def shifted(self, offset: int) -> ChanState:
        """The same channels ``offset`` positions further along ``dim``."""
        return replace(
            self,
            start=self.start + offset,
            stop=self.stop + offset,
            also=tuple(o + offset for o in self.also),
        )

    def positions(self) -> torch.Tensor:
        """``LongTensor[width, k * blocks]``: the positions of each channel along ``dim``, ascending."""
        n = self.stop - self.start
        return torch.cat([torch.arange(s, s + n).reshape(-1, self.k) for s in self.starts], dim=1)


def blocks(starts: list[int], st: ChanState) -> ChanState:
    """``st``'s channels in the blocks starting at ``starts`` (ascending)."""
    return replace(st, start=starts[0], stop=starts[0] + st.stop - st.start, also=tuple(starts[1:]))


def union(a: ChanState, b: ChanState) -> Optional[ChanState]:
    """The channels of two states at once when they are the same channels at disjoint positions of one
    dim (reached along two paths, as a GLU's value and gate halves are); None when they cannot be."""
    if a.dim != b.dim or a.k != b.k or a.width != b.width:
        return None
    starts = sorted(set(a.starts) | set(b.starts))
    n = a.stop - a.start
    if any(y - x < n for x, y in itertools.pairwise(starts)):
        return None
    return blocks(starts, a)


@dataclass
class Effect:
    """A rule's answer: ports that carry the channels, and what the op means for the group."""

    ports: dict[int, ChanState]
    role: Optional[str] = None  # "producer", "consumer", "depthwise" or "norm" for layer ops
    residual: bool = False
    mixing: str = ""  # why removing a channel changes the other channels' values (LayerNorm, ...)
    grouped: int = 0  # a grouped (not depthwise) conv's ``groups``: channels go in units across its groups
    # a split or slice of the channel dim with sizes given as numbers (not a count of equal pieces): the
    # code must compute them from the tensor's shape for the op to follow a narrower tensor
    sized: str = ""


Rule = Callable[[Call, int, ChanState, Optional[nn.Module]], Effect]


def port_shape(call: Call, port: int) -> tuple[int, ...]:
    return call.inputs[port].shape if port >= 0 else call.out_shapes[-1 - port]


def arg(call: Call, pos: int, name: str, default: Any = None) -> Any:
    if name in call.kwargs:
        return call.kwargs[name]
    return call.args[pos] if len(call.args) > pos else default


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def outs(call: Call, st: ChanState) -> dict[int, ChanState]:
    return {-1 - i: st for i in range(len(call.out_shapes))}


def check_owned(call: Call, module: Optional[nn.Module], cls: Any) -> None:
    """Weights of a layer op must be the executing layer's own parameters or buffers."""
    if len(call.inputs) == 1:
        return
    if not isinstance(module, cls):
        raise Unsupported(f"{call.where()} applies weights outside a standard layer")
    prefix = call.module + "." if call.module else ""
    for r in call.inputs[1:]:
        if r.kind not in ("param", "buffer") or not str(r.ref).startswith(prefix):
            raise Unsupported(f"{call.where()} uses a computed or foreign weight (parametrization?)")


def data_port(call: Call, port: int) -> None:
    if port > 0:
        raise Unsupported(f"{call.where()}: channels reach a weight argument")
