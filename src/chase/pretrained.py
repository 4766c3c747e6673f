"""A shareable model folder: ``model.safetensors``, ``config.json`` and a ``README.md`` model card.

``save_pretrained`` writes a trained (possibly narrowed) model so that ``from_pretrained`` rebuilds it on
another machine without pickles: the base model is built by name (or by the caller), the channel history
narrows it, and the weights load from safetensors. safetensors is imported lazily (``pip install
safetensors``; timm and transformers depend on it).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union

import torch
from torch import nn

from chase.graph import unwrap_model
from chase.io import atomic_write_bytes, atomic_write_text
from chase.slim import cpu_state_dict
from chase.surgery import replay
from chase.surgery.state import STATE_VERSION, _lookup_tensor

__all__ = ["CONFIG_FILE", "PRETRAINED_FORMAT", "WEIGHTS_FILE", "from_pretrained", "save_pretrained"]

PRETRAINED_FORMAT = "chase-pretrained/1"
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"


def _safetensors() -> Any:
    try:
        return importlib.import_module("safetensors.torch")
    except ImportError as e:
        raise ImportError(
            'save_pretrained/from_pretrained need safetensors: pip install "chase-dst[hub]"'
        ) from e


def _history_to_json(history: Mapping[str, Any]) -> dict[str, Any]:
    """The removal history with every alive vector as (size, kept positions): plain JSON."""
    if not history:
        return {}

    def enc(alive: torch.Tensor) -> dict[str, Any]:
        return {"size": int(alive.numel()), "kept": alive.nonzero().flatten().tolist()}

    return {
        "version": history["version"],
        "channels": {g: enc(a) for g, a in history["channels"].items()},
        "tensors": {t: {str(d): enc(a) for d, a in dims.items()} for t, dims in history["tensors"].items()},
    }


def _history_from_json(data: Mapping[str, Any], module: Optional[nn.Module] = None) -> dict[str, Any]:
    """The channel history a config.json holds, checked against ``module`` (the freshly built model)
    before anything is allocated: every tensor it names exists with the recorded size along the recorded
    dim, every size is an integer no larger than the model's tensors, every kept index is an integer
    inside its size (a tampered file is refused, never handed to the allocator)."""
    if not data:
        return {}
    if not isinstance(data, Mapping) or data.get("version") != STATE_VERSION:
        raise ValueError(
            f"unsupported channel history version {getattr(data, 'get', lambda k: None)('version')!r}"
        )
    tensors, channels = data.get("tensors"), data.get("channels")
    if not isinstance(tensors, Mapping) or not isinstance(channels, Mapping):
        raise ValueError("the channel history needs 'tensors' and 'channels' objects")
    bound = 0
    for name, dims in tensors.items():
        if not isinstance(dims, Mapping):
            raise ValueError(f"channel history: {name!r} must map dims to sizes")
        tensor = _lookup_tensor(module, name) if module is not None else None
        for d, v in dims.items():
            size = _size(v, f"{name!r} dim {d}")
            if tensor is not None and (
                not str(d).isdigit() or int(d) >= tensor.ndim or tensor.shape[int(d)] != size
            ):
                raise ValueError(
                    f"channel history: {name!r} dim {d} has size {size}, but the model's tensor is "
                    f"{tuple(tensor.shape)}"
                )
            bound = max(bound, size)
    for g, v in channels.items():
        size = _size(v, f"group {g!r}")
        if size > bound:
            raise ValueError(f"channel history: group {g!r} has size {size}, larger than any tensor it names")

    def dec(v: Mapping[str, Any], what: str) -> torch.Tensor:
        size, kept = int(v["size"]), v.get("kept")
        if not isinstance(kept, list) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in kept
        ):
            raise ValueError(f"channel history: {what} kept must be a list of integers")
        if any(not 0 <= k < size for k in kept) or len(set(kept)) != len(kept):
            raise ValueError(f"channel history: {what} keeps indices outside 0..{size - 1} or twice")
        alive = torch.zeros(size, dtype=torch.bool)
        alive[torch.as_tensor(kept, dtype=torch.long)] = True
        return alive

    return {
        "version": data["version"],
        "channels": {g: dec(v, f"group {g!r}") for g, v in channels.items()},
        "tensors": {
            t: {int(d): dec(v, f"{t!r} dim {d}") for d, v in dims.items()} for t, dims in tensors.items()
        },
    }


def _size(v: Any, what: str) -> int:
    if not isinstance(v, Mapping) or not isinstance(v.get("size"), int) or isinstance(v.get("size"), bool):
        raise ValueError(f"channel history: {what} needs an integer 'size' and a 'kept' list")
    if v["size"] < 1:
        raise ValueError(f"channel history: {what} has size {v['size']}")
    return v["size"]


def save_pretrained(
    source: Any,
    folder: Union[str, os.PathLike],
    *,
    history: Optional[Mapping[str, Any]] = None,
    model_name: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    recipe: Optional[Mapping[str, Any]] = None,
    speed: Optional[Mapping[str, Any]] = None,
) -> pathlib.Path:
    """Write ``folder/model.safetensors``, ``config.json`` and ``README.md``.

    Args:
        source: a sparsifier (its export is saved, with Chase's channel history, density and channel
            sparsity) or an ``nn.Module`` (saved as it is; give ``history``, e.g.
            :func:`chase.prune_channels`'s, when it was narrowed).
        model_name: the ``chase.models`` name that builds the base model (``from_pretrained`` then needs
            no builder); ``model_kwargs`` its constructor arguments (e.g. ``{"num_classes": 10}``).
        recipe: the training options to record (e.g. a run's config); ``speed``: measured speed, if any.
    With ``model_name`` the folder is checked before anything is written: the named model, narrowed by
    the history, must take the weights (what ``from_pretrained`` will do). Returns the folder.
    """
    st = _safetensors()
    folder = pathlib.Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")
    info: dict[str, Any] = {
        "format": PRETRAINED_FORMAT,
        "model": model_name,
        "model_kwargs": dict(model_kwargs or {}),
    }
    if isinstance(source, nn.Module):
        model, history = unwrap_model(source), dict(history or {})
    elif hasattr(source, "export") and hasattr(source, "export_history"):  # a sparsifier
        if history is not None:
            raise ValueError("history is for a module; a sparsifier records its own")
        model, history = source.export(), source.export_history()
        info.update(
            method=type(source).__name__,
            density=source.global_density(),
            channel_sparsity=source.channel_sparsity_now(),
        )
    else:
        raise TypeError(f"save_pretrained saves a sparsifier or an nn.Module, not a {type(source).__name__}")
    info["history"] = _history_to_json(history)
    info["widths"] = {n: int(p.shape[0]) for n, p in model.named_parameters() if p.ndim > 1}
    info["params"] = sum(p.numel() for p in model.parameters())
    info["recipe"] = dict(recipe or {})
    info["speed"] = dict(speed or {})
    # safetensors stores each storage once: tied or shared tensors are written as separate copies.
    state = {k: v.contiguous().clone() for k, v in cpu_state_dict(model).items()}
    try:  # everything that can fail is checked before the first file is written
        config_text = json.dumps(info, indent=2) + "\n"
    except TypeError as e:
        raise ValueError(f"model_kwargs, recipe and speed must be plain JSON values: {e}") from None
    if model_name is not None:
        _check_rebuild(model_name, info["model_kwargs"], history, state)
    atomic_write_bytes(folder / WEIGHTS_FILE, st.save(state, metadata={"format": PRETRAINED_FORMAT}))
    atomic_write_text(folder / CONFIG_FILE, config_text)
    atomic_write_text(folder / CARD_FILE, model_card(info))
    return folder


def _check_rebuild(name: str, kwargs: Mapping[str, Any], history: Mapping[str, Any], state: Any) -> None:
    """Raise ``ValueError`` unless ``get_model(name, **kwargs)`` narrowed by ``history`` takes ``state``."""
    from chase.models import get_model

    try:
        base = get_model(name, **kwargs)
        if history:
            replay(base, history)
        base.load_state_dict(state)
    except (ValueError, RuntimeError, TypeError) as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise ValueError(
            f"model_name={name!r} with model_kwargs={dict(kwargs)} does not rebuild this model ({first}); "
            "give the name and arguments it was built with (and the history of a narrowed module)"
        ) from None


def model_card(info: Mapping[str, Any]) -> str:
    """The README.md of a saved folder: what the model is, how it was made and how to load it."""
    name = info.get("model") or "a custom model"
    lines = [
        f"# {name}, trained with chase",
        "",
        f"- method: {info.get('method', 'n/a')}; weight density {info.get('density', 1.0):.4f}; "
        f"channels removed: {100 * info.get('channel_sparsity', 0.0):.1f}% of the prunable ones",
        f"- parameters: {info['params']:,}",
        f"- base model: `{name}` with {json.dumps(info.get('model_kwargs', {}))}",
    ]
    if info.get("speed"):
        lines.append(f"- measured speed: {json.dumps(info['speed'])}")
    if info.get("recipe"):
        lines.append(f"- recipe: {json.dumps(info['recipe'])[:2000]}")
    lines += [
        "",
        "Load it (no pickles: safetensors weights, JSON config):",
        "",
        "```python",
        "import chase",
        "model = chase.from_pretrained(PATH)"
        + ("" if info.get("model") else "  # pass build=... : the model was not saved by name"),
        "```",
        "",
    ]
    return "\n".join(lines)


def from_pretrained(
    folder: Union[str, os.PathLike], *, build: Optional[Callable[[], nn.Module]] = None
) -> nn.Module:
    """Rebuild a model ``save_pretrained`` wrote: build the base model (``build()``, or
    ``chase.models.get_model`` by the saved name), narrow it by the saved channel history, load the
    weights. Returns it in eval mode."""
    st = _safetensors()
    folder = pathlib.Path(folder)
    try:
        info = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder} is not a saved chase model ({CONFIG_FILE}: {e})") from None
    if info.get("format") != PRETRAINED_FORMAT:
        raise ValueError(
            f"{folder}: unsupported format {info.get('format')!r} (expected {PRETRAINED_FORMAT})"
        )
    where = folder / CONFIG_FILE
    kwargs = info.get("model_kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: model_kwargs must be an object of keyword arguments, got {kwargs!r}")
    if build is None:
        if not info.get("model"):
            raise ValueError(f"{folder} was not saved with a model name: pass build=")
        from chase.models import check_model_name, get_model

        try:
            check_model_name(info["model"])
            model = get_model(info["model"], **kwargs)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(
                f"{where}: cannot build model {info['model']!r} with {dict(kwargs)}: {e}"
            ) from None
    else:
        if isinstance(build, nn.Module) or not callable(build):
            raise TypeError(
                f"build must be a function that returns a freshly built model, got {type(build).__name__} "
                "(pass build=lambda: MyModel(...), not the model itself)"
            )
        model = build()
    module = unwrap_model(model)
    try:
        history = _history_from_json(info.get("history") or {}, module)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if history:
        replay(module, history)
    try:
        state = st.load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # a pickle or another file under the safetensors name: name it, never unpickle
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder / WEIGHTS_FILE} is not a safetensors file ({first})") from None
    module.load_state_dict(state)
    return model.eval()
