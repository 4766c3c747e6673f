"""PyTorch Lightning: a callback that adds any chase sparsifier to a ``Trainer``, and checkpoints that load
into a freshly built module after Chase has removed channels from it.

    from chase.integrations.lightning import SparsityCallback, load_from_checkpoint
    cb = SparsityCallback(lambda module, opt, x: chase.Chase(module, opt, density=0.1, total_steps=steps,
                                                             example_inputs=x))
    Trainer(callbacks=[cb]).fit(module)                       # shrinks the module while it trains
    Trainer(callbacks=[cb]).fit(MyModule(), ckpt_path=ckpt)   # resumes: narrowed before the weights load
    small = load_from_checkpoint(MyModule, ckpt)              # a narrow module, same outputs

How this meets Lightning's order (``Trainer._run``: the ``setup`` hooks; the module's ``on_load_checkpoint``
and its weights; the callbacks' states; ``configure_optimizers`` inside the strategy's setup;
``on_fit_start``; the optimizer states):

- The sparsifier is built at ``on_fit_start`` from the module and its single optimizer, and steps in
  ``on_train_batch_end`` whenever the trainer's optimizer-step counter moved (once per optimizer step with
  ``accumulate_grad_batches``). Lightning clears gradients inside the NEXT step's closure, so they are still
  there for an exploration update; ``on_before_zero_grad`` would be too late (it runs after the next
  forward, whose saved tensors an update must not modify).
- A checkpoint holds the sparsifier's state and, for a Chase that removes channels physically, the channel
  history (under :data:`HISTORY_KEY`) that narrows a freshly built module so its weights load.
- A resumed fit: no callback hook runs between Lightning reading the checkpoint and loading the weights, so
  ``setup`` hooks the module's ``on_load_checkpoint`` for that one call. There the sparsifier is built on
  the full-size module with a placeholder optimizer and its state loaded, which narrows the module; the
  weights load, ``configure_optimizers`` sees the narrow parameters, ``on_fit_start`` hands the real
  optimizer to the sparsifier, and Lightning loads its (narrow) state last.
- Under ``strategy="ddp"`` a physical removal rebuilds the strategy's DistributedDataParallel wrapper.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from chase.integrations.metrics import SparsityMetrics, narrows
from chase.sparsifier import Sparsifier
from chase.surgery import replay

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as e:
        raise ImportError(
            "chase.integrations.lightning needs PyTorch Lightning: "
            'pip install "chase-dst[lightning]" (it installs pytorch-lightning)'
        ) from e

log = logging.getLogger(__name__)

__all__ = [
    "HISTORY_KEY",
    "ChannelHistoryMixin",
    "SparsityCallback",
    "load_from_checkpoint",
    "replay_checkpoint",
]

#: the key of a Lightning checkpoint that holds the channel history of a physically narrowed module:
#: ``{"version": 1, "module": <the sparsified submodule's name, "" for the LightningModule>, "history":
#: <SurgeryState.state_dict()>}`` (plain tensors and strings: ``torch.load(weights_only=True)`` reads it).
HISTORY_KEY = "chase_channel_history"
_HISTORY_VERSION = 1

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_UNSET: Any = object()  # example inputs not looked for yet (None is a value a module may hold)


# ---------------------------------------------------------------------------------------------- loading
def replay_checkpoint(module: nn.Module, checkpoint: Mapping[str, Any]) -> set[str]:
    """Narrow ``module``, built at full size, to the channels a loaded Lightning ``checkpoint`` records as
    alive, so that its ``state_dict`` loads. A checkpoint without a channel history leaves the module as it
    is, and so does one whose widths the module already has.

    Returns:
        Names (in the sparsified submodule) of the parameters and buffers whose shape changed.
    """
    record = checkpoint.get(HISTORY_KEY)
    if record is None:
        return set()
    if record.get("version") != _HISTORY_VERSION:
        raise ValueError(
            f"unsupported {HISTORY_KEY} version {record.get('version')!r} (expected {_HISTORY_VERSION})"
        )
    return replay(module.get_submodule(record["module"]), record["history"])


class ChannelHistoryMixin:
    """A LightningModule base whose ``on_load_checkpoint`` narrows the module to the checkpoint's channel
    history before Lightning loads the weights, so ``MyModule.load_from_checkpoint(path)`` and
    ``trainer.test(MyModule(), ckpt_path=path)`` work after Chase removed channels::

        class MyModule(ChannelHistoryMixin, pl.LightningModule): ...
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Replay the channel history, then run the next class's ``on_load_checkpoint``."""
        replay_checkpoint(self, checkpoint)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]


