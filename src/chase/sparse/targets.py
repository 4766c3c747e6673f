"""Which parameters of a model are sparse: discovery and dense-layer patterns."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

import torch
from torch import nn

#: Module types whose ``weight`` is made sparse by default (stem and classifier included).
DEFAULT_SPARSE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def matches(name: str, patterns: Iterable[str]) -> list[str]:
    """The fnmatch patterns (case-sensitive) that ``name`` matches: the one rule for layer patterns."""
    return [p for p in patterns if fnmatch.fnmatchcase(name, p)]


#: The projection weights of ``nn.MultiheadAttention`` (it calls them through the functional API, so they
#: are not Linear layers): sparse with the Linear layers, so attention is as sparse as the MLPs.
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def _sparse_weights(module: nn.Module, sparse_types: tuple[type[nn.Module], ...]) -> list[str]:
    """Names of ``module``'s own weights that are sparse (``weight`` of a sparse-type layer, the input
    projections of a MultiheadAttention when Linear is a sparse type)."""
    if isinstance(module, sparse_types):
        return ["weight"] if isinstance(getattr(module, "weight", None), nn.Parameter) else []
    if isinstance(module, nn.MultiheadAttention) and nn.Linear in sparse_types:
        return [a for a in ATTENTION_WEIGHTS if isinstance(getattr(module, a, None), nn.Parameter)]
    return []


def find_sparse_params(
    model: nn.Module,
    *,
    dense_layers: Sequence[str] = (),
    sparse_types: Sequence[type[nn.Module]] = DEFAULT_SPARSE_TYPES,
) -> dict[str, nn.Parameter]:
    """Return ``{parameter FQN: parameter}`` of the weights to sparsify, in module order.

    Args:
        model: the (unwrapped) model.
        dense_layers: glob patterns (``fnmatch``) matched against module names (``"conv1"``,
            ``"features.0"``, ``"layer*.0.downsample.0"``) or parameter names (``"fc.weight"``); a
            matching layer stays dense. Each pattern must match at least one sparse-type layer.
        sparse_types: module types whose ``weight`` is sparsified (with ``nn.Linear``, also the input
            projections of ``nn.MultiheadAttention``: ``"encoder.layers.0.self_attention.in_proj_weight"``).

    A weight shared by several layers (tied weights) is returned once, under its first name.

    Raises:
        ValueError: when a pattern matches nothing, or when no sparsifiable layer is left.
    """
    used: set[str] = set()
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    candidates = 0
    for mod_name, module in model.named_modules():
        for local in _sparse_weights(module, tuple(sparse_types)):
            weight = getattr(module, local)
            if id(weight) in seen:  # a tied weight (shared by two layers) has one mask, under its first name
                continue
            seen.add(id(weight))
            candidates += 1
            name = f"{mod_name}.{local}" if mod_name else local
            hits = matches(mod_name, dense_layers) + matches(name, dense_layers)
            used.update(hits)
            if not hits:
                found[name] = weight
    unused = [p for p in dense_layers if p not in used]
    if unused:
        raise ValueError(
            f"dense_layers pattern(s) {unused} match no {'/'.join(t.__name__ for t in sparse_types)} layer; "
            "patterns are fnmatch globs over module names such as 'conv1' or 'features.0'"
        )
    if not found:
        what = "all of them are kept dense by dense_layers" if candidates else "the model has none"
        kinds = "/".join(t.__name__ for t in sparse_types)
        raise ValueError(f"no sparsifiable layers: expected {kinds} weights, but {what}")
    return found


def check_optimizer_holds(optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter]) -> None:
    """Raise ValueError unless every sparse parameter is in ``optimizer``'s param groups."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in params.items() if id(p) not in held]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(
            f"the optimizer does not hold {len(missing)} of the model's sparse parameters ({shown}); "
            "build the optimizer from this model's parameters"
        )
