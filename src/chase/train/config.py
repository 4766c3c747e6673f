"""The reference trainer's options: one typed dataclass, YAML files with ``base:`` includes, ``key=value``
overrides.

Only the trainer and the CLI know about YAML; the library itself takes typed keyword arguments.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from chase.sparsifier.registry import CHANNEL_OPTIONS, METHODS, check, defaults
from chase.sparsifier.registry import CHOICES as ALGORITHM_CHOICES
from chase.sparsifier.specs import flat_options

__all__ = ["ConfigError", "TrainConfig", "apply_overrides", "config_help", "load_config", "load_yaml"]

# The method names and the choices of the sparsifiers' options are the library's (one table).
CHOICES: dict[str, tuple[str, ...]] = {
    "method": METHODS,
    "dataset": ("cifar10", "cifar100", "imagefolder", "synthetic"),
    "augment": ("auto", "cifar", "imagenet", "none"),
    "loader": ("auto", "resident", "workers"),
    "optimizer": ("sgd", "adamw"),
    "schedule": ("cosine", "step", "constant"),
    "amp": ("none", "bf16", "fp16"),
    **{k: v for k, v in ALGORITHM_CHOICES.items() if k == "distribution" or k in CHANNEL_OPTIONS},
}
DATASETS = CHOICES["dataset"]
#: training images of the datasets whose size is known before they are read (synthetic: its option).
KNOWN_TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000}
#: where metric records can go (chase.train.loggers); jsonl, the run's metrics.jsonl, is always written.
LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
#: options passed to the sparsifier as they are (None: the algorithm's default, chase.sparsifier.registry):
#: the engine's, and every channel-pruning option (generated from chase.ChannelSpec and chase.Budget).
LIBRARY_OPTIONS = (
    "density",
    "distribution",
    "update_every",
    "swap_fraction",
    "soft_bound",
    "initial_density",
    *CHANNEL_OPTIONS,
)
#: the engine's schedule points: config key -> (the sparsifier's keyword, what happens there, default).
ENGINE_POINTS = {
    "update_end": ("end_step", "no mask updates from here on", "the method's (0.75; chase the end)"),
    "soft_bound_end": (
        "soft_bound_end",
        "the soft bound reaches 0 here (at the last update at the latest)",
        "the method's (chase 0.8; mest the last update)",
    ),
    "prune_start": ("prune_start", "gradual pruning from initial_density starts here", "0"),
    "prune_end": ("prune_end", "gradual pruning reaches density here", "half the updates"),
}
#: schedule points: config key -> the sparsifier's keyword. Each is a fraction of the run (``key``) or an
#: epoch (``key_epoch``); the channel ones come from chase.ChannelSpec.
SCHEDULE_POINTS = {
    **{k: v[0] for k, v in ENGINE_POINTS.items()},
    **{o.name: o.name for o in flat_options().values() if o.schedule == "point"},
}
#: schedule intervals in optimizer steps that may be given in epochs instead (``key_epochs``).
SCHEDULE_INTERVALS = tuple(o.name for o in flat_options().values() if o.schedule == "interval")


class ConfigError(ValueError):
    """A config file or override that cannot be used (unknown key, wrong type, bad value)."""


def _opt(default: Any, help: str) -> Any:  # an immutable default with its help string
    return field(default=default, metadata={"help": help})


def _point(name: str, help: str) -> dict[str, tuple[Any, Any]]:
    """A schedule point's two fields: a fraction of the run, and its epoch."""
    return {
        name: (Optional[float], _opt(None, help)),
        f"{name}_epoch": (float, _opt(0.0, f"{name} in epochs instead (0: {name})")),
    }


def _generated_section(cls: type) -> type:
    """Insert, after the sparse-training section, the engine's schedule points (a fraction of the run and
    an epoch each) and the channel-pruning options, generated from chase.ChannelSpec and chase.Budget
    (their help included): each is null by default (the library's default), but flags (prune_skip) and
    lists (keep_channels); a channel schedule point also takes an epoch (``_epoch``), an interval epochs
    (``_epochs``)."""
    generated: dict[str, tuple[Any, Any]] = {}
    for name, (_, what, default) in ENGINE_POINTS.items():
        generated |= _point(name, f"{what}, as a fraction of the run in [0, 1]; null: {default}")
    for o in flat_options().values():
        help = f"chase: {o.help}"
        if o.type is bool:
            generated[o.name] = (bool, _opt(o.default, help))
        elif o.type is list:
            generated[o.name] = (list[str], field(default_factory=list, metadata={"help": help}))
        elif o.schedule == "point":
            generated |= _point(o.name, f"{help}; here a fraction of the run in [0, 1]")
        else:
            default = "" if o.default is None else f"; null: {o.default}"
            generated[o.name] = (Optional[o.type], _opt(None, help + default))
        if o.schedule == "interval":
            generated[f"{o.name}_epochs"] = (float, _opt(0.0, f"{o.name} in epochs instead (0: {o.name})"))
    annotations: dict[str, Any] = {}
    for name, tp in cls.__annotations__.items():
        annotations[name] = tp
        if name == "soft_bound":
            for key, (key_type, default) in generated.items():
                annotations[key] = key_type
                setattr(cls, key, default)
    cls.__annotations__ = annotations
    return cls


