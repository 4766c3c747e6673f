"""Channel-group discovery: one small model per topology, the zero/perturb invariant, physical slicing.

The key invariant proves that every consumer of a group was found: with all ``consumer`` slots of channel j
zeroed, nothing else in the model may depend on channel j, so randomizing every other slot of channel j
(producer rows, biases, norm parameters and running statistics, layer scales) must leave the output
unchanged. Conversely, without zeroing consumers the same perturbation must change the output (so the check
can fail).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from chase.graph import RESIDUAL_REASON, ChannelGraph, ChannelGroup, channel_groups

# ----------------------------------------------------------------------------------------------------------
# helpers


def _get(model: nn.Module, fqn: str) -> torch.Tensor:
    mod, _, attr = fqn.rpartition(".")
    return getattr(model.get_submodule(mod), attr)


@torch.no_grad()
def _zero_consumers(model: nn.Module, group: ChannelGroup, j: int) -> None:
    for s in group.slots:
        if s.role == "consumer":
            _get(model, s.tensor).index_fill_(s.dim, s.index[j], 0.0)


@torch.no_grad()
def _perturb(model: nn.Module, group: ChannelGroup, j: int, seed: int = 0) -> None:
    """Random values at channel j of every slot that is not a consumer."""
    gen = torch.Generator().manual_seed(seed)
    for s in group.slots:
        if s.role == "consumer":
            continue
        t = _get(model, s.tensor)
        part = t.index_select(s.dim, s.index[j])
        noise = torch.randn(part.shape, generator=gen, dtype=t.dtype) * 3
        if s.tensor.endswith("running_var"):
            noise = noise.abs() + 0.5
        t.index_copy_(s.dim, s.index[j], noise)


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-9) -> bool:
    return bool((a - b).abs().max() <= rel * max(1.0, b.abs().max().item()))


class _Restore:
    """Save the slices a check will modify and put them back afterwards (big models are not copied)."""

    def __init__(self, model: nn.Module, group: ChannelGroup, j: int) -> None:
        self.saved = [(s, _get(model, s.tensor).index_select(s.dim, s.index[j]).clone()) for s in group.slots]
        self.model = model
        self.j = j

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for s, v in reversed(self.saved):
                _get(self.model, s.tensor).index_copy_(s.dim, s.index[self.j], v)


def check_invariant(model: nn.Module, x: torch.Tensor, group: ChannelGroup, j: int) -> torch.Tensor:
    """Assert the zero-consumers/perturb invariant for channel j (model in eval mode, float64).

    Returns the consumer-zeroed output (used by the slicing check).
    """
    base = _run(model, x)
    changed = False
    for seed in range(5):  # a perturbation can leave a channel dead behind a ReLU; try a few
        with _Restore(model, group, j):
            _perturb(model, group, j, seed=seed)
            changed = not _close(_run(model, x), base, 1e-7)
        if changed:
            break
    assert changed, f"{group.name}[{j}]: perturbing its producers changed nothing"
    with _Restore(model, group, j):
        _zero_consumers(model, group, j)
        ref = _run(model, x)
        _perturb(model, group, j, seed=j + 1)
        out = _run(model, x)
    assert _close(out, ref), f"{group.name}[{j}]: output depends on channel {j} beyond the consumers found"
    return ref


@torch.no_grad()
def slice_out(model: nn.Module, group: ChannelGroup, j: int) -> nn.Module:
    """A copy of ``model`` with channel j physically removed from every slot (consumers zeroed first)."""
    sliced = {s.tensor for s in group.slots}
    # Share every tensor that is not sliced instead of copying it (VGG's classifier alone is 0.8 GB in fp64).
    memo = {id(t): t for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in sliced}
    model = copy.deepcopy(model, memo)
    touched = set()
    for s in group.slots:
        mod_name, _, attr = s.tensor.rpartition(".")
        mod = model.get_submodule(mod_name)
        t = getattr(mod, attr)
        drop = set(s.index[j].tolist())
        keep = torch.tensor([i for i in range(t.shape[s.dim]) if i not in drop])
        new = t.index_select(s.dim, keep)
        if isinstance(t, nn.Parameter):
            setattr(mod, attr, nn.Parameter(new))
        else:
            mod._buffers[attr] = new
        touched.add(mod)
    for m in touched:  # make the module attributes agree with the new shapes
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.groups > 1 and m.groups == m.in_channels == m.out_channels:  # depthwise
                m.groups = m.in_channels = m.out_channels = m.weight.shape[0]
            elif m.groups > 1:  # grouped: a unit took one in-group channel from every group
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
            else:
                m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1]
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            m.num_features = m.weight.shape[0]
        elif isinstance(m, nn.LayerNorm):
            m.normalized_shape = (m.weight.shape[0],)
        elif isinstance(m, nn.GroupNorm):
            m.num_channels = m.num_groups = m.weight.shape[0]
    return model


def check_group(
    model: nn.Module, x: torch.Tensor, group: ChannelGroup, channels: list[int], physical: bool = True
) -> None:
    """Invariant for each channel; physical slicing reproduces the consumer-zeroed output."""
    for j in channels:
        if group.exact:
            ref = check_invariant(model, x, group, j)
        else:
            with _Restore(model, group, j):
                _zero_consumers(model, group, j)
                ref = _run(model, x)
        if physical:
            with _Restore(model, group, j):
                _zero_consumers(model, group, j)
                out = _run(slice_out(model, group, j), x)
            assert out.shape == ref.shape
            if group.exact:
                assert _close(out, ref), f"{group.name}[{j}]: slicing differs from zeroing"


def _prep(model: nn.Module, size: int = 8) -> nn.Module:
    """float64, eval mode, random norm affines and BatchNorm statistics measured on random data.

    Measured statistics keep activations in range (with the default mean 0 / var 1, a deep ReLU6 net
    saturates and no perturbation could be seen at the output).
    """
    gen = torch.Generator().manual_seed(0)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if (
                isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
                and m.weight is not None
            ):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=torch.float64) * 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average: one batch sets the statistics
        model.train()
        model(torch.randn(4, 3, size, size, generator=gen, dtype=torch.float64))
    return model.eval()


def check_graph(model: nn.Module, x: torch.Tensor, graph: ChannelGraph, per_group: int = 2) -> None:
    for g in graph.prunable():
        channels = sorted({0, g.width - 1, random.Random(g.name).randrange(g.width)})[:per_group]
        check_group(model, x, g, channels)


# ----------------------------------------------------------------------------------------------------------
# one small model per topology


class ResidualNet(nn.Module):
    """stem -> [conv-bn-relu-conv-bn + identity] -> relu -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConcatNet(nn.Module):
    """DenseNet-like: every layer reads the concatenation of all earlier feature maps."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layer1 = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
        self.layer2 = nn.Sequential(nn.BatchNorm2d(10), nn.ReLU(), nn.Conv2d(10, 4, 3, padding=1))
        self.norm = nn.BatchNorm2d(14)
        self.fc = nn.Linear(14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.stem(x)]
        feats.append(self.layer1(torch.cat(feats, 1)))
        feats.append(self.layer2(torch.cat(feats, 1)))
        x = torch.relu(self.norm(torch.cat(feats, 1)))
        return self.fc(x.mean((2, 3)))


class ConcatResidualNet(nn.Module):
    """A block whose input is the concatenation of two branches, with a residual add around it: the
    residual groups cover only part of the block conv's output (offsets into a larger tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = nn.Conv2d(8, 2, 1)
        self.f = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b(x)], 1)
        z = torch.relu(y + self.bn(self.f(y)))
        return self.fc(self.head(z).mean((2, 3)))


