"""The model card (``README.md``) of a saved folder: Hub metadata in a YAML block, then a readable body.

The Hugging Face Hub reads a model card's metadata from a YAML block between two ``---`` lines at the
top of ``README.md`` (``library_name``, ``tags``, ``base_model``, ``datasets``, ...). Chase adds a
``chase:`` mapping there with what it measured (density, channel sparsity, parameters, MACs, speed and
the backend it was measured under). The YAML is written here without PyYAML (``import chase`` stays
light and the library does not depend on it): every string is a JSON string, which is a valid YAML
double-quoted scalar, and every float keeps a decimal point, which YAML 1.1 readers need to read
``1.0e-05`` as a number.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Optional

__all__ = ["LIBRARY_NAME", "TAGS", "card_metadata", "check_strings", "model_card", "to_yaml"]

#: the ``library_name`` of the card (the Hub lists libraries by lowercase name).
LIBRARY_NAME = "chase"
#: tags every card carries; a transformers model adds ``transformers`` and its ``model_type``.
TAGS = ("chase", "sparse", "pruning", "channel-pruning", "dynamic-sparse-training")
#: keys of ``speed`` copied into the card's ``chase:`` block (the whole mapping stays in config.json).
SPEED_KEYS = ("speedup", "backend", "device", "dtype", "batch_size", "latency_ms", "throughput")
#: recipe ``dataset`` values that are the trainer's data sources, not datasets one could name on the Hub.
NOT_DATASETS = frozenset({"synthetic", "imagefolder"})

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
# Strings written without quotes: they start with a letter (so never read as a number) and hold no
# character YAML gives a meaning to; the words YAML 1.1 reads as booleans or null are quoted.
_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./-]*\Z")
_RESERVED = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})
# Characters YAML does not allow raw inside a double-quoted scalar (JSON leaves them as they are).
_UNPRINTABLE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff]")


def _scalar(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if "." not in mantissa:  # 1e-05 is a string to YAML 1.1 readers; 1.0e-05 is a float
            text = f"{mantissa}.0{e}{exponent}"
        return text
    if isinstance(value, str):
        if _PLAIN.match(value) and value.lower() not in _RESERVED:
            return value  # a name, a tag or a repo id: left plain, as people write card metadata
        return _UNPRINTABLE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", json.dumps(value, ensure_ascii=False))
    raise TypeError(f"card metadata holds strings, numbers, lists and mappings, not {type(value).__name__}")


def _key(key: Any) -> str:
    key = str(key)
    return key if _PLAIN_KEY.match(key) and key.lower() not in _RESERVED else _scalar(key)


def to_yaml(data: Mapping[str, Any], indent: int = 0) -> str:
    """Block-style YAML of a mapping of strings, numbers, booleans, None, lists and mappings (what
    ``yaml.safe_load`` reads back as the same values)."""
    pad, lines = " " * indent, []
    for key, value in data.items():
        if isinstance(value, Mapping):
            lines.append(f"{pad}{_key(key)}: {{}}" if not value else f"{pad}{_key(key)}:")
            if value:
                lines.append(to_yaml(value, indent + 2).rstrip("\n"))
        elif isinstance(value, (list, tuple)):
            if not value:
                lines.append(f"{pad}{_key(key)}: []")
                continue
            lines.append(f"{pad}{_key(key)}:")
            for item in value:
                if isinstance(item, (Mapping, list, tuple)):
                    raise TypeError(f"card metadata: {key!r} must be a list of strings or numbers")
                lines.append(f"{pad}- {_scalar(item)}")
        else:
            lines.append(f"{pad}{_key(key)}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def _datasets(info: Mapping[str, Any]) -> list[str]:
    """The datasets given to ``save_pretrained``, else the recipe's ``dataset`` when it names one."""
    if info.get("datasets"):
        return [str(d) for d in info["datasets"]]
    dataset = (info.get("recipe") or {}).get("dataset")
    return [dataset] if isinstance(dataset, str) and dataset and dataset not in NOT_DATASETS else []


