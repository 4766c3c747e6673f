"""Inference and training cost in multiply-accumulates (MACs) of Conv1d/2d/3d and Linear layers.

Three inference counts, as in the Chase paper (Section 4 of the algorithm notes):

* dense: every weight of the model as given counts;
* sparse (theoretical): only kept weights count, ``kept weights x output positions`` per layer;
* GPU-supported: the dense count of the slim (physically narrowed) model -- pass the slim model and read
  ``dense``, with ``reference=`` the original dense model for the ratio.

One FLOP is taken as one MAC here (biases, norms and activations are not counted), the convention of the
4.1 G figure quoted for ResNet-50 at 224; multiply by 2 for "multiply and add as two operations".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from chase.graph import unwrap_model

log = logging.getLogger(__name__)

__all__ = ["FlopReport", "LayerFlops", "StepCost", "TrainingFlops", "count_flops", "training_flops"]

COUNTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _sdpa_cpu(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU flash-attention kernel, which FlopCounterMode has no formula for."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


#: formulas for ops FlopCounterMode does not count by itself (shapes in, FLOPs out).
_EXTRA_FORMULAS: dict[Any, Any] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu


@dataclass
class LayerFlops:
    """MACs of one Conv/Linear layer for ONE example (the batch is divided out).

    Attributes:
        name: weight parameter name (``"layer1.0.conv1.weight"``), the key ``masks`` use.
        kind: module class name.
        shape: weight shape as run.
        positions: output positions per example that each weight is used at (spatial size for a conv).
        weights: weight count; ``kept``: nonzero mask entries (== ``weights`` without a mask).
        dense, sparse: ``positions x weights`` and ``positions x kept``, summed over calls.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    positions: int
    weights: int
    kept: int
    dense: int
    sparse: int


@dataclass
class FlopReport:
    """Per-layer and total MACs of one forward, per example; ratios against ``reference_dense``."""

    layers: list[LayerFlops] = field(default_factory=list)
    reference_dense: Optional[int] = None
    #: MACs outside the counted weights (attention matmuls, other functional products), counted by torch's
    #: FlopCounterMode; dense in both totals.
    other: int = 0

    @property
    def dense(self) -> int:
        return sum(layer.dense for layer in self.layers) + self.other

    @property
    def sparse(self) -> int:
        return sum(layer.sparse for layer in self.layers) + self.other

    @property
    def density(self) -> float:
        """MAC-weighted density: sparse / dense MACs of this model."""
        return self.sparse / self.dense if self.dense else 1.0

    @property
    def dense_ratio(self) -> Optional[float]:
        """This model's dense MACs over the reference's (the slim model's GPU-supported ratio)."""
        return self.dense / self.reference_dense if self.reference_dense else None

    @property
    def sparse_ratio(self) -> Optional[float]:
        """Sparse MACs over the reference's dense MACs (the theoretical ratio)."""
        return self.sparse / self.reference_dense if self.reference_dense else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense,
            "sparse": self.sparse,
            "reference_dense": self.reference_dense,
            "dense_ratio": self.dense_ratio,
            "sparse_ratio": self.sparse_ratio,
            "other": self.other,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def table(self) -> str:
        """Per-layer table and totals, in MMACs."""
        rows = [f"{'layer':<44} {'positions':>9} {'kept/weights':>20} {'dense M':>10} {'sparse M':>10}"]
        for s in self.layers:
            rows.append(
                f"{s.name:<44} {s.positions:>9} {f'{s.kept}/{s.weights}':>20} "
                f"{s.dense / 1e6:>10.3f} {s.sparse / 1e6:>10.3f}"
            )
        if self.other:
            rows.append(
                f"{'other (attention, functional matmuls)':<44} {'':>9} {'':>20} "
                f"{self.other / 1e6:>10.3f} {self.other / 1e6:>10.3f}"
            )
        rows.append(f"{'total':<44} {'':>9} {'':>20} {self.dense / 1e6:>10.3f} {self.sparse / 1e6:>10.3f}")
        return "\n".join(rows)


