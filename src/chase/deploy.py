"""The model a user serves: one function, :func:`deploy`, that returns the callable to put behind an
endpoint, with BatchNorm folded, channels-last where it helps, the dtype applied, and a backend:

- ``eager``: PyTorch as it is (BatchNorm folded into the convolutions by ``torch.fx`` where the model
  traces);
- ``inductor``: ``torch.compile`` with Inductor's inference freezing (weights constant, BatchNorm folded,
  weights pre-packed); on CUDA ``mode="max-autotune"``, with CUDA graphs for batches up to 32;
- ``onnxruntime``: the model exported to ONNX and run by onnxruntime (CPU, or CUDA where its GPU package
  is installed);
- ``openvino``: the model converted by OpenVINO and run by its CPU plugin (what many CPU deployments use).

Each backend is a small object in :data:`BACKENDS`; adding one is a class and an entry. The deployed
callable is checked against the eager model (same inputs, a tolerance for the dtype) before it is
returned, and says what it is (:attr:`Deployed.info`: backend, device, dtype, layout, TF32, what was
folded). A backend that cannot run says why (:class:`DeployError`); nothing falls back to another.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from chase.nested import tensors

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "DTYPES", "DeployError", "Deployed", "deploy", "tf32_enabled"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the largest relative difference from the eager fp32 model a deployed model may show, by dtype (TF32 on
#: a GPU rounds fp32 matrix products to 10-bit mantissas: the fp32 tolerance holds with it).
TOLERANCE = {"fp32": 1e-2, "bf16": 6e-2, "fp16": 2e-2}
#: the largest batch CUDA graphs are captured for by default (launch-bound batches; beyond, the memory
#: the graphs pin buys little).
CUDA_GRAPH_MAX_BATCH = 32


class DeployError(RuntimeError):
    """A backend that cannot deploy the model here, or a deployed model whose outputs differ from the
    eager model's: the message says which and why."""


def tf32_enabled() -> bool:
    """Whether CUDA matrix products or cuDNN convolutions in fp32 may run in TF32 now."""
    if not torch.cuda.is_available():
        return False
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)