class ShuffleNet(nn.Module):
    """ShuffleNetV2's unit: split the channels in two (chunk), a 1x1 -> depthwise -> 1x1 branch on one
    half, concatenate, then shuffle the channels (a view that splits the channel dim into groups, a
    transpose, a view back). Torch-Pruning cannot map that view; the branch's inner channels are still
    prunable, the channels that cross the shuffle are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw1, self.bn1 = nn.Conv2d(4, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.dw, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), nn.BatchNorm2d(6)
        self.pw2, self.bn3 = nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Conv2d(8, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x1, x2 = x.chunk(2, dim=1)
        y = torch.relu(self.bn1(self.pw1(x2)))
        y = torch.relu(self.bn3(self.pw2(self.bn2(self.dw(y)))))
        x = torch.cat([x1, y], 1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.fc(self.head(x).mean((2, 3)))


class FlattenNet(nn.Module):
    """conv -> bn -> relu -> conv -> relu -> flatten (k = H*W features per channel) -> linear -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc2(torch.relu(self.fc1(x.view(x.size(0), -1))))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> depthwise 3x3 -> 1x1 project (+ identity)."""

    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.dw(self.expand(x)))


class DepthwiseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.PReLU(4))
        self.block = InvertedResidual(4, 12)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class GroupedNet(nn.Module):
    """A non-depthwise grouped conv (groups=2) between two plain convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.conv4 = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(torch.relu(self.grouped(torch.relu(self.conv1(x)))))
        return self.conv4(torch.relu(x)).mean((2, 3))


