"""Attention heads as channel groups.

The channels of an attention layer's query, key and value projections cannot be followed through the
attention product (it mixes them), so the channel walk keeps them. What can go is a whole head: its rows
of the query, key and value projections, the matching columns of the output projection, and any
per-head parameter (a relative position bias table). With grouped-query attention a key/value head and
the query heads that share it go together. This module recognises the head layout of an attention
module from its structure (no class names) and turns it into a :class:`ChannelGroup` of ``kind="heads"``
whose entries are those units. Four layouts are known:

- ``packed``: ``torch.nn.MultiheadAttention`` with one ``in_proj_weight`` (query, key and value rows
  stacked) and an ``out_proj`` (torchvision's ViT);
- ``fused``: a module with ``qkv`` and ``proj`` linear layers and an int ``num_heads`` (timm's
  ``Attention``, its Swin window attention with the bias table); ``window`` is the same layout in a
  shifted-window attention that has no ``head_dim`` but a ``shift_size``, a
  ``relative_position_bias_table`` and a ``get_relative_position_bias()`` (torchvision's Swin): its
  forward derives the head size from the embedding width, so surgery gives it one that does not;
- ``split``: ``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj`` (or ``out_proj``) linear layers and an int
  ``head_dim`` (Llama-style models from ``transformers``, grouped-query attention included), or the
  same under DistilBERT's names (:data:`SPLIT_NAMES`);
- ``separate``: ``query``, ``key`` and ``value`` linear layers and an int ``attention_head_size`` in a
  module whose sibling ``output`` holds the output projection ``dense`` (BERT, RoBERTa and ViT from
  ``transformers``, which reshape to heads with ``view`` and ``permute``).

Whether the module's forward still runs with fewer heads is not decided here: the sparsifier's shape
dry run removes one head of every group on a meta copy and keeps the groups whose removal breaks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from chase.graph.types import ChannelGroup, Slot

HEADS_REASON = "attention heads; pass prune_heads=True"


@dataclass(frozen=True)
class Block:
    """Where one projection keeps its heads: ``per_unit`` consecutive positions per unit from ``offset``
    along ``dim`` of ``tensor`` (unit ``u`` holds positions ``offset + u * per_unit ...``)."""

    tensor: str
    dim: int
    offset: int
    per_unit: int
    role: str  # "producer" (scored rows), "consumer" (output projection columns) or "param"


@dataclass(frozen=True)
class HeadLayout:
    """The heads of one attention module.

    Attributes:
        module: FQN of the attention module.
        kind: ``"packed"``, ``"fused"`` or ``"split"`` (see the module docstring).
        heads: query heads; ``kv_heads``: key/value heads (equal without grouped-query attention).
        head_dim: channels per head.
        blocks: every tensor range that carries the heads.
        count: (tensor, rows per query head): ``tensor``'s dim 0 over this gives the head count.
        kv_count: the same for key/value heads (``split`` layouts only).
    """

    module: str
    kind: str
    heads: int
    kv_heads: int
    head_dim: int
    blocks: tuple[Block, ...]
    count: tuple[str, int]
    kv_count: Optional[tuple[str, int]] = None

    @property
    def units(self) -> int:
        """Entries of the head group: one per key/value head (with its query heads)."""
        return self.kv_heads

    @property
    def group_size(self) -> int:
        """Query heads per unit."""
        return self.heads // self.kv_heads

    def slots(self) -> tuple[Slot, ...]:
        """One slot per (tensor, dim): unit ``u`` -> all its positions there, in ascending order."""
        merged: dict[tuple[str, int], list[Block]] = {}
        for b in self.blocks:
            merged.setdefault((b.tensor, b.dim), []).append(b)
        slots = []
        for (tensor, dim), blocks in merged.items():
            per_unit = [
                torch.arange(b.per_unit).add(b.offset).unsqueeze(0)
                + b.per_unit * torch.arange(self.units)[:, None]
                for b in blocks
            ]
            index = torch.cat(per_unit, 1).sort(1).values
            module = tensor.rpartition(".")[0]
            slots.append(Slot(tensor, module, dim, index, blocks[0].role))  # type: ignore[arg-type]
        return tuple(slots)


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _linear(module: nn.Module, attr: str) -> Optional[nn.Linear]:
    layer = getattr(module, attr, None)
    return layer if isinstance(layer, nn.Linear) else None


def _projection(p: str, attr: str, layer: nn.Linear, offset: int, per_unit: int, role: str) -> list[Block]:
    """Blocks of a linear layer's weight (rows for a producer, columns for a consumer) and bias."""
    if role == "consumer":
        return [Block(f"{p}{attr}.weight", 1, offset, per_unit, "consumer")]
    blocks = [Block(f"{p}{attr}.weight", 0, offset, per_unit, "producer")]
    if layer.bias is not None:
        blocks.append(Block(f"{p}{attr}.bias", 0, offset, per_unit, "param"))
    return blocks


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    own = {n: t for n, t in module._parameters.items() if t is not None}
    own.update({n: t for n, t in module._buffers.items() if t is not None})
    return own


