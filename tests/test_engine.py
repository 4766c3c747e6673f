"""Invariants of the unstructured DST engine, for every algorithm x model x optimizer."""

from __future__ import annotations

import pytest
import torch
import torchvision
from tests import nets
from tests.nets import TinyResNet, make_optimizer, train_step

import chase

ALGORITHMS = {
    "static": lambda m, o, **k: chase.Static(m, o, **k),
    "set": lambda m, o, **k: chase.SET(m, o, **k),
    "rigl": lambda m, o, **k: chase.RigL(m, o, **k),
    "rigl_global": lambda m, o, **k: chase.RigL(m, o, scope="global", **k),
    "mest": lambda m, o, **k: chase.MEST(m, o, **k),
}
MODELS = {
    "tiny_resnet": lambda: TinyResNet(),
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
}


def assert_masked_zero(sp, optimizer):
    for name, mask in sp.masks.items():
        p = sp._masks.params[name]
        assert torch.all(p[~mask] == 0), f"weight {name} non-zero at a masked position"
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                assert torch.all(value[~mask] == 0), f"optimizer state {key} of {name} non-zero when masked"


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_invariants(algo, model_name, opt_name):
    torch.manual_seed(0)
    model = MODELS[model_name]()
    opt = make_optimizer(opt_name, model)
    sp = ALGORITHMS[algo](model, opt, density=0.1, total_steps=12, update_every=3)
    before = {n: m.clone() for n, m in sp.masks.items()}
    assert sp.kept == sp.budget  # every algorithm starts at d (MEST adds its extra at the first growth)
    updates = 0
    for i in range(7):
        x_masks = {n: m.clone() for n, m in sp.masks.items()}
        info = train_step(model, opt, sp, i, n=4)
        assert_masked_zero(sp, opt)
        if info.updated:
            updates += 1
            assert sp.kept == sp.target_kept(info.step)  # exact count after every update
            if sp.scope == "layer":  # per-layer scope keeps each layer's count
                for n, m in sp.masks.items():
                    assert int(m.sum()) == int(x_masks[n].sum())
    changed = any(not torch.equal(before[n], m) for n, m in sp.masks.items())
    if algo == "static":
        assert updates == 0 and not changed
    else:
        assert updates == 2 and changed  # steps 3 and 6 (end_step = 0.75 * 12 = 9, exclusive)
    # the model's own state_dict keys are unchanged
    assert set(model.state_dict()) == set(MODELS[model_name]().state_dict())


def test_new_weights_start_at_zero_with_zero_state():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("adamw", model)
    sp = chase.RigL(model, opt, density=0.2, total_steps=10, update_every=2)
    train_step(model, opt, sp, 0)
    old = {n: m.clone() for n, m in sp.masks.items()}
    info = train_step(model, opt, sp, 1)
    assert info.updated
    for n, m in sp.masks.items():
        grown = m & ~old[n]
        assert grown.any()
        p = sp._masks.params[n]
        assert torch.all(p[grown] == 0)
        for v in opt.state[p].values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                assert torch.all(v[grown] == 0)


@pytest.mark.parametrize("algo", ["rigl", "rigl_global", "mest"])
def test_pruned_and_regrown_weight_restarts_from_zero(algo):
    """A kept weight that one update prunes (smallest |w|) and regrows (largest |gradient|) is a new
    weight: value 0, optimizer state 0, like every other grown weight."""
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = ALGORITHMS[algo](model, opt, density=0.3, total_steps=40, update_every=2)
    name = "block_a.weight"
    p = sp._masks.params[name]
    checked = 0
    for i in range(6):
        x, y = nets.batch(i)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pos = sp.masks[name].reshape(-1).nonzero()[0].item()  # a kept weight
        t = sp.step_count + 1
        if sp.is_update_step(t) and t >= 4:  # MEST's first update only grows (d -> d + delta)
            with torch.no_grad():
                p.view(-1)[pos] = 1e-12  # the smallest magnitude of all: pruned ...
                p.grad.view(-1)[pos] = 1e6  # ... and the largest gradient: regrown
                assert opt.state[p]["momentum_buffer"].view(-1)[pos] != 0
        info = sp.step()
        opt.zero_grad()
        if info.updated and t >= 4 and sp.masks[name].reshape(-1)[pos]:
            checked += 1
            assert p.view(-1)[pos] == 0
            assert opt.state[p]["momentum_buffer"].view(-1)[pos] == 0
    assert checked >= 2


def test_mest_soft_bound_schedule():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = chase.MEST(model, opt, density=0.2, total_steps=20, update_every=2, soft_bound_end=10)
    assert sp.kept == sp.budget == round(0.2 * sp.total_dense)  # d at the start, as the authors' code
    kept = []
    for i in range(14):
        info = train_step(model, opt, sp, i)
        if info.updated:
            assert sp.kept == sp.target_kept(info.step)
            kept.append(sp.kept)
    assert kept == sorted(kept, reverse=True)  # delta decays
    assert kept[-1] == sp.budget  # after soft_bound_end: constant budget
    assert kept[0] > sp.budget


def test_mest_soft_bound_ends_with_its_updates():
    """By default the soft bound reaches 0 at the LAST update, so the run ends exactly at its budget; a
    soft bound that outlives the updates is refused (the run would end above budget)."""
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = chase.MEST(model, opt, density=0.2, total_steps=20, update_every=3)  # updates 3..12, end 15
    assert sp.last_update_step() == 12 and sp.soft_bound_end == 12
    for i in range(20):
        train_step(model, opt, sp, i)
    assert sp.kept == sp.budget
    with pytest.raises(ValueError, match=r"after the last exploration update \(step 12"):
        chase.MEST(TinyResNet(), opt, density=0.2, total_steps=20, update_every=3, soft_bound_end=15)


def test_global_scope_moves_density_between_layers():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = chase.RigL(model, opt, density=0.2, total_steps=40, update_every=2, scope="global")
    start = sp.layer_densities()
    for i in range(6):
        train_step(model, opt, sp, i)
    assert sp.kept == sp.budget
    assert sp.layer_densities() != start
    assert abs(sp.global_density() - 0.2) < 1e-3


def test_determinism_under_seed():
    def run(seed):
        torch.manual_seed(0)
        model = TinyResNet()
        opt = make_optimizer("sgd", model)
        sp = chase.SET(model, opt, density=0.2, total_steps=12, update_every=2, seed=seed)
        for i in range(6):
            train_step(model, opt, sp, i)
        return sp.masks, model.state_dict()

    m1, w1 = run(3)
    m2, w2 = run(3)
    m3, _ = run(4)
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    assert all(torch.equal(w1[n], w2[n]) for n in w1)
    assert any(not torch.equal(m1[n], m3[n]) for n in m1)


def test_dense_layers_and_readouts():
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = chase.RigL(model, opt, density=0.3, total_steps=10, dense_layers=["conv1", "fc"])
    assert "conv1.weight" not in sp.masks and "fc.weight" not in sp.masks
    assert "block_a.weight" in sp.masks
    assert sp.kept == sp.budget == round(0.3 * sp.total_dense)
    assert set(sp.layer_densities()) == set(sp.masks)
    assert "RigL" in repr(sp)
