"""Chase: channel events, water-filling, mask vs physical lockstep, resume across an event, export."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from tests.nets import TINY_CHASE_RUN, TinyResNet, batch, make_optimizer, train_step
from torch import nn

import chase
from chase.models import get_model
from chase.sparse.channels import channel_score, water_fill

EXAMPLE = torch.randn(2, 3, 16, 16)


def test_water_fill_hand_made():
    scores = torch.tensor([0.10, 0.20, 0.30, 0.05, 0.40, 0.01, 0.50])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    # Lowest first: 0.01 (group 2 is at its floor: skipped), 0.05 (g1), 0.10 (g0), 0.20 (g0: cap 1 used),
    # 0.30 (g0: skipped), 0.40 (g1).
    assert water_fill(scores, groups, caps=[1, 2, 0], quota=3).tolist() == [3, 0, 4]
    # The quota is exact whenever the caps allow it, and never exceeds them.
    assert water_fill(scores, groups, caps=[3, 2, 2], quota=7).numel() == 7
    assert water_fill(scores, groups, caps=[1, 1, 0], quota=5).tolist() == [3, 0]
    assert water_fill(scores, groups, caps=[3, 2, 2], quota=0).numel() == 0


def test_water_fill_counts_unit_costs():
    """Grouped-conv units cost several channels: the walk stops at the channel count nearest the quota."""
    scores = torch.tensor([0.10, 0.20, 0.05, 0.30])
    groups = torch.tensor([0, 0, 1, 1])  # group 1 holds units of 4 channels
    caps, costs = [2, 2], [1, 4]
    # lowest first: 0.05 (4 ch), 0.10 (1), 0.20 (1), 0.30 (4)
    assert water_fill(scores, groups, caps, quota=4, costs=costs).tolist() == [2]
    assert water_fill(scores, groups, caps, quota=5, costs=costs).tolist() == [2, 0]
    assert water_fill(scores, groups, caps, quota=1, costs=costs).tolist() == []  # 0 is nearer than 4
    assert water_fill(scores, groups, caps, quota=3, costs=costs).tolist() == [2]  # 4 is nearer than 0
    assert water_fill(scores, groups, caps, quota=99, costs=costs).tolist() == [2, 0, 1, 3]


def test_umm_counts_the_whole_original_filter():
    w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.0]])
    mask = w != 0
    assert torch.allclose(channel_score(w, mask, 4, "umm"), torch.tensor([0.25, 0.375]))
    assert torch.allclose(channel_score(w, mask, 4, "kept_mean"), torch.tensor([1.0, 0.5]))
    assert torch.allclose(channel_score(w, mask, 4, "density"), torch.tensor([0.25, 0.75]))
    # With input channels removed, UMM still divides by the original filter size.
    assert torch.allclose(channel_score(w[:, :2], mask[:, :2], 4, "umm"), torch.tensor([0.25, 0.25]))


def _chase(model, opt, **kw):
    options = dict(
        density=0.3,
        total_steps=24,
        example_inputs=EXAMPLE,
        channel_sparsity=0.5,
        update_every=4,
        channel_every=4,
        min_channel_ratio=0.2,
        prune_skip=True,
        seed=0,
    )
    options.update(kw)
    return chase.Chase(model, opt, **options)


def _run(model, opt, sp, steps, start=0):
    return [train_step(model, opt, sp, i) for i in range(start, steps)]


def _lockstep(factory, opt_name, size=16, prune_skip=True):
    """Run Chase with removal='mask' and removal='physical' side by side; both must compute the same
    function, take the same updates and export the same slim model."""
    runs = {}
    example = torch.randn(2, 3, size, size, dtype=torch.float64)
    for removal in ("mask", "physical"):
        torch.manual_seed(0)
        model = factory().double()
        opt = make_optimizer(opt_name, model)
        sp = _chase(model, opt, removal=removal, example_inputs=example, prune_skip=prune_skip)
        infos = []
        for i in range(20):
            x, y = batch(i, size=size, dtype=torch.float64)
            out = model(x)
            nn.functional.cross_entropy(out, y % out.shape[1]).backward()
            opt.step()
            infos.append(sp.step())
            opt.zero_grad()
        runs[removal] = (model, sp, infos)
    (m_mask, sp_mask, i_mask), (m_phys, sp_phys, i_phys) = runs["mask"], runs["physical"]
    assert sum(i.channels_removed for i in i_mask) > 0
    assert [i.channels_removed for i in i_mask] == [i.channels_removed for i in i_phys]
    assert any(i.shapes_changed for i in i_phys) and not any(i.shapes_changed for i in i_mask)
    slim_mask, slim_phys = sp_mask.export(), sp_phys.export()
    for (n, a), b in zip(slim_mask.state_dict().items(), slim_phys.state_dict().values()):
        assert a.shape == b.shape, n
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), n
    x = torch.randn(4, 3, size, size, dtype=torch.float64)
    for m in (m_mask, m_phys, slim_mask, slim_phys):
        m.eval()
    ref = m_mask(x)
    for out in (m_phys(x), slim_mask(x), slim_phys(x)):
        assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("opt_name", ["sgd", "nesterov", "adam", "adamw"])
def test_mask_and_physical_runs_in_lockstep(opt_name):
    _lockstep(TinyResNet, opt_name)


@pytest.mark.parametrize(
    "topology", ["residual", "concat", "concat_residual", "flatten", "depthwise", "grouped", "se_mul"]
)
def test_lockstep_on_each_topology(topology):
    from tests.test_graph import TOPOLOGIES

    skip = topology in ("residual", "concat_residual")
    _lockstep(TOPOLOGIES[topology][0], "sgd", size=8, prune_skip=skip)


def test_budget_exact_and_no_growth_in_removed_channels():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = _chase(model, opt, removal="mask", density=0.12)  # low enough for the surviving channels to hold
    for i in range(24):
        (info,) = _run(model, opt, sp, i + 1, start=i)
        if info.updated:
            assert sp.kept == sp.target_kept(info.step)
        region = sp.growth_region()
        flat = torch.cat([m.reshape(-1) for m in sp.masks.values()])
        assert not (flat & ~region).any(), "a weight is alive inside a removed channel"
        for name, mask in sp.masks.items():
            assert torch.all(sp._masks.params[name][~mask] == 0)
    assert sp.channel_sparsity_now() == pytest.approx(0.5, abs=0.05)
    assert sp.kept == sp.budget  # the soft bound is off by the end, freed weights regrown


def test_floors_and_final_channel_sparsity():
    torch.manual_seed(0)
    model = get_model("cifar_vgg16_bn", num_classes=10)
    opt = make_optimizer("sgd", model)
    sp = chase.Chase(
        model,
        opt,
        density=0.1,
        total_steps=10,
        example_inputs=torch.randn(1, 3, 32, 32),
        channel_sparsity=0.5,
        min_channel_ratio=0.5,
        channel_every=2,
        update_every=2,
    )
    removed = sp.remove_channels_now(sp.channel_end)  # straight to the final target
    assert removed > 0
    alive = sp.alive_channels()
    for g in sp.groups:
        assert alive[g.name] >= int(g.width * 0.5 * 0.5)
    assert sp.channel_sparsity_now() == pytest.approx(0.5, abs=1 / sp.total_channels)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert model(x).shape == (2, 10)


def test_resume_across_a_channel_event():
    def build(seed):
        torch.manual_seed(0)
        model = TinyResNet()
        opt = make_optimizer("adamw", model)
        return model, opt, _chase(model, opt, seed=seed)

    model, opt, sp = build(0)
    _run(model, opt, sp, 16)

    model_a, opt_a, sp_a = build(0)
    infos = _run(model_a, opt_a, sp_a, 7)  # events at 6 (and 2? no: first at offset 2 + 4 = 6)
    assert infos[5].channels_removed > 0
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sp": sp_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model_b, opt_b, sp_b = build(123)
    sp_b.load_state_dict(saved["sp"])  # first: replays the removals on the fresh model
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    _run(model_b, opt_b, sp_b, 16, start=7)
    for n, m in sp.masks.items():
        assert torch.equal(m, sp_b.masks[n]), n
    for (n, w), w_b in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(w, w_b), n


def test_slim_checkpoint_reloads_into_fresh_model():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = _chase(model, opt)
    _run(model, opt, sp, 12)
    buf = io.BytesIO()
    torch.save(sp.slim_checkpoint(), buf)
    buf.seek(0)
    fresh = chase.load_slim(TinyResNet(), torch.load(buf, weights_only=True))
    fresh.eval()
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    assert torch.allclose(fresh(x), model(x), atol=1e-6)
    assert sum(p.numel() for p in fresh.parameters()) < sum(p.numel() for p in TinyResNet().parameters())


def test_default_prune_set_excludes_residual_stream():
    model = TinyResNet()
    sp = chase.Chase(
        model,
        make_optimizer("sgd", model),
        density=0.3,
        total_steps=10,
        example_inputs=EXAMPLE,
        update_every=2,
        channel_every=2,
    )
    names = {g.name for g in sp.groups}
    assert names == {"block_a"}  # the only channels that do not cross an add


def test_bad_chase_options():
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    for kw, match in [
        ({"channel_sparsity": 1.0}, "channel_sparsity"),
        ({"min_channel_ratio": 2.0}, "min_channel_ratio"),
        ({"removal": "delete"}, "removal"),
        ({"channel_score": "l2"}, "channel_score"),
        ({"channel_every": 0}, "channel_every"),
    ]:
        with pytest.raises(ValueError, match=match):
            _chase(model, opt, **kw)
    # S_c asked, and no event fits: refused (it used to warn mid-run and train only unstructured).
    with pytest.raises(ValueError, match="no channel event fits"):
        _chase(model, opt, channel_every=100)


def test_channel_events_need_a_later_update():
    """Weights freed by the last channel event are regrown only by a later exploration update: a schedule
    whose updates stop before that event is refused, by the library and by the trainer's config."""
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    with pytest.raises(ValueError, match="no exploration update comes after the last channel event"):
        _chase(model, opt, end_step=10, soft_bound=0.0, channel_end=18)  # events to 18, updates to 8
    # the default schedule ends the soft bound and the channel events by the last update
    sp = _chase(model, opt, end_step=18)
    assert sp.soft_bound_end <= sp.last_update_step() and sp.last_event < sp.last_update_step()