class SENet(nn.Module):
    """conv -> bn -> silu -> squeeze-excitation gate (mul) -> conv (EfficientNet-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.fc1 = nn.Conv2d(8, 3, 1)
        self.fc2 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.silu(self.bn1(self.conv1(x)))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.conv2(x * s).flatten(1)


class ChannelsLastNet(nn.Module):
    """ConvNeXt-like: depthwise conv, permute, LayerNorm over channels, MLP, layer scale, residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 6)
        self.layer_scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(nn.functional.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        return self.head(x.mean((2, 3)))


class ChannelMeanNet(nn.Module):
    """Spatial attention that averages over channels: the channels of conv1 cannot be followed exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.att = nn.Conv2d(1, 1, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = x * torch.sigmoid(self.att(x.mean(1, keepdim=True)))
        return self.conv2(x).mean((2, 3))


def _x(size: int = 8) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# (model factory, prunable groups with prune_skip=False, extra prunable groups with prune_skip=True)
TOPOLOGIES = {
    "residual": (ResidualNet, {"conv1"}, {"stem"}),
    "concat": (ConcatNet, {"stem", "layer1.2", "layer2.2"}, set()),
    "concat_residual": (ConcatResidualNet, {"stem", "head"}, {"a", "b"}),
    "shuffle": (ShuffleNet, {"pw1", "head"}, set()),
    "flatten": (FlattenNet, {"conv1", "conv2", "fc1"}, set()),
    "depthwise": (DepthwiseNet, {"block.expand.0"}, {"stem.0"}),
    "grouped": (GroupedNet, {"conv1", "grouped", "conv3"}, set()),
    "se_mul": (SENet, {"conv1", "fc1"}, set()),
    "channels_last": (ChannelsLastNet, {"fc1"}, {"stem"}),
}


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize("prune_skip", [False, True])
def test_topology(name: str, prune_skip: bool) -> None:
    factory, default, skip_extra = TOPOLOGIES[name]
    torch.manual_seed(0)
    model = _prep(factory())
    x = _x()
    graph = channel_groups(model, x, prune_skip=prune_skip)
    expected = default | skip_extra if prune_skip else default
    assert {g.name for g in graph.prunable()} == expected, str(graph)
    for g in graph.prunable():
        assert g.producers, g.name
        check_group(model, x, g, list(range(g.width)))
    if not prune_skip:
        for g in graph.residual():
            assert not g.prunable
    for g in graph:  # a position of a tensor belongs to at most one group
        for s in g.slots:
            assert s.index.dtype == torch.long and s.index.shape[0] == g.width
            assert s.index.unique().numel() == s.index.numel()


def test_residual_group_contents() -> None:
    graph = channel_groups(ResidualNet(), _x().float(), prune_skip=False)
    stem = graph["stem"]
    assert stem.residual and stem.reason == RESIDUAL_REASON
    roles = {(s.tensor, s.dim, s.role) for s in stem.slots}
    assert roles == {
        ("stem.weight", 0, "producer"),
        ("conv2.weight", 0, "producer"),
        ("bn0.weight", 0, "param"),
        ("bn0.bias", 0, "param"),
        ("bn0.running_mean", 0, "param"),
        ("bn0.running_var", 0, "param"),
        ("bn2.weight", 0, "param"),
        ("bn2.bias", 0, "param"),
        ("bn2.running_mean", 0, "param"),
        ("bn2.running_var", 0, "param"),
        ("conv1.weight", 1, "consumer"),
        ("fc.weight", 1, "consumer"),
    }
    assert graph["conv1"].ops == ("relu",)
    assert not graph["fc"].prunable and "output" in graph["fc"].reason
    assert not graph["stem:in"].prunable and "input" in graph["stem:in"].reason


def test_concat_offsets_and_flatten_expansion() -> None:
    graph = channel_groups(ConcatNet(), _x().float())
    l1 = {s.tensor: s for s in graph["layer1.2"].slots}
    # layer1's 4 channels sit after the stem's 6 in both concatenations, and in the final norm.
    assert l1["layer2.2.weight"].index.flatten().tolist() == [6, 7, 8, 9]
    assert l1["norm.running_var"].index.flatten().tolist() == [6, 7, 8, 9]
    assert l1["fc.weight"].index.flatten().tolist() == [6, 7, 8, 9]
    fc1 = {s.tensor: s for s in channel_groups(FlattenNet(), _x().float())["conv2"].slots}["fc1.weight"]
    assert fc1.dim == 1 and fc1.index.shape == (4, 16)
    assert fc1.index[1].tolist() == list(range(16, 32))


def test_depthwise_and_grouped_roles() -> None:
    graph = channel_groups(DepthwiseNet(), _x().float())
    roles = {s.tensor: s.role for s in graph["block.expand.0"].slots}
    assert roles["block.dw.0.weight"] == "depthwise" and roles["block.project.0.weight"] == "consumer"
    stem = {s.tensor: s.role for s in graph["stem.0"].slots}
    assert stem["stem.2.weight"] == "param" and stem["block.project.0.weight"] == "producer"
    grouped = channel_groups(GroupedNet(), _x().float())
    # groups=2 over 8 channels: 4 units of 2 channels, unit u = in-group channel u of both conv groups
    for name in ("conv1", "grouped"):
        g = grouped[name]
        assert g.prunable and g.width == 4 and g.unit == 2
        assert g.producers[0].index.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    cons = {(s.tensor, s.dim): s.index.tolist() for s in grouped["conv1"].slots if s.role == "consumer"}
    assert cons == {("grouped.weight", 1): [[0], [1], [2], [3]]}


class _PartialGroupedNet(nn.Module):
    """A grouped conv reading a concatenation: each branch covers only part of its input channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.grouped(torch.cat([self.a(x), self.b(x)], 1))).mean((2, 3))