def _per_head(p: str, module: nn.Module, heads: int, inner: int) -> Optional[list[Block]]:
    """Blocks for the module's own per-head tensors (a bias table with a dim of size ``heads``); None when
    one of its own tensors has a dim of the attention width, whose meaning we cannot know."""
    blocks = []
    for name, t in _own_tensors(module).items():
        if t.dim() == 0:
            continue
        if inner in t.shape:
            return None
        if t.is_floating_point() and heads in t.shape:
            blocks.append(Block(p + name, list(t.shape).index(heads), 0, 1, "param"))
    return blocks


def _packed(name: str, m: nn.Module) -> Optional[HeadLayout]:
    if not isinstance(m, nn.MultiheadAttention) or m.in_proj_weight is None or m.bias_k is not None:
        return None
    heads, head_dim = int(m.num_heads), int(m.head_dim)
    inner = heads * head_dim
    if m.in_proj_weight.shape[0] != 3 * inner or m.out_proj.weight.shape[1] != inner:
        return None
    p = _prefix(name)
    blocks = []
    for k in range(3):
        blocks.append(Block(f"{p}in_proj_weight", 0, k * inner, head_dim, "producer"))
        if m.in_proj_bias is not None:
            blocks.append(Block(f"{p}in_proj_bias", 0, k * inner, head_dim, "param"))
    blocks.append(Block(f"{p}out_proj.weight", 1, 0, head_dim, "consumer"))
    return HeadLayout(
        name, "packed", heads, heads, head_dim, tuple(blocks), (f"{p}in_proj_weight", 3 * head_dim)
    )


def _fused(name: str, m: nn.Module) -> Optional[HeadLayout]:
    qkv, proj, heads = _linear(m, "qkv"), _linear(m, "proj"), getattr(m, "num_heads", None)
    if qkv is None or proj is None or not isinstance(heads, int) or heads < 1:
        return None
    head_dim = getattr(m, "head_dim", None)
    if not isinstance(head_dim, int):
        head_dim = qkv.out_features // (3 * heads)
    inner = heads * head_dim
    if qkv.out_features != 3 * inner or proj.in_features != inner:
        return None
    norm = getattr(m, "norm", None)  # a norm over the attention width mixes the heads
    if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()):
        return None
    p = _prefix(name)
    blocks = []
    for k in range(3):
        blocks += _projection(p, "qkv", qkv, k * inner, head_dim, "producer")
    blocks += _projection(p, "proj", proj, 0, head_dim, "consumer")
    extra = _per_head(p, m, heads, inner)
    if extra is None:
        return None
    kind = "window" if _window(m) else "fused"
    return HeadLayout(name, kind, heads, heads, head_dim, (*blocks, *extra), (f"{p}qkv.weight", 3 * head_dim))


