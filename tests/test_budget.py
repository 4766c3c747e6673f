"""Budget targets: the channel schedule counts the model's MACs or parameters instead of channels."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.nets import TinyResNet, make_optimizer, tiny_chase, train_step

import chase

EXAMPLE = torch.randn(2, 3, 16, 16)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("target, ratio", [("macs", 0.6), ("params", 0.75)])
@pytest.mark.parametrize("multiple", [1, 4])
def test_chase_meets_the_budget_within_one_channel(target, ratio, multiple):
    model, opt, sp = tiny_chase(
        EXAMPLE, channel_multiple=multiple, target=target, **{f"{target}_ratio": ratio}
    )

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
            **options,
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


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
    )
    assert sorted(t.groups) == sorted(g.name for g in sp.groups)
    assert t.predict_ms(sp.alive_channels()) == pytest.approx(t.dense_ms)
    for widths, ms in t.groups.values():
        assert widths == sorted(widths) and len(widths) == len(ms) >= 2
    assert t.meta["batch_size"] == 4 and t.meta["dtype"] == "fp32"


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


def test_chase_profile_command(tmp_path):
    from chase.cli import main

    out = tmp_path / "t.json"
    argv = ["profile", "-m", "cifar_resnet20", "--num-classes", "10", "--input", "8", "--batch", "2"]
    assert main([*argv, "--repeats", "1", "--fractions", "0.5", "-o", str(out)]) == 0
    from chase.sparsifier.latency import LatencyTable

    assert len(LatencyTable.load(out).groups) == 9


def test_a_budget_that_leaves_fewer_weights_than_the_density_warns():
    model, opt, sp = tiny_chase(EXAMPLE, density=0.9, soft_bound=0.0, target="params", params_ratio=0.6)
    with pytest.warns(UserWarning, match="fewer than the"):
        for i in range(40):
            train_step(model, opt, sp, i)
    assert sp.kept == sum(m.numel() for m in sp.masks.values())  # every surviving weight is kept
