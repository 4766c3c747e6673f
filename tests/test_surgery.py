"""Channel surgery: physical removal must equal masking, in outputs and in optimizer updates (lockstep).

Groups are written by hand here so these tests do not depend on automatic discovery.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chase.graph.types import ChannelGroup, Slot
from chase.surgery import (
    SurgeryState,
    alive_mask,
    register_rule,
    removal_problem,
    remove_channels,
    replay,
    zero_removed,
)

DT = torch.float64


# ------------------------------------------------------------------------------------------ slot helpers
def _mod(tensor: str) -> str:
    return tensor.rpartition(".")[0]


def slot(tensor: str, width: int, role: str = "param", dim: int = 0, offset: int = 0, k: int = 1) -> Slot:
    """Channel c occupies positions offset + c*k + [0, k) along dim."""
    index = offset + torch.arange(width)[:, None] * k + torch.arange(k)[None, :]
    return Slot(tensor=tensor, module=_mod(tensor), dim=dim, index=index, role=role)


def prod(tensor: str, width: int) -> Slot:
    return slot(tensor, width, "producer")


def cons(tensor: str, width: int, offset: int = 0, k: int = 1) -> Slot:
    return slot(tensor, width, "consumer", dim=1, offset=offset, k=k)


def norm(module: str, width: int, stats: bool = True) -> list[Slot]:
    names = ("weight", "bias", "running_mean", "running_var") if stats else ("weight", "bias")
    return [slot(f"{module}.{n}", width) for n in names]


def group(name: str, width: int, *slots: Slot | list[Slot]) -> ChannelGroup:
    flat: list[Slot] = []
    for s in slots:
        flat.extend(s if isinstance(s, list) else [s])
    return ChannelGroup(name=name, width=width, slots=tuple(flat), prunable=True)


# ------------------------------------------------------------------------------------------------ models
class CNN(nn.Module):
    """conv-bn-relu-conv-bn-relu-pool-flatten-linear (flatten feeds k = 2*2 features per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 2).flatten(1))

    @staticmethod
    def groups() -> list[ChannelGroup]:
        return [
            group(
                "conv1",
                8,
                prod("conv1.weight", 8),
                slot("conv1.bias", 8),
                norm("bn1", 8),
                cons("conv2.weight", 8),
            ),
            group(
                "conv2",
                6,
                prod("conv2.weight", 6),
                slot("conv2.bias", 6),
                norm("bn2", 6),
                cons("fc.weight", 6, k=4),
            ),
        ]


class Residual(nn.Module):
    """A residual add: the stream group has two producers (stem and conv2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head, self.bnh = nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = F.relu(self.bnh(self.head(F.relu(x + y))))
        return self.fc(x.mean((2, 3)))

    @staticmethod
    def groups() -> list[ChannelGroup]:
        stream = [prod("stem.weight", 8), slot("stem.bias", 8), norm("bn0", 8), prod("conv2.weight", 8)]
        stream += [norm("bn2", 8), cons("conv1.weight", 8), cons("head.weight", 8)]
        return [
            group("stream", 8, *stream),
            group("conv1", 8, prod("conv1.weight", 8), norm("bn1", 8), cons("conv2.weight", 8)),
            group(
                "head", 4, prod("head.weight", 4), slot("head.bias", 4), norm("bnh", 4), cons("fc.weight", 4)
            ),
        ]


class Concat(nn.Module):
    """Two groups concatenated into one conv: they share c.weight dim 1 at offsets 0 and 4."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bna = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.b, self.bnb = nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5)
        self.c, self.bnc = nn.Conv2d(9, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([F.relu(self.bna(self.a(x))), F.relu(self.bnb(self.b(x)))], 1)
        return self.fc(F.relu(self.bnc(self.c(x))).mean((2, 3)))

    @staticmethod
    def groups() -> list[ChannelGroup]:
        return [
            group("a", 4, prod("a.weight", 4), slot("a.bias", 4), norm("bna", 4), cons("c.weight", 4)),
            group(
                "b", 5, prod("b.weight", 5), slot("b.bias", 5), norm("bnb", 5), cons("c.weight", 5, offset=4)
            ),
            group("c", 6, prod("c.weight", 6), slot("c.bias", 6), norm("bnc", 6), cons("fc.weight", 6)),
        ]


class LayerScale(nn.Module):
    """A module surgery has no rule for: a raw per-channel parameter."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


register_rule(LayerScale, lambda module, shapes: {})  # nothing to fix: keeps the lockstep logs quiet


class Depthwise(nn.Module):
    """pointwise -> PReLU -> depthwise -> layer scale -> pointwise: one group spans all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.pw1, self.bn1, self.act1 = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.PReLU(8)
        self.dw, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.scale = LayerScale(8)
        self.pw2, self.bn3 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.pw1(x)))
        x = self.scale(F.relu(self.bn2(self.dw(x))))
        return self.fc(F.relu(self.bn3(self.pw2(x))).mean((2, 3)))

    @staticmethod
    def groups() -> list[ChannelGroup]:
        pw1 = [prod("pw1.weight", 8), slot("pw1.bias", 8), norm("bn1", 8), slot("act1.weight", 8)]
        pw1 += [slot("dw.weight", 8, "depthwise"), slot("dw.bias", 8), norm("bn2", 8), slot("scale.gamma", 8)]
        pw1 += [cons("pw2.weight", 8)]
        return [
            group("pw1", 8, *pw1),
            group("pw2", 6, prod("pw2.weight", 6), slot("pw2.bias", 6), norm("bn3", 6), cons("fc.weight", 6)),
        ]