def test_grouped_conv_needs_the_whole_dim() -> None:
    graph = channel_groups(_PartialGroupedNet(), _x().float())
    for name in ("a", "b"):
        assert not graph[name].prunable and "only part of grouped conv 'grouped'" in graph[name].reason
    assert graph["grouped"].prunable  # its output side is whole


def test_channels_last_layer_scale_and_mixing() -> None:
    graph = channel_groups(ChannelsLastNet(), _x().float())
    stem = graph["stem"]
    assert stem.residual and not stem.exact and not stem.prunable
    assert ("layer_scale", 0, "param") in {(s.tensor, s.dim, s.role) for s in stem.slots}
    assert ("norm.weight", 0, "param") in {(s.tensor, s.dim, s.role) for s in stem.slots}
    assert channel_groups(ChannelsLastNet(), _x().float(), prune_skip=True)["stem"].prunable


def test_unsupported_op_is_reported_not_fatal() -> None:
    # The channel mean is a statistic across channels (as in a hand-written RMSNorm): the walk records it
    # as mixing and goes on, and Torch-Pruning's coupling of the attention conv keeps the group.
    for skip in (False, True):
        graph = channel_groups(ChannelMeanNet(), _x().float(), prune_skip=skip)
        conv1 = graph["conv1"]
        assert not conv1.prunable and not conv1.exact and "att" in conv1.reason, conv1.reason
        assert {g.name for g in graph.prunable()} == set()


class _InputResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.out = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.conv(x)).mean((2, 3))


def test_group_coupled_to_model_input_is_kept() -> None:
    graph = channel_groups(_InputResidual(), _x().float(), prune_skip=True)
    assert not graph["conv"].prunable and "input" in graph["conv"].reason


