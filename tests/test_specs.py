"""The typed channel options (issue 25): ChannelSpec and Budget validate themselves, the flat options of
earlier releases give the same run through one adapter, rankings and budget kinds are tables (and every
entry is tested from the table), schedules take fractions of the run, and runs written by the code before
the redesign resume bit for bit."""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import shutil
import warnings

import pytest
import torch
from tests.nets import TinyResNet, linear_table, make_optimizer, tiny_chase, train_step

import chase
from chase import Budget, ChannelSpec
from chase.sparse.targets import find_sparse_params
from chase.sparsifier import registry, specs
from chase.sparsifier.budgets import BUDGET_KINDS
from chase.sparsifier.costs import COST_SOURCES
from chase.sparsifier.pruner import ChannelPruner
from chase.sparsifier.rankings import RANKINGS, LatencyWeighted, Ranking, Uniform

EXAMPLE = torch.randn(2, 3, 16, 16)
DATA = pathlib.Path(__file__).parent / "data"


# ---------------------------------------------------------------------------------------------- the specs
@pytest.mark.parametrize(
    "options, words",
    [
        ({"channel_sparsity": 1.0}, "channel_sparsity must be in"),
        ({"channel_sparsity": "0.5"}, "channel_sparsity must be a number"),
        ({"min_channel_ratio": -0.1}, "min_channel_ratio must be in"),
        ({"prune_skip": 1}, "prune_skip must be True or False"),
        ({"keep_channels": "conv1"}, "keep_channels must be a list"),
        ({"keep_channels": None}, "keep_channels must be a list"),
        ({"keep_channels": 5}, "keep_channels must be a list"),
        ({"channel_score": "l2"}, "channel_score must be one of"),
        ({"channel_rank": "cost"}, "channel_rank must be one of"),
        ({"channel_multiple": 0}, "channel_multiple must be >= 1"),
        ({"channel_multiple": 2.0}, "channel_multiple must be an integer"),
        ({"channel_every": 0}, "channel_every must be >= 1"),
        ({"channel_end": 1.5}, "fraction of the run"),
        ({"channel_end": -3}, "channel_end must be a step >= 0"),
        ({"removal": "delete"}, "removal must be one of"),
    ],
)
def test_a_channel_spec_refuses_bad_options_on_construction(options, words):
    with pytest.raises(ValueError, match=words):
        ChannelSpec(**options)


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: Budget("macs"), "needs macs_ratio in"),
        (lambda: Budget.macs(1.5), "needs macs_ratio in"),
        (lambda: Budget.params(float("nan")), "needs params_ratio in"),
        (lambda: Budget("channels", 0.5), "takes no ratio"),
        (lambda: Budget("latency_ms", 0.5), "target must be one of"),
        (lambda: Budget("latency", 0.5), "needs latency_table"),
        (lambda: Budget.macs(0.5, cost=3), "a cost model must be one of"),
        (lambda: Budget.macs("0.5"), "got '0.5'"),
        (lambda: Budget.latency(0.5, "h200@256"), r"Roofline.parse\('h200@256'\)"),
    ],
)
def test_a_budget_refuses_bad_options_on_construction(build, words):
    with pytest.raises(ValueError, match=words):
        build()


def test_a_roofline_device_file_given_as_a_latency_table_is_named_as_a_roofline(tmp_path):
    from chase.sparsifier.roofline import DEVICES

    path = tmp_path / "cpu.json"  # as `chase profile --roofline` writes it
    path.write_text(json.dumps({"device": dataclasses.asdict(DEVICES["t4"])}))
    with pytest.raises(ValueError, match=r"is a roofline's device, not a latency table: give Roofline.parse"):
        Budget.latency(0.5, str(path))
    with pytest.raises(ValueError, match=r"is a roofline's device"):
        Budget.latency(0.5, f"{path}@64")


def test_the_flat_keywords_warning_names_the_callers_line_through_torch_decorators(monkeypatch):
    from chase.sparsifier.one_shot import prune_channels  # under @torch.no_grad

    monkeypatch.setattr(specs, "_WARNED", set())
    with pytest.warns(FutureWarning) as record:
        prune_channels(TinyResNet(width=8), EXAMPLE, channel_sparsity=0.25)
    assert [pathlib.Path(w.filename).name for w in record] == ["test_specs.py"]


def test_a_budget_names_its_cost_model_and_where_it_holds():
    from chase.sparsifier.roofline import Roofline

    described = Budget.latency(0.5, Roofline("h200", batch_size=8)).describe()
    assert described == "target=latency, latency_ratio=0.5, roofline (NVIDIA H200, cuda, batch 8, fused)"


