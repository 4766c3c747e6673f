"""Budget targets: the channel schedule counts the model's MACs or parameters instead of channels."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.nets import TinyResNet, linear_table, make_optimizer, tiny_chase, train_step

import chase

EXAMPLE = torch.randn(2, 3, 16, 16)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("target, ratio", [("macs", 0.6), ("params", 0.75)])
@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize("rank", ["score", "score_per_cost", "normalized", "uniform", "latency_weighted"])
def test_chase_meets_the_budget_within_one_channel(target, ratio, multiple, rank):
    options = {"channel_multiple": multiple, "target": target, "channel_rank": rank, f"{target}_ratio": ratio}
    if rank == "latency_weighted":  # block_a's channels are slow for what they cost
        options["latency_table"] = linear_table(TinyResNet(width=32), EXAMPLE, {"block_a": 0.05})
    model, opt, sp = tiny_chase(EXAMPLE, **options)

    def now() -> int:
        return chase.count_flops(model, EXAMPLE[:1]).dense if target == "macs" else _params(model)

    dense, last = now(), None
    for i in range(40):
        train_step(model, opt, sp, i)
        if sp.is_channel_step(i + 1):
            allowed = sp.target_value(i + 1)
            assert now() <= allowed  # each event meets its step's budget
            last = (allowed, now())
    allowed, got = last
    assert allowed == round(dense * ratio)
    one_block = max(sp.pruner.channel_costs(target, EXAMPLE[:1])) * multiple
    assert allowed - one_block <= got <= allowed, (allowed, got, one_block)


def test_prune_channels_to_a_macs_budget():
    model = TinyResNet(width=32)
    dense = chase.count_flops(model, EXAMPLE).dense
    result = chase.prune_channels(model, EXAMPLE, channel_sparsity=0.6, target="macs", macs_ratio=0.5)
    macs = chase.count_flops(model, EXAMPLE).dense
    assert macs <= 0.5 * dense and result.removed


@pytest.mark.parametrize(
    "options, words",
    [
        ({"target": "macs"}, "needs macs_ratio"),
        ({"target": "params", "params_ratio": 1.5}, "needs params_ratio in"),
        ({"target": "latency_ms"}, "target must be one of"),
        ({"target": "macs", "macs_ratio": 0.5, "removal": "mask"}, "removal='physical'"),
        ({"channel_rank": "score_per_cost"}, "needs a budget target"),
        ({"target": "macs", "macs_ratio": 0.5, "channel_rank": "cost"}, "channel_rank must be one of"),
        ({"channel_rank": "latency_weighted"}, "'latency_weighted' needs latency_table"),
        (
            {"target": "macs", "macs_ratio": 0.5, "channel_rank": "uniform", "latency_table": {"groups": {}}},
            "latency_table given, but",
        ),
        (  # a table of another model: refused before anything changes
            {
                "channel_rank": "latency_weighted",
                "latency_table": linear_table(TinyResNet(width=16), EXAMPLE),
            },
            "measured on other widths",
        ),
    ],
)
def test_bad_budgets_are_refused(options, words):
    model = TinyResNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=words):
        chase.Chase(
            model,
            make_optimizer("sgd", model),
            density=0.3,
            total_steps=40,
            example_inputs=EXAMPLE,
            update_every=8,
            channel_every=4,
            **options,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_score_per_cost_takes_the_dearest_channels_first():
    """The group whose channel costs the most MACs scores a little higher than the others: ranked by score
    its channels go last, ranked by score per MAC saved they go first, and a small MACs budget is met
    from it alone."""
    from chase.sparse.targets import find_sparse_params
    from chase.sparsifier.pruner import ChannelPruner
    from chase.sparsifier.specs import ChannelSpec

    model = TinyResNet(width=32)
    with torch.no_grad():
        for p in find_sparse_params(model).values():
            p.fill_(0.9)
    pruner = ChannelPruner(
        model, EXAMPLE, find_sparse_params(model), ChannelSpec(channel_sparsity=0.5, prune_skip=True)
    )
    costs = pruner.channel_costs("macs", EXAMPLE[:1])
    dearest = pruner.groups[costs.index(max(costs))]
    assert len(costs) == 3 and sorted(costs)[-1] > 1.2 * sorted(costs)[-2]
    with torch.no_grad():
        for s in dearest.producers:
            dict(model.named_parameters())[s.tensor].fill_(1.0)
    dense = chase.count_flops(model, EXAMPLE[:1]).dense
    ratio = 1 - 2.5 * max(costs) / dense  # about three of its channels
    removed = {}
    for rank in ("score", "score_per_cost"):
        m = copy.deepcopy(model)
        result = chase.prune_channels(
            m,
            EXAMPLE,
            channel_sparsity=0.5,
            prune_skip=True,
            target="macs",
            macs_ratio=ratio,
            channel_rank=rank,
        )
        assert chase.count_flops(m, EXAMPLE[:1]).dense <= round(ratio * dense)
        removed[rank] = result.removed
    assert dearest.name not in removed["score"]
    assert removed["score_per_cost"] == {dearest.name: 3}


@pytest.mark.parametrize("budget", [{}, {"target": "macs", "macs_ratio": 0.6}])
def test_normalized_rank_prunes_every_group_at_a_similar_rate(budget):
    """One group's weights are 100x smaller than the others' (as ERK's sparsest layers score): ranked by score
    it is emptied to its floor before the others lose a channel; ranked by score over the group's mean
    every group loses a similar share, the lowest-scored channels of each."""
    from chase.sparse.targets import find_sparse_params
    from chase.sparsifier.pruner import ChannelPruner
    from chase.sparsifier.specs import ChannelSpec

    model = TinyResNet(width=32)
    params = dict(model.named_parameters())
    groups = ChannelPruner(
        model, EXAMPLE, find_sparse_params(model), ChannelSpec(channel_sparsity=0.3, prune_skip=True)
    )
    assert len(groups.groups) == 3
    small = groups.groups[1].name
    with torch.no_grad():
        for g in groups.groups:
            for s in g.producers:
                w = params[s.tensor]
                profile = torch.linspace(1.0, 2.0, w.shape[0]).view(-1, *[1] * (w.dim() - 1))
                w.copy_(profile.expand_as(w) * (0.01 if g.name == small else 1.0))
    width = {g.name: g.width for g in groups.groups}
    removed = {}
    for rank in ("score", "normalized"):
        m = copy.deepcopy(model)
        result = chase.prune_channels(
            m, EXAMPLE, channel_sparsity=0.3, prune_skip=True, channel_rank=rank, **budget
        )
        removed[rank] = {g: result.removed.get(g, 0) / width[g] for g in width}
        if rank == "normalized":  # the lowest-scored channels of each group went: the first ones
            kept = m.get_submodule(small).weight[:, 0, 0, 0]
            assert kept.min() > 0.01 * (1.0 + removed[rank][small] * 0.9)
    others = max(v for g, v in removed["score"].items() if g != small)
    assert removed["score"][small] > 0.5 and removed["score"][small] > 4 * others, removed["score"]
    shares = list(removed["normalized"].values())
    assert min(shares) > 0.1 and max(shares) - min(shares) < 0.15, removed["normalized"]


@pytest.mark.parametrize("rank", ["normalized", "uniform"])
@pytest.mark.parametrize("multiple", [1, 4])
def test_chase_reaches_s_c_ranked_by_group(rank, multiple):
    """With S_c (no budget) the per-group rankings follow the channel schedule like the paper's; ranked
    uniformly, every group has lost the same share after every event (within one block)."""
    model, opt, sp = tiny_chase(EXAMPLE, channel_sparsity=0.5, channel_rank=rank, channel_multiple=multiple)
    widths = {g.name: g.width for g in sp.pruner.groups}
    for i in range(40):
        train_step(model, opt, sp, i)
        if rank == "uniform" and sp.is_channel_step(i + 1):
            shares = [1 - w / widths[g] for g, w in sp.pruner.alive_channels().items()]
            assert max(shares) - min(shares) <= multiple / min(widths.values()), shares
    assert sp.pruner.channel_sparsity_now() == pytest.approx(0.5, abs=2 * multiple / sp.pruner.total_channels)
    assert all(w % multiple == 0 or w < multiple for w in sp.pruner.alive_channels().values())


@pytest.mark.parametrize("budget", [{}, {"target": "macs", "macs_ratio": 0.6}])
def test_uniform_rank_takes_each_groups_lowest_scored_share(budget):
    """Ranked uniformly, one-shot pruning removes the same share of every group (within one channel of the
    narrowest), the lowest-scored channels of each, however the groups' scores compare."""
    from chase.sparse.targets import find_sparse_params
    from chase.sparsifier.pruner import ChannelPruner
    from chase.sparsifier.specs import ChannelSpec

    torch.manual_seed(0)
    model = TinyResNet(width=32)
    params = dict(model.named_parameters())
    groups = ChannelPruner(
        model, EXAMPLE, find_sparse_params(model), ChannelSpec(channel_sparsity=0.3, prune_skip=True)
    )
    with torch.no_grad():  # group i's scores are 10^i times larger, and fall with the channel index
        for i, g in enumerate(groups.groups):
            for s in g.producers:
                w = params[s.tensor]
                profile = torch.linspace(2.0, 1.0, w.shape[0]).view(-1, *[1] * (w.dim() - 1))
                w.copy_(profile.expand_as(w) * 10.0**i)
    result = chase.prune_channels(
        model, EXAMPLE, channel_sparsity=0.3, prune_skip=True, channel_rank="uniform", **budget
    )
    shares = [result.removed.get(g.name, 0) / g.width for g in groups.groups]
    assert min(shares) > 0.1 and max(shares) - min(shares) <= 1 / 32, shares
    for i, g in enumerate(groups.groups):  # the last (lowest-scored) channels went: the first ones are left
        w = params[g.producers[0].tensor]
        kept = g.width - result.removed.get(g.name, 0)
        expected = torch.linspace(2.0, 1.0, g.width)[:kept] * 10.0**i
        assert torch.allclose(w.reshape(w.shape[0], -1)[:, 0], expected)


def test_the_trainer_takes_a_macs_budget(tmp_path):
    pytest.importorskip("yaml")
    from tests.nets import TINY_CHASE_RUN

    from chase.cli import main

    sets = [*TINY_CHASE_RUN, "target=macs", "macs_ratio=0.7", "name=r"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets]) == 0
    import json

    final = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["macs_ratio"] <= 0.7 + 1e-9


