"""Resume lockstep, AMP skip, gradient accumulation, wrappers, and bad input."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from tests.nets import TinyResNet, batch, make_optimizer, train_step
from torch import nn

import chase


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _build(algo, seed):
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("adamw", model)
    sp = getattr(chase, algo)(model, opt, density=0.2, total_steps=20, update_every=3, seed=seed)
    return model, opt, sp


@pytest.mark.parametrize("algo", ["SET", "RigL", "MEST"])
def test_resume_lockstep(algo):
    model, opt, sp = _build(algo, seed=1)
    for i in range(14):
        train_step(model, opt, sp, i)

    model_a, opt_a, sp_a = _build(algo, seed=1)
    for i in range(7):  # stop mid-way: an update happened at 3 and 6, the next is due at 9
        train_step(model_a, opt_a, sp_a, i)
    saved = _roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sp": sp_a.state_dict()})

    model_b, opt_b, sp_b = _build(algo, seed=99)  # a different seed: everything must come from the state
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    sp_b.load_state_dict(saved["sp"])
    assert sp_b.step_count == 7
    for i in range(7, 14):
        train_step(model_b, opt_b, sp_b, i)
    for n, m in sp.masks.items():
        assert torch.equal(m, sp_b.masks[n])
    for (n, w), w_b in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(w, w_b), n


def test_nonfinite_gradients_skip_update():
    model, opt, sp = _build("RigL", seed=0)
    train_step(model, opt, sp, 0)
    train_step(model, opt, sp, 1)
    before = {n: m.clone() for n, m in sp.masks.items()}
    x, y = batch(2)
    nn.functional.cross_entropy(model(x), y).backward()
    model.fc.weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="not finite"):
        info = sp.step()  # step 3 is an update step
    assert info.skipped and not info.updated
    assert all(torch.equal(before[n], m) for n, m in sp.masks.items())


def test_grad_scaler_overflow_skips_update():
    model, opt, sp = _build("RigL", seed=0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for i in range(2):
        x, y = batch(i)
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        sp.step()
        opt.zero_grad()
    before = {n: m.clone() for n, m in sp.masks.items()}
    x, y = batch(2)
    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)  # skipped by the scaler: gradients are inf
    with pytest.warns(RuntimeWarning):
        info = sp.step()
    assert info.skipped
    assert all(torch.equal(before[n], m) for n, m in sp.masks.items())
    for name, mask in sp.masks.items():
        assert torch.all(sp._masks.params[name][~mask] == 0)


def test_gradient_accumulation_equals_full_batch():
    """Two micro-batches accumulated per optimizer step decide the same masks as the full batch."""

    def run(micro):
        torch.manual_seed(0)
        model = TinyResNet().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = chase.RigL(model, opt, density=0.2, total_steps=20, update_every=2)
        model.eval()  # BatchNorm batch statistics would differ between micro- and full batches
        for i in range(4):
            x, y = batch(i, n=8, dtype=torch.float64)
            for xs, ys in zip(x.chunk(micro), y.chunk(micro)):
                (nn.functional.cross_entropy(model(xs), ys, reduction="sum") / len(x)).backward()
            opt.step()
            info = sp.step()
            opt.zero_grad()
        assert sp.step_count == 4 and info.updated
        return sp.masks

    full, accumulated = run(1), run(2)
    assert all(torch.equal(full[n], accumulated[n]) for n in full)


def test_zero_grad_before_step_is_an_error():
    model, opt, sp = _build("RigL", seed=0)
    for i in range(2):
        train_step(model, opt, sp, i)
    x, y = batch(2)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    with pytest.raises(RuntimeError, match=r"BEFORE optimizer\.zero_grad"):
        sp.step()


def test_compiled_and_wrapped_models_keep_keys():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    compiled = torch.compile(model, backend="aot_eager")
    sp = chase.RigL(compiled, opt, density=0.2, total_steps=10, update_every=2)
    assert "conv1.weight" in sp.masks
    for i in range(4):
        x, y = batch(i)
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    assert sp.kept == sp.budget
    for name, mask in sp.masks.items():
        assert torch.all(sp._masks.params[name][~mask] == 0)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_bad_density(density):
    model = TinyResNet()
    with pytest.raises(ValueError, match="density"):
        chase.RigL(model, make_optimizer("sgd", model), density=density, total_steps=10)


@pytest.mark.parametrize("total", [0, -5])
def test_bad_total_steps(total):
    model = TinyResNet()
    with pytest.raises(ValueError, match="total_steps"):
        chase.RigL(model, make_optimizer("sgd", model), density=0.1, total_steps=total)


def test_no_sparsifiable_layers():
    model = nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())
    with pytest.raises(ValueError, match="no sparsifiable layers"):
        chase.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.1, total_steps=10)
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no sparsifiable layers"):
        chase.RigL(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            density=0.1,
            total_steps=10,
            dense_layers=["0"],
        )


def test_dense_pattern_matching_nothing():
    model = TinyResNet()
    with pytest.raises(ValueError, match="stem"):
        chase.RigL(model, make_optimizer("sgd", model), density=0.1, total_steps=10, dense_layers=["stem"])


def test_optimizer_without_model_parameters():
    model = TinyResNet()
    other = torch.optim.SGD(TinyResNet().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold"):
        chase.RigL(model, other, density=0.1, total_steps=10)


def test_load_state_from_different_model():
    model = TinyResNet()
    sp = chase.RigL(model, make_optimizer("sgd", model), density=0.1, total_steps=10)
    other = TinyResNet(width=4)
    sp_other = chase.RigL(other, make_optimizer("sgd", other), density=0.1, total_steps=10)
    with pytest.raises(ValueError, match="different model"):
        sp.load_state_dict(sp_other.state_dict())
    twin = TinyResNet()
    mest = chase.MEST(twin, make_optimizer("sgd", twin), density=0.1, total_steps=10)
    with pytest.raises(ValueError, match="saved by MEST"):
        sp.load_state_dict(mest.state_dict())


def test_bad_options():
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    with pytest.raises(ValueError, match="scope"):
        chase.RigL(model, opt, density=0.1, total_steps=10, scope="everywhere")
    with pytest.raises(ValueError, match="distribution"):
        chase.RigL(model, opt, density=0.1, total_steps=10, distribution="gaussian")
    with pytest.raises(ValueError, match="soft"):
        chase.MEST(model, opt, density=0.1, total_steps=10, scope="layer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        chase.Static(model, opt, density=1.0, total_steps=1)