@dataclass
class Deployed:
    """A deployed model: call it with inputs shaped like the example (any batch size; the dtype and
    layout are applied here). :attr:`info` says what runs."""

    fn: Callable[[torch.Tensor], Any]
    info: dict[str, Any]
    dtype: torch.dtype
    device: torch.device
    channels_last: bool
    #: what must outlive the callable (a temporary folder of exported files).
    keep: list[Any] = field(default_factory=list, repr=False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the deployed device, dtype and memory layout (contiguous in it), without autograd
        history: what the compiled code was compiled for (a requires-grad or strided input of the same
        shape would compile again)."""
        x = x.detach().to(self.device, self.dtype if x.is_floating_point() else x.dtype)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def __call__(self, x: torch.Tensor) -> Any:
        with torch.inference_mode():  # serving: no autograd (and compiled code guards on the mode)
            return self.fn(self.prepare(x))

    @property
    def backend(self) -> str:
        return self.info["backend"]


class Backend:
    """A way to run a model. ``build`` returns the callable; ``unavailable`` says why it cannot run a
    configuration (None when it can)."""

    name: ClassVar[str] = ""
    #: the packages it needs (an ImportError names them).
    packages: ClassVar[tuple[str, ...]] = ()

    def unavailable(self, device: torch.device, dtype: str) -> Optional[str]:
        return None

    def build(self, model: nn.Module, x: torch.Tensor, info: dict[str, Any]) -> tuple[Callable, list[Any]]:
        raise NotImplementedError


class Eager(Backend):
    name = "eager"

    def build(self, model: nn.Module, x: torch.Tensor, info: dict[str, Any]) -> tuple[Callable, list[Any]]:
        model, note = fold_batchnorm(model)
        info["batchnorm"] = note
        model = _placed(model, x, info)
        return model, []


class Inductor(Backend):
    name = "inductor"

    def build(self, model: nn.Module, x: torch.Tensor, info: dict[str, Any]) -> tuple[Callable, list[Any]]:
        model = _placed(model, x, info)
        mode = info.get("mode")
        if x.device.type != "cuda":
            info["cuda_graphs"] = False
        elif mode is None:
            mode = "max-autotune" if info["cuda_graphs"] else "max-autotune-no-cudagraphs"
        elif mode == "default" and info["cuda_graphs"]:
            mode = "reduce-overhead"  # CUDA graphs without autotuning
        if mode == "default":
            mode = None
        info["mode"] = mode or "default"
        info["batchnorm"] = "folded by Inductor's freezing"
        compiled = torch.compile(model, mode=mode)
        with compile_scope(), torch.inference_mode():
            # Compiles here, with freezing on. Dynamo guards on the input's dispatch keys, and a tensor made
            # under inference_mode (as Deployed makes one when it converts the layout or dtype) has other
            # keys than one made outside: both kinds are compiled now, so that serving either never
            # recompiles outside this scope (unfrozen, and past Dynamo's limit of 8 per class, eager).
            compiled(x)
            compiled(x.clone())  # an inference tensor
        layout = (tuple(x.shape), x.stride())

        def run(inp: torch.Tensor) -> Any:
            if (tuple(inp.shape), inp.stride()) == layout:
                return compiled(inp)
            with compile_scope():  # another batch size (or layout) compiles again: with freezing too
                return compiled(inp)

        return run, [compiled]


class OnnxRuntime(Backend):
    name = "onnxruntime"
    packages = ("onnx", "onnxruntime", "onnxscript")

    def unavailable(self, device: torch.device, dtype: str) -> Optional[str]:
        if dtype != "fp32":
            return "onnxruntime runs the fp32 export here (a half-precision graph is another export)"
        if device.type == "cuda":
            import onnxruntime

            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                return "this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
        return None

    def build(self, model: nn.Module, x: torch.Tensor, info: dict[str, Any]) -> tuple[Callable, list[Any]]:
        import onnxruntime as ort

        from chase.onnx import _session, export_onnx

        folder = pathlib.Path(tempfile.mkdtemp(prefix="chase-deploy-"))
        path = export_onnx(copy.deepcopy(model).float().cpu(), x.float().cpu(), folder / "model.onnx")
        provider = "CUDAExecutionProvider" if x.device.type == "cuda" else "CPUExecutionProvider"
        # As many threads as PyTorch, and idle threads asleep: deployed models timed in turn (dense and
        # slim) would otherwise have the waiting session's spinning pool take the running one's cores.
        sess = _session(path, torch.get_num_threads(), spinning=False, provider=provider)
        name = sess.get_inputs()[0].name
        info.update(batchnorm="folded by onnxruntime's graph optimizations", provider=provider)
        info.update(onnxruntime=ort.__version__, threads=torch.get_num_threads(), spinning=False)

        def run(inp: torch.Tensor) -> list[torch.Tensor]:
            outs = sess.run(None, {name: inp.detach().cpu().numpy()})
            return [torch.from_numpy(o).to(inp.device) for o in outs]

        return run, [_Remover(folder), sess]


class OpenVino(Backend):
    name = "openvino"
    packages = ("openvino",)
    #: OpenVINO's inference precision per dtype (it defaults to bf16 on CPUs that have it: say which).
    PRECISION: ClassVar[dict[str, str]] = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}

    def unavailable(self, device: torch.device, dtype: str) -> Optional[str]:
        if device.type != "cpu":
            return "openvino is deployed on the CPU here (its CPU plugin)"
        return None

    def build(self, model: nn.Module, x: torch.Tensor, info: dict[str, Any]) -> tuple[Callable, list[Any]]:
        import warnings

        import openvino as ov

        with warnings.catch_warnings():  # its converter traces with torch.jit, which warns of deprecation
            warnings.simplefilter("ignore", FutureWarning)
            converted = ov.convert_model(copy.deepcopy(model).float().eval(), example_input=x.float())
        precision = self.PRECISION[info["dtype"]]
        compiled = ov.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": precision})
        info.update(batchnorm="folded by OpenVINO", openvino=ov.__version__, inference_precision=precision)

        def run(inp: torch.Tensor) -> list[torch.Tensor]:
            result = compiled(inp.detach().float().numpy())
            return [torch.from_numpy(result[i]) for i in range(len(compiled.outputs))]

        return run, []


#: every backend by name.
BACKENDS: dict[str, Backend] = {b.name: b for b in (Eager(), Inductor(), OnnxRuntime(), OpenVino())}


@torch.no_grad()
def deploy(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    backend: str = "eager",
    dtype: str = "fp32",
    device: Optional[str | torch.device] = None,
    channels_last: Optional[bool] = None,
    cuda_graphs: Optional[bool] = None,
    check: bool = True,
    tolerance: Optional[float] = None,
    mode: Optional[str] = None,
) -> Deployed:
    """``model`` ready to serve under ``backend`` (:data:`BACKENDS`), in ``dtype`` on ``device``.

    The model is copied (never changed) and put in eval mode. ``example_inputs`` is one input batch of the
    shape it will serve (its batch size is what ``inductor`` compiles for and CUDA graphs capture).
    ``channels_last`` defaults to True on CUDA for 4-D inputs (tensor-core convolutions want NHWC) and
    False on the CPU; ``cuda_graphs`` (inductor on CUDA) to batches up to 32. With ``check`` the deployed
    model runs on a random batch like the example and its outputs are compared with the eager fp32
    model's: a relative difference above ``tolerance`` (default by dtype: 1% fp32, 6% bf16, 2% fp16)
    raises :class:`DeployError`. ``mode`` (inductor): ``"default"`` compiles without autotuning (with
    CUDA graphs where they are on), e.g. where max-autotune's minutes of tuning per model do not fit.
    Raises ``ValueError`` for an unknown backend or dtype, :class:`DeployError` for a configuration the
    backend cannot run (with the reason), ``ImportError`` naming the package a backend needs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError("deploy takes one input tensor (a model with several inputs is not supported yet)")
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 <= tolerance < float("inf")):
        raise ValueError(f"tolerance must be a finite number >= 0 (a relative difference), got {tolerance!r}")
    dev = torch.device(device) if device is not None else _model_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeployError("device cuda, but CUDA is not available here")
    runner = BACKENDS[backend]
    for package in runner.packages:
        _require(package, backend)
    why = runner.unavailable(dev, dtype) or _dtype_problem(dtype, dev)
    if why:
        raise DeployError(f"{backend} cannot deploy {dtype} on {dev.type}: {why}")
    if channels_last is None:
        channels_last = dev.type == "cuda" and example_inputs.ndim == 4
    if channels_last and example_inputs.ndim != 4:
        raise ValueError("channels_last needs 4-D (N, C, H, W) inputs")
    batch = int(example_inputs.shape[0])
    info: dict[str, Any] = {
        "backend": backend,
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "batch_size": batch,
        "channels_last": channels_last,
        "tf32": tf32_enabled() if dev.type == "cuda" else False,
        "cuda_graphs": (batch <= CUDA_GRAPH_MAX_BATCH if cuda_graphs is None else cuda_graphs)
        and dev.type == "cuda"
        and backend == "inductor",
        "torch": torch.__version__,
    }
    if mode is not None:
        if backend != "inductor" or mode not in ("default", "max-autotune"):
            raise ValueError(f"mode is inductor's: default or max-autotune, got {mode!r} for {backend}")
        info["mode"] = mode
    reference = copy.deepcopy(model).eval().float().to(dev)
    work = copy.deepcopy(model).eval()
    out = Deployed(lambda t: t, info, DTYPES[dtype], dev, channels_last)
    x = out.prepare(example_inputs)
    try:
        fn, keep = runner.build(work, x, info)
    except (ImportError, DeployError):
        raise
    except Exception as e:  # the backend's own failure: say so, never run something else instead
        first = str(e).splitlines()[0][:300] if str(e) else ""
        raise DeployError(f"{backend} could not deploy the model: {type(e).__name__}: {first}") from e
    out.fn, out.keep = fn, keep
    if check:
        info["max_relative_diff"] = _check(
            out, reference, example_inputs, TOLERANCE[dtype] if tolerance is None else tolerance
        )
    log.info("deployed: %s", info)
    return out


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, str]:
    """``model`` (eval mode) with every BatchNorm that follows a convolution folded into it, by
    ``torch.fx`` (the model must trace symbolically), and what happened."""
    from torch.fx.experimental.optimization import fuse

    norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not norms:
        return model, "none in the model"
    try:
        folded = fuse(model.eval())
    except Exception as e:  # data-dependent control flow, a non-traceable module
        return model, f"not folded: torch.fx could not trace the model ({type(e).__name__})"
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    return folded, f"{norms - left} of {norms} folded into their convolutions"