# ---------------------------------------------------------------- latency: a measured table
@pytest.fixture(scope="module")
def table(tmp_path_factory):
    from chase.profile import profile_latency

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lat") / "table.json"
    profile_latency(TinyResNet(width=32), torch.randn(4, 3, 16, 16), repeats=2, warmup=1).save(path)
    return path


def test_the_profile_holds_every_group_and_predicts_the_dense_time(table):
    from chase.sparsifier.latency import LatencyTable

    t = LatencyTable.load(table)
    model = TinyResNet(width=32)
    sp = chase.Chase(
        model,
        make_optimizer("sgd", model),
        density=0.3,
        total_steps=40,
        example_inputs=EXAMPLE,
        update_every=8,
        channel_every=4,
    )
    assert sorted(t.groups) == sorted(g.name for g in sp.groups)
    assert t.predict_ms(sp.alive_channels()) == pytest.approx(t.dense_ms)
    for widths, ms in t.groups.values():
        assert widths == sorted(widths) and len(widths) == len(ms) >= 2
    assert t.meta["batch_size"] == 4 and t.meta["dtype"] == "fp32"
    assert t.meta["params"] == _params(model)  # the model's identity, checked at use


def test_chase_meets_a_latency_budget_by_the_table():
    """A table where block_a's width sets the time linearly: the final widths meet the budget within one
    channel's predicted time."""
    from chase.sparsifier.latency import LatencyTable

    spec = {"widths": [8, 16, 24, 32], "ms": [0.4, 0.6, 0.8, 1.0]}
    table = {"format_version": 1, "dense_ms": 1.0, "groups": {"block_a": spec}}
    model, opt, sp = tiny_chase(EXAMPLE, target="latency", latency_ratio=0.7, latency_table=table)
    for i in range(40):
        train_step(model, opt, sp, i)
    predicted = LatencyTable.load(table).predict_ms(sp.alive_channels())
    assert 0.7 - 0.025 - 1e-9 <= predicted <= 0.7 + 1e-9, predicted  # one channel is 0.025 ms here
    assert sp.alive_channels() == {"block_a": 20}