@dataclass
@_generated_section
class TrainConfig:
    """Every option of ``chase train``. YAML files set them, ``--set key=value`` wins."""

    # --- data
    dataset: str = _opt("cifar10", "cifar10, cifar100, imagefolder (train/ and test/ folders) or synthetic")
    data_dir: str = _opt(
        "",
        "cifar: a folder with train/ and test/ (ImageFolder layout) or torchvision's CIFAR cache; "
        "imagefolder: the root with train/ and test/; empty: ~/.cache/chase/data",
    )
    download: bool = _opt(True, "cifar: download into data_dir when not there (needs network)")
    augment: str = _opt(
        "auto", "auto (by dataset), cifar (crop 4 + flip), imagenet (RandomResizedCrop), none"
    )
    image_size: int = _opt(0, "input resolution; 0: 32 for CIFAR and synthetic, 224 for imagefolder")
    num_classes: int = _opt(0, "classifier outputs; 0: from the dataset")
    val_split: float = _opt(0.0, "fraction of the training set held out for validation (0: none)")
    train_limit: int = _opt(0, "train on a fixed random subset of this many training images (0: all)")
    loader: str = _opt(
        "auto",
        "resident (decode once into a tensor on the training device, augment there), workers "
        "(DataLoader worker processes) or auto (resident for cifar10/100 and synthetic)",
    )
    num_workers: int = _opt(4, "loader=workers: DataLoader processes per rank (0: load in the main process)")
    synthetic_train: int = _opt(512, "synthetic: training images")
    synthetic_test: int = _opt(256, "synthetic: test images")
    # --- model
    model: str = _opt("cifar_resnet20", "a chase.models name: cifar_resnet20, resnet50, timm:<name>, ...")
    init_from: str = _opt(
        "",
        "start from these weights: a dense run folder, its checkpoint.pt or final.pt, or a state_dict file",
    )
    pretrained: bool = _opt(
        False, "start from the model's published weights (torchvision/timm; needs network)"
    )
    channels_last: bool = _opt(False, "train in channels_last memory format")
    compile: bool = _opt(False, "torch.compile the model (re-compiled after each channel removal)")
    # --- optimisation
    epochs: int = _opt(10, "training epochs")
    batch_size: int = _opt(128, "images per optimizer step per process")
    optimizer: str = _opt("sgd", "sgd (momentum) or adamw")
    lr: float = _opt(0.1, "peak learning rate")
    momentum: float = _opt(0.9, "SGD momentum")
    nesterov: bool = _opt(False, "SGD Nesterov momentum")
    weight_decay: float = _opt(5e-4, "weight decay")
    no_bn_decay: bool = _opt(False, "no weight decay on norm weights and biases")
    schedule: str = _opt("cosine", "LR schedule after warm-up: cosine, step or constant")
    milestones: list[int] = field(
        default_factory=list,
        metadata={"help": "step schedule: epochs at which the LR is multiplied by gamma"},
    )
    gamma: float = _opt(0.1, "step schedule: LR factor at each milestone")
    warmup_epochs: float = _opt(0.0, "linear LR warm-up from 0, in epochs")
    min_lr: float = _opt(0.0, "cosine schedule: final LR")
    label_smoothing: float = _opt(0.0, "cross-entropy label smoothing")
    amp: str = _opt("none", "mixed precision: none, bf16 or fp16 (fp16 uses a GradScaler)")
    # --- sparse training
    method: str = _opt("chase", "dense, static, set, rigl, mest or chase")
    density: float = _opt(0.1, "kept fraction of the sparse layers' weights")
    initial_density: Optional[float] = _opt(
        None, "start at this density (1.0 for a trained model) and prune gradually to density; null: density"
    )
    distribution: Optional[str] = _opt(None, "initial per-layer densities: erk, er or uniform; null: erk")
    dense_layers: list[str] = field(
        default_factory=list, metadata={"help": "fnmatch patterns of layers kept dense, e.g. [conv1]"}
    )
    update_every: Optional[int] = _opt(
        None, "optimizer steps between mask updates (Delta T_p); null: the method's (100; chase 1000)"
    )
    swap_fraction: Optional[float] = _opt(
        None, "fraction of weights swapped at the first update; null: default"
    )
    soft_bound: Optional[float] = _opt(None, "MEST/Chase soft memory bound delta0; null: method default")
    # --- the engine's schedule points, then channel pruning (chase): generated, see _generated_section
    # --- run
    seed: int = _opt(0, "seed of the model, data order and sparsifier")
    device: str = _opt("auto", "auto, cpu, cuda, cuda:1, ...")
    threads: int = _opt(0, "CPU threads for torch (torch.set_num_threads); 0: torch's default")
    out: str = _opt("runs", "parent folder of run folders")
    name: str = _opt("", "run folder name; empty: <model>-<method>-<dataset>-<time>")
    eval_every: int = _opt(1, "evaluate on the test (and validation) split every this many epochs")
    ckpt_every_steps: int = _opt(0, "also checkpoint every this many optimizer steps (0: at epoch ends only)")
    log_every: int = _opt(50, "write a training metrics line every this many optimizer steps")
    max_bad_steps: int = _opt(
        10,
        "stop the run when more than this many steps had a loss that was not finite (NaN/Inf), checked every "
        "log_every steps; the last checkpoint is kept to resume from (0: never stop)",
    )
    bn_recalibrate: int = _opt(0, "slim model: re-estimate BatchNorm statistics on this many train batches")
    speedup_batch: int = _opt(64, "batch size for timing dense vs slim forward (0: skip the timing)")
    tensorboard: bool = _opt(True, "false: leave tensorboard out of loggers")
    loggers: list[str] = field(
        default_factory=lambda: ["jsonl", "tensorboard"],
        metadata={"help": "where metrics go: jsonl (always), tensorboard, wandb, mlflow"},
    )
    wandb_project: str = _opt("chase", "loggers with wandb: the W&B project (WANDB_MODE=offline: no network)")
    mlflow_uri: str = _opt(
        "", "loggers with mlflow: the tracking URI; empty: a file store mlruns/ in the run folder"
    )
    quiet: bool = _opt(False, "no progress bar")

    def validate(self) -> TrainConfig:
        """Check choices and ranges; returns ``self``."""
        for key, choices in CHOICES.items():
            if getattr(self, key) is not None and getattr(self, key) not in choices:
                raise ConfigError(f"{key}={getattr(self, key)!r} is not one of {', '.join(choices)}")
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"val_split must be in [0, 1), got {self.val_split}")
        if self.train_limit < 0:
            raise ConfigError(f"train_limit must be >= 0, got {self.train_limit}")
        for key in ("epochs", "batch_size", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in (
            "ckpt_every_steps",
            "log_every",
            "max_bad_steps",
            "threads",
            "num_workers",
            "bn_recalibrate",
            "speedup_batch",
            "image_size",
            "num_classes",
            "synthetic_train",
            "synthetic_test",
            "warmup_epochs",
            *(f"{k}_epoch" for k in SCHEDULE_POINTS),
            *(f"{k}_epochs" for k in SCHEDULE_INTERVALS),
            "min_lr",
            "weight_decay",
            "label_smoothing",
            "momentum",
        ):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not self.lr > 0:  # `not >` also refuses NaN
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.gamma <= 0:
            raise ConfigError(f"gamma must be > 0, got {self.gamma}")
        name = pathlib.PurePath(self.name)
        if self.name and (name.is_absolute() or len(name.parts) != 1 or self.name in (".", "..")):
            raise ConfigError(
                f"name={self.name!r} must be a plain folder name (the run folder is out/name), not a path"
            )
        try:
            import torch

            if self.device != "auto":
                torch.device(self.device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(
                f"device={self.device!r} is not a device (auto, cpu, cuda, cuda:1, ...): {e}"
            ) from None
        unknown = [n for n in self.loggers if n not in LOGGERS]
        if unknown:
            raise ConfigError(f"unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)}")
        if self.init_from and self.pretrained:
            raise ConfigError("give init_from or pretrained, not both")
        from chase.models import check_model_name

        try:
            check_model_name(self.model)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"model={self.model!r}: {e}") from None
        for key in SCHEDULE_POINTS:
            fraction, epoch = getattr(self, key), getattr(self, f"{key}_epoch")
            if fraction is not None and epoch > 0:
                raise ConfigError(f"give {key} (a fraction of the run) or {key}_epoch, not both")
            if fraction is not None and not 0.0 <= fraction <= 1.0:
                raise ConfigError(
                    f"{key} is a fraction of the run in [0, 1] ({key}_epoch: an epoch), got {fraction}"
                )
        for key in SCHEDULE_INTERVALS:
            if getattr(self, key) is not None and getattr(self, f"{key}_epochs"):
                raise ConfigError(f"give {key} (optimizer steps) or {key}_epochs, not both")
        gradual = ("prune_start", "prune_end")
        given = any(getattr(self, k) is not None or getattr(self, f"{k}_epoch") for k in gradual)
        if given and self.initial_density is None:
            raise ConfigError("prune_start/prune_end need initial_density (gradual pruning)")
        options = self.library_options()
        try:  # the library's own rules. Recipes set options for several methods (a recipe file plus a
            # method file), so an option this method does not take is checked by Chase's rules and left
            # out of its sparsifier (the trainer says so), not refused.
            check("chase", **options)
            if self.method != "dense":
                steps = self.planned_steps_per_epoch()
                mine = self.sparsifier_options(steps or 1)
                mine = {k: v for k, v in mine.items() if k in self.method_options()}
                # The schedule too, when the steps are known before the data is read (CIFAR, synthetic).
                check(self.method, total_steps=self.epochs * steps if steps else None, **mine)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        return self

    def split_sizes(self, n: int) -> tuple[int, int]:
        """(training, validation) images out of a training set of ``n`` (``val_split``, ``train_limit``)."""
        n_val = max(1, round(self.val_split * n)) if self.val_split > 0 else 0
        train = n - n_val
        return (min(train, self.train_limit) if self.train_limit else train), n_val

    def steps_per_epoch(self, n: int, world: int = 1) -> int:
        """Optimizer steps per epoch for a training set of ``n`` images over ``world`` processes (each
        takes an equal share, padded; a last partial batch is dropped)."""
        return math.ceil(self.split_sizes(n)[0] / world) // self.batch_size

    def planned_steps_per_epoch(self) -> Optional[int]:
        """Steps per epoch when the dataset's size is known without reading it (CIFAR, synthetic) and the
        processes from the environment (``WORLD_SIZE``, as torchrun sets it); None otherwise."""
        n = self.synthetic_train if self.dataset == "synthetic" else KNOWN_TRAIN_SIZES.get(self.dataset)
        if n is None:
            return None
        return self.steps_per_epoch(n, int(os.environ.get("WORLD_SIZE", "1") or 1)) or None

    def sparsifier_options(self, steps_per_epoch: int) -> dict[str, Any]:
        """The sparsifier's options: the library options as given, the dense layers and seed, and every
        schedule point or interval given in epochs converted to optimizer steps (a fraction of the run
        stays a fraction: the library resolves it)."""

        def steps(epochs: float) -> int:
            return max(1, round(epochs * steps_per_epoch))

        out: dict[str, Any] = {
            **self.library_options(),
            "dense_layers": list(self.dense_layers),
            "seed": self.seed,
        }
        for key, keyword in SCHEDULE_POINTS.items():
            epoch = getattr(self, f"{key}_epoch")
            out[keyword] = steps(epoch) if epoch > 0 else getattr(self, key)
        for key in SCHEDULE_INTERVALS:
            epochs = getattr(self, f"{key}_epochs")
            if epochs > 0:
                out[key] = steps(epochs)
        return out

    def resolved(self, key: str) -> Any:
        """The value of a library option: the config's, or the algorithm's default when it is None."""
        value = getattr(self, key)
        if value is None and key in LIBRARY_OPTIONS:
            return defaults("chase" if self.method == "dense" else self.method).get(key)
        return value

    def method_options(self) -> set[str]:
        """The library options this config's method takes (none for dense)."""
        if self.method == "dense":
            return set()
        return set(defaults(self.method)) | {"density"}

    def library_options(self) -> dict[str, Any]:
        """The options the sparsifier takes as they are (None: its default)."""
        return {k: getattr(self, k) for k in LIBRARY_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


_HINTS = typing.get_type_hints(TrainConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(inner[0])} or null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def _convert(key: str, value: Any, tp: Any, *, from_text: bool) -> Any:
    """``value`` as type ``tp``; text (from ``--set``) is parsed, YAML values are only checked."""
    if typing.get_origin(tp) is typing.Union:
        inner = next(a for a in typing.get_args(tp) if a is not type(None))
        if value is None or (from_text and str(value).strip().lower() in ("none", "null", "")):
            return None
        return _convert(key, value, inner, from_text=from_text)
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        if from_text and isinstance(value, str):
            text = value.strip().removeprefix("[").removesuffix("]")
            value = [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
            return [_convert(key, v, item, from_text=True) for v in value]
        if isinstance(value, (list, tuple)):
            return [_convert(key, v, item, from_text=from_text) for v in value]
        raise ConfigError(f"{key} expects a {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if from_text and str(value).strip().lower() in ("1", "true", "yes", "on"):
            return True
        if from_text and str(value).strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} expects a bool (true/false), got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects an {tp.__name__}, got {value!r}")
        if isinstance(value, int) or (tp is float and isinstance(value, float)):
            return tp(value)
        if isinstance(value, str) and (from_text or tp is float):
            try:
                number = float(value) if tp is float else int(value)
            except ValueError:
                pass
            else:
                return number
        raise ConfigError(f"{key} expects {'an' if tp is int else 'a'} {tp.__name__}, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} expects a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported option type {tp!r}")  # pragma: no cover - a bug in TrainConfig


def _unknown(keys: Iterable[str], where: str) -> ConfigError:
    import difflib

    valid = sorted(_fields())
    parts = []
    for k in keys:
        close = difflib.get_close_matches(k, valid, n=1)
        parts.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"unknown option(s) {', '.join(parts)} in {where}. Valid options: {', '.join(valid)}")


#: each schedule option and its form in epochs: one source (a file, --set) giving one of them replaces
#: the other set by an earlier source (a config's fraction, overridden by an epoch on the command line).
_PARTNERS = {
    **{k: f"{k}_epoch" for k in SCHEDULE_POINTS},
    **{k: f"{k}_epochs" for k in SCHEDULE_INTERVALS},
}
_PARTNERS |= {v: k for k, v in _PARTNERS.items()}


def _replaced_partners(values: Mapping[str, Any]) -> list[str]:
    """The schedule options that ``values`` replaces: the other form of each it gives alone."""
    return [_PARTNERS[k] for k in values if k in _PARTNERS and _PARTNERS[k] not in values]


def _merge(cfg: dict[str, Any], values: Mapping[str, Any], where: str, *, from_text: bool) -> None:
    unknown = [k for k in values if k not in _HINTS]
    if unknown:
        raise _unknown(unknown, where)
    defaults = TrainConfig().to_dict()
    for k in _replaced_partners(values):
        cfg[k] = defaults[k]
    for k, v in values.items():
        cfg[k] = _convert(k, v, _HINTS[k], from_text=from_text)


def load_yaml(path: str | pathlib.Path, _seen: tuple[pathlib.Path, ...] = ()) -> dict[str, Any]:
    """Read a config file; ``base:`` (a path or a list, relative to the file) is loaded first and
    overridden by the file's own keys."""
    import yaml  # only the CLI needs YAML

    path = pathlib.Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, (*_seen, path)))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (YAML) config file: it holds binary data") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged.update(load_yaml(path.parent / base, (*_seen, path)))
    unknown = [k for k in data if k not in _HINTS]
    if unknown:
        raise _unknown(unknown, str(path))
    for k in _replaced_partners(data):
        merged.pop(k, None)
    merged.update(data)
    return merged


