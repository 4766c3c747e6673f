"""transformers integration: configs that describe narrowed models, and the Trainer callback (offline,
tiny configs, CPU)."""

from __future__ import annotations

import pathlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

import chase  # noqa: E402
from chase.integrations.transformers import STATE_FILE, ChaseCallback, sync_config  # noqa: E402

#: the sizes every tiny model of these tests shares
_TINY = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}


def _llama() -> torch.nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**_TINY, num_key_value_heads=2))


def _bert() -> torch.nn.Module:
    return transformers.BertForSequenceClassification(transformers.BertConfig(**_TINY, num_labels=3))


def _qwen2() -> torch.nn.Module:  # derives its head width from hidden_size / heads unless told head_dim
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_TINY, num_key_value_heads=2))


@pytest.mark.parametrize("build", [_llama, _qwen2])
def test_uniform_widths_reload_with_transformers_alone(tmp_path: pathlib.Path, build) -> None:
    torch.manual_seed(0)
    model, x = build().eval(), torch.randint(0, 100, (2, 8))
    spec = chase.ChannelSpec(channel_sparsity=0.5, prune_heads=True, channel_rank="uniform")
    chase.prune_channels(model, x, channels=spec)
    assert model.model.layers[0].self_attn.q_proj.out_features == 16  # 2 of 4 heads left
    changed = sync_config(model)
    assert changed == {
        "num_attention_heads": (4, 2),
        "num_key_value_heads": (2, 1),
        "intermediate_size": (64, 32),
    }
    assert sync_config(model) == {}  # now it fits
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_widths_the_config_cannot_hold_are_refused_and_nothing_changes() -> None:
    torch.manual_seed(0)
    model, x = _bert().eval(), torch.randint(0, 100, (2, 8))
    chase.prune_channels(model, x, channels=chase.ChannelSpec(channel_sparsity=0.5, prune_heads=True))
    before = model.config.to_dict()
    with pytest.raises(ValueError, match=r"chase.save_pretrained.*channel_rank=\"uniform\""):
        sync_config(model)
    assert sync_config(model, strict=False) is None
    assert model.config.to_dict() == before  # all or nothing
    with pytest.raises(TypeError, match="config"):
        sync_config(torch.nn.Linear(2, 2))


def _tokens(n: int = 32, classes: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (n, 8), generator=g)
    labels = ids[:, 0] % classes
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def _trainer(model, out: pathlib.Path, cb: ChaseCallback, steps: int = 8, **args):
    args = {"save_strategy": "steps", **args}
    targs = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=2, save_steps=4, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, **args,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=targs, train_dataset=_tokens(), callbacks=[cb])


def _callback(total: int = 8, export_dir=None) -> ChaseCallback:
    example = {"input_ids": torch.randint(0, 100, (1, 8))}
    spec = chase.ChannelSpec(channel_sparsity=0.5, channel_every=2, prune_heads=True)

    def make(model, opt):
        return chase.Chase(
            model, opt, density=0.5, total_steps=total, update_every=2, example_inputs=example, channels=spec
        )

    return ChaseCallback(make, example_inputs=example, export_dir=export_dir)


def test_trainer_callback_shrinks_logs_checkpoints_and_resumes_bit_exactly(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model, cb = _bert(), _callback(export_dir=tmp_path / "export")
    dense = sum(p.numel() for p in model.parameters())
    trainer = _trainer(model, tmp_path / "a", cb, gradient_accumulation_steps=2)
    trainer.train()
    assert cb.sparsifier is not None and cb.sparsifier.step_count == 8  # once per optimizer step
    assert sum(p.numel() for p in model.parameters()) < dense
    logged = [h for h in trainer.state.log_history if "chase/density" in h]
    assert logged and logged[-1]["chase/channel_sparsity"] > 0 and logged[-1]["chase/macs_ratio"] < 1
    ckpt = tmp_path / "a" / "checkpoint-4"
    assert (ckpt / STATE_FILE).is_file()
    # the export: BERT with heads removed cannot be described by its config -> chase's format
    reloaded = chase.from_pretrained(tmp_path / "export")  # rebuilt from the saved transformers config
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, cb.sparsifier.export().eval()(input_ids=x).logits)

    # resume from step 4 in a fresh process state: same weights, masks and shapes as the run above, with
    # resume_from called first, and with the Trainer's own resume_from_checkpoint alone (the callback's
    # hook on load_state_dict finds the checkpoint the weights come from and narrows the model first)
    for explicit in (True, False):
        torch.manual_seed(0)
        model2, cb2 = _bert(), _callback()
        trainer2 = _trainer(model2, tmp_path / "a", cb2, gradient_accumulation_steps=2)
        if explicit:
            cb2.resume_from(model2, ckpt)
        trainer2.train(resume_from_checkpoint=str(ckpt))
        a, b = model.state_dict(), model2.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert all(torch.equal(m, cb2.sparsifier.masks[n]) for n, m in cb.sparsifier.masks.items())


def test_resume_needs_the_callbacks_state(tmp_path: pathlib.Path) -> None:
    cb = _callback()
    with pytest.raises(FileNotFoundError, match="ChaseCallback"):
        cb.resume_from(_bert(), tmp_path)