MODELS = {
    "cnn": (CNN, [{"conv1": [1, 5], "conv2": [0]}, {"conv1": torch.tensor([2, 5, 6])}]),
    "residual": (Residual, [{"stream": [0, 3], "conv1": [7]}, {"stream": [4], "head": [2]}]),
    "concat": (Concat, [{"a": [1], "b": [0, 4]}, {"b": [2], "c": [5]}]),
    "depthwise": (Depthwise, [{"pw1": [0, 2, 7]}, {"pw1": [3], "pw2": [1]}]),
}

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05, foreach=True),
}


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: thread start-up costs more than it saves (and CI machines are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g, dtype=DT), torch.randint(0, 5, (n,), generator=g)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batch(seed))
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def restrict(t: torch.Tensor, dims: dict[int, torch.Tensor]) -> torch.Tensor:
    """The alive positions of a full-size tensor."""
    for d, alive in dims.items():
        t = t.index_select(d, alive.nonzero().flatten())
    return t


def close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-9, msg=msg or None)


def assert_match(a: nn.Module, opt_a, b: nn.Module, opt_b, state: SurgeryState, masks_a, masks_b) -> None:
    """Every tensor of the sliced model b equals the masked model a at the alive positions."""
    params_b = dict(b.named_parameters())
    for name, ta in a.state_dict().items():
        dims = state.tensor_alive(name)
        close(b.state_dict()[name], restrict(ta, dims), msg=name)
        if name not in params_b:
            continue
        pa, pb = dict(a.named_parameters())[name], params_b[name]
        if pa.grad is not None:
            close(pb.grad, restrict(pa.grad, dims), msg=f"{name}.grad")
        if name in masks_a:
            assert torch.equal(masks_b[name], restrict(masks_a[name], dims))
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sa.keys() == sb.keys()
        for key, va in sa.items():
            expected = restrict(va, dims) if va.shape == pa.shape else va
            close(sb[key], expected, msg=f"{name} {key}")


def outputs(model: nn.Module, seed: int = 99) -> tuple[torch.Tensor, torch.Tensor]:
    x, _ = batch(seed, n=6)
    model.eval()
    with torch.no_grad():
        out_eval = model(x)
    model.train()
    with torch.no_grad():
        # Train-mode BatchNorm uses batch statistics; it also moves running stats (equally in both).
        out_train = model(x)
    return out_eval, out_train


