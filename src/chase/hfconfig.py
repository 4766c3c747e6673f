"""Models from ``transformers`` in a saved folder: the dense config that rebuilds them, verified first.

``from_pretrained`` replays the channel history on a freshly built, full-size model, so a transformers
model is rebuilt from the config it had *before* it was narrowed (the dense config), by the class its
``architectures`` names. A narrowed model's ``model.config`` may describe the narrow model instead (a
training integration may update head counts after shrinking; users edit configs too), so no config is
taken on trust. A candidate dense config is accepted only if the model built from it on the meta device
(no memory, no weights), narrowed by the history, is the saved model: the same state_dict names and
shapes, and the same integer attributes (head counts, head sizes, in/out features) on every module above
a narrowed tensor. A ``base_config`` the caller gives is the only candidate. Otherwise, in order: the
model's own config; the model's config with the integer fields of the config it was loaded from (its
``name_or_path``, when that is a local folder or already in the Hub cache; never the network); and the
model's config with the fields a narrowing rewrote solved back: each size field (hidden size, heads,
MLP width, ...) solved for the dense sizes the history records, in every order (heads times head width
can be solved two ways), then a bounded beam search for fields that set no size (BERT's head count).
If none is accepted, saving is refused before anything is written and the message says to pass
``base_config``.

The config as the saved model has it is kept too (``config_changes``: the keys that differ from the dense
config); ``from_pretrained`` sets them on the rebuilt model's config, so it reads as the saved one did.
transformers is imported only when a model from it is saved or loaded.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import nn

from chase.surgery import replay

__all__ = ["apply_config_changes", "build_model", "is_transformers_model", "record"]

log = logging.getLogger(__name__)

#: most meta builds the search for a rewritten config may try (a build of a tiny model takes about 5 ms
#: on the meta device, of a 7B one 25 ms) and how many candidates the beam search expands at each step.
MAX_SEARCH_BUILDS, SEARCH_BEAM = 1000, 4


def is_transformers_model(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers`` model class that ``transformers.<ClassName>`` rebuilds
    (a custom subclass defined elsewhere is not: its folder needs ``build=``)."""
    tf = sys.modules.get("transformers")  # a model from transformers means it is imported already
    return (
        tf is not None
        and isinstance(module, tf.PreTrainedModel)
        and getattr(tf, type(module).__name__, None) is type(module)
    )


def config_dict(config: Any) -> dict[str, Any]:
    """A transformers config (or its dict) as plain JSON (``to_json_string`` converts dtypes and the like)."""
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config)))
    return json.loads(config.to_json_string(use_diff=False))


