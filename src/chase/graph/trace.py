"""Record one forward pass as a list of torch function calls.

Torch-Pruning sees a model through its autograd graph; that graph hides which dimension an operation acts
on (a mean over channels looks like a mean over pixels). This recorder keeps, for every torch function the
forward calls, its name, the module it ran in, its non-tensor arguments, the shapes of its tensors and
where each input tensor came from. The op rules (:mod:`chase.graph.rules`) read these records to follow the
channel dimension through the network; :func:`trace_model` also hands the same forward pass to
Torch-Pruning, so both views describe one execution.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from chase.nested import tensors

log = logging.getLogger(__name__)

# Tensor methods that only read metadata or return non-tensors; never worth a record.
_IGNORED = frozenset({"__get__", "__set__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr"})
_BINARY_DUNDER = frozenset({"add", "sub", "mul", "truediv", "div", "floordiv", "mod", "pow", "matmul"})


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor argument of a call came from.

    ``kind`` is ``"call"`` (output ``out`` of call ``ref``), ``"input"`` (example input number ``ref``),
    ``"param"`` / ``"buffer"`` (FQN ``ref``) or ``"const"`` (anything else: created inside forward).
    ``data``: the tensor depends on the model's inputs (an activation); a call's output computed from
    parameters, buffers and constants alone (a frozen norm's scale) is not.
    """

    kind: str
    ref: Any
    shape: tuple[int, ...]
    out: int = 0
    data: bool = False


@dataclass
class Call:
    """One recorded torch function call: ``op`` on tensors ``inputs`` inside module ``module``."""

    index: int
    op: str
    func: Callable[..., Any]
    module: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    inputs: list[TensorRef]
    out_shapes: list[tuple[int, ...]]

    def where(self) -> str:
        """``'op' in 'module'`` for messages."""
        return f"'{self.op}' in '{self.module or '(model)'}'"


@dataclass
class Trace:
    """The recorded forward pass.

    ``calls`` in execution order; ``consumers[(call, out)]`` lists ``(call, port)`` pairs that read output
    ``out`` of ``call``; ``outputs`` holds the ``(call, out)`` pairs returned by the model;
    ``module_calls`` counts how often each module ran (a layer run twice shares its weights).
    """

    calls: list[Call] = field(default_factory=list)
    consumers: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)
    outputs: set[tuple[int, int]] = field(default_factory=set)
    module_calls: Counter = field(default_factory=Counter)