def trained(model_cls: type, opt_name: str, steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = model_cls().to(DT)
    opt = OPTIMIZERS[opt_name](model.parameters())
    for i in range(steps):  # optimizer state is non-zero before any removal
        train_step(model, opt, seed=i)
    return model, opt


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_lockstep_shrink(model_name: str, opt_name: str) -> None:
    model_cls, events = MODELS[model_name]
    a, opt_a = trained(model_cls, opt_name)
    b = copy.deepcopy(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()  # deepcopy does not copy grads; surgery must slice them
    opt_b = OPTIMIZERS[opt_name](b.parameters())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # load_state_dict would share tensors
    state_a, state_b = SurgeryState(a, model_cls.groups()), SurgeryState(b, model_cls.groups())
    g = torch.Generator().manual_seed(1)
    masks_a = {n: torch.rand(p.shape, generator=g) > 0.3 for n, p in a.named_parameters() if p.dim() > 1}
    masks_b = {n: m.clone() for n, m in masks_a.items()}
    mask_ids = {n: id(m) for n, m in masks_b.items()}
    params_b = list(b.parameters())
    step = 10
    for removal in events:
        # a: masked (full shape, removed positions zero in weights, grads, optimizer state and masks)
        state_a.mark_removed(removal)
        zero_removed(a, state_a, optimizer=opt_a, masks=masks_a)
        # b: physically sliced
        changed = remove_channels(b, state_b, removal, optimizer=opt_b, masks=masks_b)
        assert changed and all(b.state_dict()[n].shape != a.state_dict()[n].shape for n in changed)
        assert_match(a, opt_a, b, opt_b, state_a, masks_a, masks_b)
        for out_a, out_b in zip(outputs(a), outputs(b)):
            close(out_b, out_a)
        for _ in range(2):  # two steps after each removal, with the SAME optimizer objects
            train_step(a, opt_a, seed=step)
            zero_removed(a, state_a, optimizer=opt_a)  # as a masked trainer re-zeroes after its step
            train_step(b, opt_b, seed=step)
            step += 1
            assert_match(a, opt_a, b, opt_b, state_a, masks_a, masks_b)
    assert [id(p) for p in b.parameters()] == [id(p) for p in params_b]
    assert all(p is q for p, q in zip(opt_b.param_groups[0]["params"], params_b))
    assert {n: id(m) for n, m in masks_b.items()} == mask_ids
    for name in state_a.groups:
        assert torch.equal(state_a.alive_channels(name), state_b.alive_channels(name))


def test_module_attributes_and_widths() -> None:
    model = CNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    groups_before = copy.copy(opt.param_groups)
    state = SurgeryState(model, CNN.groups())
    remove_channels(model, state, {"conv1": [0, 3, 7], "conv2": torch.tensor([5])}, optimizer=opt)
    assert (model.conv1.out_channels, model.bn1.num_features, model.conv2.in_channels) == (5, 5, 5)
    assert (model.conv2.out_channels, model.bn2.num_features, model.fc.in_features) == (5, 5, 20)
    assert model.fc.weight.shape == (5, 20) and model.bn1.running_var.shape == (5,)
    assert state.current_width("conv1") == 5 and state.original_width("conv1") == 8
    assert state.alive_channels("conv1").tolist() == [False, True, True, False, True, True, True, False]
    assert opt.param_groups == groups_before
    model(torch.randn(2, 3, 6, 6)).sum().backward()  # forward/backward work on the new shapes
    opt.step()

    dw = Depthwise()
    state = SurgeryState(dw, Depthwise.groups())
    remove_channels(dw, state, {"pw1": [1, 2]})
    assert (dw.dw.in_channels, dw.dw.out_channels, dw.dw.groups) == (6, 6, 6)
    assert dw.act1.num_parameters == 6 and dw.scale.gamma.shape == (6, 1, 1)
    dw(torch.randn(2, 3, 6, 6))


def test_remove_is_noop_for_removed_ids_and_combines_groups() -> None:
    model = Concat()
    state = SurgeryState(model, Concat.groups())
    remove_channels(model, state, {"a": [0], "b": [1, 3]})
    assert model.c.in_channels == 6
    assert remove_channels(model, state, {"a": [0], "b": torch.tensor([], dtype=torch.long)}) == set()
    remove_channels(model, state, {"a": [3], "b": [4]})
    alive = state.tensor_alive("c.weight")[1]
    assert alive.nonzero().flatten().tolist() == [1, 2, 4, 6]
    assert model.c.weight.shape == (6, 4, 3, 3)


def test_alive_mask() -> None:
    model = Concat()
    state = SurgeryState(model, Concat.groups())
    assert alive_mask(state, "bnc.num_batches_tracked", ()) is None
    assert alive_mask(state, "c.weight", (6, 9, 3, 3)).all()
    state.mark_removed({"a": [1], "b": [0], "c": [2]})
    mask = alive_mask(state, "c.weight", (6, 9, 3, 3))
    expected = torch.ones(6, 9, 3, 3, dtype=torch.bool)
    expected[2], expected[:, 1], expected[:, 4] = False, False, False
    assert torch.equal(mask, expected)
    assert alive_mask(state, "c.weight", (5, 7, 3, 3)).all()  # already sliced: every position is alive
    mixed = torch.ones(5, 9, 3, 3, dtype=torch.bool)  # dim 0 sliced, dim 1 still full (masked)
    mixed[:, 1], mixed[:, 4] = False, False
    assert torch.equal(alive_mask(state, "c.weight", (5, 9, 3, 3)), mixed)
    with pytest.raises(ValueError, match=r"c\.weight"):
        alive_mask(state, "c.weight", (6, 8, 3, 3))


def test_errors_leave_model_unchanged() -> None:
    model = CNN()
    state = SurgeryState(model, CNN.groups())
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match="unknown channel group"):
        remove_channels(model, state, {"nope": [0]})
    with pytest.raises(ValueError, match="out of range"):
        remove_channels(model, state, {"conv1": [8]})
    with pytest.raises(ValueError, match="no channel"):
        remove_channels(model, state, {"conv1": list(range(8))})
    with pytest.raises(ValueError, match="duplicate"):
        SurgeryState(model, CNN.groups() + CNN.groups())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert state.current_width("conv1") == 8


def test_grouped_conv_and_groupnorm_raise_naming_the_layer() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 8, 3, groups=2))
    gn = group("0", 8, prod("0.weight", 8), slot("0.bias", 8), norm("1", 8, stats=False))
    grouped = group("2", 8, prod("2.weight", 8), slot("2.bias", 8))
    state = SurgeryState(model, [gn, grouped])
    with pytest.raises(ValueError, match=r"layer '2'.*grouped conv"):
        remove_channels(model, state, {"2": [0]})
    with pytest.raises(ValueError, match=r"layer '1'.*num_groups"):
        remove_channels(model, state, {"0": [0]})
    assert model[0].weight.shape == (8, 3, 1, 1) and model[2].weight.shape == (8, 4, 3, 3)
    ok = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8))
    state = SurgeryState(
        ok, [group("0", 8, prod("0.weight", 8), slot("0.bias", 8), norm("1", 8, stats=False))]
    )
    remove_channels(ok, state, {"0": [0, 1]})
    assert ok[1].num_channels == 6 and ok(torch.randn(1, 3, 4, 4)).shape == (1, 6, 4, 4)


