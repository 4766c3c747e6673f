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
from chase.graph.rule_base import ChanState, Unsupported
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
    todo = deque([(call, port, state)])

    def problem(msg: str) -> None:
        if msg not in reach.problems:
            reach.problems.append(msg)

    while todo:
        c, p, st = todo.popleft()
        if (c, p) in seen:
            if seen[(c, p)] != st:
                problem(f"{trace.calls[c].where()} sees the channels at two different positions")
            continue
        seen[(c, p)] = st
        rec = trace.calls[c]
        try:
            eff = rules.apply(rec, p, st, modules.get(rec.module))
        except Unsupported as e:
            problem(str(e))
            continue
        if eff.role:
            runs = trace.module_calls[rec.module]
            others = [c2 for c2 in (layer_calls or {}).get(rec.module, ()) if c2 != c]
            if runs > 1 and (eff.role == "attention" or len(others) != runs - 1):
                problem(f"layer '{rec.module}' runs {runs} times per forward (shared weights)")
            for c2 in others:  # the same weights at every call: the same channels
                todo.append((c2, p, st))
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
        for q, s in eff.ports.items():
            if q != p:
                if (c, q) in seen:
                    if seen[(c, q)] != s:
                        problem(f"{rec.where()} sees the channels at two different positions")
                    continue
                seen[(c, q)] = s
            if q < 0:
                if (c, -1 - q) in trace.outputs:
                    reach.to_output.append(rec.where())
                for c2, p2 in trace.consumers.get((c, -1 - q), ()):
                    todo.append((c2, p2, s))
                continue
            ref = rec.inputs[q]
            if q == p and ref.kind == "call":
                continue  # that is where the channels came from
            if ref.kind == "call":
                todo.append((ref.ref, -1 - ref.out, s))
            elif ref.kind == "input":
                reach.from_input = True
            elif ref.kind in ("param", "buffer"):
                found = reach.params if ref.kind == "param" else reach.buffers
                if found.setdefault(ref.ref, s) != s:
                    what = "parameter" if ref.kind == "param" else "buffer"
                    problem(f"{what} '{ref.ref}' carries the channels twice")
            else:
                problem(
                    f"{rec.where()} combines the channels with a {ref.kind} tensor of shape "
                    f"{list(ref.shape)}, which cannot be sliced"
                )
    return reach
