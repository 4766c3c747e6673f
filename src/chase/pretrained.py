"""A shareable model folder: ``model.safetensors``, ``config.json`` and a ``README.md`` model card.

``save_pretrained`` writes a trained (possibly narrowed) model so that ``from_pretrained`` rebuilds it on
another machine without pickles: the base model is built by name, from its saved transformers config
(:mod:`chase.hfconfig`) or by the caller, the channel history narrows it, and the weights load from
safetensors. ``from_pretrained`` takes a local folder or a Hugging Face Hub repo id (downloaded through
the Hub's cache, :mod:`chase.hub`); ``push_to_hub`` uploads a folder. safetensors and huggingface_hub
are imported lazily (``pip install "chase-dst[hub]"``).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch
from torch import nn

from chase import hfconfig, hub
from chase.card import check_strings, model_card
from chase.graph import unwrap_model
from chase.io import atomic_write_bytes, atomic_write_text
from chase.slim import cpu_state_dict
from chase.surgery import replay
from chase.surgery.state import STATE_VERSION, _lookup_tensor

__all__ = [
    "CONFIG_FILE",
    "PRETRAINED_FORMAT",
    "WEIGHTS_FILE",
    "from_pretrained",
    "push_to_hub",
    "save_pretrained",
]

log = logging.getLogger(__name__)

PRETRAINED_FORMAT = "chase-pretrained/1"
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
#: what from_pretrained reads from a Hub repo (the card is for people), and what push_to_hub uploads.
NEEDED_FILES, FOLDER_FILES = (CONFIG_FILE, WEIGHTS_FILE), (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE)


def _safetensors() -> Any:
    try:
        return importlib.import_module("safetensors.torch")
    except ImportError as e:
        raise ImportError(f"save_pretrained/from_pretrained need safetensors: {hub.HUB_EXTRA}") from e


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
    results: Optional[Mapping[str, Any]] = None,
    base_model: Optional[str] = None,
    datasets: Optional[Sequence[str]] = None,
    tags: Sequence[str] = (),
    license: Optional[str] = None,
    base_config: Any = None,
) -> pathlib.Path:
    """Write ``folder/model.safetensors``, ``config.json`` and ``README.md``.

    Args:
        source: a sparsifier (its export is saved, with Chase's channel history, density and channel
            sparsity) or an ``nn.Module`` (saved as it is; give ``history``, e.g.
            :func:`chase.prune_channels`'s, when it was narrowed).
        model_name: the ``chase.models`` name that builds the base model (``from_pretrained`` then needs
            no builder); ``model_kwargs`` its constructor arguments (e.g. ``{"num_classes": 10}``).
        recipe: the training options to record (e.g. a run's config); ``speed``: measured speed, if any
            (its ``speedup``, ``backend``, ``device``, ``dtype``, ``batch_size`` keys go into the card's
            metadata too); ``results``: other measured numbers to publish (e.g. ``{"macs": 2.1e7,
            "macs_ratio": 0.5, "top1": 91.2}``).
        base_model: the Hub id of the model this one was trained from (for a transformers model loaded
            from the Hub, its ``config.name_or_path`` when not given); ``datasets``: Hub ids of the
            training data (the recipe's ``dataset`` when not given); ``tags``, ``license``: more card
            metadata.
        base_config: for a ``transformers`` model whose ``model.config`` was rewritten after narrowing
            in a way Chase cannot undo: its config from before (a ``PretrainedConfig`` or its dict).

    A ``transformers`` model (one ``transformers.<ClassName>`` names) is saved with its dense config, so
    ``from_pretrained`` rebuilds it with no ``build=`` (see :mod:`chase.hfconfig` for how the dense config
    is found and verified). With ``model_name`` the folder is checked before anything is written: the
    named model, narrowed by the history, must take the weights (what ``from_pretrained`` will do). Every
    check runs before the first file is written. Returns the folder.
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
    info["results"] = dict(results or {})
    info["datasets"] = check_strings("datasets", datasets)
    info["tags"] = check_strings("tags", tags)
    info["license"], info["base_model"] = license, base_model
    # safetensors stores each storage once: tied or shared tensors are written as separate copies.
    state = {k: v.contiguous().clone() for k, v in cpu_state_dict(model).items()}
    if model_name is None and hfconfig.is_transformers_model(model):
        info["transformers"] = hfconfig.record(model, state, history, base_config)
        dense = info["transformers"]["config"]
        if _hub_id(dense.get("_name_or_path")) is None:  # a local path says nothing to others: not shared
            dense["_name_or_path"] = ""
        if base_model is None:
            info["base_model"] = _hub_id(dense.get("_name_or_path"))
    elif base_config is not None:
        raise ValueError("base_config is for a transformers model saved without model_name")
    try:  # everything that can fail is checked before the first file is written
        config_text = json.dumps(info, indent=2) + "\n"
        card_text = model_card(info)
    except TypeError as e:
        raise ValueError(f"model_kwargs, recipe, speed and results must be plain JSON values: {e}") from None
    if model_name is not None:
        _check_rebuild(model_name, info["model_kwargs"], history, state)
    atomic_write_bytes(folder / WEIGHTS_FILE, st.save(state, metadata={"format": PRETRAINED_FORMAT}))
    atomic_write_text(folder / CONFIG_FILE, config_text)
    atomic_write_text(folder / CARD_FILE, card_text)
    return folder


def _hub_id(name: Any) -> Optional[str]:
    """``name`` when it is a Hub repo id (a transformers model's ``name_or_path``), not a local path."""
    if isinstance(name, str) and hub.looks_like_repo_id(name) and not os.path.exists(name):
        return name
    return None


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


def _resolve(
    name_or_path: Union[str, os.PathLike],
    revision: Optional[str],
    token: Union[str, bool, None],
    cache_dir: Union[str, os.PathLike, None],
) -> pathlib.Path:
    """The local folder of ``name_or_path``: itself when it is a folder, else the Hub repo it names,
    fetched into (or read from) the Hub's cache."""
    path = pathlib.Path(name_or_path)
    if path.is_dir():  # a local folder wins over a repo of the same name, as in transformers
        if revision is not None:
            log.warning("%s is a local folder: revision=%r is ignored", path, revision)
        return path
    if path.exists():
        raise ValueError(f"{path} is a file: give the folder save_pretrained wrote, or a Hub repo id")
    if isinstance(name_or_path, str) and hub.looks_like_repo_id(name_or_path):
        return hub.download(name_or_path, NEEDED_FILES, revision=revision, token=token, cache_dir=cache_dir)
    raise FileNotFoundError(f"{name_or_path} is not a folder (nor a Hub repo id such as 'user/repo')")


def _read_info(folder: pathlib.Path) -> dict[str, Any]:
    """The checked ``config.json`` of a saved folder."""
    try:
        info = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{folder} is not a saved chase model ({CONFIG_FILE}: {e})") from None
    if isinstance(info, dict) and "format" not in info and isinstance(info.get("model_type"), str):
        # e.g. ChaseCallback's export_dir when the model's config describes its widths
        raise ValueError(
            f"{folder} is a model folder in transformers' own format (model_type {info['model_type']!r}), "
            "not one chase.save_pretrained wrote: load it with transformers.AutoModel...from_pretrained "
            "and share it with the model's push_to_hub"
        )
    if not isinstance(info, dict) or info.get("format") != PRETRAINED_FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise ValueError(f"{folder}: unsupported format {found!r} (expected {PRETRAINED_FORMAT})")
    return info


def _load_weights(st: Any, folder: pathlib.Path) -> dict[str, torch.Tensor]:
    try:
        return st.load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # a pickle or another file under the safetensors name: name it, never unpickle
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{folder / WEIGHTS_FILE} is not a safetensors file ({first})") from None


def _build_transformers(info: Mapping[str, Any], state: Mapping[str, torch.Tensor], where: Any) -> nn.Module:
    """The dense transformers model the saved config describes, checked first on the meta device: built
    from the config and narrowed by the history, it must have the weights' names and shapes (a tampered
    config is refused before any memory is allocated for it)."""
    record = info["transformers"]
    config = record.get("config") if isinstance(record, Mapping) else None
    if not isinstance(config, Mapping) or not isinstance(record.get("config_changes", {}), Mapping):
        raise ValueError(f"{where}: 'transformers' must hold a 'config' object and 'config_changes'")
    try:
        importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError(f"{where} holds a transformers model: pip install transformers") from e
    floating = {v.dtype for v in state.values() if v.is_floating_point()}
    dtype = floating.pop() if len(floating) == 1 else None  # rebuild in the saved precision
    try:  # the config is untrusted input: whatever it makes the constructor raise is reported
        with torch.device("meta"):
            probe = hfconfig.build_model(config)
        history = _history_from_json(info.get("history") or {}, probe)
        if history:
            replay(probe, history)
    except Exception as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise ValueError(f"{where}: cannot rebuild the saved transformers model ({first})") from None
    shapes = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in state.items()}
    if shapes != saved:
        wrong = sorted(k for k in shapes.keys() | saved.keys() if shapes.get(k) != saved.get(k))
        raise ValueError(
            f"{where}: the saved transformers config and channel history do not give the weights' shapes "
            f"({len(wrong)} differ, e.g. {wrong[:3]})"
        )
    return hfconfig.build_model(config, dtype=dtype)


def from_pretrained(
    name_or_path: Union[str, os.PathLike],
    *,
    build: Optional[Callable[[], nn.Module]] = None,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
) -> nn.Module:
    """Rebuild a model ``save_pretrained`` wrote: build the base model (``build()``, else
    ``chase.models.get_model`` by the saved name, else the saved transformers config's class), narrow it
    by the saved channel history, load the weights. Returns it in eval mode.

    Args:
        name_or_path: a folder ``save_pretrained`` wrote, or a Hugging Face Hub repo id (``"user/repo"``)
            when no such folder exists: its ``config.json`` and ``model.safetensors`` are downloaded into
            the Hub's cache (``HF_HUB_CACHE``, ``HF_HOME``), or read from it with ``HF_HUB_OFFLINE=1``.
        revision: a branch, tag or commit hash of the Hub repo (its default branch when None).
        token: a Hub token for a private or gated repo (the logged-in token when None).
        cache_dir: another cache folder than the Hub's default.

    Raises:
        FileNotFoundError: neither a folder nor a Hub repo; not cached in offline mode (the message says
            how to fix it).
        ValueError: the folder is not a chase model, or its config is invalid or tampered with.
    """
    st = _safetensors()
    folder = _resolve(name_or_path, revision, token, cache_dir)
    info = _read_info(folder)
    where = folder / CONFIG_FILE
    kwargs = info.get("model_kwargs", {})
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}: model_kwargs must be an object of keyword arguments, got {kwargs!r}")
    if build is not None and (isinstance(build, nn.Module) or not callable(build)):
        raise TypeError(
            f"build must be a function that returns a freshly built model, got {type(build).__name__} "
            "(pass build=lambda: MyModel(...), not the model itself)"
        )
    state = _load_weights(st, folder)
    if build is not None:
        model = build()
    elif info.get("model"):
        from chase.models import check_model_name, get_model

        try:
            check_model_name(info["model"])
            model = get_model(info["model"], **kwargs)
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(
                f"{where}: cannot build model {info['model']!r} with {dict(kwargs)}: {e}"
            ) from None
    elif info.get("transformers"):
        model = _build_transformers(info, state, where)
    else:
        raise ValueError(
            f"{name_or_path} was not saved with a model name or a transformers config: pass build="
        )
    module = unwrap_model(model)
    try:
        history = _history_from_json(info.get("history") or {}, module)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if history:
        replay(module, history)
    module.load_state_dict(state)
    if info.get("transformers") and build is None and not info.get("model"):
        hfconfig.apply_config_changes(module, info["transformers"].get("config_changes") or {})
    return model.eval()


def push_to_hub(
    source: Any,
    repo_id: str,
    *,
    revision: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[str, bool, None] = None,
    commit_message: str = "Upload a model trained with chase",
    **save_kwargs: Any,
) -> str:
    """Upload a model to the Hugging Face Hub repo ``repo_id`` (created if needed, ``private`` when
    created), in one commit to the branch ``revision`` (created if needed; the default branch when None).

    Args:
        source: a folder ``save_pretrained`` wrote (its ``config.json``, ``model.safetensors`` and
            ``README.md`` are uploaded, nothing else), or a sparsifier or module, saved first by
            :func:`save_pretrained` with ``save_kwargs`` (``history``, ``model_name``, ``recipe``, ...)
            into a temporary folder whose card names ``repo_id``.
        token: a Hub token with write access (the logged-in token when None).

    Returns:
        The commit's URL (huggingface_hub's ``CommitInfo``, a ``str``).
    """
    if not isinstance(repo_id, str) or not hub.looks_like_repo_id(repo_id):
        raise ValueError(f"repo_id must be a Hub repo id such as 'user/my-model', got {repo_id!r}")
    hub.require_online()
    upload = dict(revision=revision, private=private, token=token, commit_message=commit_message)
    if isinstance(source, (str, os.PathLike)):
        if save_kwargs:
            raise TypeError(
                f"{sorted(save_kwargs)} apply when push_to_hub saves a model; {source} is a folder"
            )
        folder = pathlib.Path(source)
        _read_info(folder)  # a chase folder, not any folder
        if not (folder / WEIGHTS_FILE).is_file():
            raise ValueError(f"{folder} has no {WEIGHTS_FILE}: write it with chase.save_pretrained")
        return hub.upload(folder, repo_id, FOLDER_FILES, **upload)
    with tempfile.TemporaryDirectory(prefix="chase-push-") as tmp:
        folder = save_pretrained(source, tmp, **save_kwargs)
        # The card's loading example names the repo the folder goes to.
        atomic_write_text(folder / CARD_FILE, model_card(_read_info(folder), repo_id=repo_id))
        return hub.upload(folder, repo_id, FOLDER_FILES, **upload)