def test_linear_layernorm_and_modules_without_a_rule() -> None:
    """A module type without a rule: a per-channel parameter alone needs nothing; a size-named int and a
    broadcast shape (timm's layer scale keeps ``shape = (dim, 1, 1)``) follow the new size; an attribute
    of unknown meaning holding the size is refused before anything is sliced."""

    class Gain(nn.Module):  # a per-channel parameter and nothing else
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.g

    class ShapedGain(Gain):  # remembers its width twice, as a size name and as a broadcast shape
        def __init__(self) -> None:
            super().__init__()
            self.channels, self.shape = 8, (8,)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.g.view(self.shape)

    class Opaque(Gain):  # an int of unknown meaning that equals the width
        def __init__(self) -> None:
            super().__init__()
            self.heads = 8

    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), Gain(), ShapedGain(), nn.Linear(8, 3))
    slots = [
        prod("0.weight", 8),
        slot("0.bias", 8),
        norm("1", 8, stats=False),
        slot("2.g", 8),
        slot("3.g", 8),
    ]
    state = SurgeryState(model, [group("0", 8, *slots, cons("4.weight", 8))])
    remove_channels(model, state, {"0": [1, 2]})
    remove_channels(model, state, {"0": [3]})
    assert model[0].out_features == 5 and model[4].in_features == 5
    assert model[1].normalized_shape == (5,) and model[2].g.shape == (5,)
    assert (model[3].channels, model[3].shape) == (5, (5,))
    assert model(torch.randn(2, 4)).shape == (2, 3)

    opaque = nn.Sequential(nn.Linear(4, 8), Opaque(), nn.Linear(8, 3))
    slots = [prod("0.weight", 8), slot("0.bias", 8), slot("1.g", 8)]
    state = SurgeryState(opaque, [group("0", 8, *slots, cons("2.weight", 8))])
    with pytest.raises(ValueError, match=r"'1' \(.*Opaque\).*heads"):
        remove_channels(opaque, state, {"0": [0]})
    assert opaque[0].weight.shape == (8, 4) and opaque[1].g.shape == (8,)  # nothing was sliced
    assert removal_problem(opaque, state, "0")