@contextlib.contextmanager
def compile_scope() -> Any:
    """Where a model compiled for serving compiles (its first call): Inductor's inference freezing on
    (weights constant, BatchNorm folded, weights pre-packed; ``torch.compile(options={"freezing": True})``
    does not reach that pass), and Dynamo's recompile limit raised so that many models of one class
    compiled in one process do not fall back to eager, and fail where they still would."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    limit = 1024
    limits = {
        k: max(limit, getattr(dynamo_config, k)) for k in ("recompile_limit", "accumulated_recompile_limit")
    }
    with (
        inductor_config.patch(freezing=True),
        dynamo_config.patch(fail_on_recompile_limit_hit=True, **limits),
    ):
        yield


def _placed(model: nn.Module, x: torch.Tensor, info: dict[str, Any]) -> nn.Module:
    model = model.to(x.device, DTYPES[info["dtype"]])
    return model.to(memory_format=torch.channels_last) if info["channels_last"] else model


def _check(out: Deployed, reference: nn.Module, example: torch.Tensor, tolerance: float) -> float:
    """The largest ``max|deployed - eager| / max|eager|`` over the outputs, on a random batch like the
    example; :class:`DeployError` above ``tolerance``."""
    gen = torch.Generator().manual_seed(0)
    x = (
        torch.randn(example.shape, generator=gen, dtype=torch.float32)
        if example.is_floating_point()
        else example
    )
    want = [t.float() for t in tensors(reference(x.to(out.device)))]
    got = [t.float().to(out.device) for t in tensors(out(x))]
    if len(got) != len(want) or any(a.shape != b.shape for a, b in zip(got, want)):
        raise DeployError(
            f"{out.backend}: the deployed model's outputs have other shapes than the eager model's "
            f"({[tuple(t.shape) for t in got]} vs {[tuple(t.shape) for t in want]})"
        )
    worst = 0.0
    for a, b in zip(got, want):
        scale = float(b.abs().max()) or 1.0
        worst = max(worst, float((a - b).abs().max()) / scale)
    if not worst <= tolerance:  # NaN fails too
        raise DeployError(
            f"{out.backend} ({out.info['dtype']}): outputs differ from the eager fp32 model's by "
            f"{worst:.3g} of their largest value (tolerance {tolerance:g})"
        )
    return worst


def _dtype_problem(dtype: str, dev: torch.device) -> Optional[str]:
    if dtype == "fp16" and dev.type != "cuda":
        return "fp16 is deployed on CUDA only (CPU half-precision convolutions are not a deployment path)"
    if dtype == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16 support"
    return None


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _require(package: str, backend: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        extra = "openvino" if package == "openvino" else "onnx"
        raise ImportError(f"the {backend} backend needs {package}: pip install 'chase-dst[{extra}]'")


class _Remover:
    """Deletes a folder when the deployed model that holds it is garbage-collected."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.folder = folder

    def __del__(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
