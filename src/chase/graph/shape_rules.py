"""Rules for ops that move, reduce, reshape, concatenate or index dims: where the channel dim ends up.

Reductions and permutations are analysed by running the op on a meta tensor whose dims have distinct
sizes; views by comparing shapes (a flatten is fine when the channel dim is the outermost merged dim: each
channel then owns ``k`` consecutive features); concatenation along the channels gives each input a slice.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Optional

import torch
from torch import nn

from chase.graph.layer_rules import pointwise
from chase.graph.rule_base import (
    ChanState,
    Effect,
    Unsupported,
    arg,
    blocks,
    data_port,
    norm_dim,
    outs,
)
from chase.graph.trace import Call, _Port
from chase.nested import tensors

_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def _probe(call: Call) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Run the op on a meta tensor whose dims have distinct sizes, to see where each dim goes."""
    ndim = len(call.inputs[0].shape)
    if ndim > len(_PRIMES):
        raise Unsupported(f"{call.where()} has too many dims to analyse")
    sizes = _PRIMES[:ndim]
    meta = torch.empty(sizes, device="meta")

    def sub(a: Any) -> Any:
        if isinstance(a, _Port):
            if a.i:
                raise Unsupported(f"{call.where()} takes several tensors")
            return meta
        if isinstance(a, (list, tuple)) and not isinstance(a, torch.Size):
            return type(a)(sub(x) for x in a)
        return a

    try:
        out = call.func(*sub(call.args), **{k: sub(v) for k, v in call.kwargs.items()})
    except Unsupported:
        raise
    except Exception as e:  # an op the meta device cannot run
        raise Unsupported(f"{call.where()} could not be analysed: {e}") from e
    return sizes, tuple(tensors(out)[0].shape)


#: reductions that, kept as a size-1 dim, are a per-position statistic of the channels (a norm's).
STATISTICS = frozenset({"mean", "var", "std", "norm"})