@pytest.mark.parametrize(
    "bad",
    [
        {"end_step": 10, "soft_bound": 0.0, "channel_end": 18},  # the schedule check (no later update)
        {"keep_channels": ["no_such_layer"]},
        {"removal": "mask", "example_inputs": "not a tensor"},  # the graph tracer fails
    ],
)
def test_a_refused_chase_leaves_model_and_optimizer_untouched(bad):
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    train_step(model, opt, None, 0)  # optimizer state exists
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: v.clone() for k, v in opt.state[model.conv1.weight].items()}
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        _chase(model, opt, **bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(state[k], v) for k, v in opt.state[model.conv1.weight].items())
    assert not opt._optimizer_step_post_hooks  # no hook left behind


def test_keep_channels_leaves_the_named_groups_out():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    twin = copy.deepcopy(model)
    every = _chase(twin, make_optimizer("sgd", twin))
    kept = _chase(model, opt, keep_channels=["block_a"])
    assert {g.name for g in every.groups} - {g.name for g in kept.groups}
    assert not any(s.tensor == "block_a.weight" for g in kept.groups for s in g.producers)
    assert kept.total_channels == every.total_channels - model.block_a.out_channels
    _run(model, opt, kept, 20)
    assert model.block_a.out_channels == 8 and kept.channel_sparsity_now() > 0