def test_a_latency_target_needs_its_table():
    model = TinyResNet()
    with pytest.raises(ValueError, match="latency_table"):
        chase.Chase(
            model,
            make_optimizer("sgd", model),
            density=0.3,
            total_steps=40,
            example_inputs=EXAMPLE,
            target="latency",
            latency_ratio=0.5,
        )
    with pytest.raises(ValueError, match="no measurements of group"):
        chase.prune_channels(
            TinyResNet(),
            EXAMPLE,
            channel_sparsity=0.5,
            target="latency",
            latency_ratio=0.5,
            latency_table={
                "format_version": 1,
                "dense_ms": 1.0,
                "groups": {"x": {"widths": [1, 2], "ms": [1, 2]}},
            },
        )


def test_a_table_of_another_model_is_refused(table):
    """The table of a TinyResNet of width 32 holds groups of the same names as one of width 16: refused,
    naming the widths, instead of predicting the narrower model's time from the wider one's."""
    model = TinyResNet(width=16)
    with pytest.raises(ValueError, match=r"other widths \(block_a: 32 in the table, 16 here"):
        chase.prune_channels(
            model, EXAMPLE, channel_sparsity=0.5, target="latency", latency_ratio=0.5, latency_table=table
        )
    assert model.block_a.out_channels == 16