def test_specs_are_frozen_values_and_say_what_they_are():
    spec = ChannelSpec(channel_sparsity=0.5, keep_channels=["conv1"], channel_multiple=8)
    assert spec.keep_channels == ("conv1",) and hash(spec) == hash(spec.replace())
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.channel_sparsity = 0.3  # type: ignore[misc]
    assert spec.describe() == "channel_sparsity=0.5, keep_channels=['conv1'], channel_multiple=8"
    assert Budget.macs(0.5).describe() == "target=macs, macs_ratio=0.5"
    assert (
        ChannelSpec(channel_rank=LatencyWeighted(exponent=0.75))
        .describe()
        .startswith("channel_rank=LatencyWeighted(exponent=0.75")
    )


def test_the_flat_options_are_generated_from_the_specs_and_the_tables():
    flat = specs.flat_options()
    fields = [f.name for f in dataclasses.fields(ChannelSpec)]
    ratios = [f"{k}_ratio" for k, v in BUDGET_KINDS.items() if v.ratio]
    assert list(flat) == [*fields, "target", *ratios, *COST_SOURCES]
    assert flat["channel_rank"].choices == tuple(RANKINGS) and flat["target"].choices == tuple(BUDGET_KINDS)
    assert all(o.help and o.role in specs.ROLES for o in flat.values())
    assert tuple(flat) == registry.CHANNEL_OPTIONS


@pytest.mark.parametrize(
    "flat, want",
    [
        ({"macs_ratio": 0.5}, Budget.macs(0.5)),  # a ratio alone names its kind
        ({"target": "params", "params_ratio": 0.7}, Budget.params(0.7)),
        ({"channel_sparsity": 0.3, "macs_ratio": None}, Budget()),
    ],
)
def test_flat_options_build_the_specs(flat, want):
    _, budget = specs.specs_from_flat(flat)
    assert budget == want


@pytest.mark.parametrize(
    "flat, words",
    [
        ({"macs_ratio": 0.5, "params_ratio": 0.5}, "one budget at a time"),
        ({"target": "params", "macs_ratio": 0.5}, "macs_ratio given, but target='params' does not use it"),
        # a cost model no option uses is refused before it is read (here it is no table at all)
        ({"macs_ratio": 0.5, "latency_table": {"groups": {}}}, "latency_table given, but neither"),
        ({"channel_rank": "score_per_cost"}, "needs a budget target"),
        ({"channel_rank": "latency_weighted"}, "needs latency_table"),
        ({"macs_ratio": 0.5, "removal": "mask"}, "removal='physical'"),
        ({"bogus": 1}, "unknown channel option"),
    ],
)
def test_flat_options_that_cannot_work_are_refused(flat, words):
    with pytest.raises(ValueError, match=words):
        specs.specs_from_flat(flat)


def test_the_flat_keywords_give_the_same_run_and_warn_once(monkeypatch):
    monkeypatch.setattr(specs, "_WARNED", set())
    flat = {"channel_sparsity": 0.5, "prune_skip": True, "target": "macs", "macs_ratio": 0.6}
    with pytest.warns(FutureWarning, match="flat channel options .* are deprecated"):
        model_a, opt_a, sp_a = tiny_chase(EXAMPLE, **flat)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # once per process and function
        tiny_chase(EXAMPLE, **flat)
        model_b, opt_b, sp_b = tiny_chase(
            EXAMPLE, channels=ChannelSpec(channel_sparsity=0.5, prune_skip=True), budget=Budget.macs(0.6)
        )
    for i in range(40):
        train_step(model_a, opt_a, sp_a, i)
        train_step(model_b, opt_b, sp_b, i)
    assert sp_a.alive_channels() == sp_b.alive_channels() and sp_a.channel_sparsity_now() > 0
    for (k, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="not both"):
        tiny_chase(EXAMPLE, channels=ChannelSpec(), channel_sparsity=0.5)
    model = TinyResNet()
    with pytest.raises(TypeError, match=r"channels must be a chase\.ChannelSpec"):
        chase.Chase(
            model,
            make_optimizer("sgd", model),
            density=0.3,
            total_steps=40,
            example_inputs=EXAMPLE,
            channels={"channel_sparsity": 0.5},
        )