def _window(m: nn.Module) -> bool:
    """A shifted-window attention that keeps no head size of its own (see the module docstring)."""
    table = getattr(m, "relative_position_bias_table", None)
    return (
        isinstance(table, nn.Parameter)
        and callable(getattr(m, "get_relative_position_bias", None))
        and getattr(m, "shift_size", None) is not None
        and getattr(m, "window_size", None) is not None
        and not hasattr(m, "head_dim")
        and not hasattr(m, "logit_scale")
    )


#: the names of a ``split`` layout's projections and head size: (query, key, value, outputs, head size).
SPLIT_NAMES = (
    ("q_proj", "k_proj", "v_proj", ("o_proj", "out_proj"), "head_dim"),  # Llama-style
    ("q_lin", "k_lin", "v_lin", ("out_lin",), "attention_head_size"),  # DistilBERT
)


def _split(name: str, m: nn.Module) -> Optional[HeadLayout]:
    for q_attr, k_attr, v_attr, outs, size in SPLIT_NAMES:
        layout = _split_named(name, m, (q_attr, k_attr, v_attr), outs, size)
        if layout is not None:
            return layout
    return None


def _split_named(
    name: str, m: nn.Module, qkv: tuple[str, str, str], outs: tuple[str, ...], size: str
) -> Optional[HeadLayout]:
    q_attr, k_attr, v_attr = qkv
    q, k, v = _linear(m, q_attr), _linear(m, k_attr), _linear(m, v_attr)
    out_attr = next((a for a in outs if _linear(m, a) is not None), outs[0])
    o, head_dim = _linear(m, out_attr), getattr(m, size, None)
    if q is None or k is None or v is None or o is None or not isinstance(head_dim, int) or head_dim < 1:
        return None
    if q.out_features % head_dim or k.out_features % head_dim or v.out_features != k.out_features:
        return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads % kv_heads or o.in_features != q.out_features:
        return None
    g = heads // kv_heads
    p = _prefix(name)
    blocks = [
        *_projection(p, q_attr, q, 0, g * head_dim, "producer"),
        *_projection(p, k_attr, k, 0, head_dim, "producer"),
        *_projection(p, v_attr, v, 0, head_dim, "producer"),
        *_projection(p, out_attr, o, 0, g * head_dim, "consumer"),
    ]
    extra = _per_head(p, m, heads, heads * head_dim)
    if extra is None or any(b.per_unit != 1 for b in extra) or (extra and g != 1):
        return None
    return HeadLayout(
        name,
        "split",
        heads,
        kv_heads,
        head_dim,
        (*blocks, *extra),
        (f"{p}{q_attr}.weight", head_dim),
        (f"{p}{k_attr}.weight", head_dim),
    )


def _separate(name: str, m: nn.Module) -> Optional[HeadLayout]:
    """A child with ``query``, ``key`` and ``value`` linear layers and an int ``attention_head_size``
    beside ``output`` with a ``dense`` linear layer (BERT, RoBERTa, HF ViT in ``transformers``): the
    output projection is a sibling of the attention, so the layout is recognised at their parent; its
    module is the attention child, whose head counts change."""
    out = getattr(m, "output", None)
    found = [
        (child_name, child)
        for child_name, child in m.named_children()
        if all(_linear(child, a) is not None for a in ("query", "key", "value"))
    ]
    if len(found) != 1 or not isinstance(out, nn.Module):
        return None
    (child, attn), p = found[0], _prefix(name)
    q, k, v, o = _linear(attn, "query"), _linear(attn, "key"), _linear(attn, "value"), _linear(out, "dense")
    head_dim = getattr(attn, "attention_head_size", None)
    if q is None or k is None or v is None or o is None or not isinstance(head_dim, int) or head_dim < 1:
        return None
    inner = q.out_features
    if inner % head_dim or k.out_features != inner or v.out_features != inner or o.in_features != inner:
        return None
    heads = inner // head_dim
    blocks = [
        *(
            b
            for a in ("query", "key", "value")
            for b in _projection(p, f"{child}.{a}", getattr(attn, a), 0, head_dim, "producer")
        ),
        *_projection(p, "output.dense", o, 0, head_dim, "consumer"),
    ]
    extra = _per_head(f"{p}{child}.", attn, heads, inner)
    if extra is None:
        return None
    module = f"{p}{child}"
    return HeadLayout(
        module, "separate", heads, heads, head_dim, (*blocks, *extra), (f"{module}.query.weight", head_dim)
    )


