"""A roofline cost model: a model's forward time predicted from what each kernel computes and moves, on a
device described by its peak compute, memory bandwidth and kernel launch overhead.

Chase's widths can then be chosen for a device without the device at hand:
``Budget.latency(0.5, cost=Roofline("h200", fused=True))``, or ``roofline: h200`` in a config.

How the time is counted. The model runs once on the ``meta`` device (shapes only, no arithmetic) under a
dispatch mode that records every ATen operation: its FLOPs (PyTorch's own FLOP formulas for convolutions
and matrix products) and the bytes it reads and writes (every input and output tensor, at the deployed
dtype's width; parameters counted once per batch, activations per example). A kernel takes
``max(FLOPs / (peak x efficiency), bytes / (bandwidth x efficiency)) + launch``; the model's time is the
sum over its kernels, scaled to ``batch_size``. Two ways of running it:

- ``fused=False`` (eager PyTorch): every operation is its own kernel, BatchNorm, ReLU and residual adds
  included, each reading and writing a whole activation, each paying an eager launch.
- ``fused=True`` (a fusing runtime: Inductor with freezing, TensorRT-style engines, CUDA graphs): eval
  BatchNorm folds into the convolution, pointwise operations (activations, residual adds) run in the
  producing kernel's epilogue and cost only the extra operands they read; launches are cheaper.

Alignment: kernels compute whole tiles of channels (tensor-core tiles on a GPU, the channel blocks of
oneDNN's convolutions on a CPU), so a convolution or a matrix product with weights computes as if its
output channels and (ungrouped) input channels were rounded up to the device's ``tile``: 54 channels cost
what 56 do at a tile of 8. The device's tile is also the default ``channel_multiple`` under a roofline.

A channel's saving is measured the same way: the model with one more step of a group removed (a step is
the tile, or the channel multiple if larger; on a meta copy) against the model as it is, per channel.
What the model does not capture: cache effects, algorithm choice per shape, overlap of launches with
work.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from chase.graph.trace import prepare_inputs
from chase.nested import map_tensors
from chase.sparsifier.dry_run import meta_copy
from chase.surgery import remove_channels

__all__ = ["DEVICES", "Device", "Roofline", "measure_device", "read_device"]

ROOFLINE_FORMAT_VERSION = 1
#: bytes per element of the deployed dtypes.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Device:
    """What a roofline needs to know about a device, for one dtype.

    Attributes:
        name: what it is.
        kind: ``"cuda"`` or ``"cpu"`` (where the trainer can time a model against the prediction).
        dtype: the deployed dtype these numbers are for (``fp32``, ``bf16``, ``fp16``).
        flops: peak dense FLOP/s of convolutions and matrix products in ``dtype``.
        bandwidth: memory bandwidth, bytes/s.
        launch_eager: seconds one kernel costs beyond its work in eager PyTorch (dispatch and launch).
        launch_fused: the same under a fusing runtime (compiled code, CUDA graphs).
        tile: the channel multiple its fast kernels want (the default ``channel_multiple``).
        compute_efficiency: the share of ``flops`` real convolutions reach.
        memory_efficiency: the share of ``bandwidth`` real kernels reach.
        source: where the numbers come from.
    """

    name: str
    kind: str
    dtype: str
    flops: float
    bandwidth: float
    launch_eager: float
    launch_fused: float
    tile: int = 1
    compute_efficiency: float = 0.6
    memory_efficiency: float = 0.8
    source: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"device dtype must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}")
        for name in ("flops", "bandwidth", "compute_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"device {name} must be a positive number, got {value!r}")
        for name in ("launch_eager", "launch_fused"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"device {name} must be a number >= 0, got {value!r}")
        if isinstance(self.tile, bool) or not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"device tile must be an integer >= 1, got {self.tile!r}")


_GPU_LAUNCH = (
    "launch: ~22 us per eager kernel measured on an H200 (174 kernels, ~3.9 ms floor at batch 1, "
    "benchmarks/results/gpu_resnet50.md), 3 us under CUDA graphs (assumed)"
)
#: device presets: datasheet peaks (dense, no sparsity), the dtype tensor cores run.
DEVICES: dict[str, Device] = {
    "h100": Device(
        "NVIDIA H100 SXM",
        "cuda",
        "bf16",
        989e12,
        3.35e12,
        22e-6,
        3e-6,
        8,
        source=f"NVIDIA H100 datasheet (bf16 dense 989 TFLOPS, HBM3 3.35 TB/s); {_GPU_LAUNCH}",
    ),
    "h200": Device(
        "NVIDIA H200",
        "cuda",
        "bf16",
        989e12,
        4.8e12,
        22e-6,
        3e-6,
        8,
        source=f"NVIDIA H200 datasheet (bf16 dense 989 TFLOPS, HBM3e 4.8 TB/s); {_GPU_LAUNCH}",
    ),
    "a100": Device(
        "NVIDIA A100 80GB SXM",
        "cuda",
        "bf16",
        312e12,
        2.04e12,
        22e-6,
        3e-6,
        8,
        source=f"NVIDIA A100 datasheet (bf16 dense 312 TFLOPS, HBM2e 2.04 TB/s); {_GPU_LAUNCH}",
    ),
    "l4": Device(
        "NVIDIA L4",
        "cuda",
        "bf16",
        121e12,
        300e9,
        22e-6,
        3e-6,
        8,
        source=f"NVIDIA L4 datasheet (bf16 dense 121 TFLOPS, GDDR6 300 GB/s); {_GPU_LAUNCH}",
    ),
    "t4": Device(
        "NVIDIA T4",
        "cuda",
        "fp16",
        65e12,
        320e9,
        22e-6,
        3e-6,
        8,
        source=f"NVIDIA T4 datasheet (fp16 tensor cores 65 TFLOPS, GDDR6 320 GB/s); {_GPU_LAUNCH}",
    ),
    "rtx2080ti": Device(
        "NVIDIA RTX 2080 Ti (fp32, the paper's Figure 1 setting)",
        "cuda",
        "fp32",
        13.4e12,
        616e9,
        22e-6,
        3e-6,
        1,
        source=f"NVIDIA Turing specifications (fp32 13.4 TFLOPS, GDDR6 616 GB/s); {_GPU_LAUNCH}",
    ),
}


@dataclass(frozen=True)
class _Kernel:
    """One recorded operation, per example: FLOPs, activation bytes read and written, parameter bytes,
    and the bytes a fused pointwise epilogue still reads (its operands beyond the kernel's own output)."""

    kind: str  # "matmul", "pointwise", "norm" (foldable eval BatchNorm) or "other"
    flops: float
    act_bytes: float
    weight_bytes: float
    epilogue_bytes: float
    #: the channel dims a device's tile rounds up (a weighted kernel's output and ungrouped input channels).
    channels: tuple[int, ...] = ()

    def padded(self, tile: int) -> float:
        """The FLOPs the device computes at channel ``tile``: each channel dim rounded up to it."""
        flops = self.flops
        for c in self.channels:
            flops *= math.ceil(c / tile) * tile / c
        return flops


_ZERO_COST = {"empty", "empty_like", "zeros", "ones", "full", "detach", "lift_fresh", "_to_copy"}
_NORMS = {
    "_native_batch_norm_legit_no_training",
    "native_batch_norm",
    "batch_norm",
    "_native_batch_norm_legit",
}


class _Recorder(TorchDispatchMode):
    """Records every ATen operation of a forward pass as a :class:`_Kernel`."""

    def __init__(self, params: set[int], elem_bytes: int) -> None:
        super().__init__()
        self.params, self.elem_bytes, self.kernels = params, elem_bytes, []
        self._views: list[torch.Tensor] = []  # views of parameters, held so that their ids stay theirs

    def _bytes(self, t: torch.Tensor) -> float:
        size = self.elem_bytes if t.is_floating_point() else t.element_size()
        return float(t.numel() * size)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._overloadpacket.__name__
        inputs = [a for a in _flat(args, kwargs) if isinstance(a, torch.Tensor)]
        outputs = [o for o in _flat(out, {}) if isinstance(o, torch.Tensor)]
        # Views and allocations move no data (aliasing outputs are views); a view of a parameter (a
        # transposed Linear weight) is still the parameter.
        if name in _ZERO_COST or any(
            r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns
        ):
            if any(id(t) in self.params for t in inputs):
                self._views.extend(outputs)
                self.params.update(id(o) for o in outputs)
            return out
        weights = sum(self._bytes(t) for t in inputs if id(t) in self.params)
        acts = sum(self._bytes(t) for t in inputs if id(t) not in self.params)
        acts += sum(self._bytes(t) for t in outputs)
        packet = func._overloadpacket
        if packet in flop_registry:  # PyTorch's own formulas (they take the tensors and the output)
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out))
            kind = "matmul"
        else:
            flops = float(sum(o.numel() for o in outputs))
            kind = "pointwise" if torch.Tag.pointwise in func.tags else "norm" if name in _NORMS else "other"
        # A pointwise op fused into its producer reads only its other operands (a residual add's second
        # input), not the activation the producer already holds.
        act_inputs = [t for t in inputs if id(t) not in self.params]
        epilogue = sum(self._bytes(t) for t in act_inputs[1:]) if kind == "pointwise" else 0.0
        channels = (
            _tiled_channels(name, args, [t for t in inputs if id(t) in self.params])
            if kind == "matmul"
            else ()
        )
        self.kernels.append(_Kernel(kind, flops, acts, weights, epilogue, channels))
        return out