# ---------------------------------------------------------------------------------------------- rankings
def _ranked_pruning(rank: Ranking | str, multiple: int, slow: float = 0.05):
    """TinyResNet (prune_skip) with random masks, pruned with ``rank``: under a MACs budget of 0.6 when the
    ranking needs one, by S_c 0.5 otherwise; a cost model when it needs one (block_a ``slow`` ms per
    channel, the others 1e-3). Returns the pruner, the scores at the first removal round (group ->
    original id -> score), which channels were alive after that round, the budget and its target. (A
    budget takes several rounds: once a group loses channels its consumers' filters shrink and their scores
    change, so the ranking's order holds round by round.)"""
    torch.manual_seed(0)
    model = TinyResNet(width=32)
    ranking = rank if isinstance(rank, Ranking) else RANKINGS[rank]
    cost = linear_table(TinyResNet(width=32), EXAMPLE, {"block_a": slow}, prune_skip=True)
    budget = Budget.macs(0.6, cost if ranking.needs_cost else None)
    if not ranking.needs_budget:
        budget = Budget.channels(cost) if ranking.needs_cost else Budget()
    spec = ChannelSpec(channel_sparsity=0.5, prune_skip=True, channel_multiple=multiple, channel_rank=rank)
    params = find_sparse_params(model)
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in params.items()}
    probe = EXAMPLE[:1]
    pruner = ChannelPruner(model, probe, params, spec)
    if budget.cost is not None:
        pruner.use_cost(budget.cost, budget.kind, probe)
    scores, gids, ids = pruner.scores(params, masks)
    by_group = {
        g.name: dict(zip(ids[i].tolist(), scores[gids == i].tolist())) for i, g in enumerate(pruner.groups)
    }
    target = None
    if budget.ratio is not None:
        target = round(pruner.measure(budget.kind, probe) * budget.ratio)
        excess = pruner.measure(budget.kind, probe) - target
        costs = pruner.channel_costs(budget.kind, probe)
        pruner.remove(0, params, masks, costs=costs, quota=excess, at_least=True)  # the first round
        first = {g.name: pruner.surgery.alive_channels(g.name).clone() for g in pruner.groups}
        pruner.remove_to_budget(budget.kind, target, probe, params, masks)
    else:
        pruner.remove(round(pruner.total_channels * 0.5), params, masks)
        first = {g.name: pruner.surgery.alive_channels(g.name).clone() for g in pruner.groups}
    return pruner, by_group, first, budget, target


@pytest.mark.parametrize("multiple", [1, 4])
@pytest.mark.parametrize("rank", list(RANKINGS))
def test_every_ranking_in_the_table_keeps_the_invariants(rank, multiple):
    """For each entry of RANKINGS: inside a group the lowest-scored channels go first, no group goes
    below its floor, every narrowed group keeps a multiple of ``channel_multiple``, and the budget is met
    within one block's cost."""
    pruner, by_group, first, budget, target = _ranked_pruning(rank, multiple)
    removed_any = False
    for i, g in enumerate(pruner.groups):
        alive = first[g.name]
        kept = [by_group[g.name][c] for c in range(g.width) if alive[c]]
        gone = [by_group[g.name][c] for c in range(g.width) if not alive[c]]
        if gone:
            removed_any = True
            assert max(gone) <= min(kept) + 1e-12, (g.name, rank)
        width = pruner.surgery.current_width(g.name)
        assert width >= pruner.floors[i], g.name
        if multiple > 1 and width < g.width:
            assert width % multiple == 0, (g.name, width)
    assert removed_any
    if target is not None:
        got = pruner.measure(budget.kind, EXAMPLE[:1])
        block = max(pruner.channel_costs(budget.kind, EXAMPLE[:1])) * multiple
        assert target - block <= got <= target, (got, target, block)
    else:
        assert pruner.channel_sparsity_now() == pytest.approx(0.5, abs=multiple * 4 / pruner.total_channels)


def test_a_ranking_is_a_small_object_and_takes_its_parameters():
    """A new ranking needs no registration to be used (a Ranking object as channel_rank), and the
    latency exponent is a parameter (no module global): a larger exponent takes more from the slow
    group."""

    class Reversed(Uniform):  # the highest-scored channels of each group first
        name = "reversed"

        def keys(self, ctx):
            return super().keys(dataclasses.replace(ctx, scores=-ctx.scores))

    pruner, by_group, first, _, _ = _ranked_pruning(Reversed(), 1)
    g = pruner.groups[0]
    alive = first[g.name]
    gone = [by_group[g.name][c] for c in range(g.width) if not alive[c]]
    kept = [by_group[g.name][c] for c in range(g.width) if alive[c]]
    assert gone and min(gone) >= max(kept)
    slow = {}
    for e in (0.25, 1.0):
        pruner, _, _, _, _ = _ranked_pruning(LatencyWeighted(exponent=e), 1, slow=2e-3)
        slow[e] = pruner.alive_channels()["block_a"]
    assert slow[1.0] < slow[0.25]
    with pytest.raises(ValueError, match="exponent must be >= 0"):
        LatencyWeighted(exponent=-1)