LAYOUTS: tuple[Callable[[str, nn.Module], Optional[HeadLayout]], ...] = (_packed, _fused, _split, _separate)


def head_layout(name: str, module: nn.Module) -> Optional[HeadLayout]:
    """The head layout of ``module`` (called ``name`` in its model), or None if it is not an attention
    module of a known layout."""
    for recognise in LAYOUTS:
        layout = recognise(name, module)
        if layout is not None:
            return layout
    return None


def _position_keys(model: nn.Module) -> Callable[[Slot], tuple[str, int]]:
    """``slot -> (tensor, non-negative dim)``, each tensor looked up once."""
    ndims: dict[str, int] = {}

    def key(slot: Slot) -> tuple[str, int]:
        if slot.tensor not in ndims:
            owner, _, local = slot.tensor.rpartition(".")
            ndims[slot.tensor] = getattr(model.get_submodule(owner), local).dim()
        return slot.tensor, slot.dim % ndims[slot.tensor]

    return key


def attention_layouts(model: nn.Module, called: set[str]) -> dict[str, HeadLayout]:
    """Head layouts of the attention modules of a known layout that ran in the traced forward
    (``called``: names of the modules that did)."""
    found = {}
    for name, module in model.named_modules():
        layout = head_layout(name, module)
        if layout is not None and any(c == name or c.startswith(_prefix(name)) for c in called):
            found[name] = layout
    return found


def head_sides(layouts: dict[str, HeadLayout]) -> set[tuple[str, str]]:
    """``(layer, "out"|"in")`` of the projections whose channels the heads carry: the channel walk from
    there always ends at the attention product, so they need no channel group of their own (and
    Torch-Pruning's walk from a query projection through rotary embeddings can take minutes)."""
    sides = set()
    for layout in layouts.values():
        for b in layout.blocks:
            layer, _, attr = b.tensor.rpartition(".")
            if attr == "weight":
                sides.add((layer, "out" if b.dim == 0 else "in"))
    return sides


def with_head_groups(
    model: nn.Module, groups: list[ChannelGroup], layouts: dict[str, HeadLayout], *, prune_heads: bool
) -> list[ChannelGroup]:
    """``groups`` with one ``kind="heads"`` group per attention module in ``layouts``. Channel groups that
    cover some of the same projection dimensions (kept: the attention product stops their walk) lose
    those slots, or go when nothing else is left in them. A head group is prunable only with
    ``prune_heads`` and when no prunable channel group shares its positions."""
    out = list(groups)
    key = _position_keys(model)
    for name, layout in layouts.items():
        slots = layout.slots()
        owned = {key(s) for s in slots}
        reason = "" if prune_heads else HEADS_REASON
        kept: list[ChannelGroup] = []
        at = None  # the head group goes where the first group it replaces was
        for g in out:
            touched = [s for s in g.slots if key(s) in owned]
            if touched and at is None:
                at = len(kept)
            if not touched:
                kept.append(g)
            elif g.prunable:
                reason = f"its projections carry the channels of group {g.name!r}"
                kept.append(g)
            elif len(touched) < len(g.slots):
                rest = tuple(s for s in g.slots if not any(s is t for t in touched))
                kept.append(ChannelGroup(g.name, g.width, rest, False, g.residual, g.reason, g.ops, g.exact))
        kept.insert(
            len(kept) if at is None else at,
            ChannelGroup(
                name=f"{name}:heads",
                width=layout.units,
                slots=slots,
                prunable=not reason,
                reason=reason,
                ops=("attention",),
                kind="heads",
                unit_channels=layout.group_size * layout.head_dim,
            ),
        )
        out = kept
    return out
