"""The trainer's loggers: the same records reach TensorBoard, Weights & Biases (offline) and MLflow (a file
store), and a resumed run continues the same W&B and MLflow runs."""

from __future__ import annotations

import pytest

pytest.importorskip("yaml")

from tests.nets import TINY_CHASE_RUN

from chase.cli import main


def _train(tmp_path, *sets):
    return main(["train", "-q", "--out", str(tmp_path), "--set", *TINY_CHASE_RUN, *sets])


def test_mlflow_gets_the_metrics_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    from chase.train import run as run_mod

    save = run_mod.save_checkpoint

    def save_then_die(st, path):
        save(st, path)
        if st.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path, "loggers=[jsonl,mlflow]", "ckpt_every_steps=1")
    monkeypatch.setattr(run_mod, "save_checkpoint", save)
    mlflow.end_run()  # the killed process's run was left open in this test process
    run = tmp_path / "chase"
    first = (run / "mlflow_run_id").read_text()
    assert main(["train", "-q", "--resume", str(run)]) == 0
    assert (run / "mlflow_run_id").read_text() == first  # the same MLflow run goes on
    run_id = (run / "mlflow_run_id").read_text().strip()
    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    history = client.get_metric_history(run_id, "epoch.test_acc")
    assert [m.step for m in history] and history[-1].value >= 0
    assert client.get_run(run_id).data.params["method"] == "chase"
    assert client.get_metric_history(run_id, "final.slim_test_acc")


def test_wandb_offline_gets_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert _train(tmp_path, "loggers=[jsonl,wandb]") == 0
    run = tmp_path / "chase"
    run_id = (run / "wandb_run_id").read_text().strip()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert offline and any(p.suffix == ".wandb" for p in offline[0].iterdir())


def test_an_unknown_logger_is_refused(tmp_path, capsys):
    assert _train(tmp_path, "loggers=[jsonl,neptune]") == 2
    assert "unknown logger" in capsys.readouterr().err


def test_an_mlflow_uri_it_cannot_use_is_refused_before_anything_is_written(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from chase.cli import main

    sets = ["dataset=synthetic", "method=dense", "epochs=1", "loggers=jsonl,mlflow", "mlflow_uri=foo://bar"]
    assert main(["train", "-q", "--out", str(tmp_path), "--set", *sets, "name=r"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mlflow_uri='foo://bar' is not a tracking URI" in err and "\n" not in err
    assert not (tmp_path / "r").exists()