def _tiled_channels(name: str, args: Any, weights: list[torch.Tensor]) -> tuple[int, ...]:
    """The channel dims of a weighted kernel that a device's tile rounds up: a convolution's output channels
    and, ungrouped, its input channels (a depthwise convolution's one input channel per group is not a
    channel block); a matrix product's two weight dims (a Linear weight, transposed or not). None for a
    product of activations (attention): its dims are not Chase's channels."""
    weight = next((w for w in weights if w.dim() >= 2), None)
    if weight is None:
        return ()
    if name == "convolution":
        groups = args[8] if len(args) > 8 else 1
        transposed = bool(args[6]) if len(args) > 6 else False
        cout, cin = (weight.shape[1] * groups, weight.shape[0]) if transposed else weight.shape[:2]
        return (int(cout),) if groups != 1 else (int(cout), int(cin))
    return tuple(int(c) for c in weight.shape[-2:])


def _flat(args: Any, kwargs: Any) -> list[Any]:
    out: list[Any] = []
    for a in [*(args if isinstance(args, (list, tuple)) else [args]), *kwargs.values()]:
        if isinstance(a, (list, tuple)):
            out.extend(_flat(a, {}))
        else:
            out.append(a)
    return out


def _trace(module: nn.Module, example_inputs: Any, elem_bytes: int) -> list[_Kernel]:
    """The kernels of one forward pass of a meta module on the first example of ``example_inputs``
    (costs are per example: the batch a time is predicted for is the roofline's, not the example's)."""
    args, kwargs, _ = prepare_inputs(example_inputs)
    first = lambda t: (t[:1] if t.dim() else t).to("meta")  # noqa: E731
    to_meta = lambda a: map_tensors(a, first)  # noqa: E731
    params = {id(t) for t in (*module.parameters(), *module.buffers())}
    recorder = _Recorder(params, elem_bytes)
    was_training = module.training
    module.eval()  # the deployed forward: BatchNorm at its running statistics
    try:
        with torch.no_grad(), recorder:
            module(*[to_meta(a) for a in args], **{k: to_meta(v) for k, v in kwargs.items()})
    finally:
        module.train(was_training)
    return recorder.kernels