def test_trainer_refuses_a_schedule_without_regrowth(tmp_path, capsys):
    from chase.cli import main

    args = ["train", "-q", "--out", str(tmp_path), "--set", *TINY_CHASE_RUN, "update_end_epoch=0.5"]
    assert main(args) == 2
    err = capsys.readouterr().err
    # refused when the config is read (the steps per epoch are known for synthetic data), not mid-run
    assert "no exploration update comes after the last channel event" in err
    assert not (tmp_path / "chase").exists()  # nothing written


def test_mask_mode_channel_events_are_in_the_cost_log(tmp_path):
    from chase.cli import main
    from chase.train.metrics import read_metrics

    # 6 steps: updates at 2 and 4, one channel event at step 3 (no update there)
    sets = ["removal=mask", "epochs=3", "update_every=2", "channel_every=2", "channel_end_epoch=1.5"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *TINY_CHASE_RUN, *sets]) == 0
    records = read_metrics(tmp_path / "chase")
    costs = [r for r in records if r["kind"] == "cost"]
    assert [(r["step"], r["update"]) for r in costs] == [(2, True), (3, False), (4, True)]
    assert costs[1]["macs_sparse"] < costs[0]["macs_sparse"]  # the event zeroed kept weights


def test_channel_stats_hand_made_and_after_shrink():
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = chase.RigL(model, opt, density=0.3, total_steps=10)
    # Hand-set block_a's mask: channel 0 keeps all 72 weights, the others 9 each -> layer density 135/576.
    mask = sp._masks.masks["block_a.weight"]
    mask.zero_()
    mask[0] = True
    mask[1:, 0] = True
    sp._masks.sync_views()
    stats = chase.channel_stats(model, sp)
    layer = next(s for s in stats.layers if s.name == "block_a.weight")
    assert layer.layer_density == pytest.approx(135 / 576)
    assert layer.density[0] == 1.0 and torch.allclose(layer.density[1:], torch.tensor(9 / 72))
    # 9/72 = 0.125 >= 0.5 * 0.234: not amenable; with a stricter ratio of 0.6 they are (0.125 < 0.1406).
    assert layer.amenable_fraction == 0.0
    assert chase.channel_stats(model, sp, amenable_ratio=0.6).layers[1].amenable_fraction == 7 / 8
    assert "sparse amenable" in str(stats)
    with pytest.raises(ValueError, match="not the sparsifier"):
        chase.channel_stats(TinyResNet(), sp)

    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = _chase(model, opt)
    _run(model, opt, sp, 12)
    stats = chase.channel_stats(model, sp)
    assert stats.channels == sum(model.get_parameter(n).shape[0] for n in sp.masks)
    assert 0.0 <= stats.amenable_fraction <= 1.0