def parse_overrides(pairs: Iterable[str]) -> dict[str, str]:
    """``["lr=0.1", "method=rigl"]`` -> ``{"lr": "0.1", "method": "rigl"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any], *, from_text: bool = True) -> TrainConfig:
    """A copy of ``cfg`` with ``overrides`` applied (text values are converted to each option's type)."""
    values = cfg.to_dict()
    _merge(values, overrides, "--set", from_text=from_text)
    return TrainConfig(**values).validate()


def load_config(
    files: Iterable[str | pathlib.Path] = (), overrides: Iterable[str] | Mapping[str, str] = ()
) -> TrainConfig:
    """Defaults, then each YAML file in order, then ``key=value`` overrides; validated."""
    values = TrainConfig().to_dict()
    for f in files:
        _merge(values, load_yaml(f), str(f), from_text=False)
    pairs = overrides if isinstance(overrides, Mapping) else parse_overrides(overrides)
    _merge(values, pairs, "--set", from_text=True)
    return TrainConfig(**values).validate()


def config_help() -> str:
    """One line per option: name, type, default and help (for ``chase train --help``)."""
    lines = []
    for name, f in _fields().items():
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        lines.append(f"  {name:<22} {_type_name(_HINTS[name]):<16} {default!r:<18} {f.metadata['help']}")
    return "\n".join(lines)
