"""Channel surgery: remove channels physically (or mask them), keeping the optimizer working.

- :class:`SurgeryState`: alive channels per group and alive positions per (tensor, dim), in original
  coordinates; its ``state_dict()`` is the history :func:`replay` needs.
- :func:`remove_channels`: slice channels out of parameters, buffers, grads, optimizer state and masks.
- :func:`alive_mask` / :func:`zero_removed`: the same removal as zeros, for a mask-only mode.
- :func:`replay`: reshape a freshly built model before loading a slim checkpoint.
- :func:`register_rule`: teach surgery the shape attributes of a module type it does not know.
"""

from chase.surgery.masking import alive_mask, zero_removed
from chase.surgery.remove import removal_problem, remove_channels
from chase.surgery.replay import replay
from chase.surgery.rules import register_rule
from chase.surgery.slicing import slice_tensors
from chase.surgery.state import RemovalPlan, SurgeryState

__all__ = [
    "RemovalPlan",
    "SurgeryState",
    "alive_mask",
    "register_rule",
    "removal_problem",
    "remove_channels",
    "replay",
    "slice_tensors",
    "zero_removed",
]