def test_chase_profile_command(tmp_path):
    from chase.cli import main

    out = tmp_path / "t.json"
    argv = ["profile", "-m", "cifar_resnet20", "--num-classes", "10", "--input", "8", "--batch", "2"]
    assert main([*argv, "--repeats", "1", "--fractions", "0.5", "-o", str(out)]) == 0
    from chase.sparsifier.latency import LatencyTable

    assert len(LatencyTable.load(out).groups) == 9


def test_self_time_signatures_mark_exactly_the_calls_whose_work_changed():
    """Narrowing block_a's channels changes block_a, bn_a, block_b (its input) and the root's own relu on
    block_a's output; the stem, the strided block and the classifier did the same work."""
    from chase.sparse.targets import find_sparse_params
    from chase.sparsifier.pruner import ChannelPruner
    from chase.sparsifier.specs import ChannelSpec
    from chase.surgery import SurgeryState, remove_channels
    from chase.timing import module_self_times

    model = TinyResNet(width=16).eval()
    narrow = copy.deepcopy(model)
    (group,) = [
        g
        for g in ChannelPruner(
            narrow, EXAMPLE, find_sparse_params(narrow), ChannelSpec(channel_sparsity=0.5)
        ).groups
        if g.name == "block_a"
    ]
    remove_channels(narrow, SurgeryState(narrow, [group]), {"block_a": torch.arange(4, 16)})
    dense_calls = module_self_times(model, EXAMPLE, warmup=0, repeats=2)
    narrow_calls = module_self_times(narrow, EXAMPLE, warmup=0, repeats=2)
    assert dense_calls.keys() == narrow_calls.keys()
    assert all(t >= 0 for _, t in dense_calls.values())
    changed = {k[0] for k in dense_calls if dense_calls[k][0] != narrow_calls[k][0]}
    assert changed == {"block_a", "bn_a", "block_b", ""}


class _Sum(torch.nn.Module):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input.sum(1, keepdim=True)


