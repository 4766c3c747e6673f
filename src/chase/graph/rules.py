"""The op rule table: which rule follows the channels through each torch op.

Rules are keyed by the op's name as the tracer records it (in-place variants and dunder methods are
normalized: ``x += y`` is ``add``). An op missing from the table is unsupported, so code the rules do not
know can only make a group unprunable, never wrong.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from chase.graph.layer_rules import (
    attention,
    channel_first,
    conv,
    embedding,
    group_norm,
    layer_norm,
    linear,
    mixes,
    pointwise,
)
from chase.graph.rule_base import ChanState, Effect, Rule, Unsupported
from chase.graph.shape_rules import ALONG_DIM, along_dim, cat, expand, getitem, probed, view
from chase.graph.trace import Call

__all__ = ["RULES", "ChanState", "Effect", "Unsupported", "apply"]


def _names(text: str) -> list[str]:
    return text.split()


# Elementwise (with broadcasting): every operand aligned from the right carries the same channels.
POINTWISE = _names("""
    relu relu6 hardtanh leaky_relu elu selu celu gelu silu mish sigmoid hardsigmoid hardswish tanh softplus
    softsign tanhshrink hardshrink softshrink threshold logsigmoid rrelu clamp clip clamp_min clamp_max neg
    negative abs exp exp2 expm1 log log1p log2 log10 sqrt rsqrt square reciprocal sin cos erf sign floor
    ceil round trunc frac pow float_power dropout dropout1d dropout2d dropout3d alpha_dropout
    feature_alpha_dropout clone contiguous to float double half bfloat16 type type_as nan_to_num positive
    add sub rsub mul multiply div divide true_divide floor_divide remainder fmod maximum minimum fmax fmin
    where addcmul addcdiv lerp copysign hypot atan2 detach zeros_like ones_like empty_like full_like
    rand_like randn_like
""")
# Defined on (N, C, ...) tensors and acting on each channel separately.
CHANNEL_FIRST = _names("""
    batch_norm instance_norm prelu max_pool1d max_pool2d max_pool3d max_pool1d_with_indices
    max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
    adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
    adaptive_max_pool1d_with_indices adaptive_max_pool2d_with_indices lp_pool1d lp_pool2d interpolate
    upsample upsample_nearest upsample_bilinear pad
""")
# Reductions and permutations, analysed on a meta tensor.
PROBED = _names("""
    mean sum nansum nanmean amax amin max min std var std_mean var_mean norm logsumexp prod median argmax
    argmin all any count_nonzero permute transpose swapaxes swapdims movedim moveaxis t
""")
VIEWS = _names("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as")
EXPANDS = _names("expand expand_as broadcast_to repeat tile")
# Products that mix all channels: the channels cannot be followed through them.
MIXING = _names("""
    matmul mm bmm baddbmm addmm addbmm einsum scaled_dot_product_attention bilinear
""")

RULES: dict[str, Rule] = {
    **dict.fromkeys(POINTWISE, pointwise),
    **dict.fromkeys(CHANNEL_FIRST, channel_first),
    **dict.fromkeys(PROBED, probed),
    **dict.fromkeys(VIEWS, view),
    **dict.fromkeys(EXPANDS, expand),
    **dict.fromkeys(MIXING, mixes),
    **dict.fromkeys(ALONG_DIM, along_dim),
    **dict.fromkeys(_names("conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d"), conv),
    **dict.fromkeys(_names("cat concat concatenate stack"), cat),
    "group_norm": group_norm,
    "layer_norm": layer_norm,
    "rms_norm": layer_norm,
    "linear": linear,
    "embedding": embedding,
    "multi_head_attention_forward": attention,
    "getitem": getitem,
}


def apply(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """The rule for ``call``'s op applied to channels arriving at ``port``; raises :class:`Unsupported`."""
    rule = RULES.get(call.op)
    if rule is None:
        raise Unsupported(f"{call.where()} is not in the channel rule table")
    return rule(call, port, st, module)