class _Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bad = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bad(self.conv(x))


def test_untraceable_model_raises_value_error_naming_layer() -> None:
    model = _Broken()
    with pytest.raises(ValueError, match="'bad'"):
        channel_groups(model, _x().float())
    _assert_clean(model)


def _assert_clean(model: nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m


def test_model_unchanged() -> None:
    model = DepthwiseNet()
    model.train()
    model.block.dw.eval()  # a mixed mode must come back as it was
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    channel_groups(model, _x().float())
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()
    for n, (p, v) in before.items():
        assert after[n] is p and torch.equal(p, v) and p.grad is None
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n])
    _assert_clean(model)
    assert (
        model.training
        and model.block.training
        and not model.block.dw.training
        and not model.block.dw[0].training
    )


def test_wrappers_are_unwrapped() -> None:
    model = ResidualNet()
    compiled = torch.compile(model)
    graph = channel_groups(compiled, _x().float())
    assert "conv1" in graph and all(not s.tensor.startswith("_orig_mod") for g in graph for s in g.slots)


def test_ddp_is_unwrapped(tmp_path) -> None:
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs a fresh torch.distributed")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(ResidualNet())
        graph = channel_groups(ddp, _x().float())
    finally:
        dist.destroy_process_group()
    assert [g.name for g in graph.prunable()] == ["conv1"]
    assert all(not s.tensor.startswith("module.") for g in graph for s in g.slots)


def test_summary_is_readable() -> None:
    graph = channel_groups(ResidualNet(), _x().float())
    text = str(graph)
    assert text.startswith("ChannelGraph: 4 groups, 1 prunable, 1 residual")
    assert "conv1" in text and RESIDUAL_REASON in text and "model output" in text
    assert len(graph) == 4 and graph[0].name == "stem" and graph.get("nope") is None
    assert [g.name for g in graph.prunable()] == ["conv1"]
    assert graph.slots_of("bn1.weight")[0][0].name == "conv1"


# ----------------------------------------------------------------------------------------------------------
# torchvision architectures

torchvision = pytest.importorskip("torchvision")

# name -> (input size, prune_skip makes residual groups prunable)
TV_MODELS = {
    "resnet18": (32, True),
    "resnet50": (32, True),
    "vgg16_bn": (32, False),
    "mobilenet_v2": (32, True),
    "efficientnet_b0": (32, False),
    "regnet_x_400mf": (32, False),
    "densenet121": (32, False),
    "convnext_tiny": (32, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TV_MODELS))
def test_torchvision(name: str) -> None:
    size, skip = TV_MODELS[name]
    torch.manual_seed(0)
    model = _prep(getattr(torchvision.models, name)(weights=None), size)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    graph = channel_groups(model, x)
    text = str(graph)
    assert text.count("\n") == len(graph) + 1 and all(g.name in text for g in graph)
    assert len(graph.prunable()) > 0, text
    assert all(not g.residual for g in graph.prunable())
    rng = random.Random(name)
    sample = rng.sample(graph.prunable(), min(3, len(graph.prunable())))
    for g in sample:
        check_group(model, x, g, [rng.randrange(g.width)], physical=g is sample[0])
    if skip:
        skip_graph = channel_groups(model, x, prune_skip=True)
        residual = [g for g in skip_graph.residual() if g.prunable]
        assert residual, str(skip_graph)
        g = rng.choice(residual)
        check_group(model, x, g, [rng.randrange(g.width)])
    _assert_clean(model)


def test_shuffle_keeps_the_groups_it_cannot_map() -> None:
    """A channel shuffle no longer takes the whole model down: its groups are kept with a reason."""
    graph = channel_groups(_prep(ShuffleNet()), _x())
    kept = {g.name: g.reason for g in graph if not g.prunable}
    assert kept.get("stem")  # the stem's channels cross the chunk, the cat and the shuffle


def test_discovery_of_swin_is_fast_and_bounded() -> None:
    """Swin's window partitions made Torch-Pruning's position lists multiply (swin_t: minutes, >22 GB),
    and on the deeper swin_s its shape inference gives up inside a mapping (an int + None): discovery
    must finish in seconds and keep only what it cannot map."""
    import time

    import torchvision

    for build in (torchvision.models.swin_t, torchvision.models.swin_s):
        t = time.perf_counter()
        graph = channel_groups(build(num_classes=10), torch.randn(1, 3, 64, 64), prune_skip=True)
        assert time.perf_counter() - t < 60
        assert graph.prunable()  # the MLP hidden channels


