"""The dynamic sparse training engine: masks, exploration schedule, state, hooks."""

from __future__ import annotations

import logging
import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from chase.graph import unwrap_model
from chase.slim import make_slim
from chase.sparse import exploration, schedules
from chase.sparse.distribution import DISTRIBUTIONS, layer_counts, random_masks
from chase.sparse.masks import MaskSet
from chase.sparse.targets import DEFAULT_SPARSE_TYPES, check_optimizer_holds, find_sparse_params
from chase.sparsifier.schedule import Schedule, resolve_schedule

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SCOPES = ("global", "layer")
GROWTH = ("gradient", "random")


@dataclass
class StepInfo:
    """What one :meth:`Sparsifier.step` call did.

    Attributes:
        step: optimizer steps counted so far (including this one).
        updated: an exploration update changed the masks.
        skipped: an update was due but skipped because the gradients were not finite.
        shapes_changed: parameters changed shape (channels were physically removed): re-wrap DDP,
            re-compile, or rebuild anything that captured shapes.
        channels_removed: channels removed at this step.
    """

    step: int
    updated: bool = False
    skipped: bool = False
    shapes_changed: bool = False
    channels_removed: int = 0


def _check_fraction(name: str, value: float, low_open: bool = True) -> None:
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")


def check_options(
    *,
    density: float,
    distribution: str = "erk",
    update_every: int = 100,
    growth: str = "gradient",
    scope: str = "layer",
    swap_fraction: float = 0.3,
    swap_schedule: str = "cosine",
    swap_floor: float = 0.0,
    soft_bound: float = 0.0,
    initial_density: float | None = None,
) -> None:
    """The one validation of :class:`Sparsifier`'s model-independent options (``ValueError`` naming the
    option); the constructor and the trainer's config both call it."""
    if initial_density is not None and not density <= initial_density <= 1.0:
        raise ValueError(f"initial_density must be in [density, 1] = [{density}, 1], got {initial_density}")
    _check_fraction("density", density)
    if update_every < 1:
        raise ValueError(f"update_every must be >= 1, got {update_every}")
    if growth not in GROWTH:
        raise ValueError(f"growth must be one of {GROWTH}, got {growth!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if swap_schedule not in schedules.SWAP_SCHEDULES:
        raise ValueError(f"swap_schedule must be one of {schedules.SWAP_SCHEDULES}, got {swap_schedule!r}")
    _check_fraction("swap_fraction", swap_fraction, low_open=False)
    _check_fraction("swap_floor", swap_floor, low_open=False)
    if soft_bound < 0 or density + soft_bound > 1:
        raise ValueError(f"soft_bound must be >= 0 with density + soft_bound <= 1, got {soft_bound}")
    if soft_bound > 0 and scope != "global":
        raise ValueError("the soft memory bound (soft_bound > 0) needs scope='global'")


#: id(parameter) -> (parameter, sparsifier), both weak: two sparsifiers on one weight would fight over its
#: mask. (Tensors compare elementwise, so they cannot key a WeakKeyDictionary.)
_OWNERS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owner(p: torch.Tensor) -> Any:
    entry = _OWNERS.get(id(p))
    if entry is None or entry[0]() is not p:
        return None
    owner = entry[1]()
    return owner if owner is not None and not owner._removed else None


def _foreign_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """A global optimizer step post-hook: an optimizer that steps a sparsifier's weights but is not the
    sparsifier's own (replaced after the sparsifier was built) is recorded on that sparsifier, which
    refuses to go on at its next ``step()`` (its masks and channel surgery follow its own optimizer)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            owner = _owner(p)
            if owner is not None:
                if owner.optimizer is not optimizer:
                    owner._foreign = optimizer
                return  # one owned weight decides; the rest of the model's weights have the same owner
    return


_GLOBAL_HOOK: list[Any] = []  # the global hook's handle, installed with the first sparsifier


def _check_not_owned(params: Mapping[str, torch.Tensor]) -> None:
    for stale in [k for k, (p, sp) in _OWNERS.items() if p() is None or sp() is None]:
        del _OWNERS[stale]
    for name, p in params.items():
        owner = _owner(p)
        if owner is not None:
            raise ValueError(
                f"{name} is already masked by a {type(owner).__name__} sparsifier: one model takes one "
                "sparsifier (call .remove() on the first one to replace it)"
            )


class Sparsifier:
    """Unstructured dynamic sparse training on any model, with the user's own optimizer.

    Call :meth:`step` once after every ``optimizer.step()`` (and before ``optimizer.zero_grad()``, so an
    exploration update can read the gradients). Weights and every optimizer state tensor shaped like a
    weight are zeroed at masked positions right after each optimizer step (an optimizer step post-hook).

    Args:
        model: the model (DDP-wrapped and ``torch.compile``d models are unwrapped; mask keys are the
            parameter names of the unwrapped model).
        optimizer: any ``torch.optim.Optimizer`` holding the model's parameters.
        density: fraction of the sparse layers' ORIGINAL weights that is kept, in (0, 1].
        total_steps: optimizer steps in the whole run.
        distribution: initial per-layer densities: ``"erk"``, ``"er"`` or ``"uniform"``.
        dense_layers: fnmatch patterns of module or parameter names kept dense (e.g. ``["conv1"]``).
        sparse_types: module types whose ``weight`` is sparse (default all Conv1d/2d/3d and Linear).
        update_every: optimizer steps between exploration updates.
        end_step: last step at which updates happen (exclusive); default ``total_steps``. Like every
            schedule point here, an ``int`` is an optimizer step and a ``float`` in [0, 1] a fraction of
            the run (:mod:`chase.sparsifier.schedule`).
        growth: ``"gradient"`` (RigL: largest |gradient|) or ``"random"`` (SET).
        scope: ``"global"`` (all layers ranked together) or ``"layer"`` (each layer keeps its count).
        swap_fraction: fraction of kept weights pruned and regrown at the first update.
        swap_schedule: ``"cosine"`` (decays to ``swap_floor`` at ``swap_horizon``) or ``"constant"``.
        swap_floor: value the cosine schedule decays to.
        swap_horizon: steps over which the cosine decays; default ``end_step``.
        soft_bound: MEST's extra density delta0 held between updates (0 disables); global scope only.
        soft_bound_end: step at which delta(t) has decayed to 0; default the last update step, so that the
            last update prunes back to the budget. A later step is an error (the run would end above
            it); a later fraction is moved back to the last update.
        initial_density: start at this density instead (1.0: a trained dense model) and prune by
            magnitude at every update down to ``density`` on a cubic schedule (gradual pruning, as GraNet),
            while the swap regrows part of the pruned weights by gradient; default ``density``.
        prune_start, prune_end: steps (or fractions of the run) where that schedule starts and reaches
            ``density``; default 0 and half of ``end_step``, never after the last update.
        seed: seed of the sparsifier's own generator (initial masks, random growth); the global RNG is
            never touched.
        sync_distributed: under ``torch.distributed``, broadcast masks from rank 0 after every change.
    """

    #: default soft-bound end as a fraction of ``total_steps`` (None: the last update step); never later
    #: than the last update step.
    soft_bound_end_fraction: ClassVar[float | None] = None
    #: default ``end_step`` as a fraction of ``total_steps`` (None: the whole run).
    end_fraction: ClassVar[float | None] = None
    #: whether the algorithm makes exploration updates (a static mask does not).
    explores: ClassVar[bool] = True
    #: option defaults of the algorithm over the engine's (the registry reads them too).
    defaults: ClassVar[dict[str, Any]] = {}
    #: whether the algorithm removes channels, so that :meth:`export` is narrower than the model.
    removes_channels: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        density: float,
        total_steps: int,
        distribution: str = "erk",
        dense_layers: Sequence[str] = (),
        sparse_types: Sequence[type[nn.Module]] = DEFAULT_SPARSE_TYPES,
        update_every: int = 100,
        end_step: int | float | None = None,
        growth: str = "gradient",
        scope: str = "layer",
        swap_fraction: float = 0.3,
        swap_schedule: str = "cosine",
        swap_floor: float = 0.0,
        swap_horizon: int | None = None,
        soft_bound: float = 0.0,
        soft_bound_end: int | float | None = None,
        initial_density: float | None = None,
        prune_start: int | float = 0,
        prune_end: int | float | None = None,
        seed: int = 0,
        sync_distributed: bool = True,
    ) -> None:
        check_options(
            density=density,
            distribution=distribution,
            update_every=update_every,
            growth=growth,
            scope=scope,
            swap_fraction=swap_fraction,
            swap_schedule=swap_schedule,
            swap_floor=swap_floor,
            soft_bound=soft_bound,
            initial_density=initial_density,
        )

        self.model = model
        self.module = unwrap_model(model)
        self.optimizer = optimizer
        self.density = float(density)
        self.total_steps = total_steps
        self.distribution = distribution
        self.update_every = int(update_every)
        self.initial_density = self.density if initial_density is None else float(initial_density)
        if not self.density <= self.initial_density <= 1.0:
            raise ValueError(
                f"initial_density must be in [density, 1] = [{self.density}, 1], got {initial_density}"
            )
        #: the exploration schedule in optimizer steps (:mod:`chase.sparsifier.schedule`).
        self.schedule: Schedule = self._resolve_schedule(
            total_steps,
            update_every=update_every,
            end_step=end_step,
            soft_bound=soft_bound,
            soft_bound_end=soft_bound_end,
            gradual=self.initial_density > self.density,
            prune_start=prune_start,
            prune_end=prune_end,
        )
        self.end_step = self.schedule.end_step
        self.growth = growth
        self.scope = scope
        self.swap_fraction = float(swap_fraction)
        self.swap_schedule = swap_schedule
        self.swap_floor = float(swap_floor)
        self.swap_horizon = self.end_step if swap_horizon is None else int(swap_horizon)
        self.soft_bound = float(soft_bound)
        self.soft_bound_end = self.schedule.soft_bound_end
        self.sync_distributed = sync_distributed
        self.prune_start = self.schedule.prune_start
        self.prune_end = self.schedule.prune_end

        params = find_sparse_params(self.module, dense_layers=dense_layers, sparse_types=sparse_types)
        check_optimizer_holds(optimizer, params)
        _check_not_owned(params)
        #: weights per sparse layer at construction: densities always count against these.
        self.dense_numel = {n: p.numel() for n, p in params.items()}
        self.dense_shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.total_dense = sum(self.dense_numel.values())
        #: kept weights at density ``d`` (never shrinks, even when channels are removed).
        self.budget = round(self.density * self.total_dense)

        self._step = 0
        self._generator = torch.Generator().manual_seed(seed)
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        # The run starts at density d (or initial_density when pruning gradually); MEST's soft bound adds
        # its extra delta(t) at the first growth.
        counts = layer_counts(shapes, self.initial_density, distribution)
        self._masks = MaskSet(params, random_masks(shapes, counts, self._generator))
        # Subclasses discover structure and validate here, before the model and optimizer are touched:
        # a constructor that raises leaves both as they were.
        self._prepare()
        self._broadcast_masks()
        self._masks.apply(optimizer)
        self._hook_fired = False
        self._short_warned = False
        self._hook = optimizer.register_step_post_hook(self._post_step_hook)
        self._removed = False
        self._foreign: torch.optim.Optimizer | None = None
        if not _GLOBAL_HOOK:
            _GLOBAL_HOOK.append(register_optimizer_step_post_hook(_foreign_step))
        for p in params.values():
            _OWNERS[id(p)] = (weakref.ref(p), weakref.ref(self))
        log.info(
            "%s: %d sparse layers, %d of %d weights kept (density %.4f)",
            type(self).__name__,
            len(params),
            self.kept,
            self.total_dense,
            self.global_density(),
        )

    # ------------------------------------------------------------------ read-outs
    @property
    def step_count(self) -> int:
        """Optimizer steps counted so far."""
        return self._step

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool mask}`` (views of the live masks: do not modify)."""
        return dict(self._masks.masks)

    @property
    def kept(self) -> int:
        """Number of kept weights over all sparse layers."""
        return int(torch.count_nonzero(self._masks.flat))

    def global_density(self) -> float:
        """Kept weights / ORIGINAL dense size of the sparse layers."""
        return self.kept / self.total_dense

    def layer_densities(self) -> dict[str, float]:
        """Per-layer kept weights / that layer's ORIGINAL dense size."""
        counts = self._masks.counts()
        return {n: c / self.dense_numel[n] for n, c in zip(self._masks.names, counts)}

    def density_at(self, t: int) -> float:
        """The density budget after an update at step ``t``: ``density``, or while pruning gradually the
        cubic schedule from ``initial_density``."""
        if self.initial_density <= self.density:
            return self.density
        return schedules.gradual_density(
            t, initial=self.initial_density, final=self.density, start=self.prune_start, end=self.prune_end
        )

    def budget_at(self, t: int) -> int:
        """Kept weights allowed after an update at step ``t`` (without MEST's soft-bound extra)."""
        return round(self.density_at(t) * self.total_dense)

    def target_kept(self, t: int) -> int:
        """Kept weights the schedule asks for after an update at step ``t``: the budget, plus MEST's
        soft-bound extra ``delta(t)`` while it is on."""
        return round((self.density_at(t) + self._extra(t)) * self.total_dense)

    def describe(self) -> str:
        """The options that decide which channels go, for reports ('' without channel pruning)."""
        return ""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(density={self.density}, layers={len(self._masks.names)}, "
            f"step={self._step}/{self.total_steps}, scope={self.scope!r}, growth={self.growth!r})"
        )

    # ------------------------------------------------------------------ stepping
    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._masks.apply(optimizer)
        self._hook_fired = True

    def _extra(self, t: int) -> float:
        if self.soft_bound <= 0:
            return 0.0
        return schedules.soft_bound_extra(t, delta0=self.soft_bound, end=self.soft_bound_end)

    def is_update_step(self, t: int) -> bool:
        """Whether an exploration update is due after optimizer step ``t``."""
        return self.explores and t % self.update_every == 0 and t < self.end_step

    def last_update_step(self) -> int:
        """The last step at which :meth:`is_update_step` holds (0: none in the run)."""
        return self.schedule.last_update

    @classmethod
    def _resolve_schedule(cls, total_steps: int, **options: Any) -> Schedule:
        """The exploration schedule of ``options`` (the constructor's schedule keywords) under this
        algorithm's defaults (``end_fraction``, ``soft_bound_end_fraction``, ``explores``)."""
        return resolve_schedule(
            total_steps,
            explores=cls.explores,
            end_fraction=cls.end_fraction,
            soft_bound_end_fraction=cls.soft_bound_end_fraction,
            name=cls.__name__,
            **options,
        )

    @classmethod
    def check_schedule(cls, total_steps: int, options: Mapping[str, Any]) -> Schedule:
        """The schedule of ``options`` in a run of ``total_steps`` steps, or ``ValueError`` where the
        constructor would refuse it, without a model (the trainer's config checks this before any data
        is read). ``options`` are the constructor's keywords, with every default filled in."""
        return cls._resolve_schedule(
            total_steps,
            update_every=options["update_every"],
            end_step=options.get("end_step"),
            soft_bound=options.get("soft_bound") or 0.0,
            soft_bound_end=options.get("soft_bound_end"),
            gradual=(options.get("initial_density") or options["density"]) > options["density"],
            prune_start=options.get("prune_start") or 0,
            prune_end=options.get("prune_end"),
        )

    def step(self) -> StepInfo:
        """Count one optimizer step; run the exploration update (and subclass events) when due."""
        if self._foreign is not None:
            foreign, self._foreign = self._foreign, None
            raise RuntimeError(
                f"another optimizer ({type(foreign).__name__}) stepped this model's sparse weights, not the "
                f"{type(self.optimizer).__name__} this {type(self).__name__} was built with: the masks and "
                "channel surgery follow that one. Give the new optimizer to the sparsifier with "
                "sparsifier.use_optimizer(new_optimizer) (or build the sparsifier with it)"
            )
        if not self._hook_fired:  # the optimizer skipped its step (GradScaler) or does not run hooks
            self._masks.apply(self.optimizer)
        self._hook_fired = False
        self._step += 1
        info = StepInfo(step=self._step)
        if self.is_update_step(self._step):
            if self._grads_finite():
                self.explore(self._step)
                info.updated = True
            else:
                info.skipped = True
                warnings.warn(
                    f"step {self._step}: gradients are not finite (inf/NaN, e.g. a GradScaler overflow); "
                    "exploration update skipped, masks unchanged",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._after_step(self._step, info)
        return info

    def _after_step(self, t: int, info: StepInfo) -> None:
        """Hook for subclasses (channel events)."""

    def _prepare(self) -> None:
        """Hook for subclasses, called by the constructor once the masks exist and before they are applied
        to the model or the optimizer hooked: anything that may refuse the options belongs here."""

    def _grads(self) -> list[torch.Tensor]:
        grads = [self._masks.params[n].grad for n in self._masks.names]
        missing = [n for n, g in zip(self._masks.names, grads) if g is None]
        if missing:
            raise RuntimeError(
                f"no gradient for {missing[0]} (and {len(missing) - 1} more) at an exploration update: "
                "call sparsifier.step() after optimizer.step() and BEFORE optimizer.zero_grad()"
            )
        return grads

    def _grads_finite(self) -> bool:
        if self.growth != "gradient":
            return True
        grads = self._grads()
        # One sync for all layers: the norm of the norms is finite iff every entry is finite.
        return bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()))

    # ------------------------------------------------------------------ exploration
    def growth_region(self) -> torch.Tensor | None:
        """Flat bool tensor of positions where growth may land (None: anywhere). Subclasses restrict it."""
        return None

    @torch.no_grad()
    def explore(self, t: int) -> None:
        """One prune-and-grow update at step ``t`` (uses the current gradients for gradient growth)."""
        m = self._masks
        params = [m.params[n] for n in m.names]
        prune_scores = exploration.magnitude_scores(params)
        if self.growth == "gradient":
            grow_scores = exploration.magnitude_scores(self._grads())
        else:
            grow_scores = torch.rand(m.flat.numel(), generator=self._generator).to(m.flat.device)
        frac = schedules.swap_fraction(
            t,
            start=self.swap_fraction,
            horizon=self.swap_horizon,
            schedule=self.swap_schedule,
            floor=self.swap_floor,
        )
        if self.scope == "layer":
            counts = m.counts()
            budget = self.budget_at(t)
            if budget < sum(counts):  # gradual pruning: each layer to its share of the step's budget
                shapes = {n: self.dense_shapes[n] for n in m.names}
                target = layer_counts(shapes, budget / self.total_dense, self.distribution)
                for i, n in enumerate(m.names):
                    extra = counts[i] - min(counts[i], target[n])
                    if extra > 0:
                        lo, hi = m.offsets[i], m.offsets[i + 1]
                        exploration.prune_smallest(m.flat[lo:hi], prune_scores[lo:hi].clone(), extra)
                counts = m.counts()
            swaps = [math.floor(frac * c) for c in counts]
            pruned = exploration.per_layer_prune_grow(m.flat, prune_scores, grow_scores, m.offsets, swaps)
        else:
            current = self.kept
            # While the soft bound is on, an update prunes back to the budget and grows to budget +
            # delta(t); afterwards it swaps frac * budget weights at a constant budget. Both forms also
            # regrow weights freed by removed channels, so the budget is restored at every update.
            budget = self.budget_at(t)
            swap = 0 if self._extra(t) > 0 else math.floor(frac * budget)
            n_prune = max(0, current - budget + swap)
            pruned = exploration.prune_smallest(m.flat, prune_scores, n_prune)
            allowed = self.growth_region()
            if allowed is None:
                room = m.flat.numel() - (current - n_prune)
            else:
                room = int(torch.count_nonzero(allowed & ~m.flat))
            wanted = self.target_kept(t) - (current - n_prune)
            n_grow = min(wanted, room)
            if n_grow < wanted and not self._short_warned:
                # Removed channels can leave fewer weights than the budget (a MACs target, say): all of
                # them are kept and the density ends below the budget.
                self._short_warned = True
                warnings.warn(
                    f"step {t}: the model has only {current - n_prune + room:,} weights left in its sparse "
                    f"layers, fewer than the {self.target_kept(t):,} the budget allows: every one is kept",
                    stacklevel=3,
                )
            exploration.grow_largest(m.flat, grow_scores, n_grow, allowed)
        # A weight pruned and regrown in this same update is a new weight: it starts at 0 with zero
        # optimizer state, like every other grown weight (masked positions already hold zeros).
        regrown = torch.zeros_like(m.flat)
        regrown[pruned] = True
        regrown &= m.flat
        m.sync_views()
        self._broadcast_masks()
        m.restart(self._share(regrown), self.optimizer)
        m.apply(self.optimizer)

    def _distributed(self) -> bool:
        dist = torch.distributed
        if not (self.sync_distributed and dist.is_available() and dist.is_initialized()):
            return False
        return dist.get_world_size() > 1

    def _share(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's value of a tensor that has the same shape on every rank (no-op without distributed).

        Sent as uint8/int64 on the parameters' device, which both gloo (CPU) and NCCL (CUDA) accept."""
        if not self._distributed():
            return tensor
        device = self._masks.flat.device
        buf = tensor.to(device, torch.uint8 if tensor.dtype == torch.bool else tensor.dtype).contiguous()
        torch.distributed.broadcast(buf, src=0)
        return buf.to(tensor.device, tensor.dtype)

    def _broadcast_masks(self) -> None:
        """Under torch.distributed, make every rank hold rank 0's masks (decide once, share)."""
        if self._distributed():
            self._masks.flat.copy_(self._share(self._masks.flat))
            self._masks.sync_views()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything that decides the run: step, masks, generator state, and the settings they depend on."""
        return {
            "format_version": FORMAT_VERSION,
            "algorithm": type(self).__name__,
            "step": self._step,
            "density": self.density,
            "dense_numel": dict(self.dense_numel),
            "masks": {n: mask.detach().cpu().clone() for n, mask in self._masks.masks.items()},
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; masks are re-applied to the weights and optimizer state.

        Raises:
            ValueError: the state comes from another algorithm, model or format version.
        """
        version = state.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unsupported sparsifier state format {version!r} (expected {FORMAT_VERSION})")
        if state.get("algorithm") != type(self).__name__:
            raise ValueError(f"state_dict was saved by {state.get('algorithm')}, not {type(self).__name__}")
        saved, mine = set(state["dense_numel"]), set(self.dense_numel)
        if saved != mine or any(state["dense_numel"][n] != self.dense_numel[n] for n in mine):
            diff = (
                sorted(saved ^ mine)[:5]
                or [n for n in mine if state["dense_numel"][n] != self.dense_numel[n]][:5]
            )
            raise ValueError(f"state_dict is from a different model (sparse layers differ: {diff})")
        self._load_extra_state(state)
        self._masks.rebuild(state["masks"])
        self.density = float(state["density"])
        self.budget = round(self.density * self.total_dense)
        self._step = int(state["step"])
        self._generator.set_state(state["generator"])
        self._masks.apply(self.optimizer)

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Hook for subclasses: restore their own state before the masks are loaded."""

    # ------------------------------------------------------------------ export
    def export(self) -> nn.Module:
        """The model to deploy. Unstructured sparsity keeps every channel, so it is the model itself (its
        masked weights are already 0); :class:`~chase.Chase` returns a physically narrower copy."""
        return self.module

    def slim_checkpoint(self, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The exported model as a slim checkpoint (:mod:`chase.slim`): weights, removal history and
        masks, plain tensors only; :func:`chase.load_slim` rebuilds it in a freshly built model."""
        return make_slim(self.export(), history=self.export_history(), masks=self._export_masks(), meta=meta)

    def export_history(self) -> dict[str, Any]:
        """The channel-removal record of the exported model (none for unstructured sparsity)."""
        return {}

    def _export_masks(self) -> dict[str, torch.Tensor] | None:
        """Masks shaped like the exported model's weights (None when they are not)."""
        return {n: m.detach().cpu().clone() for n, m in self._masks.masks.items()}

    def channel_sparsity_now(self) -> float:
        """Fraction of prunable channels removed so far (0 for unstructured sparsity)."""
        return 0.0

    def use_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Follow ``optimizer`` from now on (one built after the sparsifier, e.g. to change its type or
        groups): it must hold every sparse weight; its state is masked now and at every step."""
        check_optimizer_holds(optimizer, self._masks.params)
        self._hook.remove()
        self.optimizer = optimizer
        self._hook = optimizer.register_step_post_hook(self._post_step_hook)
        self._foreign = None
        self._masks.apply(optimizer)

    def remove(self) -> None:
        """Detach from the optimizer (the masks stop being enforced); another sparsifier may then take the
        model."""
        self._hook.remove()
        self._removed = True
