"""Rules for elementwise ops and for layers (conv, linear, norms): where their channels go and what they mean.

A layer op ends a group's walk (a conv consumes its input channels and produces new ones); depthwise convs
and per-channel norms pass the channels through. The role a rule reports (producer, consumer, depthwise,
norm) says how the layer's weights carry the channels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from torch import nn

from chase.graph.rule_base import (
    DATA,
    ChanState,
    Effect,
    Unsupported,
    arg,
    check_owned,
    data_port,
    outs,
    port_shape,
)
from chase.graph.trace import Call

FIRST_ONLY = frozenset({"to", "type_as"})  # the second tensor only gives a dtype/device


def pointwise(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """Elementwise ops with broadcasting: every operand aligned from the right shares the channels."""
    shape = port_shape(call, port)
    neg = st.dim - len(shape)  # broadcasting aligns dims from the right
    size = shape[st.dim]
    ports: dict[int, ChanState] = {}
    data = 0
    for q, ref in enumerate(call.inputs):
        if q > 0 and call.op in FIRST_ONLY:
            break
        dq = len(ref.shape) + neg
        if dq < 0 or ref.shape[dq] != size:
            # Broadcast along the channels (size 1 or no channel dim): one value per sample or position
            # scales every channel alike (stochastic depth's per-sample noise, a spatial attention map).
            # Removing a channel does not change it unless it is computed from the channels, and then
            # the walk meets that computation (a reduction over the channels) and refuses it there.
            continue
        ports[q] = replace(st, dim=dq)
        data += ref.kind in DATA and ref.data
    for i, out in enumerate(call.out_shapes):
        ports[-1 - i] = replace(st, dim=len(out) + neg)
    return Effect(ports, residual=call.op in ("add", "sub", "rsub") and data >= 2)


def _dim1(call: Call, port: int, st: ChanState) -> None:
    data_port(call, port)
    if st.dim != 1:
        raise Unsupported(f"{call.where()} treats dim 1 as channels but the channels are in dim {st.dim}")


def channel_first(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """Ops defined on (N, C, ...) tensors that act on each channel separately (norms, pooling, resize)."""
    _dim1(call, port, st)
    if call.op == "pad" and st.dim >= len(port_shape(call, 0)) - len(arg(call, 1, "pad", ())) // 2:
        raise Unsupported(f"{call.where()} pads the channel dim")
    role = None
    if call.op in ("batch_norm", "instance_norm", "prelu"):
        check_owned(
            call, module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU)
        )
        role = "norm" if len(call.inputs) > 1 else None
        if call.op == "prelu" and call.inputs[1].shape in ((), (1,)):
            role = None  # one shared slope: nothing to slice
    return Effect({0: st, **outs(call, st)}, role=role)


def group_norm(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """GroupNorm is per-channel only with one channel per group; one group mixes all channels."""
    _dim1(call, port, st)
    check_owned(call, module, nn.GroupNorm)
    groups, channels = arg(call, 1, "num_groups"), port_shape(call, 0)[1]
    eff = Effect({0: st, **outs(call, st)}, role="norm" if len(call.inputs) > 1 else None)
    if groups == channels:
        return eff
    if groups == 1:
        eff.mixing = f"GroupNorm '{call.module}' normalizes across channels"
        return eff
    raise Unsupported(
        f"GroupNorm '{call.module}' (num_groups={groups}) can only lose whole groups of channels"
    )


def layer_norm(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    data_port(call, port)
    check_owned(call, module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))
    shape = arg(call, 1, "normalized_shape")
    n = 1 if isinstance(shape, int) else len(shape)
    ndim = len(port_shape(call, port))
    if st.dim < ndim - n:
        raise Unsupported(f"LayerNorm '{call.module}' normalizes over dims that are not the channels")
    if n != 1:
        raise Unsupported(f"LayerNorm '{call.module}' normalizes over the channels and other dims together")
    mixing = f"LayerNorm '{call.module}' normalizes across channels"
    return Effect({0: st, **outs(call, st)}, role="norm" if len(call.inputs) > 1 else None, mixing=mixing)


def conv(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """Convolutions: input channels (dim 1) are consumed, output channels (dim 1) produced."""
    data_port(call, port)
    check_owned(call, module, nn.modules.conv._ConvNd)
    if call.op.startswith("conv_transpose") or getattr(module, "transposed", False):
        raise Unsupported(f"transposed conv '{call.module}' is not supported")
    if st.dim != 1:
        raise Unsupported(f"{call.where()} reads channels from dim 1 but they are in dim {st.dim}")
    groups = module.groups
    if groups == 1:
        return Effect({port: st}, role="consumer" if port == 0 else "producer")
    if groups == module.in_channels == module.out_channels:
        return Effect({0: st, -1: st}, role="depthwise")
    # A grouped conv reads input channel c in conv group c // (C / groups): it cannot lose one channel,
    # but it can lose the same in-group channel of every group (a unit of `groups` channels). Whether the
    # group's channels cover the whole dim, as units need, is checked when the group is built.
    return Effect({port: st}, role="consumer" if port == 0 else "producer", grouped=groups)


def linear(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    data_port(call, port)
    check_owned(call, module, nn.Linear)
    if st.dim != len(port_shape(call, port)) - 1:
        raise Unsupported(
            f"{call.where()} reads features from the last dim but the channels are in dim {st.dim}"
        )
    return Effect({port: st}, role="consumer" if port == 0 else "producer")


def attention(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """``nn.MultiheadAttention``'s functional call on the embedding channels of its query, key and value:
    its packed input projection reads them and its output projection writes them, each channel on its
    own (the heads mix only the projected channels), like a layer that consumes and produces them."""
    if not isinstance(module, nn.MultiheadAttention):
        raise Unsupported(f"{call.where()} is attention outside nn.MultiheadAttention")
    data = [q for q, r in enumerate(call.inputs) if r.kind not in ("param", "buffer")][:3]
    if port >= 0 and port not in data:
        raise Unsupported(f"{call.where()}: channels reach a weight argument")
    if st.dim != len(port_shape(call, port)) - 1:
        raise Unsupported(f"{call.where()} reads the embedding from the last dim, not dim {st.dim}")
    ports = {q: replace(st, dim=len(call.inputs[q].shape) - 1) for q in data}
    ports[-1] = replace(st, dim=len(call.out_shapes[0]) - 1)
    return Effect(ports, role="attention")


def embedding(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    """``F.embedding(indices, weight)``: the weight's dim 1 becomes the output's last dim."""
    last = len(call.out_shapes[0]) - 1
    if port == 1 and st.dim == 1:
        return Effect({1: st, -1: replace(st, dim=last)})
    if port == -1 and st.dim == last:
        return Effect({1: replace(st, dim=1), -1: st})
    raise Unsupported(f"{call.where()}: the channels are not the embedding width")


def mixes(call: Call, port: int, st: ChanState, module: Optional[nn.Module]) -> Effect:
    raise Unsupported(f"{call.where()} mixes channels (matrix product / attention)")