@torch.no_grad()
def count_flops(
    model: nn.Module,
    example_inputs: Any,
    masks: Optional[Mapping[str, torch.Tensor]] = None,
    *,
    reference: Optional[nn.Module] = None,
) -> FlopReport:
    """Count the MACs of one eval-mode forward of ``example_inputs`` through ``model``, per example.

    Forward hooks on every Conv1d/2d/3d and Linear record the output size (so padding, stride, dilation
    and groups are what the layer really did); they are removed afterwards and the model's train/eval
    mode is restored. ``nn.MultiheadAttention``'s projections, which it applies through the functional
    API, are counted per weight too (its ``in_proj_weight`` is sparse with the Linear layers). Every other
    matmul, convolution and attention op of the forward (attention scores and values) is counted by
    torch's ``FlopCounterMode`` and reported as ``other`` (dense: it has no mask). ``masks`` ({weight
    parameter name: bool mask}, e.g. ``sparsifier.masks``) give the sparse count; without them sparse ==
    dense. ``reference`` (the original dense model, same input) is counted too and its dense MACs stored
    for the ratios.
    ``example_inputs`` is a tensor, a tuple of positional arguments or a dict of keyword arguments (a
    transformers model's ``input_ids=...``); the first tensor's first dimension is the batch.
    """
    module = unwrap_model(model)
    names = {m: n for n, m in module.named_modules()}
    report = FlopReport()
    seen: dict[str, LayerFlops] = {}
    kwargs = dict(example_inputs) if isinstance(example_inputs, Mapping) else {}
    args = () if kwargs else example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    # per example: a tensor argument's batch, or a list of images' length (a detector's input)
    batch = next(
        (
            a.shape[0] if isinstance(a, torch.Tensor) else len(a)
            for a in (*args, *kwargs.values())
            if isinstance(a, (torch.Tensor, list))
        ),
        1,
    )

    fired: dict[str, int] = {}

    def record(name: str, kind: str, w: torch.Tensor, positions: int, rows: slice = slice(None)) -> None:
        part = w[rows]
        mask = masks.get(name) if masks is not None else None
        kept = int(mask[rows].count_nonzero()) if mask is not None else part.numel()
        if name not in seen:
            seen[name] = LayerFlops(name, kind, tuple(w.shape), positions, w.numel(), 0, 0, 0)
            report.layers.append(seen[name])
            seen[name].kept = int(mask.count_nonzero()) if mask is not None else w.numel()
        seen[name].dense += positions * part.numel()  # a weight used twice (shared layer) counts twice
        seen[name].sparse += positions * kept

    def hook(m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        name = f"{names[m]}.weight" if names[m] else "weight"
        # Output positions each weight is used at: the output size over batch and output channels.
        channels = out.shape[-1] if isinstance(m, nn.Linear) else out.shape[1]
        record(name, type(m).__name__, m.weight, out.numel() // (batch * channels))
        fired[name] = fired.get(name, 0) + 1

    def tokens(t: torch.Tensor) -> int:
        return t.numel() // (batch * t.shape[-1])

    def attention_pre(m: nn.Module, inp: Any) -> None:
        fired[f"{names[m]}.out_proj.weight"] = 0

    def attention_hook(m: nn.Module, inp: Any, out: Any) -> None:
        # nn.MultiheadAttention applies its packed input projection (and, in torch's own forward, its
        # output projection) through the functional API, where no Linear hook sees them.
        prefix = f"{names[m]}." if names[m] else ""
        if len(inp) < 3:
            return
        if m.in_proj_weight is not None:
            inner = m.in_proj_weight.shape[0] // 3
            for i, t in enumerate(inp[:3]):  # query, key, value rows of the projection
                rows = slice(i * inner, (i + 1) * inner)
                record(f"{prefix}in_proj_weight", "MultiheadAttention", m.in_proj_weight, tokens(t), rows)
        else:  # separate projections (key/value widths other than the embedding's)
            for attr, t in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), inp[:3]):
                record(f"{prefix}{attr}", "MultiheadAttention", getattr(m, attr), tokens(t))
        if not fired.get(f"{prefix}out_proj.weight"):
            record(f"{prefix}out_proj.weight", "Linear", m.out_proj.weight, tokens(inp[0]))

    was_training = module.training
    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, COUNTED)]
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention):
            handles.append(m.register_forward_pre_hook(attention_pre))
            handles.append(m.register_forward_hook(attention_hook))
    # MultiheadAttention's inference fast path is one fused op the counter cannot see into.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
            module.eval()(*args, **kwargs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for h in handles:
            h.remove()
        module.train(was_training)
    hooked = sum(layer.dense for layer in report.layers)
    # The counter counts multiply and add as two operations, over the whole batch.
    report.other = max(0, round(counter.get_total_flops() / 2 / batch) - hooked)
    if masks is not None:
        unused = set(masks) - set(seen)
        if unused:  # a typo'd or unwrapped-prefix key would silently count as dense
            log.warning("count_flops: %d mask(s) match no counted layer, e.g. %s", len(unused), min(unused))
    if reference is not None:
        report.reference_dense = count_flops(reference, example_inputs).dense
    return report


# ---------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class StepCost:
    """The forward cost of one training step, per example, as a trainer can log it after each step.

    Attributes:
        density: MAC-weighted density of the forward, sparse / dense MACs (``FlopReport.density``);
            between MEST/Chase updates this includes the soft bound's extra density.
        macs: dense forward MACs at the model's CURRENT widths (``FlopReport.dense``); shrinks as Chase
            removes channels.
        update: whether this step computed the dense weight gradient (an exploration update); ``None``
            lets :func:`training_flops` decide from ``update_every``.
    """

    density: float
    macs: float
    update: Optional[bool] = None

    @classmethod
    def from_report(cls, report: FlopReport, update: Optional[bool] = None) -> StepCost:
        return cls(report.density, report.dense, update)


@dataclass
class TrainingFlops:
    """Training MACs of a run (per example times ``batch_size``) and the ratio to dense training."""

    total: float
    dense_total: float
    steps: int
    update_steps: int

    @property
    def ratio(self) -> float:
        return self.total / self.dense_total if self.dense_total else 1.0


def training_flops(
    step_log: Iterable[Union[StepCost, Sequence[float]]],
    *,
    update_every: Optional[int] = None,
    end_step: Optional[int] = None,
    dense_macs: Optional[float] = None,
    batch_size: int = 1,
) -> TrainingFlops:
    """RigL's training-FLOPs accounting (Evci et al. 2020, App. H) over a per-step log.

    Step ``t`` (1-based; entry ``t - 1`` of ``step_log``, a :class:`StepCost` or a ``(density, macs)`` pair)
    with forward cost ``f_S = density_t x macs_t`` costs

    * ``3 f_S``: sparse forward, sparse backward to the activations, sparse weight gradient; or
    * ``2 f_S + macs_t`` at an exploration update, where the weight gradient is computed dense (what
      gradient-based growth ranks): ``t % update_every == 0 and t < end_step``, the engine's schedule,
      unless the entry says ``update`` itself. With ``update_every=None`` only flagged steps are updates.

    The total is multiplied by ``batch_size``. Dense training costs ``3 x dense_macs`` per step
    (``dense_macs`` defaults to the first entry's ``macs``, the unpruned width). SET/static runs have no
    dense-gradient steps (pass ``update_every=None``). Magnitude-only pruning/regrowth and the mask
    bookkeeping are not counted (they are O(weights), not O(MACs)).
    """
    total = 0.0
    steps = updates = 0
    first: Optional[float] = None
    for i, entry in enumerate(step_log):
        cost = entry if isinstance(entry, StepCost) else StepCost(float(entry[0]), float(entry[1]))
        t = i + 1
        first = cost.macs if first is None else first
        update = cost.update
        if update is None:
            update = update_every is not None and t % update_every == 0 and (end_step is None or t < end_step)
        f_s = cost.density * cost.macs
        total += 2 * f_s + cost.macs if update else 3 * f_s
        steps += 1
        updates += int(update)
    ref = dense_macs if dense_macs is not None else (first or 0.0)
    return TrainingFlops(batch_size * total, batch_size * 3 * ref * steps, steps, updates)