class _Slicer(torch.nn.Module):
    """Its own code makes a tensor of width k and hands it to a submodule as a keyword."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.sum = k, _Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(input=x[:, : self.k] * 2)


def test_work_handed_on_as_a_keyword_is_part_of_the_callers_signature():
    from chase.timing import module_self_times

    x = torch.randn(2, 8)
    wide, narrow = (module_self_times(_Slicer(k), x, warmup=0, repeats=1) for k in (6, 3))
    assert wide[("", 0)][0] != narrow[("", 0)][0]  # the root's own code made a narrower tensor
    assert module_self_times(_Slicer(6), x, warmup=0, repeats=1)[("", 0)][0] == wide[("", 0)][0]


def test_a_profile_point_counts_only_the_calls_whose_work_changed():
    from chase.profile import _changed_ratio

    dense = {("a", 0): (1, 0.010), ("b", 0): (2, 0.020), ("c", 0): (3, 0.030)}
    # b did the same work (noise: 5 ms slower), a changed (4 ms faster), d is a call only the narrow one made
    narrow = {("a", 0): (9, 0.006), ("b", 0): (2, 0.025), ("c", 0): (3, 0.030), ("d", 0): (4, 0.001)}
    assert _changed_ratio(dense, narrow) == pytest.approx((0.060 - 0.004 + 0.001) / 0.060)
    assert _changed_ratio(dense, {k: v for k, v in narrow.items() if k != ("a", 0)}) == pytest.approx(
        (0.060 - 0.010 + 0.001) / 0.060
    )
    # a machine that slowed down while the dense calls were timed: the point is still a positive time
    slow = {k: (s, 10 * t) for k, (s, t) in dense.items()}
    assert 0 < _changed_ratio(slow, narrow) < 1


def test_a_profile_sees_a_dominant_group_narrowed():
    """The middle convolutions dominate this model's time: at a quarter of their width the table predicts
    well under the dense time, and never more than it."""
    from chase.profile import profile_latency

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 96, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(96, 8, 3, padding=1),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    table = profile_latency(model, torch.randn(8, 3, 32, 32), fractions=(0.25,), repeats=5, warmup=1)
    widths, ms = table.groups["2"]
    assert widths == [24, 96] and ms[0] < 0.8 * table.dense_ms
    assert table.meta["method"] == "module self times"


def test_a_budget_that_leaves_fewer_weights_than_the_density_warns():
    model, opt, sp = tiny_chase(EXAMPLE, density=0.9, soft_bound=0.0, target="params", params_ratio=0.6)
    with pytest.warns(UserWarning, match="fewer than the"):
        for i in range(40):
            train_step(model, opt, sp, i)
    assert sp.kept == sum(m.numel() for m in sp.masks.values())  # every surviving weight is kept


# ---------------------------------------------------------------- latency_weighted: uniform, by the table
def _shares(budget: dict, slopes: dict[str, float], rank: str = "latency_weighted") -> dict[str, float]:
    """Share of each group's width one-shot pruning removes from a TinyResNet of width 32 whose channels
    all score alike, with a linear latency table of ``slopes``."""
    model = TinyResNet(width=32)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.1)
    table = linear_table(TinyResNet(width=32), EXAMPLE, slopes, prune_skip=True)
    if rank == "latency_weighted" or budget.get("target") == "latency":
        budget = {**budget, "latency_table": table}
    result = chase.prune_channels(
        model, EXAMPLE, channel_sparsity=0.3, prune_skip=True, channel_rank=rank, **budget
    )
    widths = {g: spec["widths"][-1] for g, spec in table["groups"].items()}
    return {g: result.removed.get(g, 0) / w for g, w in widths.items()}


@pytest.mark.parametrize("target", ["channels", "macs"])
def test_latency_weighted_takes_more_from_groups_slow_for_their_cost(target):
    """One group's channels take 4x the time per unit of the budget (per channel with S_c, per MAC with a
    MACs budget): it loses about sqrt(4) = 2x the share of the others, which lose equal shares."""
    from chase.sparse.targets import find_sparse_params
    from chase.sparsifier.pruner import ChannelPruner
    from chase.sparsifier.specs import ChannelSpec

    budget = {} if target == "channels" else {"target": "macs", "macs_ratio": 0.6}
    model = TinyResNet(width=32)
    pruner = ChannelPruner(
        model, EXAMPLE, find_sparse_params(model), ChannelSpec(channel_sparsity=0.3, prune_skip=True)
    )
    cost = dict(zip([g.name for g in pruner.groups], pruner.channel_costs("macs", EXAMPLE[:1])))
    per_unit = {g: 1e-3 * (1.0 if target == "channels" else c / max(cost.values())) for g, c in cost.items()}
    slow = pruner.groups[0].name
    shares = _shares(budget, {g: v * (4.0 if g == slow else 1.0) for g, v in per_unit.items()})
    others = [v for g, v in shares.items() if g != slow]
    assert min(others) > 0.05 and max(others) - min(others) <= 2 / 32 + 1e-9, shares
    assert 1.5 <= shares[slow] / (sum(others) / len(others)) <= 2.6, shares
    uniform = _shares(budget, {}, rank="uniform")  # the same budget, without the table's weights
    assert max(uniform.values()) - min(uniform.values()) <= 1 / 32 + 1e-9, uniform


def test_a_flat_line_in_the_table_is_noise_not_a_free_group():
    """A group whose measured time did not fall with its width (a flat line: the profile's noise) still
    loses channels, about a tenth of the others' share, instead of none."""
    flat = _shares({}, {"conv1": 0.0})
    assert 0 < flat["conv1"] < flat["block_a"] / 4, flat


def test_latency_weighted_under_a_latency_budget_is_uniform():
    """With target="latency" a group's time per unit of the budget is 1 everywhere: the uniform ranking's
    widths, whatever the table's slopes."""
    budget = {"target": "latency", "latency_ratio": 0.95}
    slopes = {"conv1": 0.02, "block_a": 0.005}
    assert _shares(budget, slopes) == _shares(budget, slopes, rank="uniform")


def test_flops_and_the_trainer_take_latency_weighted(tmp_path, capsys):
    pytest.importorskip("yaml")
    import json

    from tests.nets import TINY_CHASE_RUN

    from chase.cli import main
    from chase.models import get_model

    table = tmp_path / "table.json"
    model = get_model("cifar_resnet20", num_classes=10)
    table.write_text(json.dumps(linear_table(model, torch.randn(1, 3, 32, 32))))
    argv = ["flops", "-m", "cifar_resnet20", "--num-classes", "10", "--macs-ratio", "0.6"]
    assert main([*argv, "--channel-rank", "latency_weighted", "--latency-table", str(table)]) == 0
    assert "channel_rank=latency_weighted" in capsys.readouterr().out
    assert main([*argv, "--channel-rank", "latency_weighted"]) == 2
    assert "needs latency_table" in capsys.readouterr().err
    assert main([*argv, "--latency-table", str(table)]) == 2  # the paper's ranking does not use it
    assert "latency_table given" in capsys.readouterr().err

    small = tmp_path / "small.json"
    small.write_text(json.dumps(linear_table(model, torch.randn(1, 3, 8, 8))))
    sets = [*TINY_CHASE_RUN, "target=macs", "macs_ratio=0.7", "channel_rank=latency_weighted", "name=r"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets, f"latency_table={small}"]) == 0
    final = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["macs_ratio"] <= 0.7 + 1e-9
    assert final["latency_predicted_ms"] < 10.0  # the table's prediction of the final widths is reported