def build_model(config: Mapping[str, Any], *, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A freshly initialised model of the class ``config["architectures"][0]`` names, built from
    ``config`` (a saved dense config) by ``cls._from_config``, in ``dtype`` (the saved weights' dtype)."""
    tf = importlib.import_module("transformers")
    name = (config.get("architectures") or [None])[0]
    cls = getattr(tf, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel)):
        raise ValueError(
            f"transformers {tf.__version__} has no model class {name!r}: install the transformers version "
            "the model was saved with, or pass build="
        )
    if config.get("model_type") != cls.config_class.model_type:
        raise ValueError(
            f"the config's model_type {config.get('model_type')!r} is not {name}'s "
            f"({cls.config_class.model_type!r})"
        )
    kwargs = {} if dtype is None else {"dtype": dtype}  # None would override the config's own dtype
    return cls._from_config(cls.config_class.from_dict(dict(config)), **kwargs)


def _dense_shapes(state: Mapping[str, torch.Tensor], history: Mapping[str, Any]) -> dict[str, tuple]:
    """The state_dict shapes of the model before narrowing: the saved shapes with every dim the history
    narrowed put back at its recorded original size."""
    shapes = {k: list(v.shape) for k, v in state.items()}
    for name, dims in (history.get("tensors") or {}).items():
        for d, alive in dims.items():
            if name in shapes:
                shapes[name][int(d)] = int(alive.numel())
    return {k: tuple(v) for k, v in shapes.items()}


def _narrowed_modules(history: Mapping[str, Any]) -> list[str]:
    """Every module above a tensor the history narrows (the root included)."""
    names = {""}
    for tensor in history.get("tensors") or {}:
        parts = tensor.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(names)


def _int_attributes(model: nn.Module, names: list[str]) -> dict[str, dict[str, int]]:
    # Integers only: head counts, head sizes and widths are ints; booleans (gradient checkpointing) and
    # floats (dropout rates) may differ between a training model and a rebuilt one without changing it.
    out = {}
    for n in names:
        try:
            module = model.get_submodule(n)
        except AttributeError:
            out[n] = {"<missing>": 1}
            continue
        out[n] = {k: v for k, v in vars(module).items() if type(v) is int and not k.startswith("_")}
    return out


class _Verifier:
    """Scores a candidate dense config by how far the model it builds, narrowed by the history, is from
    the saved model; 0 means it rebuilds the saved model exactly."""

    def __init__(self, model: nn.Module, state: Mapping[str, torch.Tensor], history: Mapping[str, Any]):
        self.history, self.builds = history, 0
        self.dense = _dense_shapes(state, history)
        self.narrow = {k: tuple(v.shape) for k, v in state.items()}
        self.modules = _narrowed_modules(history) if history else [""]
        self.attributes = _int_attributes(model, self.modules)
        self.worst = 2 * len(self.dense) + sum(len(a) + 1 for a in self.attributes.values()) + 1

    def count(self) -> None:
        """One more meta build (the search stops at :data:`MAX_SEARCH_BUILDS`)."""
        self.builds += 1

    def score(self, config: Mapping[str, Any]) -> int:
        """The number of dense shapes that differ, plus the number of shapes and module integer attributes
        that differ after narrowing by the part of the history that fits (so a candidate that fixes the
        head count but not yet the MLP width still scores better)."""
        self.builds += 1
        try:  # a candidate may be any config: whatever its constructor raises just rules it out
            with torch.device("meta"):
                candidate = build_model(config)
        except Exception as e:
            log.debug("candidate config rejected: %s", e)
            return self.worst
        tensors = dict(candidate.state_dict())
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        wrong = len(shapes.keys() ^ self.dense.keys())
        wrong += sum(shapes[k] != self.dense[k] for k in shapes.keys() & self.dense.keys())
        fits = {
            name: dims
            for name, dims in (self.history.get("tensors") or {}).items()
            if name in tensors and all(tensors[name].shape[int(d)] == a.numel() for d, a in dims.items())
        }
        try:
            if fits:
                replay(candidate, {**self.history, "tensors": fits})
        except Exception as e:  # e.g. rows that are not whole heads: compare the model as built
            log.debug("candidate config does not take the history: %s", e)
            with torch.device("meta"):
                candidate = build_model(config)
        after = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
        wrong += sum(after[k] != self.narrow[k] for k in after.keys() & self.narrow.keys())
        mine = _int_attributes(candidate, self.modules)
        for n in self.modules:
            theirs = self.attributes[n]
            wrong += sum(mine[n].get(k) != theirs.get(k) for k in mine[n].keys() | theirs.keys())
        return wrong


def meta_shapes(config: Mapping[str, Any]) -> Optional[dict[str, tuple]]:
    """Every tensor's shape of the model ``config`` builds, built on the meta device (no memory, no
    init cost); None when the architecture refuses the config."""
    try:  # any config may be tried: whatever its constructor raises just rules it out
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    except Exception as e:
        log.debug("candidate config rejected: %s", e)
        return None


def solve_field(
    config: Mapping[str, Any],
    base: dict[str, tuple],
    field: str,
    target: Mapping[str, tuple],
    on_build: Optional[Callable[[], None]] = None,
) -> Optional[int]:
    """The value of the integer ``field`` that gives the ``target`` sizes on the dims it sets, or None
    (also when that is its value already). ``base``: the shapes ``config`` builds.

    A field sets the dims that change when it grows, linearly (``size = a * value + b``: heads times head
    width, hidden units); one build at ``value + 1`` (or ``2 * value``, for an architecture that wants
    heads dividing the width) gives ``a`` and ``b``, and the target size then gives the value. Every dim
    it sets must give the same whole value."""
    value = config[field]
    for probe in (value + 1, 2 * value):
        if on_build is not None:
            on_build()
        grown = meta_shapes({**config, field: probe})
        if grown is not None and grown.keys() == base.keys():
            break
    else:
        return None
    found = {
        value + (target[k][d] - s0) * (probe - value) / (s1 - s0)
        for k, shape in base.items()
        for d, (s0, s1) in enumerate(zip(shape, grown[k]))
        if s0 != s1
    }
    if len(found) != 1 or not (new := found.pop()).is_integer() or new < 1 or new == value:
        return None
    return int(new)


def _size_solutions(config: dict[str, Any], verifier: _Verifier) -> list[dict[str, Any]]:
    """The configs that build the dense shapes, reached from ``config`` by solving its size fields one at
    a time (:func:`solve_field`) in every order. Orders matter where a size is a product (query rows are
    heads times head width: a config written for the narrowed model solves to 4 heads of 8 or to 2 heads
    of 16); the verifier then tells which one is the saved model."""
    root = meta_shapes(config)
    if root is None or root.keys() != verifier.dense.keys():
        return []
    fields = [f for f, v in config.items() if type(v) is int and v >= 1]
    states, seen, found = [(config, root)], {tuple(config[f] for f in fields)}, []
    movable = None  # the fields that set sizes at all, from the first state on
    while states and verifier.builds < MAX_SEARCH_BUILDS:
        current, base = states.pop()
        if base == verifier.dense:
            found.append(current)
            continue
        solved = {
            f: solve_field(current, base, f, verifier.dense, verifier.count) for f in (movable or fields)
        }
        solved = {f: v for f, v in solved.items() if v is not None}
        movable = movable or list(solved)
        for field, value in solved.items():
            nxt = {**current, field: value}
            key = tuple(nxt[f] for f in fields)
            if key not in seen and (shapes := meta_shapes(nxt)) is not None and shapes.keys() == base.keys():
                seen.add(key)
                states.append((nxt, shapes))
    return found


def _search(config: dict[str, Any], verifier: _Verifier) -> Optional[dict[str, Any]]:
    """Restore the integer fields of ``config`` that a narrowing rewrote: the size fields solved for the
    dense sizes (:func:`_size_solutions`), then the rest (a head count that sets no size) by a beam search.
    Each field
    changes at most once: to a size the history records as original (of a tensor, or of a group in
    units, e.g. heads) or to its value scaled back by a group's size over its kept count (a head count
    narrowed with the heads it counts). The :data:`SEARCH_BEAM` candidates closest to the saved model
    are expanded, at most :data:`MAX_SEARCH_BUILDS` builds in all. Returns the config that rebuilds the
    saved model, or None."""
    solutions = _size_solutions(config, verifier)
    if solutions:  # the search goes on from the one closest to the saved model
        scores = [verifier.score(c) for c in solutions]
        config = solutions[scores.index(min(scores))]
        log.info("dense config: %d size solutions, the closest %d away", len(solutions), min(scores))
    start = verifier.score(config)
    if start == 0:
        return config
    history = verifier.history
    groups = [(int(a.numel()), int(a.sum())) for a in history["channels"].values()]
    sizes = {int(a.numel()) for dims in history["tensors"].values() for a in dims.values()}
    sizes |= {n for n, _ in groups}  # a group's size counts its units: heads, for a head group
    options = {}
    for field, value in config.items():
        if type(value) is int and value > 0:
            scaled = {value * n // k for n, k in groups if k and value * n % k == 0}
            options[field] = sorted((sizes | scaled) - {value})
    # Fields worth changing: those one of whose values alone brings the model closer.
    first = [(verifier.score({**config, f: o}), f, o) for f, opts in options.items() for o in opts]
    useful = {f for s, f, _ in first if s < start}
    beam = [(s, {f: o}) for s, f, o in sorted(first, key=lambda t: t[0]) if f in useful][:SEARCH_BEAM]
    seen = {tuple(sorted(c.items())) for _, c in beam}
    while beam and beam[0][0] != 0:
        expanded = []
        for _, changes in beam:
            for f in sorted(useful - changes.keys()):
                for o in options[f]:
                    key = tuple(sorted({**changes, f: o}.items()))
                    if key in seen:
                        continue
                    if verifier.builds >= MAX_SEARCH_BUILDS:
                        log.info("dense config search stopped after %d builds", verifier.builds)
                        return None
                    seen.add(key)
                    expanded.append((verifier.score({**config, **dict(key)}), dict(key)))
        beam = sorted(beam + expanded, key=lambda t: t[0])[:SEARCH_BEAM]
        if not expanded:
            break
    if not beam or beam[0][0] != 0:
        return None
    log.info(
        "dense config: %s restored (the model's config had %s)",
        beam[0][1],
        {k: config[k] for k in beam[0][1]},
    )
    return {**config, **beam[0][1]}


def _loaded_from(as_is: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The model's config with its integer fields taken from the config it was loaded from (its
    ``name_or_path``: a local folder, or a Hub repo already in the cache; never the network), or nothing
    when there is no such config or it changes nothing."""
    name = as_is.get("_name_or_path")
    if not isinstance(name, str) or not name:
        return []
    try:  # not cached, not a config, another model: this candidate is just missing
        loaded = config_dict(
            sys.modules["transformers"].AutoConfig.from_pretrained(name, local_files_only=True)
        )
    except Exception as e:
        log.debug("no config to restore from at %r: %s", name, e)
        return []
    restored = {
        k: v for k, v in loaded.items() if type(v) is int and type(as_is.get(k)) is int and v != as_is[k]
    }
    return [{**as_is, **restored}] if restored else []


def record(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    history: Mapping[str, Any],
    base_config: Any = None,
) -> dict[str, Any]:
    """What ``config.json`` keeps to rebuild the transformers ``model`` (narrowed by ``history``, with
    weights ``state``): ``{"version", "config" (dense, with architectures), "config_changes"}``.

    Raises ``ValueError`` (before anything is written) when no candidate config rebuilds the model."""
    tf = sys.modules["transformers"]
    as_is = config_dict(model.config)
    as_is["architectures"] = [type(model).__name__]  # set by transformers' save_pretrained, not at init
    verifier = _Verifier(model, state, history)
    if base_config is not None:  # the caller's word is final: no other candidate
        candidates = [{**config_dict(base_config), "architectures": as_is["architectures"]}]
    else:
        candidates = [as_is, *_loaded_from(as_is)]
    dense = next((c for c in candidates if verifier.score(c) == 0), None)
    if dense is None and base_config is None and history:
        dense = _search(dict(as_is), verifier)
    if dense is None:
        given = "the base_config given" if base_config is not None else "the model's config"
        raise ValueError(
            f"{given} does not rebuild this {type(model).__name__} with its channel history (a config that "
            "describes the narrowed model cannot be replayed on): pass base_config= the model's config "
            "from before it was narrowed, e.g. transformers.AutoConfig.from_pretrained(<base model>)"
        )
    changes = {k: v for k, v in as_is.items() if k != "architectures" and dense.get(k) != v}
    log.info("transformers config recorded (%d verification builds)", verifier.builds)
    return {"version": tf.__version__, "config": dense, "config_changes": changes}


def apply_config_changes(model: nn.Module, changes: Mapping[str, Any]) -> None:
    """Set the saved model's config values (``config_changes``) on the rebuilt model's config, except
    where the config holds a nested config object (those stay as rebuilt)."""
    for key, value in changes.items():
        if not hasattr(getattr(model.config, key, None), "to_dict"):
            setattr(model.config, key, value)
