"""Attention heads as channel groups (issue 15): discovery for the three head layouts, the any-width
MultiheadAttention, physical head removal during Chase training with exact export and reload, and the
ONNX export of a slim ViT. Tiny models, CPU, seconds each."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import chase
from chase.graph.heads import HEADS_REASON, head_layout
from chase.slim import load_slim, make_slim
from chase.surgery.attention import MultiheadAttentionAnyWidth, window_any_width

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def _timm_vit() -> nn.Module:
    from chase.models import get_model

    return get_model("cifar_vit_tiny", 10, depth=2, embed_dim=64, num_heads=4)


def _tv_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(32, 4, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10)


def _timm_swin() -> nn.Module:
    return timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        num_classes=10,
        img_size=56,
        embed_dim=32,
        depths=(1, 1),
        num_heads=(2, 4),
    )


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer([4, 4], 32, [1, 1], [2, 4], [7, 7], num_classes=10)


class _Logits(nn.Module):
    """A Llama-style causal LM (transformers, built from a config: no weights) returning its logits."""

    def __init__(self, kv_heads: int = 2) -> None:
        super().__init__()
        cfg = transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=kv_heads,
            max_position_embeddings=32,
            use_cache=False,
        )
        self.lm = transformers.LlamaForCausalLM(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


IMAGE = torch.randn(2, 3, 32, 32)
MODELS = {
    # name: (build, example input, heads per group, channels per head unit, MLP group pattern)
    "timm_vit": (_timm_vit, IMAGE, 4, 16, "*mlp.fc1"),
    "torchvision_vit": (_tv_vit, IMAGE, 4, 16, "*mlp.0"),
    "timm_swin": (_timm_swin, torch.randn(2, 3, 56, 56), 2, 16, "*mlp.fc1"),
    "torchvision_swin": (_tv_swin, torch.randn(2, 3, 56, 56), 2, 16, "*mlp.0"),
    "llama_gqa": (_Logits, torch.randint(0, 64, (2, 12)), 2, 32, "*gate_proj"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_head_groups_are_found_and_kept_unless_asked(name: str) -> None:
    build, x, units, unit_channels, _ = MODELS[name]
    torch.manual_seed(0)
    model = build()
    kept = chase.channel_groups(model, x).heads()
    asked = chase.channel_groups(model, x, prune_heads=True).heads()
    assert kept and len(kept) == len(asked)
    assert all(not g.prunable and g.reason == HEADS_REASON for g in kept)
    assert all(g.prunable for g in asked)
    assert asked[0].width == units and asked[0].unit == unit_channels
    # the projections' own channel groups are gone: each tensor dim belongs to one group
    graph = chase.channel_groups(model, x, prune_heads=True)
    for g in graph.heads():
        for s in g.slots:
            owners = [h.name for h, t in graph.slots_of(s.tensor) if t.dim == s.dim]
            assert owners == [g.name], (s.tensor, owners)


def _train(model: nn.Module, x: torch.Tensor, keep: str, prune_skip: bool = False) -> chase.Chase:
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    # keep the MLP neurons so that the channel budget has to come from the heads
    sp = chase.Chase(
        model,
        opt,
        density=0.3,
        total_steps=8,
        example_inputs=x[:1],
        channel_sparsity=0.5,
        update_every=2,
        channel_every=1,
        prune_heads=True,
        prune_skip=prune_skip,
        keep_channels=[keep],
    )
    for _ in range(8):
        model(x).float().pow(2).mean().backward()
        opt.step()
        sp.step()
        opt.zero_grad()
    return sp


@pytest.mark.slow
@pytest.mark.parametrize("prune_skip", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_chase_removes_heads_physically_and_reloads_exactly(name: str, prune_skip: bool) -> None:
    build, x, units, _, keep = MODELS[name]
    torch.manual_seed(0)
    model = build()
    fresh = copy.deepcopy(model)
    sp = _train(model, x, keep, prune_skip)
    heads = [g for g in sp.groups if g.kind == "heads"]
    alive = {g.name: sp.pruner.surgery.current_width(g.name) for g in heads}
    assert heads and min(alive.values()) < units, alive
    for g in heads:  # the module's head count follows its tensors (its layout is whole again)
        module_name = g.name.removesuffix(":heads")
        layout = head_layout(module_name, model.get_submodule(module_name))
        assert layout is not None and layout.kv_heads == alive[g.name]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    slim = make_slim(model, history=sp.export_history())
    reloaded = load_slim(fresh, slim).eval()
    with torch.no_grad():
        got = reloaded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["timm_vit", "torchvision_vit", "llama_gqa"])
def test_embedding_width_goes_under_prune_skip(name: str) -> None:
    """The residual stream (patch embedding / token embedding, norms, class token, position embedding,
    every projection reading or writing it, the head's input) loses channels, with exact reload."""
    build, x, _, _, keep = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    fresh = copy.deepcopy(model)
    result = chase.prune_channels(model, x[:1], channel_sparsity=0.25, prune_skip=True, keep_channels=[keep])
    residual = [g for g in chase.channel_groups(fresh, x[:1], prune_skip=True).residual() if g.prunable]
    assert residual and all(g.name in result.removed for g in residual), (result.removed, residual)
    with torch.no_grad():
        expected = model(x)
    reloaded = load_slim(fresh, make_slim(model, history=result.history)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("size", [14, 10, 7])
def test_any_width_window_attention_matches_torchvision(shift: int, size: int) -> None:
    """The window forward heads are removed with equals torchvision's at full width (padding, shift)."""
    from torchvision.models.swin_transformer import ShiftedWindowAttention

    torch.manual_seed(0)
    ref = ShiftedWindowAttention(32, [7, 7], [shift, shift], 4).eval()
    ours = copy.deepcopy(ref)
    ours.__class__ = window_any_width(type(ref))
    x = torch.randn(2, size, size, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def _mha_pair(batch_first: bool) -> tuple[nn.MultiheadAttention, nn.MultiheadAttention]:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=batch_first)
    ours = copy.deepcopy(ref)
    ours.__class__ = MultiheadAttentionAnyWidth
    return ref.eval(), ours.eval()


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "padding", "both", "causal"])
def test_any_width_attention_matches_torch(batch_first: bool, need_weights: bool, mask: str) -> None:
    ref, ours = _mha_pair(batch_first)
    L, N = 5, 3
    q = torch.randn(N, L, 32) if batch_first else torch.randn(L, N, 32)
    kw: dict = {"need_weights": need_weights}
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    if mask in ("bool", "both"):
        kw["attn_mask"] = causal
    if mask == "float":
        kw["attn_mask"] = torch.randn(L, L)
    if mask in ("padding", "both"):
        pad = torch.zeros(N, L, dtype=torch.bool)
        pad[0, -2:] = True
        kw["key_padding_mask"] = pad
    if mask == "causal":
        kw.update(attn_mask=causal, is_causal=True)
    with torch.no_grad():
        a, wa = ref(q, q, q, **kw)
        b, wb = ours(q, q, q, **kw)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-5)
    else:
        assert wb is None


