"""Follow one group's channels through the recorded calls with the op rules.

Starting from a root (a layer's output or input), a breadth-first walk applies :func:`rules.apply` at
every call the channels reach and moves along tensors to their producers and consumers. The result,
:class:`Reach`, says which layers and parameters carry the channels (and at which positions), which ops
they pass, and everything that forbids removing them. It is an independent second opinion on the group
Torch-Pruning reports; :mod:`chase.graph.discover` compares the two.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from chase.graph import rules
from chase.graph.rule_base import ChanState, Unsupported, union
from chase.graph.trace import Trace


@dataclass
class Reach:
    """Where one group's channels go."""

    layers: dict[tuple[str, str], ChanState] = field(default_factory=dict)  # (module, role) -> state
    params: dict[str, ChanState] = field(default_factory=dict)  # free parameter FQN -> state in its dims
    # buffer FQN -> state: per-channel buffers a module's own code applies (FrozenBatchNorm2d's statistics
    # and affine terms); Torch-Pruning's autograd graph does not see them, so they are the rules' alone
    buffers: dict[str, ChanState] = field(default_factory=dict)
    ops: list[str] = field(default_factory=list)
    residual: list[str] = field(default_factory=list)  # where several producers are summed
    mixing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    from_input: bool = False
    to_output: list[str] = field(default_factory=list)
    grouped: dict[str, int] = field(default_factory=dict)  # grouped conv module -> its groups
    sized: list[str] = field(default_factory=list)  # splits/slices of the channels by written sizes


def propagate(
    trace: Trace,
    modules: dict[str, nn.Module],
    call: int,
    port: int,
    state: ChanState,
    layer_calls: Optional[Mapping[str, list[int]]] = None,
) -> Reach:
    """Walk the channels that sit at ``port`` of call ``call`` in ``state`` through the whole trace.

    A layer that runs several times per forward (weights shared across FPN levels or refinement steps,
    ``layer_calls``: its calls) carries the same channels at every call: the walk goes on from each of
    them, so the group holds what every call reads and writes."""
    reach = Reach()
    seen: dict[tuple[int, int], ChanState] = {}
    # (call, port, state, whether the channels came along the tensor at that port: then the walk does not
    # go back along it; the root and another call of a shared layer start there and walk both ways)
    todo = deque([(call, port, state, False)])

    def problem(msg: str) -> None:
        if msg not in reach.problems:
            reach.problems.append(msg)

    def arrive(key: tuple[int, int], st: ChanState) -> Optional[ChanState]:
        """The state to walk on from ``key`` now, or None when nothing new arrived there. The same
        channels arriving at other positions of the same tensor (a GLU's value and gate halves) widen
        its state: the walk goes on with both; states that cannot be merged are a problem."""
        old = seen.get(key)
        if old == st:
            return None
        if old is not None:
            merged = union(old, st)
            if merged is None:
                problem(f"{trace.calls[key[0]].where()} sees the channels at two different positions")
                return None
            if merged == old:
                return None
            st = merged
        seen[key] = st
        return st

    while todo:
        c, p, st, came = todo.popleft()
        new = arrive((c, p), st)
        if new is None:
            continue
        st = new
        rec = trace.calls[c]
        try:
            eff = rules.apply(rec, p, st, modules.get(rec.module))
        except Unsupported as e:
            problem(str(e))
            continue
        if eff.role:
            runs = trace.module_calls[rec.module]
            others = [c2 for c2 in (layer_calls or {}).get(rec.module, ()) if c2 != c]
            if runs > 1 and len(others) != runs - 1:
                problem(f"layer '{rec.module}' runs {runs} times per forward (shared weights)")
            for c2 in others:  # the same weights at every call: the same channels
                todo.append((c2, p, st, False))
            side = 0 if eff.role in ("consumer", "norm", "depthwise") else -1
            reach.layers[(rec.module, eff.role)] = eff.ports[side]
            if eff.grouped:
                reach.grouped[rec.module] = eff.grouped
        elif rec.op not in reach.ops:
            reach.ops.append(rec.op)
        if eff.residual:
            reach.residual.append(rec.where())
        if eff.mixing and eff.mixing not in reach.mixing:
            reach.mixing.append(eff.mixing)
        if eff.sized and eff.sized not in reach.sized:
            reach.sized.append(eff.sized)
        for q, s in eff.ports.items():
            if q != p:
                new = arrive((c, q), s)
                if new is None:
                    continue
                s = new
            if q < 0:
                if (c, -1 - q) in trace.outputs:
                    reach.to_output.append(rec.where())
                for c2, p2 in trace.consumers.get((c, -1 - q), ()):
                    todo.append((c2, p2, s, True))
                continue
            ref = rec.inputs[q]
            if q == p and came:
                continue  # that is where the channels came from
            if ref.kind == "call":
                todo.append((ref.ref, -1 - ref.out, s, True))
            elif ref.kind == "input":
                reach.from_input = True
            elif ref.kind in ("param", "buffer"):
                found = reach.params if ref.kind == "param" else reach.buffers
                merged = union(found[ref.ref], s) if ref.ref in found else s
                if merged is None:
                    what = "parameter" if ref.kind == "param" else "buffer"
                    problem(f"{what} '{ref.ref}' carries the channels twice")
                else:
                    found[ref.ref] = merged
            else:
                problem(
                    f"{rec.where()} combines the channels with a {ref.kind} tensor of shape "
                    f"{list(ref.shape)}, which cannot be sliced"
                )
    return reach