def split_option(text: str) -> tuple[str, str, str]:
    """The parts of a roofline option's text ``DEVICE[:MODE][@BATCH]``: (device or file, mode, batch), the
    missing ones empty (the one reading of the grammar; :meth:`Roofline.parse` checks the parts)."""
    device, _, batch = text.partition("@")
    device, _, mode = device.partition(":") if not pathlib.Path(device).is_file() else (device, "", "")
    return device, mode, batch


class Roofline:
    """A cost model (:mod:`chase.sparsifier.costs`) that predicts time from a roofline of ``device``.

    Args:
        device: a preset name (:data:`DEVICES`: ``h100``, ``h200``, ``a100``, ``l4``, ``t4``,
            ``rtx2080ti``), a :class:`Device`, or the JSON file ``chase profile --roofline`` measured
            (this CPU, say).
        fused: time the model as a fusing runtime runs it (True, the default) or as eager PyTorch.
        batch_size: the batch the time is predicted for (launch-bound small batches favour removing
            kernels' work less than memory-bound large ones).
    """

    def __init__(self, device: Union[str, os.PathLike, Device], *, fused: bool = True, batch_size: int = 32):
        self.device = read_device(device)
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got {fused!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"roofline batch_size must be an integer >= 1, got {batch_size!r}")
        self.fused, self.batch_size = fused, batch_size
        #: the dense model's predicted time (set by :meth:`check`, on the model as it is at the start).
        self.dense_ms: float = float("nan")

    @classmethod
    def parse(cls, text: Any) -> Roofline:
        """A roofline from its option text: ``DEVICE[:fused|:eager][@BATCH]`` (``h200``, ``a100:eager@1``,
        ``cpu_roofline.json@128``), or a :class:`Roofline` as it is."""
        if isinstance(text, Roofline):
            return text
        if not isinstance(text, (str, os.PathLike)):
            raise ValueError(f"roofline must be DEVICE[:fused|:eager][@BATCH], got {text!r}")
        text = str(text)
        device, mode, batch = split_option(text)
        if mode not in ("", "fused", "eager"):
            raise ValueError(f"roofline {text!r}: the mode after ':' must be fused or eager, got {mode!r}")
        try:
            size = int(batch) if batch else 32
        except ValueError:
            raise ValueError(
                f"roofline {text!r}: the batch size after '@' must be an integer "
                "(DEVICE[:fused|:eager][@BATCH])"
            ) from None
        return cls(device, fused=mode != "eager", batch_size=size)

    @property
    def tile(self) -> int:
        """The channel multiple the device's kernels want (the default ``channel_multiple``)."""
        return self.device.tile

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "device": self.device.kind,
            "dtype": self.device.dtype,
            "batch_size": self.batch_size,
            "fused": self.fused,
            "name": self.device.name,
        }

    def __repr__(self) -> str:
        mode = "fused" if self.fused else "eager"
        return f"Roofline({self.device.name!r}, {mode}, batch {self.batch_size})"

    def _key(self) -> tuple[Any, ...]:
        return (self.device, self.fused, self.batch_size)

    def __eq__(self, other: object) -> bool:  # the same prediction (the dense time is state, not identity)
        return isinstance(other, Roofline) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    # ------------------------------------------------------------------ time
    def seconds(self, kernels: list[_Kernel]) -> float:
        """The time of ``kernels`` at :attr:`batch_size` on the device."""
        d, b = self.device, self.batch_size
        flops, bandwidth = d.flops * d.compute_efficiency, d.bandwidth * d.memory_efficiency
        launch = d.launch_fused if self.fused else d.launch_eager
        total = 0.0
        for k in kernels:
            if self.fused and k.kind in ("pointwise", "norm"):  # in the producer's epilogue / folded
                total += k.epilogue_bytes * b / bandwidth
                continue
            compute = k.padded(d.tile) * b / flops if k.kind == "matmul" else 0.0
            total += max(compute, (k.act_bytes * b + k.weight_bytes) / bandwidth) + launch
        return total

    def predict_ms(self, module: nn.Module, example_inputs: Any) -> float:
        """The predicted forward time (ms) of ``module`` at the roofline's batch size (any model;
        ``example_inputs`` of any batch: its first example is traced)."""
        return 1e3 * self.seconds(_trace(meta_copy(module), example_inputs, DTYPE_BYTES[self.device.dtype]))

    # ------------------------------------------------------------------ as a cost model
    def check(self, pruner: Any, example: Any) -> None:
        """Refuse a model that cannot run on the meta device (the roofline traces it there); record the
        time of the model as it is (dense, at the start of a run)."""
        try:
            self.dense_ms = self.predict_ms(pruner.module, example)
        except Exception as e:  # data-dependent control flow, an op without a meta kernel, ...
            raise ValueError(
                f"the roofline cannot trace this model on the meta device ({type(e).__name__}: {e}); "
                "measure a latency table instead (chase profile)"
            ) from None

    def model_ms(self, pruner: Any, example: Any) -> float:
        return self.predict_ms(pruner.module, example)

    def channel_saving_ms(self, pruner: Any, example: Any) -> list[float]:
        """Per group, what a channel (unit) saves: the current time less the predicted time with one step
        of the group removed, per channel of the step, each on a meta copy of the model as it is. A step
        is a tile (or the channel multiple, if larger): one channel of 64 at a tile of 16 saves no compute
        (63 computes as 64), and budgets counted in such savings would remove far too much."""
        step = max(self.tile, pruner.spec.channel_multiple or 1)
        return self._savings(pruner, example, lambda alive: alive[: max(1, min(step, alive.numel() - 1))])

    def mean_saving_ms(self, pruner: Any, example: Any) -> list[float]:
        """Per group, what a channel saves on average from the current width down to half of it."""
        return self._savings(pruner, example, lambda alive: alive[: max(1, alive.numel() // 2)])

    def _savings(self, pruner: Any, example: Any, pick: Any) -> list[float]:
        elem = DTYPE_BYTES[self.device.dtype]
        base = meta_copy(pruner.module)
        now = self.seconds(_trace(base, example, elem))
        out = []
        for g in pruner.groups:
            alive = pruner.surgery.alive_channels(g.name).nonzero().squeeze(1)
            if alive.numel() <= 1:
                out.append(0.0)
                continue
            ids = pick(alive)
            work, state = copy.deepcopy(base), copy.deepcopy(pruner.surgery)
            remove_channels(work, state, {g.name: ids})
            out.append(max(0.0, 1e3 * (now - self.seconds(_trace(work, example, elem))) / ids.numel()))
        return out

    # ------------------------------------------------------------------ state
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": ROOFLINE_FORMAT_VERSION,
            "device": dataclasses.asdict(self.device),
            "fused": self.fused,
            "batch_size": self.batch_size,
            "dense_ms": self.dense_ms,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Roofline:
        if data.get("format_version") != ROOFLINE_FORMAT_VERSION:
            raise ValueError(f"unsupported roofline format {data.get('format_version')!r}")
        out = cls(Device(**data["device"]), fused=bool(data["fused"]), batch_size=int(data["batch_size"]))
        out.dense_ms = float(data.get("dense_ms", float("nan")))
        return out


def read_device(value: Union[str, os.PathLike, Device]) -> Device:
    """The :class:`Device` a preset name, a :class:`Device` or a file `chase profile --roofline` wrote
    gives; ``ValueError`` naming what is wrong otherwise."""
    if isinstance(value, Device):
        return value
    if isinstance(value, str) and value.lower() in DEVICES:
        return DEVICES[value.lower()]
    path = pathlib.Path(value)
    if path.suffix == ".json" or path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a roofline device file ({type(e).__name__}: {e})") from None
        fields = data.get("device", data) if isinstance(data, dict) else data
        if not isinstance(fields, dict):
            raise ValueError(f"{path} is not a roofline device file: it holds a {type(fields).__name__}")
        try:
            return Device(**fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a usable roofline device file: {e}") from None
    raise ValueError(
        f"unknown roofline device {str(value)!r}: give one of {', '.join(DEVICES)} or a file "
        "`chase profile --roofline` wrote"
    )


def measure_device(
    device: str = "cpu", dtype: str = "fp32", *, repeats: int = 20, name: Optional[str] = None
) -> Device:
    """This machine's roofline, measured: the FLOP/s of a convolution of ResNet-like size (3x3, 64
    channels, 56x56, batch 8), the bandwidth of a large elementwise add, and the time of a tiny operation
    (the launch overhead), each the median of ``repeats`` timings. Efficiencies are 1: the measured
    numbers already are what kernels reach."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    dev = torch.device(device)

    def median_time(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    with torch.no_grad():
        conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(dev, dt).eval()
        x = torch.randn(8, 64, 56, 56, device=dev, dtype=dt)
        # The faster layout is the peak (compiled runtimes pick it: oneDNN's blocked channels, NHWC on GPUs).
        conv_s = min(median_time(lambda: conv(x)), _channels_last_time(conv, x, median_time))
        flops = 2 * 8 * 64 * 64 * 9 * 56 * 56 / conv_s
        tile = _measure_tile(dev, dt, median_time)
        a = torch.randn(16 * 1024 * 1024, device=dev, dtype=dt)
        b = torch.randn_like(a)
        add_s = median_time(lambda: torch.add(a, b))
        bandwidth = 3 * a.numel() * a.element_size() / add_s
        tiny = torch.randn(8, device=dev, dtype=dt)
        launch = median_time(lambda: torch.add(tiny, tiny))
    label = name or (torch.cuda.get_device_name(dev) if dev.type == "cuda" else "this CPU")
    return Device(
        label,
        dev.type,
        dtype,
        flops,
        bandwidth,
        launch,
        launch / 4,
        tile,
        1.0,
        1.0,
        source=f"measured by chase.sparsifier.roofline.measure_device on {time.strftime('%Y-%m-%d')} "
        f"({torch.get_num_threads()} threads): conv {flops / 1e9:.1f} GFLOP/s, add "
        f"{bandwidth / 1e9:.1f} GB/s, tiny op {launch * 1e6:.1f} us (fused launch assumed a quarter of it), "
        f"channel tile {tile}",
    )


def _channels_last_time(conv: nn.Module, x: torch.Tensor, median_time: Any) -> float:
    conv = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    return median_time(lambda: conv(x))


#: a convolution's output channels count as one tile while halving them saves less than this share.
_TILE_SAVING = 0.15


def _measure_tile(dev: torch.device, dt: torch.dtype, median_time: Any) -> int:
    """The channel block the device's convolutions compute in: the largest T of 2..32 whose output
    channels cost as much at T/2 as at T (a 3x3 convolution of 64 input channels, channels-last: 16x16 at
    batch 32 on a CPU, 56x56 at batch 256 on a GPU, where a smaller one is launch-bound), 1 when halving
    always pays or the convolution costs the same at every width (overhead-bound: no block shows)."""
    batch, size = (256, 56) if dev.type == "cuda" else (32, 16)
    x = torch.randn(batch, 64, size, size, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)

    def cost(cout: int) -> float:
        conv = nn.Conv2d(64, cout, 3, padding=1, bias=False).to(dev, dt).eval()
        conv = conv.to(memory_format=torch.channels_last)
        return median_time(lambda: conv(x))

    times = {c: cost(c) for c in (1, 2, 4, 8, 16, 32, 64)}
    if times[1] > (1 - _TILE_SAVING) * times[64]:  # flat throughout: overhead-bound, no block to see
        return 1
    for tile in (32, 16, 8, 4, 2):
        if times[tile // 2] > (1 - _TILE_SAVING) * times[tile]:
            return tile
    return 1
