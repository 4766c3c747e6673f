"""Attention modules after surgery: their head counts follow the sliced projections.

An attention module keeps its head count (and, in timm, its attention width) in Python attributes, and
its projections may be child layers, so the per-module rule table cannot see a head go. Here the head
layout (:func:`chase.graph.heads.head_layout`) of every attention module above a sliced tensor gives its
new attributes from the planned shapes: ``num_heads`` (and ``attn_dim``, ``num_key_value_heads`` where the
module has them).

``torch.nn.MultiheadAttention`` computes its attention in ``F.multi_head_attention_forward``, which
requires ``num_heads * head_dim == embed_dim``: once heads or the embedding width are removed that no
longer holds, so the module becomes a :class:`MultiheadAttentionAnyWidth` (its subclass, same parameters
and state-dict keys) whose forward does the same computation without that constraint. A shifted-window
attention of the ``window`` layout (torchvision's Swin) likewise becomes a subclass of its own class whose
forward is :func:`window_attention`; that subclass is made at run time, so a model holding one is saved
as a state dict or a slim file (``chase.slim``), not pickled whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from chase.graph.heads import HeadLayout, head_layout

ShapeOf = Callable[[str], torch.Size]


class MultiheadAttentionAnyWidth(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose heads need not fill ``embed_dim`` (packed ``in_proj_weight`` only).

    The query, key and value projections are ``num_heads * head_dim`` rows each of ``in_proj_weight``
    (``[3 * num_heads * head_dim, embed_dim]``), the output projection maps them back to ``embed_dim``.
    Same arguments and results as :meth:`nn.MultiheadAttention.forward`; the attention runs through
    ``F.scaled_dot_product_attention`` unless the weights are asked for.
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[torch.Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (length, batch, embed) from here on, as in F.multi_head_attention_forward
        heads, head_dim = self.num_heads, self.head_dim
        inner = heads * head_dim
        w_q, w_k, w_v = self.in_proj_weight.split(inner)
        b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(inner)
        length, batch = query.shape[:2]

        def split_heads(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
            return F.linear(x, w, b).reshape(x.shape[0], batch, heads, head_dim).permute(1, 2, 0, 3)

        q, k, v = split_heads(query, w_q, b_q), split_heads(key, w_k, b_k), split_heads(value, w_v, b_v)
        mask = _merged_mask(attn_mask, key_padding_mask, batch, heads, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * head_dim**-0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores + _causal(length, k.shape[2], q)
            attn = F.dropout(scores.softmax(-1), dropout, self.training)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            causal = is_causal and mask is None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, inner))
        if unbatched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(0, 1) if self.batch_first else out), weights


def _causal(length: int, source: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((length, source), float("-inf"), dtype=like.dtype, device=like.device).triu(1)


def _merged_mask(
    attn_mask: Optional[torch.Tensor],
    key_padding_mask: Optional[torch.Tensor],
    batch: int,
    heads: int,
    dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    """One additive mask broadcastable to (batch, heads, L, S) from the two masks MultiheadAttention takes
    (bool: True means "do not attend")."""

    def additive(m: torch.Tensor) -> torch.Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:  # (batch * heads, L, S)
            mask = mask.reshape(batch, heads, *mask.shape[1:])
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).reshape(batch, 1, 1, -1)
        mask = padding if mask is None else mask + padding
    return mask


def _region_slices(size: int, window: int, shift: int) -> tuple[tuple[int, int], ...]:
    """The three bands of a shifted map along one axis: windows that stay whole, and the two parts of the
    windows the cyclic shift puts together."""
    return ((0, size - window), (size - window, size - shift), (size - shift, size))


def window_attention(
    x: torch.Tensor,
    qkv: nn.Linear,
    proj: nn.Linear,
    bias: torch.Tensor,
    window: tuple[int, int],
    shift: tuple[int, int],
    heads: int,
    attention_dropout: float = 0.0,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """(Shifted) window attention of Swin (Liu et al. 2021) on ``x`` [B, H, W, C], where the heads need
    not fill ``C``: the head size is ``qkv``'s width over ``3 * heads``. ``bias`` is the relative position
    bias [1, heads, N, N] of one window of N positions. Pads to whole windows, shifts cyclically, masks
    attention between positions the shift brought together, and undoes all of it."""
    batch, height, width, channels = x.shape
    wh, ww = window
    x = F.pad(x, (0, 0, 0, (-width) % ww, 0, (-height) % wh))
    hp, wp = x.shape[1:3]
    sh, sw = (0 if wh >= hp else shift[0]), (0 if ww >= wp else shift[1])  # one window: nothing to shift
    if sh or sw:
        x = x.roll((-sh, -sw), (1, 2))
    nh, nw, n = hp // wh, wp // ww, wh * ww
    windows = x.reshape(batch, nh, wh, nw, ww, channels).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, channels)
    head_dim = qkv.out_features // (3 * heads)
    q, k, v = (
        F.linear(windows, qkv.weight, qkv.bias).reshape(-1, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    )
    attn = (q * head_dim**-0.5) @ k.transpose(-2, -1) + bias
    if sh or sw:
        region = x.new_zeros(hp, wp)
        bands = [(h, w) for h in _region_slices(hp, wh, sh) for w in _region_slices(wp, ww, sw)]
        for i, ((h0, h1), (w0, w1)) in enumerate(bands):
            region[h0:h1, w0:w1] = i
        ids = region.reshape(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, n)
        mask = (ids[:, None, :] != ids[:, :, None]).to(attn.dtype) * -100.0  # as the paper's code
        attn = (attn.view(batch, nh * nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    attn = F.dropout(attn.softmax(-1), attention_dropout, training)
    out = (attn @ v).transpose(1, 2).reshape(-1, n, heads * head_dim)
    out = F.dropout(F.linear(out, proj.weight, proj.bias), dropout, training)
    out = (
        out.reshape(batch, nh, nw, wh, ww, channels)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, hp, wp, channels)
    )
    if sh or sw:
        out = out.roll((sh, sw), (1, 2))
    return out[:, :height, :width].contiguous()


def _window_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return window_attention(
        x,
        self.qkv,
        self.proj,
        self.get_relative_position_bias(),
        tuple(self.window_size),
        tuple(self.shift_size),
        self.num_heads,
        float(getattr(self, "attention_dropout", 0.0)),
        float(getattr(self, "dropout", 0.0)),
        self.training,
    )


_ANY_WIDTH: dict[type, type] = {}


def window_any_width(base: type) -> type:
    """The subclass of ``base`` (a ``window``-layout attention class) whose forward is
    :func:`window_attention` (one per class, made once)."""
    if base in _ANY_WIDTH.values():
        return base
    if base not in _ANY_WIDTH:
        cls = type(f"{base.__name__}AnyWidth", (base,), {"forward": _window_forward, "__module__": __name__})
        cls.__doc__ = f"{base.__name__} whose heads need not fill its width (chase.surgery.attention)."
        _ANY_WIDTH[base] = cls
    return _ANY_WIDTH[base]


def _heads(layout: HeadLayout, shape_of: ShapeOf) -> tuple[int, int]:
    tensor, rows = layout.count
    heads = shape_of(tensor)[0] // rows
    kv_heads = heads if layout.kv_count is None else shape_of(layout.kv_count[0])[0] // layout.kv_count[1]
    return heads, kv_heads


def attention_attributes(module: nn.Module, layout: HeadLayout, shape_of: ShapeOf) -> dict[str, Any]:
    """New attributes of an attention module whose tensors will have the shapes ``shape_of`` gives (by
    FQN). Raises ValueError when the shapes leave a partial head."""
    heads, kv_heads = _heads(layout, shape_of)
    tensor, rows = layout.count
    if shape_of(tensor)[0] % rows:
        raise ValueError(f"{shape_of(tensor)[0]} rows of {tensor!r} are not whole heads of {rows} rows")
    inner = heads * layout.head_dim
    # the int attributes attention modules keep their head counts and width in, where a module has them
    counts = {
        "num_heads": heads,
        "n_heads": heads,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "attn_dim": inner,
        "all_head_size": inner,
    }
    attrs: dict[str, Any] = {a: v for a, v in counts.items() if isinstance(getattr(module, a, None), int)}
    if layout.kind == "window":
        prefix = f"{layout.module}." if layout.module else ""
        embed = shape_of(f"{prefix}qkv.weight")[1]
        if heads * layout.head_dim != embed or type(module) in _ANY_WIDTH.values():
            attrs["__class__"] = window_any_width(type(module))
    if layout.kind == "packed":
        prefix = f"{layout.module}." if layout.module else ""
        embed = shape_of(f"{prefix}in_proj_weight")[1]
        attrs.update(embed_dim=embed, kdim=embed, vdim=embed)
        if heads * layout.head_dim != embed or type(module) is MultiheadAttentionAnyWidth:
            attrs["__class__"] = MultiheadAttentionAnyWidth
    return attrs


def attention_modules(model: nn.Module, tensors: list[str]) -> dict[str, tuple[nn.Module, HeadLayout]]:
    """The attention modules of a known head layout that own (directly or through their projections) any
    of ``tensors``, by name."""
    found: dict[str, tuple[nn.Module, HeadLayout]] = {}
    seen: set[str] = set()
    for tensor in tensors:
        parts = tensor.split(".")[:-1]
        for i in range(len(parts), -1, -1):
            name = ".".join(parts[:i])
            if name in seen:
                continue
            seen.add(name)
            module = model.get_submodule(name)
            layout = head_layout(name, module)
            if layout is not None:  # the attention module itself (a "separate" layout's is a child)
                found[layout.module] = (model.get_submodule(layout.module), layout)
    return found