def test_shrink_survives_a_live_gradient_accumulator():
    """Something (a DDP reducer, a retained graph) may hold autograd's accumulator of a weight across a
    shrink; the next backward must still work with the new shape."""
    torch.manual_seed(0)
    model = TinyResNet()
    opt = make_optimizer("sgd", model)
    sp = _chase(model, opt)
    held = [p.expand_as(p) for p in model.parameters()]  # each holds its parameter's accumulator alive
    removed = sp.remove_channels_now(sp.last_event)
    assert removed > 0
    _run(model, opt, sp, 2)
    assert held  # still alive during the backward above


def test_amenable_family_hand_made():
    """Ratios of the family, conv channels of sparse layers only: the Linear classifier and a layer the
    distribution made dense are not counted."""
    from chase.analysis import ChannelStats, LayerChannelStats

    d = torch.tensor([0.05, 0.08, 0.10, 0.30])  # layer density 0.1325
    conv = LayerChannelStats("a.weight", d, d, 0.1325, d < 0.5 * 0.1325, conv=True)
    dense_conv = LayerChannelStats(
        "stem.weight", torch.ones(3), torch.ones(3), 1.0, torch.zeros(3, dtype=torch.bool)
    )
    fc = LayerChannelStats(
        "fc.weight", torch.zeros(5), torch.zeros(5), 0.2, torch.ones(5, dtype=torch.bool), False
    )
    stats = ChannelStats([conv, dense_conv, fc])
    assert stats.counted_channels == 4
    f = stats.fractions((1.0, 0.75, 0.5, 0.25))
    # 0.1325 x r = 0.1325 / 0.0994 / 0.0663 / 0.0331 -> 3, 2, 1, 0 channels below
    assert f == {1.0: 0.75, 0.75: 0.5, 0.5: 0.25, 0.25: 0.0}


