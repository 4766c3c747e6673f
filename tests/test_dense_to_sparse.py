"""Start from a trained model: gradual pruning from initial_density to density, for every sparsifier,
in the library, the trainer (init_from) and the Lightning callback."""

from __future__ import annotations

import pytest
import torch
from tests.nets import TinyResNet, make_optimizer, train_step

import chase
from chase.sparse import schedules


@pytest.mark.parametrize("cls", [chase.RigL, chase.SET, chase.MEST])
def test_budget_follows_the_cubic_schedule_to_density(cls):
    torch.manual_seed(0)
    model = TinyResNet()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer("sgd", model)
    sp = cls(model, opt, density=0.2, total_steps=40, update_every=4, initial_density=1.0, prune_end=20)
    assert sp.global_density() == 1.0  # nothing of the trained weights is thrown away at step 0
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    for i in range(40):
        info = train_step(model, opt, sp, i)
        t = i + 1
        if info.updated:
            expected = schedules.gradual_density(t, initial=1.0, final=0.2, start=0, end=20)
            assert sp.kept == sp.target_kept(t)
            assert sp.budget_at(t) == round(expected * sp.total_dense)
        for name, mask in sp.masks.items():  # masked weights are 0 at every step
            assert not model.get_parameter(name)[~mask].any()
    assert sp.global_density() == pytest.approx(0.2, abs=1e-3) and sp.kept == sp.budget


def test_chase_from_a_trained_model_prunes_and_removes_channels():
    torch.manual_seed(0)
    model = TinyResNet(width=16)
    opt = make_optimizer("sgd", model)
    sp = chase.Chase(
        model,
        opt,
        density=0.2,
        total_steps=40,
        example_inputs=torch.randn(2, 3, 16, 16),
        update_every=4,
        channel_every=4,
        channel_sparsity=0.5,
        initial_density=1.0,
        prune_end=20,
    )
    assert sp.global_density() == 1.0
    for i in range(40):
        train_step(model, opt, sp, i)
    assert sp.channel_sparsity_now() > 0.3 and sp.kept == sp.budget


@pytest.mark.parametrize(
    "options, words",
    [
        ({"initial_density": 0.1}, "initial_density must be in"),
        ({"initial_density": 1.0, "prune_end": 39}, "after the last exploration update"),
        ({"initial_density": 1.0, "prune_start": 12, "prune_end": 8}, "prune_start"),
    ],
)
def test_bad_gradual_schedules_are_refused(options, words):
    model = TinyResNet()
    with pytest.raises(ValueError, match=words):
        chase.RigL(
            model, make_optimizer("sgd", model), density=0.2, total_steps=40, update_every=8, **options
        )
    with pytest.raises(ValueError, match="no exploration update"):
        chase.Static(
            TinyResNet(), make_optimizer("sgd", model), density=0.2, total_steps=40, initial_density=1.0
        )


def test_state_resumes_mid_schedule():
    torch.manual_seed(0)
    a, b = TinyResNet(), TinyResNet()
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = make_optimizer("sgd", a), make_optimizer("sgd", b)
    kw = {"density": 0.2, "total_steps": 40, "update_every": 4, "initial_density": 1.0, "prune_end": 20}
    sp_a, sp_b = chase.RigL(a, opt_a, **kw), chase.RigL(b, opt_b, **kw)
    for i in range(10):
        train_step(a, opt_a, sp_a, i)
        train_step(b, opt_b, sp_b, i)
    state = sp_b.state_dict()
    c = TinyResNet()
    c.load_state_dict(b.state_dict())
    opt_c = make_optimizer("sgd", c)
    opt_c.load_state_dict(opt_b.state_dict())
    sp_b.remove()
    sp_c = chase.RigL(c, opt_c, **kw)
    sp_c.load_state_dict(state)
    for i in range(10, 30):
        train_step(a, opt_a, sp_a, i)
        train_step(c, opt_c, sp_c, i)
    assert all(torch.equal(sp_a.masks[n], sp_c.masks[n]) for n in sp_a.masks)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))