@pytest.mark.parametrize("model_name", list(MODELS))
def test_replay_and_state_dict_round_trip(model_name: str) -> None:
    model_cls, events = MODELS[model_name]
    model, opt = trained(model_cls, "adamw", steps=1)
    state = SurgeryState(model, model_cls.groups())
    for removal in events:
        remove_channels(model, state, removal, optimizer=opt)
    buf = io.BytesIO()
    torch.save({"surgery": state.state_dict(), "model": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    fresh = model_cls().to(DT)
    fresh_state = SurgeryState(fresh, model_cls.groups())  # built on the full-size model, as discovery would
    fresh_state.load_state_dict(ckpt["surgery"])
    changed = replay(fresh, ckpt["surgery"])
    assert changed and replay(fresh, ckpt["surgery"]) == set()  # idempotent
    fresh.load_state_dict(ckpt["model"])
    for out_a, out_b in zip(outputs(model), outputs(fresh)):
        close(out_b, out_a)
    for name in fresh_state.groups:
        assert torch.equal(fresh_state.alive_channels(name), state.alive_channels(name))
    sd_a, sd_b = state.state_dict(), fresh_state.state_dict()
    assert sd_a["tensors"].keys() == sd_b["tensors"].keys()
    with pytest.raises(ValueError, match="groups differ"):
        SurgeryState(model_cls(), model_cls.groups()[:1]).load_state_dict(ckpt["surgery"])


def test_channels_last_layout_is_kept() -> None:
    model = CNN().to(memory_format=torch.channels_last)
    state = SurgeryState(model, CNN.groups())
    remove_channels(model, state, {"conv1": [2]})
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.conv2.weight.shape == (6, 7, 3, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    """Surgery on CUDA slices weights, optimizer state and masks exactly as on the CPU, and the narrowed
    model trains on. (Slicing is exact; a training step is compared within one Adam step, because Adam
    divides by sqrt(v) and turns float-order differences of near-zero gradients into ~lr moves: the
    first H200 run measured 9e-4 at lr 1e-2 even with TF32 off.)"""
    cpu, opt_cpu = trained(Residual, "adam")
    gpu = copy.deepcopy(cpu).cuda()
    opt_gpu = OPTIMIZERS["adam"](gpu.parameters())
    opt_gpu.load_state_dict(opt_cpu.state_dict())  # moves the moments to the GPU
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in gpu.named_parameters()}
    for model, opt, m in ((cpu, opt_cpu, None), (gpu, opt_gpu, masks)):
        state = SurgeryState(model, Residual.groups())
        for removal in MODELS["residual"][1]:
            remove_channels(model, state, removal, optimizer=opt, masks=m)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert q.is_cuda and torch.equal(q.cpu(), p), name
        for key, v in opt_cpu.state[p].items():
            assert torch.equal(opt_gpu.state[q][key].cpu(), v), f"{name} {key}"
    for model, opt in ((cpu, opt_cpu), (gpu, opt_gpu)):
        train_step(model, opt, seed=5)
    for (name, p), q in zip(cpu.state_dict().items(), gpu.state_dict().values()):
        torch.testing.assert_close(q.cpu(), p, rtol=0, atol=2e-2, msg=lambda m, name=name: f"{name}: {m}")
    assert all(m.is_cuda and m.shape == gpu.get_parameter(n).shape for n, m in masks.items())


def test_grouped_conv_down_to_one_channel_per_group_keeps_its_groups() -> None:
    """A grouped conv whose input units shrink to one channel per group looks like a depthwise conv with a
    channel multiplier; removing an output unit afterwards must still keep ``groups`` (found on timm's
    regnetx_002, whose last stage went from 8 to 1 input channel per group)."""
    from chase.graph import channel_groups

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 1)
            self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)  # 2 in, 4 out per group
            self.conv3 = nn.Conv2d(16, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv3(torch.relu(self.grouped(torch.relu(self.conv1(x))))).mean((2, 3))

    model = Net()
    graph = channel_groups(model, torch.randn(1, 3, 6, 6))
    state = SurgeryState(model, graph.prunable())
    remove_channels(model, state, {"conv1": [1]})  # one of the 2 in-group inputs: 8 -> 4 channels
    assert (model.grouped.in_channels, model.grouped.groups) == (4, 4)
    remove_channels(model, state, {"grouped": [0, 3]})  # two of the 4 in-group outputs: 16 -> 8
    assert (model.grouped.in_channels, model.grouped.out_channels, model.grouped.groups) == (4, 8, 4)
    assert model(torch.randn(2, 3, 6, 6)).shape == (2, 5)
