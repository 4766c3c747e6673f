"""Attention heads on the issue-15 model list: does Chase remove heads (and MLP neurons) physically while
training, and does the exported model reload with the same outputs?

For torchvision's ViT-B/16 and Swin-T, timm's DeiT-Tiny, DeiT-Small, ViT-Tiny and ViT-Small (224) and
Swin-T, and a small Llama-style decoder built with ``transformers`` from a config (RMSNorm, rotary
embeddings, SwiGLU, grouped-query attention: 8 query heads sharing 2 key/value heads), with
``prune_heads`` on and ``prune_skip`` off, twice (MLP neurons and heads; heads only, the MLP groups kept
with ``keep_channels`` so that the channel budget must come from the heads): ``chase.check.check_model``
trains 6 steps on random data with a channel event each step from step 2 (S_c 0.5), exports, reloads
into a fresh model and compares the outputs in eval mode (the Llama model through a small wrapper that
returns its logits, with token ids as input). Reported per model: status, prunable groups and head
groups (after the shape dry run), the head units removed, parameter ratio of the slim model, largest
relative output difference, seconds.

    python benchmarks/heads_models.py                       # about 6 minutes on 2 cores
    python benchmarks/heads_models.py --only timm:deit_tiny_patch16_224 --out /tmp/heads
    python benchmarks/heads_models.py --only bert,distilbert --name heads_models_encoders
"""

from __future__ import annotations

import argparse
import pathlib
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import common
from chase import ChannelSpec
from chase.check import check_model
from chase.models import get_model

#: model -> the pattern of its MLP groups, kept in the "heads only" runs so the budget must come from heads.
MODELS = {
    "vit_b_16": "*mlp.0",
    "swin_t": "*mlp.0",
    "timm:deit_tiny_patch16_224": "*mlp.fc1",
    "timm:deit_small_patch16_224": "*mlp.fc1",
    "timm:vit_tiny_patch16_224": "*mlp.fc1",
    "timm:vit_small_patch16_224": "*mlp.fc1",
    "timm:swin_tiny_patch4_window7_224": "*mlp.fc1",
    "llama_gqa": "*gate_proj",
    # issue 27: encoders from transformers whose attention reshapes to heads with view + permute
    "bert": "*intermediate.dense",
    "distilbert": "*ffn.lin1",
}


class LlamaLogits(nn.Module):
    """A 4-layer Llama-style decoder from ``transformers`` (config only, no weights) returning logits."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=512,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=128,
            use_cache=False,
        )
        self.lm = transformers.LlamaForCausalLM(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(ids).logits


class EncoderStates(nn.Module):
    """A 4-layer BERT or DistilBERT encoder from ``transformers`` (config only, no weights, width 256, 4
    heads) returning its last hidden states."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        import transformers

        if kind == "bert":
            cfg = transformers.BertConfig(
                vocab_size=512,
                hidden_size=256,
                num_hidden_layers=4,
                num_attention_heads=4,
                intermediate_size=1024,
            )
            self.encoder = transformers.BertModel(cfg, add_pooling_layer=False)
        else:
            cfg = transformers.DistilBertConfig(
                vocab_size=512, dim=256, n_layers=4, n_heads=4, hidden_dim=1024
            )
            self.encoder = transformers.DistilBertModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(ids).last_hidden_state


def _case(name: str) -> tuple[Callable[[], nn.Module], torch.Tensor]:
    if name == "llama_gqa":
        return LlamaLogits, torch.randint(0, 512, (2, 64))
    if name in ("bert", "distilbert"):
        return (lambda: EncoderStates(name)), torch.randint(0, 512, (2, 64))
    return (lambda: get_model(name, num_classes=10)), torch.randn(2, 3, 224, 224)


def run_one(name: str, heads_only: bool) -> dict[str, Any]:
    build, x = _case(name)
    keep = [MODELS[name]] if heads_only else []
    t = time.perf_counter()
    channels = ChannelSpec(channel_sparsity=0.5, prune_heads=True, keep_channels=keep)
    report = check_model(build, x, channels, steps=6)
    row = {"model": name, "pruned": "heads only" if heads_only else "neurons + heads", "keep_channels": keep}
    return {**row, "seconds": time.perf_counter() - t, **report.to_dict()}


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        "# Attention heads removed while training: the issue-15 model list",
        "",
        "Each model twice: MLP neurons and heads compete for the channel budget (`neurons + heads`), and the "
        "MLP groups kept with `keep_channels` so that the budget must come from the heads (`heads only`).",
        "",
        f"{m['cpu']} ({m['cpu_count']} cores), torch {m['torch']}, {m['date']}. "
        "`chase.check.check_model` with `prune_heads=True`, `prune_skip=False`, S_c 0.5, density 0.2, "
        "6 steps on random data (a channel "
        "event every step from step 2), export, reload into a fresh model, outputs compared in eval mode.",
        "",
        "| model | pruned | status | prunable groups | head groups | head units removed | "
        "params slim / dense | max rel. diff | seconds | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["rows"]:
        ratio = r["params_slim"] / r["params_dense"] if r.get("params_dense") else float("nan")
        note = (r.get("error") or "")[:120] or "; ".join(w[:160] for w in r.get("warnings", [])[:1])
        lines.append(
            f"| {r['model']} | {r['pruned']} | {r['status']} | {r.get('prunable_groups', '-')} | "
            f"{r.get('head_groups', '-')} | "
            f"{r.get('heads_removed', '-')} | {ratio:.3f} | "
            f"{r.get('rel_diff', float('nan')):.1e} | {r['seconds']:.0f} | {note} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="comma-separated model names")
    p.add_argument("--out", default=str(common.RESULTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="heads_models", help="result files' name (NAME.json, NAME.md)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    payload: dict[str, Any] = {"machine": common.machine("cpu"), "rows": []}
    for name in names:
        for heads_only in (False, True):
            payload["rows"].append(run_one(name, heads_only))
            common.write(args.name, payload, markdown(payload), folder=pathlib.Path(args.out))
            print(markdown(payload).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