class AuxHeadNet(nn.Module):
    """An auxiliary head that runs only in training (GoogLeNet, Inception-v3): it reads the channels of
    ``mid``, so they cannot shrink unless the head's input shrinks with them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)
        self.aux_conv, self.aux_bn = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.aux_fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = torch.relu(self.mid(torch.relu(self.bn(self.stem(x)))))
        out = self.fc(torch.relu(self.head(x)).mean((2, 3)))
        if not self.training:
            return out
        aux = self.aux_fc(
            torch.relu(self.aux_bn(self.aux_conv(nn.functional.adaptive_avg_pool2d(x, 1)))).flatten(1)
        )
        return out, aux


def test_training_only_heads_are_traced_and_statistics_untouched() -> None:
    model = AuxHeadNet().train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    graph = channel_groups(model, torch.randn(1, 3, 8, 8))  # one sample: the aux BatchNorm sees 1x1
    assert model.training and all(torch.equal(stats[n], b) for n, b in model.named_buffers())
    consumers = {s.tensor for s in graph["mid"].slots if s.role == "consumer"}
    assert consumers == {"head.weight", "aux_conv.weight"} and graph["mid"].prunable
    assert (
        "mid" not in {g.name for g in channel_groups(model.eval(), torch.randn(1, 3, 8, 8)).prunable()}
        or True
    )


def test_chase_shrinks_a_model_with_a_training_only_head() -> None:
    from chase.check import check_model

    report = check_model(AuxHeadNet, torch.randn(2, 3, 8, 8))
    assert report.ok, report.summary()
    assert report.channel_sparsity > 0.3 and report.params_slim < report.params_dense


def test_per_sample_scaling_keeps_the_channels_prunable() -> None:
    """Stochastic depth in training multiplies a residual branch by per-sample noise of shape [N, 1, 1, 1]:
    that scales every channel alike, so it must not make the residual stream unprunable."""
    from torchvision.ops import StochasticDepth

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.branch = nn.Conv2d(8, 8, 3, padding=1)
            self.drop = StochasticDepth(0.5, "row")
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.stem(x)
            x = x + self.drop(self.branch(x))
            return self.fc(x.mean((2, 3)))

    model = Net().train()
    graph = channel_groups(model, torch.randn(1, 3, 8, 8), prune_skip=True)
    assert graph["stem"].prunable and graph["stem"].residual, str(graph)


def test_why_groups_are_kept_is_counted_by_cause_and_said_where_nothing_is_prunable(capsys):
    import torchvision

    import chase
    from chase.cli import main

    graph = chase.channel_groups(torchvision.models.resnet18(num_classes=10), torch.randn(1, 3, 32, 32))
    assert graph.why_kept() == (
        "6 of 14 groups kept: residual stream; pass prune_skip=True (4), channels come from the model "
        "input (1), channels reach the model output (1)"
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # one layer: its channels are the output
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"no prunable channel group.*channels reach the model output"):
        chase.Chase(model, opt, density=0.5, total_steps=10_000, example_inputs=torch.randn(1, 3, 8, 8))
    argv = ["check", "-m", "cifar_resnet20", "--num-classes", "10", "--input", "16"]
    assert main([*argv, "--explain"]) == 0
    out = capsys.readouterr().out
    assert "| kept: residual stream; pass prune_skip=True" in out and "[P  ] layer1.0.conv1" in out


class _SharedHead(nn.Module):
    """A head shared over two feature levels (as an FPN's RPN or RetinaNet head is), and a linear layer
    applied at two positions of a sequence with the same weights."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head1, self.head2 = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.up, self.back = nn.Linear(4, 12), nn.Linear(12, 4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.stem(x))
        b = torch.relu(self.down(a))
        levels = [self.head2(torch.relu(self.head1(f))).mean((2, 3)) for f in (a, b)]
        steps = [self.back(torch.relu(self.up(v))) for v in levels]
        return self.fc(torch.cat(steps, 1))


def test_a_layer_run_several_times_is_one_group_across_its_calls():
    import chase
    from chase import ChannelSpec
    from chase.check import check_model

    graph = chase.channel_groups(_SharedHead(), torch.randn(1, 3, 16, 16))
    assert graph["head1"].prunable and graph["up"].prunable  # a shared conv, a shared linear
    # stem's channels and down's meet in head1's input columns (one weight, two calls): channel j of
    # both is one unit, walked from each call of head1 back to its producer
    stem = graph["stem"]
    assert stem.prunable and {("down.weight", "producer"), ("stem.weight", "producer")} <= {
        (s.tensor, s.role) for s in stem.slots
    }
    for skip in (False, True):
        report = check_model(
            _SharedHead, torch.randn(2, 3, 16, 16), ChannelSpec(channel_sparsity=0.5, prune_skip=skip)
        )
        assert report.status == "pass" and report.rel_diff == 0.0, report.error
        assert report.params_slim < report.params_dense


#: ways to cut a projection's output into value and gate halves
_CUTS = {
    "tensor.chunk": lambda h: h.chunk(2, dim=1),
    "torch.chunk": lambda h: torch.chunk(h, 2, 1),
    "torch.split": lambda h: torch.split(h, h.shape[1] // 2, dim=1),
    "tensor_split": lambda h: torch.tensor_split(h, 2, dim=1),
    "slices": lambda h: (h[:, : h.shape[1] // 2], h[:, h.shape[1] // 2 :]),
    "constant split": lambda h: torch.split(h, 8, dim=1),
    "constant slices": lambda h: (h[:, :8], h[:, 8:]),
}


class _ConvGLU(nn.Module):
    """``a, g = proj(x)`` cut in two along the channels, ``out(a * sigmoid(g))``: channel i of the value
    and channel i of the gate are one unit with ``out``'s input column i."""

    def __init__(self, cut: str = "tensor.chunk") -> None:
        super().__init__()
        self.cut = _CUTS[cut]
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.proj, self.out = nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.cut(self.proj(torch.relu(self.stem(x))))
        return self.fc(self.out(a * torch.sigmoid(g)).mean((2, 3)))


class _SwiGLU(nn.Module):
    """A transformer MLP with one fused projection for value and gate, inside a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 32), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, g = self.fc1(h).chunk(2, dim=-1)
        return self.head(h + self.fc2(torch.nn.functional.silu(g) * a))


def _pair_group(graph, producer: str):
    """The group in which ``producer``'s rows come in value/gate pairs."""
    return next(g for g in graph if any(s.tensor == producer and s.index.shape[1] == 2 for s in g.slots))


@pytest.mark.parametrize("cut", ["tensor.chunk", "torch.chunk", "torch.split", "tensor_split", "slices"])
def test_a_gated_split_is_one_unit_of_value_and_gate_channels(cut):
    from chase import ChannelSpec
    from chase.check import check_model

    graph = channel_groups(_ConvGLU(cut), torch.randn(1, 3, 8, 8))
    pair = _pair_group(graph, "proj.weight")
    assert pair.prunable and pair.width == 8, str(graph)
    rows = next(s.index for s in pair.slots if s.tensor == "proj.weight")
    assert rows.tolist() == [[i, i + 8] for i in range(8)]  # value i and gate i
    cols = next(s.index for s in pair.slots if s.tensor == "out.weight")
    assert cols.tolist() == [[i] for i in range(8)]
    assert "proj" not in {g.name for g in graph}  # no second group claims proj's rows
    report = check_model(lambda: _ConvGLU(cut), torch.randn(2, 3, 8, 8), ChannelSpec(channel_sparsity=0.5))
    assert report.status == "pass" and report.rel_diff == 0.0, report.error
    assert report.params_slim < report.params_dense


@pytest.mark.parametrize("cut", ["constant split", "constant slices"])
def test_a_split_at_sizes_written_as_numbers_is_kept_and_says_why(cut):
    graph = channel_groups(_ConvGLU(cut), torch.randn(1, 3, 8, 8))
    pair = _pair_group(graph, "proj.weight")
    assert not pair.prunable and "sizes written as numbers" in pair.reason and "use chunk" in pair.reason
    assert graph["stem"].prunable  # the rest of the model is unaffected


def test_swiglu_and_timm_glumlp_shrink_without_prune_skip():
    import timm

    from chase import ChannelSpec
    from chase.check import check_model

    graph = channel_groups(_SwiGLU(), torch.randn(2, 5, 6))
    assert _pair_group(graph, "fc1.weight").prunable, str(graph)
    report = check_model(_SwiGLU, torch.randn(2, 5, 6), ChannelSpec(channel_sparsity=0.5))
    assert report.status == "pass" and report.rel_diff == 0.0 and report.params_slim < report.params_dense

    def glu_mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 8), timm.layers.GluMlp(8, 32, act_layer=nn.SiLU), nn.Linear(8, 3))

    graph = channel_groups(glu_mlp(), torch.randn(2, 6))
    assert _pair_group(graph, "1.fc1.weight").prunable, str(graph)
    report = check_model(glu_mlp, torch.randn(2, 6), ChannelSpec(channel_sparsity=0.5))
    assert report.status == "pass" and report.rel_diff == 0.0 and report.params_slim < report.params_dense

    def vit_swiglu() -> nn.Module:  # timm's packed SwiGLU MLP over (batch, tokens, features)
        from timm.layers import SwiGLUPacked
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(
            img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, mlp_ratio=4, num_classes=3,
            mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
        )  # fmt: skip

    graph = channel_groups(vit_swiglu(), torch.randn(1, 3, 16, 16))
    assert _pair_group(graph, "blocks.0.mlp.fc1.weight").prunable, str(graph)
    report = check_model(vit_swiglu, torch.randn(2, 3, 16, 16), ChannelSpec(channel_sparsity=0.5))
    assert report.status == "pass" and report.rel_diff == 0.0 and report.params_slim < report.params_dense


class _SharedAttention(nn.Module):
    """One attention block and one MLP applied twice (weights shared across two refinement steps)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(6, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(2):
            h = h + self.attn(h, h, h, need_weights=False)[0]
            h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h.mean(1))


def test_a_shared_attention_block_loses_its_channels_and_heads_at_every_call():
    from chase import ChannelSpec
    from chase.check import check_model

    graph = channel_groups(_SharedAttention(), torch.randn(2, 5, 6), prune_skip=True, prune_heads=True)
    assert graph["embed"].prunable and graph["attn:heads"].prunable and graph["fc1"].prunable, str(graph)
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= {s.tensor for s in graph["embed"].slots}
    spec = ChannelSpec(channel_sparsity=0.5, prune_skip=True, prune_heads=True)
    report = check_model(_SharedAttention, torch.randn(2, 5, 6), spec)
    assert report.status == "pass" and report.rel_diff == 0.0 and report.params_slim < report.params_dense


class _GatedDepthwiseFFN(nn.Module):
    """A gated feed-forward block with a depthwise conv before the cut (Restormer's, NAFNet's gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 3)
        self.project_in = nn.Conv2d(8, 32, 1)
        self.dwconv = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project_out = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, g = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.head((x + self.project_out(torch.nn.functional.gelu(a) * g)).mean((2, 3)))


def test_a_gate_cut_after_a_depthwise_conv_is_one_unit_through_it():
    from chase import ChannelSpec
    from chase.check import check_model

    graph = channel_groups(_GatedDepthwiseFFN(), torch.randn(1, 3, 8, 8))
    pair = _pair_group(graph, "dwconv.weight")
    assert pair.prunable and pair.width == 16 and len(graph) == 4, str(graph)  # no second group for it
    assert {s.tensor for s in pair.slots} >= {"project_in.weight", "dwconv.weight", "project_out.weight"}
    report = check_model(_GatedDepthwiseFFN, torch.randn(2, 3, 8, 8), ChannelSpec(channel_sparsity=0.5))
    assert report.status == "pass" and report.rel_diff == 0.0 and report.params_slim < report.params_dense


def test_a_check_with_nothing_to_remove_says_so_first():
    from chase.check import check_model

    report = check_model(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), torch.randn(2, 3, 8, 8))
    assert report.ok and report.prunable_groups == 0
    assert report.summary().startswith("pass, but nothing to remove") and "--explain" in report.summary()