def load_from_checkpoint(module_cls: type[ModuleT], checkpoint_path: Any, **kwargs: Any) -> ModuleT:
    """``module_cls.load_from_checkpoint(checkpoint_path, **kwargs)`` for a checkpoint written after Chase
    removed channels: the module is narrowed to the stored history before its weights load (any Lightning
    keyword, e.g. ``map_location``, hyperparameters, passes through). For a class you can edit,
    :class:`ChannelHistoryMixin` does the same through Lightning's own classmethod."""
    if issubclass(module_cls, ChannelHistoryMixin):
        return module_cls.load_from_checkpoint(checkpoint_path, **kwargs)  # type: ignore[attr-defined]
    # Lightning builds the instance inside its classmethod and calls its on_load_checkpoint right before
    # load_state_dict: a subclass with the mixin is the one place to step in. The instance gets the
    # user's class back, so that it pickles and prints as one.
    narrowing = type(
        module_cls.__name__,
        (ChannelHistoryMixin, module_cls),
        {"__module__": module_cls.__module__, "__qualname__": module_cls.__qualname__},
    )
    module = narrowing.load_from_checkpoint(checkpoint_path, **kwargs)
    module.__class__ = module_cls
    return module


# ---------------------------------------------------------------------------------------------- callback
class SparsityCallback(Callback):
    """Runs a chase sparsifier inside a Lightning ``Trainer``: builds it when ``fit`` starts, steps it after
    every optimizer step, logs what it did, saves it in checkpoints and restores it when a fit resumes.

    Args:
        make_sparsifier: builds the sparsifier once per ``fit``. ``(module, optimizer) -> Sparsifier``, or,
            for Chase's channel discovery, ``(module, optimizer, example_inputs) -> Sparsifier`` (a third
            positional parameter, or a required keyword ``example_inputs`` as in
            ``functools.partial(chase.Chase, density=0.1, total_steps=n)``), called with
            :attr:`example_inputs`. ``module`` is the LightningModule; the sparsifier may take one of its
            submodules instead (``chase.Chase(module.net, ...)``).
        log_prefix: prefix of the metrics logged through ``pl_module.log_dict`` after every optimizer step
            (:class:`chase.integrations.metrics.SparsityMetrics`): ``density`` (kept weights over the dense
            size) and, for Chase, ``channel_sparsity``, ``params`` and ``macs`` of the deployable model with
            their ratios to the start (counted at the start and after each channel event; MACs where an
            example input is known). None logs nothing.

    Limits: one optimizer; one process or ``strategy="ddp"`` (with ``ddp_spawn``/``ddp_fork``, Lightning
    copies rank 0's final weights into the main process's full-size module, so physical removal is refused
    there; sharded strategies are not supported). A resumed fit calls ``make_sparsifier`` before
    ``configure_optimizers`` with a placeholder optimizer, which the sparsifier then swaps for the real one.
    """

    def __init__(
        self, make_sparsifier: Callable[..., Sparsifier], *, log_prefix: str | None = "chase/"
    ) -> None:
        self.make_sparsifier = make_sparsifier
        self.log_prefix = log_prefix
        self.sparsifier: Sparsifier | None = None
        self._inputs_as = _example_inputs_argument(make_sparsifier)
        self._pending: dict[str, Any] | None = None
        self._restored = False  # built and restored inside on_load_checkpoint (a resumed fit)
        self._last_step = 0
        self._trainer: Any = None
        self._module: nn.Module | None = None
        self._example: Any = _UNSET
        self._metrics = SparsityMetrics()
        self._logged: dict[str, float] = {}
        self._hooked: tuple[nn.Module, Callable[[dict[str, Any]], None]] | None = None

    # ------------------------------------------------------------------ example inputs
    @property
    def example_inputs(self) -> Any:
        """An input batch for channel discovery, looked for once per ``fit``: the module's
        ``example_input_array``, else the inputs of the first training batch (its first element when the
        batch is a tuple or list such as ``(x, y)``, a dict batch as it is). Drawing that batch leaves the
        global RNG as it was. Available from the ``setup`` hook until ``teardown``."""
        if self._example is _UNSET:
            if self._trainer is None or self._module is None:
                raise RuntimeError(
                    "SparsityCallback.example_inputs is found from the trainer's module and data: read it "
                    "inside make_sparsifier (during fit)"
                )
            self._example = _find_example_inputs(self._trainer, self._module)
        return self._example

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._trainer, self._module, self._example = trainer, pl_module, _UNSET
        self._unhook()
        # No callback hook runs between Lightning reading a checkpoint and loading the module's weights
        # (restore_model calls the module's on_load_checkpoint, then load_state_dict; callback hooks come
        # after), so the module's hook is wrapped for this call; on_fit_start or teardown unwraps it.
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            self._unhook()
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if stage == "fit" and state:
                self._restore_before_weights(trainer, pl_module, state)
            # What narrows a fresh module for validate/test/predict (a no-op after the restore above).
            replay_checkpoint(pl_module, checkpoint)
            original(checkpoint)

        vars(pl_module)["on_load_checkpoint"] = on_load_checkpoint
        self._hooked = (pl_module, on_load_checkpoint)

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._unhook()  # the checkpoint, if any, has been loaded
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"SparsityCallback supports one optimizer, the module has {len(trainer.optimizers)}"
            )
        optimizer = trainer.optimizers[0]
        if self._restored:
            self.sparsifier.use_optimizer(optimizer)  # Lightning loads its state after this hook
        else:
            self._release()  # a second fit: the previous sparsifier lets go of the model
            self.sparsifier = self._build(trainer, pl_module, optimizer)
            if self._pending is not None:
                self.sparsifier.load_state_dict(self._pending)
        self._pending, self._restored = None, False
        self._metrics = SparsityMetrics(self._metrics.example_inputs)
        self._refresh_metrics(macs=True)

    def on_train_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._last_step = trainer.global_step  # restored by now on a resumed fit

    def on_train_batch_end(self, trainer: Any, pl_module: nn.Module, *args: Any) -> None:
        if self.sparsifier is None or trainer.global_step <= self._last_step:
            return  # no optimizer step on this batch (gradient accumulation)
        self._last_step = trainer.global_step
        info = self.sparsifier.step()
        if info.shapes_changed:
            _rewrap(trainer)
        if info.updated or info.channels_removed:
            self._refresh_metrics(macs=info.channels_removed > 0)
        if self._logged:
            # Every step, from values recounted only when they change: a logger writes at its own cadence.
            pl_module.log_dict(
                {f"{self.log_prefix}{k}": v for k, v in self._logged.items()}, on_step=True, on_epoch=False
            )

    def on_save_checkpoint(self, trainer: Any, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        sp = self.sparsifier
        if sp is None or not narrows(sp):
            return
        name = next((n for n, m in pl_module.named_modules() if m is sp.module), None)
        if name is not None:
            checkpoint[HISTORY_KEY] = {
                "version": _HISTORY_VERSION,
                "module": name,
                "history": sp.export_history(),
            }

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._unhook()
        self._trainer, self._module, self._example = None, None, _UNSET  # do not hold the user's batch

    def state_dict(self) -> dict[str, Any]:
        return self.sparsifier.state_dict() if self.sparsifier is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._restored:
            return  # already loaded, before the weights (setup's on_load_checkpoint)
        # Lightning restores callbacks before on_fit_start builds the sparsifier: apply it there.
        self._pending = dict(state_dict) or None

    # ------------------------------------------------------------------ internals
    def _restore_before_weights(self, trainer: Any, pl_module: nn.Module, state: dict[str, Any]) -> None:
        """Build the sparsifier on the full-size module and load ``state``, which narrows the module (Chase
        replays its channel history) before Lightning loads the narrow weights. ``configure_optimizers``
        has not run yet: a placeholder optimizer stands in until ``on_fit_start``."""
        self._release()
        # On the device training will use, as in a fresh fit (the sparsifier's masks and probe live there).
        pl_module.to(trainer.strategy.root_device)
        placeholder = torch.optim.SGD(pl_module.parameters(), lr=0.0)
        self.sparsifier = self._build(trainer, pl_module, placeholder)
        self.sparsifier.load_state_dict(state)
        self._restored = True

    def _build(self, trainer: Any, pl_module: nn.Module, optimizer: torch.optim.Optimizer) -> Sparsifier:
        args: list[Any] = [pl_module, optimizer]
        kwargs: dict[str, Any] = {}
        if self._inputs_as == "positional":
            args.append(self.example_inputs)
        elif self._inputs_as == "keyword":
            kwargs["example_inputs"] = self.example_inputs
        try:
            sparsifier = self.make_sparsifier(*args, **kwargs)
        except Exception as e:
            if _caused_by(e, NotImplementedError) and not _has_forward(pl_module):
                raise ValueError(
                    f"{type(pl_module).__name__} has no forward(), which channel discovery runs on the "
                    "example input (example_input_array, or the first element of a training batch): "
                    "define forward() in the LightningModule, or build the sparsifier on the submodule "
                    "that has one, e.g. lambda module, opt, x: chase.Chase(module.net, opt, "
                    "example_inputs=x, ...)"
                ) from e
            raise
        if not any(m is sparsifier.module for m in pl_module.modules()):
            sparsifier.remove()
            raise ValueError(
                "make_sparsifier must build the sparsifier on the LightningModule or one of its submodules"
            )
        if narrows(sparsifier) and hasattr(trainer.strategy.launcher, "_recover_results_in_main_process"):
            sparsifier.remove()
            raise ValueError(
                f"{type(sparsifier).__name__} removes channels physically, but this strategy's launcher "
                "(ddp_spawn, ddp_fork, ddp_notebook) loads rank 0's final weights into the main process's "
                "full-size module, which they no longer fit: use strategy='ddp', or "
                "channels=chase.ChannelSpec(removal='mask')"
            )
        probe = self._make_probe(pl_module) if sparsifier.removes_channels else None
        self._metrics = SparsityMetrics(probe)
        return sparsifier

    def _make_probe(self, pl_module: nn.Module) -> Any:
        """One example of an input already known (never drawn from the data for this alone) to count MACs
        on; None when there is none."""
        example = self._example
        if example is _UNSET:
            example = getattr(pl_module, "example_input_array", None)
        return _first_example(example)

    def _refresh_metrics(self, *, macs: bool) -> None:
        if self.sparsifier is not None and self.log_prefix is not None:
            self._logged = self._metrics.update(self.sparsifier, recount=macs)

    def _release(self) -> None:
        if self.sparsifier is not None:
            self.sparsifier.remove()
            self.sparsifier = None

    def _unhook(self) -> None:
        if self._hooked is not None:
            module, hook = self._hooked
            if vars(module).get("on_load_checkpoint") is hook:
                del vars(module)["on_load_checkpoint"]
            self._hooked = None


# ---------------------------------------------------------------------------------------------- helpers
def _rewrap(trainer: Any) -> None:
    """After a physical removal: rebuild the strategy's DistributedDataParallel around the narrowed module
    (DDP fixes its parameter list and gradient buckets when it is built), as Lightning's DDP setup does.
    Every rank gets here at the same step: channel events fall on the same steps everywhere, and the
    channels removed are rank 0's (the sparsifier broadcasts its decision)."""
    strategy = trainer.strategy
    wrapped = strategy.model
    if isinstance(wrapped, DistributedDataParallel) and hasattr(strategy, "configure_ddp"):
        strategy.model = wrapped.module
        strategy.configure_ddp()
        log.info("step %d: channels removed, DistributedDataParallel rebuilt", trainer.global_step)
    elif trainer.world_size > 1:
        raise RuntimeError(
            f"channels were physically removed under {type(strategy).__name__}, whose model wrapper "
            f"({type(wrapped).__name__}) cannot be rebuilt: use strategy='ddp', or "
            "channels=chase.ChannelSpec(removal='mask')"
        )


def _example_inputs_argument(factory: Callable[..., Any]) -> str | None:
    """How ``factory`` takes example inputs: ``"positional"`` (a third positional parameter),
    ``"keyword"`` (a required keyword-only ``example_inputs``, as a ``partial`` of ``chase.Chase`` has) or
    None (the two-argument form)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # no signature to read: the two-argument form
        return None
    if any(p.name == "example_inputs" and p.kind is p.KEYWORD_ONLY and p.default is p.empty for p in params):
        return "keyword"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "positional" if len(positional) >= 3 else None


def _find_example_inputs(trainer: Any, module: nn.Module) -> Any:
    """``module.example_input_array``, else the inputs of the first batch of the fit's training data."""
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return example
    # Lightning keeps what fit() was given (loaders, a datamodule, or the module's train_dataloader) as the
    # fit loop's data source; the loaders it trains with are built only when training starts.
    source = getattr(trainer.fit_loop, "_data_source", None)
    loader = source.dataloader() if source is not None and source.is_defined() else None
    if loader is None:
        raise ValueError(
            "no example input for channel discovery: set example_input_array on the LightningModule, or "
            "give fit() training data"
        )
    # A shuffling sampler and the loader's base seed draw from the global RNG: leave it as it was, so the
    # run is the one it would have been.
    with torch.random.fork_rng(devices=[]):
        batch = next(iter(loader))
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        return dict(batch)
    raise ValueError(
        f"cannot tell the inputs in a training batch of type {type(batch).__name__}: set "
        "example_input_array on the LightningModule"
    )


def _first_example(example: Any) -> Any:
    """The first example of an input batch as a copy that does not keep the batch alive (count_flops
    divides by the batch): a tensor, a tuple of positional or a dict of keyword arguments; None for any
    other input, which count_flops does not take."""

    def first(t: Any) -> Any:
        return t[:1].clone() if isinstance(t, torch.Tensor) and t.ndim else t

    if isinstance(example, torch.Tensor):
        return first(example)
    if isinstance(example, tuple):
        return tuple(first(t) for t in example)
    if isinstance(example, dict):  # keyword arguments (a transformers model's input_ids=...)
        return {k: first(t) for k, t in example.items()}
    return None


def _has_forward(module: nn.Module) -> bool:
    """Whether ``module``'s class defines ``forward`` (LightningModule's own only calls nn.Module's, which
    raises)."""
    owner = next(c for c in type(module).__mro__ if "forward" in vars(c))
    return owner is not nn.Module and owner.__name__ != "LightningModule"


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    """Whether ``error`` or an exception it was raised from or during is a ``kind``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