def test_trainer_logs_the_amenable_family_at_every_update(tmp_path, capsys):
    from chase.analysis import AMENABLE_RATIOS, amenable_curve
    from chase.cli import main
    from chase.train.metrics import read_metrics

    sets = ["epochs=3", "update_every=2", "channel_every=2", "channel_end_epoch=1.5"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *TINY_CHASE_RUN, *sets]) == 0
    run = tmp_path / "chase"
    records = read_metrics(run)
    assert [r["step"] for r in records if r["kind"] == "channels"] == [0, 2, 4]  # start + every update
    curve = amenable_curve(records)
    assert sorted(curve) == sorted(AMENABLE_RATIOS)
    assert all(0.0 <= f <= 1.0 for points in curve.values() for _, f in points)
    final = next(r for r in records if r["kind"] == "final")
    assert "amenable_1" in final and (run / "amenable.png").exists()
    assert "amenable.png" in (run / "report.md").read_text()
    capsys.readouterr()
    assert main(["analyze", str(run)]) == 0
    out = capsys.readouterr().out
    assert "amenable family over training" in out and "r=0.5" in out


def test_groups_a_module_cannot_follow_are_refused_at_construction():
    """A custom module recording its width in an attribute of unknown meaning: its group is kept from the
    start with a warning naming it, instead of failing at the first channel event."""

    class Opaque(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.heads, self.g = c, nn.Parameter(torch.ones(c, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.g

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.opaque, self.head = Opaque(8), nn.Conv2d(8, 4, 1)
            self.fc = nn.Linear(4, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.b(torch.relu(self.a(x))))
            return self.fc(self.head(self.opaque(x)).mean((2, 3)))

    model = Net()
    opt = make_optimizer("sgd", model)
    with pytest.warns(UserWarning, match=r"keeps 1 channel group.*heads"):
        sp = _chase(model, opt)
    assert "b" in sp.refused_groups and {g.name for g in sp.groups} == {"a", "head"}
    _run(model, opt, sp, 24)
    assert sp.channel_sparsity_now() > 0.3 and model.b.out_channels == 8


class _WidthInPython(nn.Module):
    """MaxViT's pattern: a branch of fixed width is reshaped with the residual stream's width read from
    ``x.shape``, so the stream (prune_skip) cannot shrink while the branch keeps its width."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.expand = nn.Conv2d(8, 8, 1)  # its channels go through a split view: a group that stays
        self.proj = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        t = self.expand(x).reshape(b, 2, 4, h, w).reshape(b, c, h, w)  # c: the stream's width
        x = x + self.proj(t)
        return self.fc(x.mean((2, 3)))


def test_the_shape_dry_run_refuses_groups_that_break_the_forward_pass():
    from chase.sparsifier.dry_run import breaking_groups

    model = _WidthInPython()
    opt = make_optimizer("sgd", model)
    with pytest.warns(UserWarning, match="breaks the forward pass"):
        sp = _chase(model, opt, example_inputs=torch.randn(1, 3, 8, 8))
    assert "stem" in sp.refused_groups and "stem" not in {g.name for g in sp.groups}
    _run(model, opt, sp, 24, start=0)  # trains through its events without a shape error
    # a model whose every group can shrink: nothing refused
    torch.manual_seed(0)
    plain = TinyResNet()
    groups = chase.channel_groups(plain, torch.randn(1, 3, 16, 16), prune_skip=True).prunable()
    assert breaking_groups(plain, groups, torch.randn(1, 3, 16, 16)) == {}

    class DataDependent(TinyResNet):  # .item() has no meta kernel: no verdict, and no error
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = super().forward(x)
            return out * 2 if float(out.sum().item()) > 0 else out

    model = DataDependent()
    groups = chase.channel_groups(model, torch.randn(1, 3, 16, 16), prune_skip=True).prunable()
    assert breaking_groups(model, groups, torch.randn(1, 3, 16, 16)) == {}
