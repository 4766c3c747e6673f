"""Hardware-friendly widths: ``channel_multiple`` keeps every pruned group a multiple of m channels."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.nets import TinyResNet, tiny_chase, train_step

import chase
from chase.sparse.channels import aligned_blocks

EXAMPLE = torch.randn(2, 3, 16, 16)


def test_aligned_blocks_hand_made():
    # group 0: 10 alive, floor 3, m=4 -> remainder 2 (the two lowest), then one block of 4 (8 -> 4 >= 4);
    # group 1: 3 alive < m -> keeps its width; group 2: 6 alive, floor 5 -> aligning to 4 breaks the floor.
    scores = torch.tensor([5, 1, 9, 2, 8, 3, 7, 4, 6, 0, 1, 1, 1, 3, 1, 2, 0, 5, 4], dtype=torch.float)
    gids = torch.tensor([0] * 10 + [1] * 3 + [2] * 6)
    members, g, costs, block_scores, forced = aligned_blocks(
        scores, gids, [10, 3, 6], [3, 1, 5], [1, 1, 1], 4
    )
    assert g == [0, 0] and costs == [2, 4] and forced == [True, False]
    assert sorted(members[0].tolist()) == [1, 9]  # scores 1 and 0
    assert sorted(scores[members[1]].tolist()) == [2, 3, 4, 5]
    assert block_scores[1] == pytest.approx(3.5)


@pytest.mark.parametrize("multiple", [4, 8])
def test_every_event_leaves_multiples_and_follows_the_schedule(multiple):
    model, opt, sp = tiny_chase(EXAMPLE, channel_sparsity=0.5, channel_multiple=multiple)
    floors = dict(zip([g.name for g in sp.groups], sp.pruner.floors))
    events = 0
    for i in range(40):
        info = train_step(model, opt, sp, i)
        if sp.is_channel_step(i + 1):
            events += 1
            for g in sp.groups:
                alive = sp.alive_channels()[g.name]
                assert alive % multiple == 0 or g.width < multiple, (g.name, alive)
                assert alive >= floors[g.name]
            keep = round(sp.total_channels * (1 - sp.target_channel_sparsity(i + 1)))
            assert abs(sp.pruner.alive_total() - keep) <= multiple, (i, sp.pruner.alive_total(), keep)
        assert info is not None
    assert events >= 3 and sp.channel_sparsity_now() > 0.3
    # The exported model has the aligned widths and computes the same function.
    x = torch.randn(2, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(sp.export().eval()(x), model(x), atol=1e-5)


def test_prune_channels_and_untrained_widths_are_aligned():
    model = TinyResNet(width=24)
    twin = copy.deepcopy(model)
    result = chase.prune_channels(twin, EXAMPLE, channel_sparsity=0.5, channel_multiple=8)
    assert result.removed and all(n % 8 == 0 for n in result.removed.values())
    widths = [m.out_channels for m in twin.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    slim = chase.untrained_slim(model, EXAMPLE, 0.5, channel_multiple=8)
    assert all(m.out_channels % 8 == 0 for m in slim.modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="channel_multiple"):
        chase.prune_channels(copy.deepcopy(model), EXAMPLE, channel_sparsity=0.5, channel_multiple=0)


def test_the_trainer_takes_channel_multiple(tmp_path):
    pytest.importorskip("yaml")
    from tests.nets import TINY_CHASE_RUN

    from chase.cli import main
    from chase.slim import read_slim

    out = tmp_path / "r"
    assert (
        main(
            ["train", "-q", "--out", str(tmp_path), "--set", *TINY_CHASE_RUN, "channel_multiple=4", "name=r"]
        )
        == 0
    )
    state = read_slim(out / "slim.pt")["model"]
    widths = [v.shape[0] for k, v in state.items() if k.endswith("conv1.weight") and v.ndim == 4]
    assert widths and all(w % 4 == 0 for w in widths), widths
    assert any(w not in (16, 32, 64) for w in widths), widths  # channels were removed, in blocks of 4


def test_an_alignment_that_leaves_the_sparsity_out_of_reach_says_what_will_go():
    """channel_multiple larger than every group: S_c 0.5 asked, nothing can go; said once, with the count."""
    import warnings

    from tests.nets import TinyResNet

    import chase

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = chase.prune_channels(
            TinyResNet(),
            torch.randn(1, 3, 16, 16),
            channels=chase.ChannelSpec(channel_sparsity=0.5, channel_multiple=100_000),
        )
    said = [str(w.message) for w in caught if "channel_multiple=100000" in str(w.message)]
    assert len(said) == 1 and "at most 0 of the" in said[0] and result.channel_sparsity == 0