def test_any_width_attention_unbatched_and_per_head_weights() -> None:
    ref, ours = _mha_pair(False)
    q = torch.randn(5, 32)
    with torch.no_grad():
        a, wa = ref(q, q, q, average_attn_weights=False)
        b, wb = ours(q, q, q, average_attn_weights=False)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wb, wa, rtol=1e-5, atol=1e-5)


def test_prune_channels_removes_heads_of_a_gqa_decoder() -> None:
    torch.manual_seed(0)
    model = _Logits(kv_heads=2)
    x = torch.randint(0, 64, (2, 12))
    result = chase.prune_channels(
        model, x, channel_sparsity=0.3, prune_heads=True, keep_channels=["*gate_proj"]
    )
    attn = model.lm.model.layers[0].self_attn
    removed = [g for g in result.removed if g.endswith(":heads")]
    assert removed
    # a key/value head went with both query heads that read it
    widths = {n: model.get_submodule(n.removesuffix(":heads")).k_proj.out_features for n in removed}
    assert all(w == attn.head_dim for w in widths.values())
    assert all(
        model.get_submodule(n.removesuffix(":heads")).q_proj.out_features == 2 * attn.head_dim
        for n in removed
    )
    with torch.no_grad():
        assert model(x).shape == (2, 12, 64)