def test_a_resume_the_trainer_is_not_told_of_is_refused_before_training(tmp_path: pathlib.Path) -> None:
    """TrainingArguments(resume_from_checkpoint=...) narrows the model through the callback, but the
    Trainer loads the checkpoint only when train() is given it: it would train the narrowed model from
    step 0 with the sparsifier at the checkpoint's step."""
    torch.manual_seed(0)
    _trainer(_bert(), tmp_path / "a", _callback(), steps=4).train()
    ckpt = tmp_path / "a" / "checkpoint-4"
    torch.manual_seed(0)
    model, cb = _bert(), _callback()
    trainer = _trainer(model, tmp_path / "b", cb, resume_from_checkpoint=str(ckpt))
    assert cb.sparsifier is not None and cb.sparsifier.step_count == 4  # read when the Trainer was built
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"trainer.train\(resume_from_checkpoint="):
        trainer.train()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing trained


def test_load_best_model_at_end_is_refused_with_physical_removal(tmp_path: pathlib.Path) -> None:
    """The best checkpoint may be wider than the model at the end: the Trainer's load would fail after
    the whole run. Refused when training starts, saying what to do instead."""
    torch.manual_seed(0)
    model, cb = _bert(), _callback()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "a"), max_steps=8, per_device_train_batch_size=4, save_steps=4,
        eval_strategy="steps", eval_steps=4, load_best_model_at_end=True, report_to=[], use_cpu=True,
        disable_tqdm=True,
    )  # fmt: skip
    data = _tokens()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[cb]
    )
    with pytest.raises(ValueError, match="load_best_model_at_end=False"):
        trainer.train()
    assert cb.sparsifier is None and trainer.state.global_step == 0


def test_with_masks_the_export_is_the_best_checkpoint_the_trainer_loaded(tmp_path: pathlib.Path) -> None:
    """removal="mask" keeps the shapes, so load_best_model_at_end works; the export then takes the best
    checkpoint's masks with its weights (not the last step's masks over the best weights)."""
    torch.manual_seed(0)
    model, example = _llama(), {"input_ids": torch.randint(0, 100, (1, 8))}
    spec = chase.ChannelSpec(
        channel_sparsity=0.5, channel_every=2, prune_heads=True, channel_rank="uniform", removal="mask"
    )

    def make(m, opt):
        return chase.Chase(
            m, opt, density=0.5, total_steps=8, update_every=2, example_inputs=example, channels=spec
        )

    cb = ChaseCallback(make, export_dir=tmp_path / "export")
    data = [{"input_ids": t["input_ids"], "labels": t["input_ids"]} for t in _tokens()]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=True, report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[cb]
    )
    trainer.train()
    assert not trainer.state.best_model_checkpoint.endswith("checkpoint-8")  # an earlier one was loaded
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.allclose(reloaded(x).logits, model.eval()(x).logits, atol=1e-6)


def test_a_llama_trained_with_uniform_widths_exports_for_transformers_alone(tmp_path: pathlib.Path) -> None:
    torch.manual_seed(0)
    model = _llama()
    example = {"input_ids": torch.randint(0, 100, (1, 8))}
    spec = chase.ChannelSpec(channel_sparsity=0.5, channel_every=2, prune_heads=True, channel_rank="uniform")

    def make(m, opt):
        return chase.Chase(
            m, opt, density=0.5, total_steps=8, update_every=2, example_inputs=example, channels=spec
        )

    cb = ChaseCallback(make, export_dir=tmp_path / "export")
    data = [{"input_ids": t["input_ids"], "labels": t["input_ids"]} for t in _tokens()]
    trainer = _trainer(model, tmp_path / "run", cb)
    trainer.train_dataset = data
    trainer.train()
    assert model.config.num_attention_heads < 4 and model.config.intermediate_size < 64  # kept in sync
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        assert torch.equal(again(x).logits, cb.sparsifier.export().eval()(x).logits)
    # every checkpoint the Trainer wrote loads with transformers alone too
    ckpt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-8")
    assert ckpt.config.num_key_value_heads == model.config.num_key_value_heads


def _ddp_worker(rank: int, world: int, out: str, port: int) -> None:
    """One rank of the Trainer's own DDP (Accelerate on the gloo group the test started): a run with
    removal="mask" (its final weights saved), then one with physical removal (its error saved)."""
    import os

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    example = {"input_ids": torch.randint(0, 100, (1, 8))}
    for removal in ("mask", "physical"):
        torch.manual_seed(0)
        model = _bert()
        spec = chase.ChannelSpec(channel_sparsity=0.5, channel_every=2, removal=removal)

        def make(m, opt, spec=spec):
            return chase.Chase(
                m, opt, density=0.5, total_steps=8, update_every=2, example_inputs=example, channels=spec
            )

        cb = ChaseCallback(make)
        trainer = _trainer(model, pathlib.Path(out) / removal, cb, save_strategy="no", ddp_backend="gloo")
        try:
            trainer.train()
        except RuntimeError as e:
            (pathlib.Path(out) / f"{removal}{rank}.err").write_text(str(e))
            continue
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "cs": cb.sparsifier.channel_sparsity_now()}, f"{out}/{removal}{rank}.pt")


@pytest.mark.slow
def test_trainer_ddp_on_two_cpu_processes(tmp_path: pathlib.Path) -> None:
    import socket

    import torch.multiprocessing as mp

    from nets import in_process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(in_process_group, args=(2, str(tmp_path / "init"), _ddp_worker, str(tmp_path), port), nprocs=2)
    a, b = (torch.load(tmp_path / f"mask{r}.pt") for r in (0, 1))
    assert a["cs"] > 0  # channels were removed (zeroed) during the run
    assert all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])  # the ranks agree
    for r in (0, 1):  # a physical removal cannot re-wrap the Trainer's DDP: refused, saying what to do
        assert "removal='mask'" in (tmp_path / f"physical{r}.err").read_text()