def test_a_latency_weighted_run_resumes_in_lockstep():
    """The weights are fixed on the dense model and saved: a run resumed after its first channel events
    (into a model built with another table, which the saved one replaces) ends exactly as the whole run."""
    import io

    table = linear_table(TinyResNet(width=32), EXAMPLE, {"block_a": 0.05})
    options = {
        "target": "macs",
        "macs_ratio": 0.6,
        "channel_rank": "latency_weighted",
        "latency_table": table,
    }
    model, opt, sp = tiny_chase(EXAMPLE, **options)
    for i in range(40):
        train_step(model, opt, sp, i)

    model_a, opt_a, sp_a = tiny_chase(EXAMPLE, **options)
    for i in range(14):  # channel events at 2, 6, 10 (and more to come)
        train_step(model_a, opt_a, sp_a, i)
    assert sp_a.pruner.alive_channels() != {g.name: g.width for g in sp_a.pruner.groups}
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sp": sp_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    other = {**options, "latency_table": linear_table(TinyResNet(width=32), EXAMPLE, {"conv1": 0.05})}
    model_b, opt_b, sp_b = tiny_chase(EXAMPLE, **other)
    with pytest.warns(UserWarning, match="latency table changed"):
        sp_b.load_state_dict(saved["sp"])
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    for i in range(14, 40):
        train_step(model_b, opt_b, sp_b, i)
    assert sp_b.pruner.rank_weights == sp.pruner.rank_weights
    assert sp_b.pruner.alive_channels() == sp.pruner.alive_channels()
    for (n, w), w_b in zip(model.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(w, w_b), n


def test_a_table_of_a_model_with_the_same_groups_is_refused_by_its_parameter_count():
    """Same group names and widths (a TinyResNet for 100 classes against one for 10, as torchvision's
    ResNet-18 against ResNet-50's table): the parameter count the table recorded tells them apart; a table
    without one (written before it was recorded) is still taken."""
    wide_head = TinyResNet(width=32, num_classes=100)
    table = linear_table(wide_head, EXAMPLE) | {"meta": {"params": _params(wide_head)}}
    options = {"channel_sparsity": 0.5, "channel_rank": "latency_weighted", "latency_table": table}
    model = TinyResNet(width=32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="measured on a model with 46,596 parameters, this one has 40,746"):
        chase.prune_channels(model, EXAMPLE, **options)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    table["meta"] = {"params": _params(model)}
    assert chase.prune_channels(model, EXAMPLE, **options).removed
    without_count = options | {"latency_table": linear_table(TinyResNet(width=32), EXAMPLE)}
    assert chase.prune_channels(TinyResNet(width=32), EXAMPLE, **without_count).removed


@pytest.mark.parametrize(
    "table, words",
    [
        ({"format_version": 1, "dense_ms": float("nan"), "groups": {}}, "dense_ms must be a finite time"),
        (
            {"format_version": 1, "dense_ms": 10.0, "groups": {"a": {"widths": [2, 4], "ms": [-1, 10]}}},
            "group 'a': ms",
        ),
        (
            {"format_version": 1, "dense_ms": 10.0, "groups": {"a": {"widths": [2, 4], "ms": [0, 10]}}},
            "> 0 ms",
        ),
        (
            {"format_version": 1, "dense_ms": 10.0, "groups": {"a": {"widths": [2, 4], "ms": ["x", 10]}}},
            "a number",
        ),
        (
            {"format_version": 1, "dense_ms": 10.0, "groups": {"a": {"widths": [4, 2], "ms": [9, 10]}}},
            "ascending",
        ),
        (
            {"format_version": 1, "dense_ms": 10.0, "groups": {"a": {"widths": [2.5, 4], "ms": [9, 10]}}},
            "integers",
        ),
        (
            {"format_version": 1, "dense_ms": 10.0, "groups": {"a": {"widths": [2, 4], "ms": [30, 10]}}},
            "not a measurement",
        ),
        ({"format_version": 1, "dense_ms": 10.0, "groups": []}, "needs 'groups'"),
        ([1, 2, 3], "a JSON object"),
    ],
)
def test_a_latency_table_is_checked_when_it_is_read(table, words, tmp_path):
    """NaN, zero or negative times, unordered widths or a line no measurement draws are refused, naming the
    file and the entry, before any channel is removed (a NaN table used to remove half the channels by
    NaN-derived weights; a negative one, none)."""
    from chase.sparsifier.latency import LatencyTable

    path = tmp_path / "bad.json"
    path.write_text(__import__("json").dumps(table))  # NaN is written as JSON's NaN, as json.dumps does
    with pytest.raises(ValueError, match=words) as info:
        LatencyTable.load(path)
    assert str(path) in str(info.value)
    (tmp_path / "bin.json").write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(ValueError, match=r"bin\.json is not a latency table"):
        LatencyTable.load(tmp_path / "bin.json")