def probed(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """Reductions and permutations: which output dim (if any) the channel dim becomes."""
    if call.op in ("max", "min") and len(call.inputs) > 1:
        return pointwise(call, port, st, module)
    data_port(call, port)
    sizes, out = _probe(call)
    if port == 0:
        if sizes[st.dim] not in out:
            if call.op in STATISTICS and len(out) == len(sizes) and out[st.dim] == 1:
                # A statistic over the channels kept for broadcasting back (a hand-written RMSNorm's
                # mean of squares): like a LayerNorm, removal changes it but the rest still follows.
                return Effect({0: st}, mixing=f"{call.where()} takes a statistic across channels")
            raise Unsupported(f"{call.where()} reduces over the channel dim")
        return Effect({0: st, **outs(call, replace(st, dim=out.index(sizes[st.dim])))})
    if out[st.dim] not in sizes:
        raise Unsupported(f"{call.where()}: cannot place the channel dim")
    return Effect({0: replace(st, dim=sizes.index(out[st.dim])), **outs(call, st)})


ALONG_DIM = {
    "softmax": (1, None),
    "log_softmax": (1, None),
    "softmin": (1, None),
    "cumsum": (1, None),
    "cumprod": (1, None),
    "cummax": (1, None),
    "cummin": (1, None),
    "logcumsumexp": (1, None),
    "sort": (1, -1),
    "argsort": (1, -1),
    "topk": (2, -1),
    "flip": (1, None),
    "roll": (2, None),
    "narrow": (1, None),
    "select": (1, None),
    "index_select": (1, None),
    "split": (2, 0),
    "chunk": (2, 0),
    "tensor_split": (2, 0),
    "unbind": (1, 0),
    "split_with_sizes": (2, 0),
}
_DROPS_DIM = ("select", "unbind")


def along_dim(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """Ops that act along one named dim: fine unless that dim is the channel dim."""
    data_port(call, port)
    pos, default = ALONG_DIM[call.op]
    dims = arg(call, pos, "dims" if call.op in ("flip", "roll") else "dim", default)
    if dims is None:
        raise Unsupported(f"{call.where()} acts on all dims, channels included")
    ndim = len(call.inputs[0].shape)
    dims = [norm_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    drop = call.op in _DROPS_DIM
    if call.op in PIECES and dims[0] == (st.dim if port == 0 else st.dim + drop):
        return pieces(call, port, st, _piece_offsets(call, dims[0]))
    if port == 0:
        if st.dim in dims:
            raise Unsupported(f"{call.where()} acts along the channel dim")
        out = replace(st, dim=st.dim - (drop and dims[0] < st.dim))
        return Effect({0: st, **outs(call, out)})
    d = st.dim + (drop and dims[0] <= st.dim)
    if d in dims:
        raise Unsupported(f"{call.where()} acts along the channel dim")
    return Effect({0: replace(st, dim=d), **outs(call, st)})


#: ops that cut the channel dim into consecutive pieces, and whether the pieces are given by a count (as
#: ``chunk(2)``: they follow a narrower tensor) rather than by sizes or positions written as numbers.
PIECES = {
    "chunk": lambda call: True,
    "tensor_split": lambda call: (
        isinstance(arg(call, 1, "indices_or_sections", None), int)
        or isinstance(arg(call, 1, "sections", None), int)
    ),
    "split": lambda call: False,
    "split_with_sizes": lambda call: False,
    "narrow": lambda call: False,
}


def _piece_offsets(call: Call, dim: int) -> list[tuple[int, int]]:
    """(start, size) along ``dim`` of each output of a split-like op (narrow: its one slice)."""
    if call.op == "narrow":
        start = norm_dim(arg(call, 2, "start", 0), call.inputs[0].shape[dim])
        return [(start, call.out_shapes[0][dim])]
    spans, at = [], 0
    for shape in call.out_shapes:
        spans.append((at, shape[dim]))
        at += shape[dim]
    return spans


def pieces(call: Call, port: int, st: ChanState, spans: list[tuple[int, int]]) -> Effect:
    """A split, chunk or slice of the channel dim: each output holds a consecutive piece of the input.

    From the input, every block of the group's channels must lie within one piece (a block cut in two
    cannot be followed); the outputs holding blocks carry the channels. From an output, its blocks sit
    ``start`` further along in the input. The two halves of a GLU reach the input from two outputs: the
    walk merges them into one state whose channel ``j`` is a value-gate pair."""
    n = st.stop - st.start
    sized = "" if call.op in PIECES and PIECES[call.op](call) else f"{call.where()} cuts the channels"
    if port < 0:
        return Effect({0: st.shifted(spans[-1 - port][0]), port: st}, sized=sized)
    ports: dict[int, ChanState] = {0: st}
    for i, (start, size) in enumerate(spans):
        inside = [s - start for s in st.starts if start <= s and s + n <= start + size]
        if any(s < start + size and start < s + n for s in st.starts if s - start not in inside):
            raise Unsupported(f"{call.where()} cuts the group's channels across two pieces")
        if inside:
            ports[-1 - i] = blocks(inside, st)
    return Effect(ports, sized=sized)


def _prefix(shape: tuple[int, ...], value: int) -> bool:
    return any(math.prod(shape[:i]) == value for i in range(len(shape) + 1))


def map_view(a: tuple[int, ...], b: tuple[int, ...], st: ChanState, where: str) -> ChanState:
    """The channel state after viewing a row-major tensor of shape ``a`` as shape ``b``."""
    if st.also:
        raise Unsupported(f"{where} reshapes channels that sit in several blocks (a split's halves)")
    d, size = st.dim, a[st.dim]
    outer = math.prod(a[:d])
    e, p = 0, 1
    while e < len(b) and p < outer:
        p *= b[e]
        e += 1
    if p != outer:
        raise Unsupported(f"{where} merges the channel dim with the dims before it")
    while e < len(b) - 1 and b[e] == 1 and size != 1:
        e += 1
    if e == len(b):
        raise Unsupported(f"{where} drops the channel dim")
    if b[e] == size:
        return replace(st, dim=e)
    if b[e] > size and b[e] % size == 0 and _prefix(a, outer * b[e]):
        m = b[e] // size  # flatten: each channel now spans m consecutive features
        return ChanState(e, st.start * m, st.stop * m, st.k * m)
    if b[e] < size and size % b[e] == 0:
        m = size // b[e]  # un-flatten back to channels
        if st.k % m == 0 and st.start % m == 0 and _prefix(b, outer * size):
            return ChanState(e, st.start // m, st.stop // m, st.k // m)
    raise Unsupported(f"{where} reshapes the channel dim ({list(a)} -> {list(b)})")


def view(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    data_port(call, port)
    a, b = call.inputs[0].shape, call.out_shapes[0]
    if port == 0:
        return Effect({0: st, -1: map_view(a, b, st, call.where())})
    return Effect({0: map_view(b, a, st, call.where()), -1: st})


def expand(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """expand/repeat: new or repeated dims are fine as long as the channel dim keeps its size."""
    data_port(call, port)
    a, b = call.inputs[0].shape, call.out_shapes[0]
    shift = len(b) - len(a)
    d_in = st.dim if port == 0 else st.dim - shift
    if d_in < 0 or a[d_in] != b[d_in + shift]:
        raise Unsupported(f"{call.where()} repeats the channels")
    return Effect({0: replace(st, dim=d_in), -1: replace(st, dim=d_in + shift)})


def cat(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """torch.cat: along the channel dim each input owns a slice; along any other dim all inputs share."""
    ndim = len(call.out_shapes[0])
    d = norm_dim(arg(call, 1, "dim", 0), ndim)
    if call.op == "stack":
        if port >= 0:
            out = replace(st, dim=st.dim + (d <= st.dim))
            return Effect({q: st for q in range(len(call.inputs))} | {-1: out})
        inner = replace(st, dim=st.dim - (d < st.dim))
        if d == st.dim:
            raise Unsupported(f"{call.where()} stacks along the channel dim")
        return Effect({q: inner for q in range(len(call.inputs))} | {-1: st})
    if d != st.dim:
        return Effect({q: st for q in range(len(call.inputs))} | {-1: st})
    offsets = [0]
    for r in call.inputs:
        offsets.append(offsets[-1] + r.shape[d])
    if port >= 0:
        return Effect({port: st, -1: st.shifted(offsets[port])})
    n = st.stop - st.start
    for q in range(len(call.inputs)):
        if all(offsets[q] <= s and s + n <= offsets[q + 1] for s in st.starts):
            return Effect({q: st.shifted(-offsets[q]), -1: st})
    raise Unsupported(f"{call.where()}: a group spans two concatenated inputs")


def getitem(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """``x[...]`` with basic indexing that keeps the channel dim whole."""
    data_port(call, port)
    idx = call.args[1] if isinstance(call.args[1], tuple) else (call.args[1],)
    if any(isinstance(i, (_Port, list, bool)) for i in idx):
        raise Unsupported(f"{call.where()} uses advanced indexing")
    shape = call.inputs[0].shape
    used = sum(1 for i in idx if i is not None and i is not Ellipsis)
    full: list[Any] = []
    for i in idx:
        full.extend([slice(None)] * (len(shape) - used) if i is Ellipsis else [i])
    full.extend([slice(None)] * (len(shape) - sum(1 for i in full if i is not None)))
    mapping: dict[int, Optional[int]] = {}
    cuts: dict[int, int] = {}  # input dim -> start of a step-1 slice that keeps only part of it
    d_in, d_out = 0, 0
    for i in full:
        if i is None:
            d_out += 1
            continue
        if isinstance(i, slice):
            mapping[d_in] = d_out
            if i.step in (None, 1) and not isinstance(i.start, _Port) and not isinstance(i.stop, _Port):
                start = i.indices(shape[d_in])[0]
                if start or call.out_shapes[0][d_out] != shape[d_in]:
                    cuts[d_in] = start
            else:
                mapping[d_in] = None  # a strided slice: every other channel
            d_out += 1
        else:
            mapping[d_in] = None  # an integer index drops the dim
        d_in += 1
    d = st.dim if port == 0 else next((k for k, v in mapping.items() if v == st.dim), None)
    if d is None or mapping.get(d) is None:
        raise Unsupported(f"{call.where()} slices the channel dim")
    out = mapping[d]
    assert out is not None
    if d not in cuts:
        return Effect({0: replace(st, dim=d), -1: replace(st, dim=out)})
    # a slice of the channel dim (a GLU's ``h[:, :c]``, ``h[:, c:]``): one piece of the input
    eff = pieces(
        call,
        port if port == 0 else -1,
        replace(st, dim=d) if port == 0 else st,
        [(cuts[d], call.out_shapes[0][out])],
    )
    if port == 0:
        return Effect(
            {0: st, **{q: replace(s, dim=out) for q, s in eff.ports.items() if q < 0}}, sized=eff.sized
        )
    return Effect({0: replace(eff.ports[0], dim=d), -1: st}, sized=eff.sized)