# ---------------------------------------------------------------------------------------------- schedules
def test_schedule_points_take_fractions_of_the_run():
    by_step = tiny_chase(
        EXAMPLE,
        soft_bound_end=28,
        channels=ChannelSpec(channel_sparsity=0.5, channel_every=4, channel_end=20),
    )[2]
    by_fraction = tiny_chase(
        EXAMPLE,
        soft_bound_end=0.7,
        channels=ChannelSpec(channel_sparsity=0.5, channel_every=4, channel_end=0.5),
    )[2]
    assert (by_fraction.soft_bound_end, by_fraction.channel_end) == (28, 20)
    assert by_fraction.channel_plan == by_step.channel_plan
    # A fraction past the last update is moved back to it (as the defaults are); a step there is refused.
    late = tiny_chase(
        EXAMPLE, soft_bound_end=1.0, channels=ChannelSpec(channel_sparsity=0.5, channel_end=1.0)
    )[2]
    assert late.soft_bound_end == late.last_update_step() == 32 and late.channel_end == 31
    with pytest.raises(ValueError, match="after the last exploration update"):
        tiny_chase(EXAMPLE, soft_bound_end=40)
    model = TinyResNet()
    rigl = chase.RigL(model, make_optimizer("sgd", model), density=0.3, total_steps=40, end_step=0.5)
    assert rigl.end_step == 20


@pytest.mark.parametrize("epochs", [1, 2, 30])
def test_the_quickstart_config_works_for_any_number_of_epochs(epochs):
    """configs/quickstart.yaml uses fractions of the run: --set epochs=N keeps a schedule with channel
    events and an update after the last, through the sparsifier's construction on the real model."""
    from chase.models import get_model
    from chase.train.config import load_config
    from chase.train.loop import build_sparsifier

    root = pathlib.Path(__file__).resolve().parents[1]
    cfg = load_config([root / "configs" / "quickstart.yaml"], [f"epochs={epochs}"])
    steps = cfg.planned_steps_per_epoch()
    assert steps == 390
    model = get_model(cfg.model, num_classes=10)
    sp = build_sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), cfg, steps, 32)
    assert sp.channel_plan.events and sp.last_update_step() > sp.last_event
    assert sp.last_event <= 0.834 * epochs * steps


def test_a_schedule_without_channel_events_is_refused_when_the_config_is_read(tmp_path):
    from chase.train.config import ConfigError, load_config

    sets = ["dataset=synthetic", "synthetic_train=64", "batch_size=16", "epochs=2", "channel_every=1000"]
    with pytest.raises(ConfigError, match="no channel event fits"):
        load_config([], sets)
    with pytest.raises(ConfigError, match=r"channel_end .* or channel_end_epoch, not both"):
        load_config([], ["channel_end=0.5", "channel_end_epoch=2"])
    with pytest.raises(ConfigError, match=r"channel_end is a fraction of the run in \[0, 1\]"):
        load_config([], ["channel_end=2"])
    load_config([], [*sets[:-1], "update_every=2", "channel_every=2", "channel_end=0.75"])  # fine


# ---------------------------------------------------------------------------------------------- the edges
def test_every_channel_option_has_a_flag_where_its_role_is_offered():
    from chase.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    offered = {
        "train": tuple(specs.ROLES),
        "flops": ("groups", "amount", "ranking", "budget"),
        "bench": ("groups", "amount", "ranking", "budget"),
        "check": ("groups", "amount", "ranking", "removal", "budget"),
        "profile": ("groups",),
    }
    for command, roles in offered.items():
        flags = sub.choices[command]._option_string_actions
        for o in specs.flat_options().values():
            flag = "--" + o.name.replace("_", "-")
            if command == "profile" and o.name == "roofline":
                continue  # chase profile --roofline measures this device's roofline (the file is one)
            assert (flag in flags) == (o.role in roles), (command, flag)
            if flag in flags:
                assert flags[flag].help, (command, flag)