def test_the_trainer_starts_from_a_dense_run(tmp_path):
    pytest.importorskip("yaml")
    from tests.nets import TINY_CHASE_RUN

    from chase.cli import main
    from chase.slim import read_slim

    base = [s for s in TINY_CHASE_RUN if not s.startswith(("method=", "name="))]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *base, "method=dense", "name=dense"]) == 0
    dense = read_slim(tmp_path / "dense" / "final.pt")["model"]
    sets = [*base, "method=rigl", "initial_density=1.0", "prune_end_epoch=1", "name=ft", "update_every=1"]
    sets += ["init_from=" + str(tmp_path / "dense"), "lr=1e-9", "epochs=2"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets]) == 0
    import json

    records = [json.loads(x) for x in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and records[0]["density"] == 1.0
    assert records[-1]["density"] == pytest.approx(0.2, abs=1e-3)
    # With a negligible learning rate a kept weight is the dense run's own, or one regrown from 0.
    ft = read_slim(tmp_path / "ft" / "final.pt")
    for name, mask in ft["masks"].items():
        kept, before = ft["model"][name][mask], dense[name][mask]
        same = torch.isclose(kept, before, atol=1e-6)
        assert bool((same | (kept.abs() < 1e-6)).all()) and same.float().mean() > 0.5, name


def test_init_from_refuses_what_does_not_fit(tmp_path, capsys):
    pytest.importorskip("yaml")
    from tests.nets import TINY_CHASE_RUN

    from chase.cli import main

    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for source, words in [
        (tmp_path / "other.pt", "does not fit the model"),
        (tmp_path / "junk.pt", "is not"),
    ]:
        assert (
            main(["train", "-q", "--out", str(tmp_path), "--set", *TINY_CHASE_RUN, f"init_from={source}"])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err


def test_the_lightning_callback_prunes_gradually(tmp_path):
    pytest.importorskip("pytorch_lightning")
    from tests.test_lightning import Module, _loader, _trainer

    from chase.integrations.lightning import SparsityCallback

    cb = SparsityCallback(
        lambda m, o: chase.RigL(
            m, o, density=0.2, total_steps=16, update_every=2, initial_density=1.0, prune_end=8
        )
    )
    _trainer(tmp_path, cb, epochs=2).fit(Module(), _loader())
    assert cb.sparsifier.global_density() == pytest.approx(0.2, abs=1e-3)


def test_the_trainer_resumes_a_gradual_run_exactly(tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    from tests.nets import TINY_CHASE_RUN

    from chase.cli import main
    from chase.slim import read_slim
    from chase.train import run as run_mod

    base = [s for s in TINY_CHASE_RUN if not s.startswith("name=")]
    sets = [*base, "initial_density=1.0", "prune_end_epoch=1", "ckpt_every_steps=1"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets, "name=whole"]) == 0
    save = run_mod.save_checkpoint

    def save_then_die(st, path):
        save(st, path)
        if st.step == 1:  # in the middle of the gradual schedule
            raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(["train", "-q", "--out", str(tmp_path), "--set", *sets, "name=killed"])
    monkeypatch.setattr(run_mod, "save_checkpoint", save)
    assert main(["train", "-q", "--resume", str(tmp_path / "killed")]) == 0
    a, b = read_slim(tmp_path / "whole" / "slim.pt"), read_slim(tmp_path / "killed" / "slim.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_pretrained_weights_are_refused_clearly_where_there_are_none():
    from chase.models import get_model

    with pytest.raises(ValueError, match="no published weights"):
        get_model("cifar_resnet20", num_classes=10, pretrained=True)
    with pytest.raises(ValueError, match="1000 classes"):
        get_model("resnet18", num_classes=10, pretrained=True)