class _Port:
    """Placeholder for the ``i``-th tensor argument inside a call's stored args."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __repr__(self) -> str:
        return f"<tensor {self.i}>"


def _normalize(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", str(func))
    if name.startswith("__") and name.endswith("__"):
        base = name.strip("_")
        if base[:1] in ("r", "i") and base[1:] in _BINARY_DUNDER:
            base = base[1:]
        return {"truediv": "div"}.get(base, base)
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]  # in-place variant: same rule
    return name.lstrip("_")


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace, names: dict[int, tuple[str, str]], inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.trace = trace
        self.names = names  # id(tensor) -> (kind, fqn) for parameters and buffers
        self.input_ids = {id(t): i for i, t in enumerate(inputs)}
        self.input_grad_fns = {t.grad_fn: i for i, t in enumerate(inputs) if t.grad_fn is not None}
        self.out_key: dict[tuple[Any, int], tuple[int, int]] = {}  # (grad_fn, output_nr) -> (call, out)
        self.no_grad_out: dict[int, tuple[int, int]] = {}  # id(tensor) -> (call, out), tensors without grad
        self.keep: list[torch.Tensor] = []  # keeps grad-less outputs alive so their ids stay unique
        self.stack: list[str] = [""]
        self.data_calls: set[int] = set()  # calls whose outputs depend on the model's inputs

    def ref(self, t: torch.Tensor) -> TensorRef:
        shape = tuple(t.shape)
        fn = t.grad_fn
        if fn is not None:
            key = self.out_key.get((fn, t.output_nr))
            if key is not None:
                return TensorRef("call", key[0], shape, key[1], key[0] in self.data_calls)
            if fn in self.input_grad_fns:
                return TensorRef("input", self.input_grad_fns[fn], shape, data=True)
        if id(t) in self.input_ids:
            return TensorRef("input", self.input_ids[id(t)], shape, data=True)
        if id(t) in self.names:
            kind, fqn = self.names[id(t)]
            return TensorRef(kind, fqn, shape)
        key = self.no_grad_out.get(id(t))
        if key is not None and fn is None:
            return TensorRef("call", key[0], shape, key[1], key[0] in self.data_calls)
        return TensorRef("const", None, shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _normalize(func)
        if op in _IGNORED:
            return func(*args, **kwargs)
        # Resolve the inputs before the call: an in-place op changes its input's autograd node.
        inputs: list[TensorRef] = []

        def swap(a: Any) -> Any:
            if isinstance(a, torch.Tensor):
                inputs.append(self.ref(a))
                return _Port(len(inputs) - 1)
            if isinstance(a, (list, tuple)) and not hasattr(a, "_fields"):
                return type(a)(swap(x) for x in a)
            return a

        s_args = tuple(swap(a) for a in args)
        s_kwargs = {k: swap(v) for k, v in kwargs.items()}
        arg_ids = {id(a) for a in tensors((args, kwargs))}
        out = func(*args, **kwargs)
        self._record(func, op, s_args, s_kwargs, inputs, arg_ids, out)
        return out

    def _record(self, func, op, args, kwargs, inputs, arg_ids, out) -> None:
        outs = tensors(out)
        if not outs:
            return
        new = []
        for t in outs:
            fn = t.grad_fn
            if fn is not None:
                fresh = (fn, t.output_nr) not in self.out_key and fn not in self.input_grad_fns
            else:
                fresh = id(t) not in arg_ids and id(t) not in self.names
            new.append(fresh)
        if not any(new):
            return  # returned an input unchanged (dropout in eval, contiguous on a contiguous tensor)
        call = Call(len(self.trace.calls), op, func, self.stack[-1], args, kwargs, inputs, [])
        self.trace.calls.append(call)
        if any(r.data for r in inputs):
            self.data_calls.add(call.index)
        for i, t in enumerate(outs):
            call.out_shapes.append(tuple(t.shape))
            if not new[i]:
                continue
            if t.grad_fn is not None:
                self.out_key[(t.grad_fn, t.output_nr)] = (call.index, i)
            else:
                self.no_grad_out[id(t)] = (call.index, i)
                self.keep.append(t)
        for port, r in enumerate(inputs):
            if r.kind == "call":
                self.trace.consumers.setdefault((r.ref, r.out), []).append((call.index, port))


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module behind DistributedDataParallel/DataParallel (``.module``) and torch.compile.

    Parameter names are always taken relative to the unwrapped module, so masks keep the same keys
    whether or not the model is wrapped.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def prepare_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]]:
    """Positional args, keyword args and the list of input tensors used for tracing.

    Floating-point inputs are replaced by copies that require grad, so every tensor derived from the input
    has an autograd node: Torch-Pruning then sees layers that share the input, and in-place ops on the
    input stay legal because the copy is not a leaf.
    """

    def prep(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().requires_grad_(True).clone()
        return t

    if isinstance(example_inputs, dict):
        kwargs = {k: prep(v) for k, v in example_inputs.items()}
        return (), kwargs, tensors(kwargs)
    if isinstance(example_inputs, (list, tuple)):
        args = tuple(prep(v) for v in example_inputs)
        return args, {}, tensors(args)
    if isinstance(example_inputs, torch.Tensor):
        args = (prep(example_inputs),)
        return args, {}, tensors(args)
    raise ValueError(
        f"example_inputs must be a tensor, a tuple/list of args or a dict of kwargs, got "
        f"{type(example_inputs).__name__}"
    )


def trace_model(model: nn.Module, example_inputs: Any, run: Callable[[Callable[[], Any]], Any]) -> Trace:
    """Run ``model`` once on ``example_inputs`` while recording every torch call.

    ``run`` receives a zero-argument forward function and must call it exactly once (Torch-Pruning's
    ``build_dependency`` does so through its ``forward_fn``); the model's output is recorded as the set
    of calls that produced it. Forward errors become a ValueError naming the innermost module.
    """
    args, kwargs, inputs = prepare_inputs(example_inputs)
    names: dict[int, tuple[str, str]] = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), ("param", n))
    for n, b in model.named_buffers():
        names.setdefault(id(b), ("buffer", n))
    trace = Trace()
    rec = _Recorder(trace, names, inputs)
    module_names = {}
    for n, m in model.named_modules():
        module_names.setdefault(m, n)

    def pre(m: nn.Module, _inp: Any) -> None:
        rec.stack.append(module_names[m])
        trace.module_calls[module_names[m]] += 1

    def post(_m: nn.Module, _inp: Any, _out: Any) -> None:
        rec.stack.pop()

    handles = []
    for m in module_names:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))

    def forward() -> Any:
        try:
            with rec:
                out = model(*args, **kwargs)
        except Exception as e:
            where = rec.stack[-1] or "(model)"
            raise ValueError(
                f"channel discovery could not run the model's forward pass; it failed in module '{where}': "
                f"{type(e).__name__}: {e}"
            ) from e
        flat = list(tensors(out))
        for t in flat:
            r = rec.ref(t)
            if r.kind == "call":
                trace.outputs.add((r.ref, r.out))
        # Torch-Pruning walks back from each output's grad_fn and unpacks one level of tuple/list/dict
        # only: a model output nested deeper (a transformers ModelOutput holding a cache of tuples) is
        # handed over as the flat list of its tensors that autograd produced.
        return [t for t in flat if t.grad_fn is not None]

    try:
        with torch.enable_grad():
            run(forward)
    finally:
        for h in handles:
            h.remove()
    if not trace.outputs:
        raise ValueError(
            "the model's output does not depend on its input or parameters through any torch "
            "operation; there is nothing to trace"
        )
    log.debug("traced %d torch calls", len(trace.calls))
    return trace