def test_the_cli_takes_every_budget_kind(capsys):
    from chase.cli import main

    base = ["flops", "-m", "resnet18", "--num-classes", "10", "--input", "32"]
    assert main([*base, "--params-ratio", "0.7", "--channel-multiple", "8"]) == 0
    assert "target=params, params_ratio=0.7" in capsys.readouterr().out
    assert main([*base, "--latency-ratio", "0.7"]) == 2
    assert "needs latency_table" in capsys.readouterr().err
    assert (
        main([*base, "--prune-skip", "--keep-channels", "conv1,layer1.0.conv1", "--channel-sparsity", "0.3"])
        == 0
    )
    assert "keep_channels=['conv1', 'layer1.0.conv1']" in capsys.readouterr().out


def test_the_trainer_takes_the_channel_flags_as_overrides(tmp_path, monkeypatch):
    from chase.cli import train as train_command

    seen = {}
    monkeypatch.setattr("chase.train.train", lambda cfg, *a, **k: seen.setdefault("cfg", cfg) and {"ok": 1})
    parser = __import__("chase.cli", fromlist=["build_parser"]).build_parser()
    sets = ["dataset=synthetic", "update_every=2", "channel_every=2"]
    args = parser.parse_args(["train", "--set", *sets, "--macs-ratio", "0.5", "--prune-skip"])
    train_command.run(args)
    cfg = seen["cfg"]
    assert cfg.macs_ratio == 0.5 and cfg.prune_skip is True and cfg.target is None


def test_no_method_is_special_cased_by_name_outside_its_class():
    """The trainer passes specs through the registry: no ``== "chase"`` comparison in the library."""
    src = pathlib.Path(chase.__file__).parent
    hits = [p.relative_to(src) for p in src.rglob("*.py") if '== "chase"' in p.read_text()]
    assert not hits, hits


# ---------------------------------------------------------------------------------------------- old runs
def _same(a, b) -> bool:
    """Nested dicts/lists of tensors and plain values, equal exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


def test_a_run_checkpointed_before_the_options_redesign_resumes_bit_for_bit(tmp_path):
    """tests/data/run_v0_2: a trainer run (prune_skip, a MACs budget, score_per_cost, channel_multiple 2)
    written by the code before issue 25 (commit 58b44af), stopped after its first epoch;
    expected_slim.pt is the same run's result without the stop."""
    pytest.importorskip("yaml")
    from chase.cli import main
    from chase.slim import read_slim

    run = tmp_path / "old"
    shutil.copytree(DATA / "run_v0_2", run)
    expected = torch.load(run / "expected_slim.pt", weights_only=True)
    assert main(["train", "-q", "--resume", str(run)]) == 0
    got = read_slim(run / "slim.pt")
    assert _same(got["history"], expected["history"])  # the same channels removed
    for k, v in expected["model"].items():  # the same weights (to float noise on another CPU)
        assert torch.allclose(got["model"][k].double(), v.double(), rtol=1e-4, atol=1e-5), k


def test_a_latency_weighted_state_of_the_old_code_resumes_bit_for_bit():
    """tests/data/chase_state_v0_2.pt: model, optimizer and Chase state (latency_weighted widths to a MACs
    budget by a table where block_a is slow, prune_skip, channel_multiple 2; the old state keys
    latency_table and latency_weights) at step 20 of 40, written before issue 25; continued with the new
    specs it ends where the old code's uninterrupted run ended."""
    state = torch.load(DATA / "chase_state_v0_2.pt", weights_only=False)
    assert "latency_weights" in state["sparsifier"] and "rank_weights" not in state["sparsifier"]
    torch.manual_seed(0)
    model = TinyResNet(width=16)
    opt = make_optimizer("sgd", model)
    sp = chase.Chase(
        model,
        opt,
        density=0.3,
        total_steps=40,
        example_inputs=torch.randn(2, 3, 16, 16),
        update_every=8,
        channels=ChannelSpec(
            channel_every=4, prune_skip=True, channel_rank="latency_weighted", channel_multiple=2
        ),
        budget=Budget.macs(0.6, cost=state["table"]),
    )
    sp.load_state_dict(state["sparsifier"])
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    for i in range(20, 40):
        train_step(model, opt, sp, i)
    for k, v in state["expected_model"].items():  # the same weights (to float noise on another CPU)
        assert torch.allclose(model.state_dict()[k].double(), v.double(), rtol=1e-4, atol=1e-5), k
    for k, v in state["expected_masks"].items():  # the same decisions
        assert torch.equal(sp.masks[k], v), k
    saved = sp.state_dict()  # written under the new keys from now on
    assert "cost" in saved and "rank_weights" in saved and "latency_weights" not in saved
    fresh = copy.deepcopy(saved)
    assert fresh["rank_weights"] == state["sparsifier"]["latency_weights"]
