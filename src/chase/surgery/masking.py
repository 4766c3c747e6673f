"""Structural masks: removed channels zeroed instead of sliced ("mask-only" mode).

A mask-only run records removals with :meth:`SurgeryState.mark_removed` and zeroes the removed positions;
a sliced run uses :func:`chase.surgery.remove_channels`. Both give the same function and the same updates
at the alive positions, which the lockstep tests check.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

import torch
from torch import nn

from chase.surgery.state import SurgeryState, _lookup_tensor


def alive_mask(
    state: SurgeryState,
    tensor_name: str,
    shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Bool tensor of ``shape``: True where a position of the CURRENT tensor is alive along every dim
    that groups carry; None when no group carries ``tensor_name``.

    Along each dim the tensor may be at full size (mask-only mode: the alive vector applies as is) or
    already sliced (every current position is alive).
    """
    dims = state.tensor_alive(tensor_name)
    if not dims:
        return None
    shape = torch.Size(shape)
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    for d, alive in dims.items():
        n = shape[d]
        if n == alive.numel():
            view = [1] * len(shape)
            view[d] = n
            mask &= alive.to(mask.device).view(view)
        elif n != int(alive.sum()):
            raise ValueError(
                f"{tensor_name!r} dim {d} has size {n}: neither original ({alive.numel()}) "
                f"nor alive ({int(alive.sum())})"
            )
    return mask


@torch.no_grad()
def zero_removed(
    model: nn.Module,
    state: SurgeryState,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    masks: MutableMapping[str, torch.Tensor] | None = None,
) -> None:
    """Zero every removed position of every carried tensor, in place, without changing any shape.

    Also zeroes the same positions in a parameter's ``.grad``, its optimizer state tensors of full shape,
    and ``masks[name]`` (so a mask-based trainer keeps them zero and never regrows there). Cheap enough for
    each channel event; a trainer should fold the result into its weight masks rather than call this every
    step.
    """
    opt_state = optimizer.state if optimizer is not None else {}
    for name in state.tensor_names:
        if all(bool(a.all()) for a in state.tensor_alive(name).values()):
            continue  # nothing removed from this tensor (checked on the CPU: no device sync)
        tensor = _lookup_tensor(model, name)
        removed = ~alive_mask(state, name, tensor.shape, device=tensor.device)
        companions = [tensor, tensor.grad]
        if isinstance(tensor, nn.Parameter) and opt_state.get(tensor):
            companions += [v for v in opt_state[tensor].values() if isinstance(v, torch.Tensor)]
        if masks is not None and name in masks:
            companions.append(masks[name])
        for t in companions:
            if t is not None and t.shape == tensor.shape:
                t.masked_fill_(removed.to(t.device), 0)
