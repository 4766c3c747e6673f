"""A training run: its folder, the epoch loop, checkpoints, metrics, resume, and the final report.

Run folder: ``config.yaml`` (resolved), ``checkpoint.pt`` (the latest, written atomically),
``metrics.jsonl``, ``tensorboard/`` (when installed), ``report.md`` (+ PNG plots when matplotlib is
installed) and the exported model (``slim.pt`` for Chase, ``final.pt`` otherwise).
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import time
from typing import Any, Optional

import torch

from chase.analysis import amenable_record
from chase.flops import count_flops
from chase.io import stale_temporaries
from chase.models import get_model
from chase.train import report
from chase.train.checkpoint import load_checkpoint, restore, save_checkpoint
from chase.train.config import ConfigError, TrainConfig
from chase.train.data import build_data
from chase.train.distributed import Dist, init_distributed
from chase.train.loggers import check_loggers, open_loggers
from chase.train.loop import (
    DivergedError,
    TrainState,
    build_sparsifier,
    check_finite,
    evaluate,
    train_one_epoch,
)
from chase.train.metrics import METRICS_FILE, Metrics, read_metrics
from chase.train.optim import build_optimizer, build_scheduler
from chase.train.report import FINAL_FILE, REPORT_FILE, SLIM_FILE
from chase.train.seeds import epoch_seed, rank_seed
from chase.train.warm_start import load_initial_weights

log = logging.getLogger(__name__)

__all__ = ["RESUME_SAFE_KEYS", "config_diff", "run_dir_for", "train"]

#: options that may change when a run is resumed: they do not change what is computed.
RESUME_SAFE_KEYS = frozenset(
    {
        "data_dir",
        "download",
        "num_workers",
        "quiet",
        "tensorboard",
        "loggers",
        "wandb_project",
        "mlflow_uri",
        "out",
        "name",
        "device",
        "log_every",
        "max_bad_steps",
        "speedup_batch",
        "threads",
    }
)
CHECKPOINT = "checkpoint.pt"


def run_dir_for(cfg: TrainConfig) -> pathlib.Path:
    name = (
        cfg.name
        or f"{cfg.model.replace(':', '_')}-{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return pathlib.Path(cfg.out) / name


def config_diff(saved: dict[str, Any], new: TrainConfig) -> list[str]:
    """``key: saved -> new`` for every option that differs and matters for the result."""
    cur = new.to_dict()
    # An option added after the run was written is absent from its config: its default is what the run
    # did (every new option's default keeps the old behaviour).
    defaults = TrainConfig().to_dict()
    return [
        f"{k}: {saved.get(k)!r} -> {cur[k]!r}"
        for k in cur
        if k not in RESUME_SAFE_KEYS and saved.get(k, defaults[k]) != cur[k]
    ]


def _macs(st: TrainState) -> dict[str, Any]:
    """MACs per image of the model as it is now: dense-counted (GPU-supported) and over kept weights."""
    sp = st.sparsifier
    size = st.meta["image_size"]
    example = torch.zeros(1, 3, size, size, device=next(st.module.parameters()).device)
    flops = count_flops(st.module, example, masks=sp.masks if sp is not None else None)
    return {"macs": flops.dense, "macs_sparse": flops.sparse}


def _cost_record(st: TrainState) -> Optional[dict[str, Any]]:
    """After a step that changed masks or shapes: the forward cost from the next step on, and whether
    this step computed a dense weight gradient (gradient growth). ``chase.training_flops`` reads these."""
    info, sp = st.last_info, st.sparsifier
    # A mask-mode channel event changes no shape but zeroes weights: its cost changes too.
    if sp is None or info is None or not (info.updated or info.shapes_changed or info.channels_removed):
        return None
    update = info.updated and getattr(sp, "growth", None) == "gradient"
    return {"kind": "cost", "step": st.step, "update": update, "density": sp.global_density(), **_macs(st)}


def _channels_record(st: TrainState) -> Optional[dict[str, Any]]:
    """At the start and after every mask update: the amenable-channel family (chase.analysis)."""
    sp, info = st.sparsifier, st.last_info
    if sp is None or (st.step > 0 and (info is None or not info.updated)):
        return None
    return {"kind": "channels", "step": st.step, **amenable_record(sp)}


def _sparsity_record(st: TrainState) -> dict[str, Any]:
    sp = st.sparsifier
    widths = {n: int(p.shape[0]) for n, p in st.module.named_parameters() if p.ndim > 1}
    rec: dict[str, Any] = {"density": sp.global_density() if sp is not None else 1.0, "widths": widths}
    rec.update(_macs(st))
    if sp is not None and sp.removes_channels:
        rec["channel_sparsity"] = sp.channel_sparsity_now()
    return rec


def _write_config(cfg: TrainConfig, path: pathlib.Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


#: files a run writes besides its checkpoint: a folder holding any of them holds an earlier run's outputs.
RUN_OUTPUTS = ("config.yaml", METRICS_FILE, REPORT_FILE, SLIM_FILE, FINAL_FILE)


def _prepare(
    cfg: TrainConfig, run_dir: Optional[pathlib.Path], resume: bool, d: Dist, overwrite: bool = False
) -> tuple[pathlib.Path, Any]:
    """Decide the run folder and, for a resume, read and check the checkpoint. Writes nothing, except
    that rank 0 deletes temporary files a killed write left in the folder."""
    if resume:
        assert run_dir is not None
        if not (run_dir / CHECKPOINT).exists():
            raise ConfigError(f"cannot resume: {run_dir / CHECKPOINT} does not exist")
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
        if not (run_dir / METRICS_FILE).is_file():
            log.warning(
                "%s is missing: the run resumes, but its curves and training cost before step %d are lost "
                "(the report says so)",
                run_dir / METRICS_FILE,
                ckpt.get("step", 0),
            )
        diff = config_diff(ckpt["config"], cfg)
        if diff:
            raise ConfigError(
                f"cannot resume {run_dir}: the config differs from the run's ({'; '.join(diff)}). "
                "Start a new run (another --out/name) instead; nothing was changed"
            )
        _clean_temporaries(run_dir, d)
        return run_dir, ckpt
    run_dir = run_dir or run_dir_for(cfg)
    if (run_dir / CHECKPOINT).exists():
        raise ConfigError(
            f"{run_dir} already holds a run: resume it with --resume {run_dir} or pick another name"
        )
    earlier = [n for n in RUN_OUTPUTS if (run_dir / n).exists()]
    if earlier and not overwrite:
        raise ConfigError(
            f"{run_dir} holds outputs of an earlier run ({', '.join(earlier)}) but no checkpoint to resume: "
            "pick another name, or pass --overwrite to replace them"
        )
    _clean_temporaries(run_dir, d)
    return run_dir, None


def _clean_temporaries(run_dir: pathlib.Path, d: Dist) -> None:
    """Delete the temporary files of atomic writes that a killed process left behind."""
    if not d.main:
        return
    for tmp in stale_temporaries(run_dir):
        log.info("removing %s, left by an interrupted write", tmp)
        tmp.unlink(missing_ok=True)


def _check_same_world(saved: dict[str, Any], now: dict[str, Any], run_dir: pathlib.Path) -> None:
    """Refuse a resume whose processes or data differ from the run's: the schedule is in optimizer steps
    per epoch, so either would silently change the run."""
    problems = [
        f"{what} {saved[key]} -> {now[key]}"
        for key, what in (
            ("world", "processes"),
            ("train_size", "training images"),
            ("num_classes", "classes"),
            ("steps_per_epoch", "steps per epoch"),
        )
        if key in saved and saved[key] != now[key]  # checkpoints before 0.2 have no world or train_size
    ]
    if problems:
        raise ConfigError(
            f"cannot resume {run_dir}: {'; '.join(problems)}. Resume with the run's number of processes "
            "and its dataset (the schedule counts optimizer steps), or start a new run; nothing was changed"
        )


def train(
    cfg: TrainConfig,
    run_dir: Optional[str | os.PathLike] = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (default ``out/name``), or continue the run there with ``resume``.

    A new run refuses a folder that holds an earlier run's outputs unless ``overwrite``.

    Returns the final results (test accuracy, densities, slim model numbers); rank 0 writes the folder.
    """
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    d = init_distributed(cfg.device)
    try:
        return _train(cfg, pathlib.Path(run_dir) if run_dir else None, resume, d, overwrite)
    finally:
        d.close()