def test_heads_onnx_export_matches(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from chase.onnx import check_onnx, export_onnx

    for build in (_tv_vit, _timm_vit):
        torch.manual_seed(0)
        model = build().eval()
        chase.prune_channels(model, IMAGE[:1], channel_sparsity=0.4, prune_heads=True)
        assert any(isinstance(m, MultiheadAttentionAnyWidth) for m in model.modules()) or build is _timm_vit
        path = export_onnx(model, IMAGE[:1], tmp_path / f"{build.__name__}.onnx")
        check_onnx(path, model, torch.randn(2, 3, 32, 32))


def test_latency_table_profiles_heads_and_chase_uses_it() -> None:
    from chase.profile import profile_latency

    torch.manual_seed(0)
    model = _timm_vit()
    table = profile_latency(model, IMAGE[:1], prune_heads=True, fractions=(0.5,), repeats=1, warmup=0)
    assert {"blocks.0.attn:heads", "blocks.1.attn:heads"} <= set(table.groups)
    assert table.meta["prune_heads"] is True
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = chase.Chase(
        model,
        opt,
        density=0.3,
        total_steps=6,
        example_inputs=IMAGE[:1],
        prune_heads=True,
        target="latency",
        latency_ratio=0.7,
        latency_table=table,
        update_every=2,
        channel_every=1,
    )
    assert any(g.kind == "heads" for g in sp.groups)


def test_count_flops_counts_multihead_attention_projections_per_weight() -> None:
    torch.manual_seed(0)
    model = _tv_vit()
    sp = chase.RigL(model, torch.optim.SGD(model.parameters(), lr=0.1), density=0.2, total_steps=10)
    report = chase.count_flops(model, IMAGE[:1], masks=sp.masks)
    layers = {layer.name: layer for layer in report.layers}
    name = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    assert name in sp.masks and name in layers
    layer = layers[name]
    assert layer.dense == 65 * 3 * 64 * 64  # 64 patches + the class token, q/k/v rows
    assert layer.sparse == 65 * int(sp.masks[name].sum())
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in layers


def test_prune_heads_on_a_model_without_attention_says_so():
    import warnings

    from tests.nets import TinyResNet

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chase.prune_channels(
            TinyResNet(), torch.randn(1, 3, 16, 16), channels=chase.ChannelSpec(prune_heads=True)
        )
    assert sum("no attention whose heads" in str(w.message) for w in caught) == 1


def test_bert_style_heads_reshaped_with_view_and_permute_are_found_and_removed_exactly():
    """transformers' BERT/RoBERTa attention: query/key/value in one module, the output projection in its
    sibling, heads made with view + permute (issue 27)."""
    transformers = pytest.importorskip("transformers")
    from chase import ChannelSpec
    from chase.check import check_model
    from chase.graph import channel_groups
    from chase.sparsifier.one_shot import prune_channels

    config = transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=100
    )

    def build():
        return transformers.BertModel(config)

    x = (torch.randint(0, 100, (2, 12)),)
    torch.manual_seed(0)
    heads = [g for g in channel_groups(build().eval(), x, prune_heads=True) if g.kind == "heads"]
    assert [(g.name, g.width, g.prunable) for g in heads] == [
        (f"encoder.layer.{i}.attention:heads", 4, True) for i in (0, 1)
    ]
    only_heads = ChannelSpec(channel_sparsity=0.4, prune_heads=True, keep_channels=["*intermediate.dense"])
    model = build().eval()
    result = prune_channels(model, x, channels=only_heads)
    counts = [layer.attention.self.num_attention_heads for layer in model.encoder.layer]
    assert sum(result.removed.values()) == 16 * (8 - sum(counts)) > 0
    assert model(*x).last_hidden_state.shape == (2, 12, 64)
    report = check_model(build, x, only_heads)
    assert report.status == "pass" and report.heads_removed > 0 and report.rel_diff <= 1e-5, report.error


def test_distilbert_heads_with_their_own_projection_names_are_removed_exactly():
    transformers = pytest.importorskip("transformers")
    from chase import ChannelSpec
    from chase.check import check_model
    from chase.sparsifier.one_shot import prune_channels

    config = transformers.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100)
    x = (torch.randint(0, 100, (2, 12)),)
    only_heads = ChannelSpec(channel_sparsity=0.4, prune_heads=True, keep_channels=["*ffn.lin1"])
    torch.manual_seed(0)
    model = transformers.DistilBertModel(config).eval()
    result = prune_channels(model, x, channels=only_heads)
    counts = [layer.attention.n_heads for layer in model.transformer.layer]
    assert sum(result.removed.values()) == 16 * (8 - sum(counts)) > 0
    assert model(*x).last_hidden_state.shape == (2, 12, 64)
    report = check_model(lambda: transformers.DistilBertModel(config), x, only_heads)
    assert report.status == "pass" and report.heads_removed > 0 and report.rel_diff <= 1e-5, report.error
