"""Where the trainer's metric records go besides ``metrics.jsonl``: TensorBoard, Weights & Biases, MLflow.

Every logger receives the same records (``{"kind", "step", ...}``) and logs their numbers under
``<kind>/<name>``; each package is imported only when its logger is asked for. A resumed run continues
the same TensorBoard folder, W&B run and MLflow run (their ids are kept in the run folder).
"""

from __future__ import annotations

import importlib
import logging
import os
import pathlib
import secrets
from typing import Any, Optional

from chase.train.config import LOGGERS, ConfigError

log = logging.getLogger(__name__)

__all__ = ["LOGGERS", "Logger", "open_loggers"]


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {
        f"{record['kind']}/{k}": float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")
    }


class Logger:
    """One destination of metric records."""

    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TensorBoardLogger(Logger):
    def __init__(self, run_dir: pathlib.Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=max(0, resume_step + 1))

    def log(self, record: dict[str, Any]) -> None:
        for k, v in _numbers(record).items():
            self.writer.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbLogger(Logger):
    """A W&B run per run folder (``WANDB_MODE=offline`` works without network); resumed with its id."""

    def __init__(self, run_dir: pathlib.Path, config: dict[str, Any], project: str) -> None:
        import wandb

        id_file = run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        self.run = wandb.init(
            project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config
        )
        id_file.write_text(run_id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        numbers = _numbers(record)
        if numbers:
            self.run.log(numbers, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


class MlflowLogger(Logger):
    """An MLflow run (tracking URI: ``mlflow_uri``, default a file store ``mlruns/`` in the run folder);
    resumed by id."""

    def __init__(self, run_dir: pathlib.Path, config: dict[str, Any], uri: Optional[str]) -> None:
        import mlflow

        self.mlflow = mlflow
        if uri is None:  # a file store needs no server and no database package (mlflow-skinny has none)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        mlflow.set_tracking_uri(uri)
        id_file = run_dir / "mlflow_run_id"
        if id_file.exists():
            self.run = mlflow.start_run(run_id=id_file.read_text().strip())
        else:
            self.run = mlflow.start_run(run_name=run_dir.name)
            mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
            id_file.write_text(self.run.info.run_id + "\n")

    def log(self, record: dict[str, Any]) -> None:
        numbers = {k.replace("/", "."): v for k, v in _numbers(record).items()}
        if numbers:
            self.mlflow.log_metrics(numbers, step=int(record["step"]))

    def close(self) -> None:
        self.mlflow.end_run()


def open_loggers(
    names: list[str],
    run_dir: pathlib.Path,
    config: dict[str, Any],
    resume_step: int = -1,
    *,
    wandb_project: str = "chase",
    mlflow_uri: Optional[str] = None,
) -> list[Logger]:
    """The loggers ``names`` asks for (``jsonl`` is the run's own file, written anyway). TensorBoard missing
    is noted and skipped (it is the default); a missing W&B or MLflow package, which was asked for, is a
    ``ConfigError`` naming what to install."""
    out: list[Logger] = []
    for name in names:
        if name == "jsonl":
            continue
        try:
            if name == "tensorboard":
                out.append(TensorBoardLogger(run_dir, resume_step))
            elif name == "wandb":
                out.append(WandbLogger(run_dir, config, wandb_project))
            elif name == "mlflow":
                out.append(MlflowLogger(run_dir, config, mlflow_uri))
            else:
                raise ConfigError(f"unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
        except ImportError as e:
            if name == "tensorboard":
                log.info("tensorboard is not installed: metrics go to metrics.jsonl only")
                continue
            package = {"wandb": "wandb", "mlflow": "mlflow (or mlflow-skinny)"}[name]
            raise ConfigError(f"logger {name} needs {package}: pip install {package.split()[0]} ({e})") from e
    return out


def check_loggers(names: list[str], *, mlflow_uri: Optional[str] = None) -> None:
    """Refuse (``ConfigError``) loggers that cannot start, before the run folder is created: a W&B or
    MLflow package that is not installed, an MLflow tracking URI that MLflow does not support. (Nothing
    is contacted: a server's reachability shows when the run starts.)"""
    packages = {"wandb": "wandb", "mlflow": "mlflow"}
    for name in names:
        if name not in packages:
            continue
        try:
            importlib.import_module(packages[name])
        except ImportError as e:
            package = {"wandb": "wandb", "mlflow": "mlflow (or mlflow-skinny)"}[name]
            raise ConfigError(f"logger {name} needs {package}: pip install {package.split()[0]} ({e})") from e
    if "mlflow" in names and mlflow_uri:
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=mlflow_uri)
        except Exception as e:  # mlflow's own refusal of the scheme
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"mlflow_uri={mlflow_uri!r} is not a tracking URI mlflow can use: {first}"
            ) from None