def _train(
    cfg: TrainConfig, run_dir: Optional[pathlib.Path], resume: bool, d: Dist, overwrite: bool
) -> dict[str, Any]:
    names = [n for n in cfg.loggers if cfg.tensorboard or n != "tensorboard"]
    check_loggers(names, mlflow_uri=cfg.mlflow_uri or None)  # before anything is written
    run_dir, ckpt = _prepare(cfg, run_dir, resume, d, overwrite)
    data = build_data(cfg, rank=d.rank, world=d.world, device=d.device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    module = get_model(cfg.model, num_classes=data.num_classes, pretrained=cfg.pretrained and ckpt is None)
    if cfg.init_from and ckpt is None:  # a resume takes every weight from its checkpoint
        load_initial_weights(module, cfg.init_from)
    module = module.to(d.device)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(module, cfg)
    scheduler = build_scheduler(optimizer, cfg, data.steps_per_epoch)
    sparsifier = build_sparsifier(module, optimizer, cfg, data.steps_per_epoch, data.image_size)
    scaler = torch.amp.GradScaler(d.device.type) if cfg.amp == "fp16" else None
    if d.rank:
        torch.manual_seed(rank_seed(cfg.seed, d.rank))  # augmentation differs per rank
    meta = {
        "steps_per_epoch": data.steps_per_epoch,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
        "world": d.world,
        "train_size": data.train_sampler.n,
    }
    if ckpt is not None:
        _check_same_world(ckpt["meta"], meta, run_dir)
    st = TrainState(cfg, module, optimizer, scheduler, sparsifier, d, scaler, meta)
    if ckpt is not None:
        restore(st, ckpt)
        log.info("resumed %s at epoch %d, step %d", run_dir, st.epoch, st.step)
    created = ckpt is None and d.main and not run_dir.exists()
    if ckpt is None and d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_config(cfg, run_dir / "config.yaml")
    initial = _sparsity_record(st) if ckpt is None else None
    metrics = Metrics(
        run_dir,
        d.main,
        lambda resume_step: open_loggers(
            names,
            run_dir,
            cfg.to_dict(),
            resume_step,
            wandb_project=cfg.wandb_project,
            mlflow_uri=cfg.mlflow_uri or None,
        ),
        st.step if ckpt is not None else -1,
    )
    if initial is not None:
        metrics.write({"kind": "start", "step": 0, "epoch": 0, **initial})
        channels = _channels_record(st) if d.main else None
        if channels is not None:
            metrics.write(channels)

    def checkpoint() -> None:
        # A diverged model is never checkpointed over the last good one: the run resumes from that.
        check_finite(st)
        if not all(bool(torch.isfinite(p).all()) for p in st.module.parameters()):
            raise DivergedError(
                f"the weights are not finite (NaN/Inf) at step {st.step}: not checkpointed; the last "
                "checkpoint resumes the run. Lower the learning rate or use amp=bf16"
            )
        # Every rank's partial epoch sums, added up: rank 0 saves the total and, at a resume, starts
        # from it while the other ranks start from 0 (so the epoch's train loss/accuracy stay exact).
        local = st.sums
        if d.enabled:
            st.sums = local.new_tensor(d.all_sum(local.tolist()))
        if d.main:
            save_checkpoint(st, run_dir / CHECKPOINT)
        st.sums = local

    def after_step(s: TrainState, loss: torch.Tensor) -> None:
        for rec in (_cost_record(s), _channels_record(s)) if d.main else ():
            if rec is not None:
                metrics.write(rec)
        if cfg.log_every and s.step % cfg.log_every == 0:
            metrics.write(
                {
                    "kind": "train_step",
                    "step": s.step,
                    "epoch": s.epoch + s.batch / data.steps_per_epoch,
                    "loss": float(loss),
                    "lr": s.optimizer.param_groups[0]["lr"],
                    **({"density": s.sparsifier.global_density()} if s.sparsifier else {}),
                }
            )
        if cfg.ckpt_every_steps and s.step % cfg.ckpt_every_steps == 0 and s.batch < data.steps_per_epoch:
            checkpoint()

    test: dict[str, float] = {}
    while st.epoch < cfg.epochs:
        data.train_sampler.set_epoch(st.epoch, start=st.batch * cfg.batch_size)
        data.train.generator.manual_seed(epoch_seed(cfg.seed, st.epoch))
        t0 = time.perf_counter()
        try:
            tr = train_one_epoch(st, data.train, data.steps_per_epoch, after_step)
        except ConfigError:  # a bad image, say: a folder this call made holds nothing to resume from
            if created and not (run_dir / CHECKPOINT).exists():
                metrics.close()
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        st.epoch, st.batch = st.epoch + 1, 0
        st.sums.zero_()
        rec: dict[str, Any] = {
            "kind": "epoch",
            "step": st.step,
            "epoch": st.epoch,
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "lr": st.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        if st.epoch % cfg.eval_every == 0 or st.epoch == cfg.epochs:
            test = evaluate(st.model, data.test, cfg, d)
            rec.update(test_loss=test["loss"], test_acc=test["acc"])
            if data.val is not None:
                val = evaluate(st.model, data.val, cfg, d)
                rec.update(val_loss=val["loss"], val_acc=val["acc"])
        rec.update(_sparsity_record(st))
        metrics.write(rec)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f%s",
            st.epoch,
            cfg.epochs,
            tr["loss"],
            tr["acc"],
            f"  test acc {test['acc']:.4f}" if "test_acc" in rec else "",
        )
        checkpoint()
    if not test:  # resumed a run that had already finished its epochs
        test = evaluate(st.model, data.test, cfg, d)
    if initial is None and d.main:
        initial = (read_metrics(run_dir)[:1] or [{}])[0]
    results = report.finish(st, data, test, run_dir, initial or {})
    metrics.write(
        {
            "kind": "final",
            "step": st.step,
            "epoch": st.epoch,
            **{k: v for k, v in results.items() if isinstance(v, (int, float))},
        }
    )
    metrics.close()
    d.barrier()
    return results