def card_metadata(info: Mapping[str, Any]) -> dict[str, Any]:
    """The Hub metadata of a saved folder's ``config.json`` contents ``info``."""
    tags = list(TAGS)
    hf = info.get("transformers") or {}
    if hf:
        tags += ["transformers", str(hf["config"].get("model_type", ""))]
    tags += [str(t) for t in info.get("tags") or ()]
    meta: dict[str, Any] = {"library_name": LIBRARY_NAME, "tags": list(dict.fromkeys(t for t in tags if t))}
    if info.get("license"):
        meta["license"] = info["license"]
    if info.get("base_model"):
        meta["base_model"] = info["base_model"]
    if _datasets(info):
        meta["datasets"] = _datasets(info)
    numbers: dict[str, Any] = {"method": info["method"]} if info.get("method") else {}
    numbers.update({k: info[k] for k in ("density", "channel_sparsity", "params") if info.get(k) is not None})
    for k in ("density", "channel_sparsity"):  # counted in float32: 0.30000003580369267 reads as 0.3
        if isinstance(numbers.get(k), float) and math.isfinite(numbers[k]):
            numbers[k] = round(numbers[k], 6)
    numbers.update(info.get("results") or {})
    numbers.update({k: v for k, v in (info.get("speed") or {}).items() if k in SPEED_KEYS})
    meta["chase"] = numbers
    return meta


def _base_line(info: Mapping[str, Any]) -> str:
    hf = info.get("transformers") or {}
    if hf:
        arch = (hf["config"].get("architectures") or ["?"])[0]
        return f"- base model: `{arch}` from transformers, rebuilt from the config saved with it"
    name = info.get("model") or "a custom model"
    return f"- base model: `{name}` with {json.dumps(info.get('model_kwargs', {}))}"


def model_card(info: Mapping[str, Any], repo_id: Optional[str] = None) -> str:
    """The README.md of a saved folder: Hub metadata, what the model is, how it was made and how to load
    it (``repo_id``: the Hub repository it goes to, named in the loading example)."""
    hf = info.get("transformers") or {}
    arch = (hf["config"].get("architectures") or [None])[0] if hf else None
    title = info.get("model") or arch or "a custom model"
    needs_build = not info.get("model") and not hf
    args = (json.dumps(repo_id) if repo_id else '"path/to/folder"') + (
        ", build=MyModel" if needs_build else ""
    )
    notes = [] if repo_id else ['or the Hub repo id, "user/repo"']
    if needs_build:
        notes.append("MyModel() builds the base model: it was saved without a name")
    lines = [
        "---",
        to_yaml(card_metadata(info)).rstrip("\n"),
        "---",
        "",
        f"# {title}, trained with chase",
        "",
    ]
    if info.get("method"):
        lines.append(
            f"- method: {info['method']}; weight density {info.get('density', 1.0):.4f}; "
            f"channels removed: {100 * info.get('channel_sparsity', 0.0):.1f}% of the prunable ones"
        )
    narrowed = len((info.get("history") or {}).get("tensors") or {})
    if narrowed:
        lines.append(f"- narrowed: {narrowed} tensors, by the channel history in config.json")
    lines += [f"- parameters: {info['params']:,}", _base_line(info)]
    if info.get("base_model"):
        lines.append(f"- fine-tuned from: `{info['base_model']}`")
    if _datasets(info):
        lines.append(f"- datasets: {', '.join(_datasets(info))}")
    if info.get("results"):
        lines.append(f"- results: {json.dumps(info['results'])}")
    if info.get("speed"):
        lines.append(f"- measured speed: {json.dumps(info['speed'])}")
    if info.get("recipe"):
        lines.append(f"- recipe: {json.dumps(info['recipe'])[:2000]}")
    lines += [
        "",
        "Load it (no pickles: safetensors weights, JSON config; `pip install chase-dst[hub]`):",
        "",
        "```python",
        "import chase",
        f"model = chase.from_pretrained({args})" + (f"  # {'; '.join(notes)}" if notes else ""),
        "```",
        "",
    ]
    return "\n".join(lines)


def check_strings(name: str, values: Optional[Sequence[str]]) -> list[str]:
    """``values`` as a list of non-empty strings, or ``ValueError`` naming ``name``."""
    if values is None:
        return []
    if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{name} must be a list of non-empty strings, got {values!r}")
    return list(values)
