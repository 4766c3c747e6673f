"""The CUDA paths: Chase with physical removal under autocast, GradScaler overflow, the trainer on a GPU.

Every test here needs a CUDA device and is skipped without one (CI has none; the GPU sessions run
``pytest -m gpu``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from tests.nets import TINY_CHASE_RUN, TinyResNet, batch
from torch import nn

import chase
from chase.models import get_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _chase(model, opt, **kw):
    with warnings.catch_warnings():  # a short schedule warns about its length
        warnings.simplefilter("ignore")
        return chase.Chase(
            model,
            opt,
            density=0.1,  # the budget fits in the narrowed TinyResNet
            total_steps=12,
            example_inputs=torch.zeros(1, 3, 16, 16),  # on the CPU: Chase moves it to the model
            channel_sparsity=0.5,
            update_every=2,
            channel_every=2,
            prune_skip=True,
            **kw,
        )


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_chase_shrinks_on_cuda_under_autocast(amp):
    torch.manual_seed(0)
    model = TinyResNet().cuda().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = _chase(model, opt)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
    shrunk = 0
    for i in range(12):
        x, y = batch(i)
        with torch.autocast("cuda", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x.cuda()), y.cuda())
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        info = sp.step()
        opt.zero_grad()
        shrunk += info.shapes_changed
        for name, mask in sp.masks.items():
            p = sp._masks.params[name]
            assert mask.is_cuda and p.is_cuda and mask.shape == p.shape
            assert torch.all(p[~mask] == 0)
            buf = opt.state[p]["momentum_buffer"]
            assert buf.shape == p.shape and torch.all(buf[~mask] == 0)
    assert shrunk >= 2 and sp.channel_sparsity_now() > 0.3
    assert sp.kept == sp.budget
    slim = sp.export().eval()
    model.eval()
    x = batch(99)[0].cuda()
    with torch.no_grad():
        torch.testing.assert_close(slim(x), model(x), rtol=1e-4, atol=1e-4)
    # the slim checkpoint reloads on the CPU into a freshly built model
    fresh = chase.load_slim(TinyResNet(), sp.slim_checkpoint()).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x.cpu()), slim(x).cpu(), rtol=1e-4, atol=1e-4)


def test_cuda_matches_cpu_through_a_channel_event():
    """Same seeds, same data: the CUDA run decides the same masks and channels as the CPU run (fp32)."""
    torch.backends.cudnn.deterministic = True
    runs = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = TinyResNet().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sp = _chase(model, opt)
        for i in range(5):  # updates at 2 and 4, a channel event at 3
            x, y = batch(i)
            nn.functional.cross_entropy(model(x.to(dev)), y.to(dev)).backward()
            opt.step()
            sp.step()
            opt.zero_grad()
        runs[dev] = (sp.alive_channels(), {n: m.cpu() for n, m in sp.masks.items()})
    assert runs["cpu"][0] == runs["cuda"][0]
    differ = sum(int((runs["cpu"][1][n] != runs["cuda"][1][n]).sum()) for n in runs["cpu"][1])
    total = sum(m.numel() for m in runs["cpu"][1].values())
    assert differ <= 0.01 * total  # ties and float-order differences may flip a handful of positions


def test_grad_scaler_overflow_skips_update_on_cuda():
    torch.manual_seed(0)
    model = TinyResNet().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = chase.RigL(model, opt, density=0.2, total_steps=10, update_every=1)
    scaler = torch.amp.GradScaler("cuda")
    before = {n: m.clone() for n, m in sp.masks.items()}
    x, y = batch(0)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = nn.functional.cross_entropy(model(x.cuda()), y.cuda()) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    with pytest.warns(RuntimeWarning, match="not finite"):
        info = sp.step()
    assert info.skipped and all(torch.equal(before[n], m) for n, m in sp.masks.items())


def test_trainer_runs_chase_on_cuda(tmp_path):
    from chase.cli import main

    opts = [o for o in TINY_CHASE_RUN if not o.startswith("threads=")]
    args = ["train", "--quiet", "--set", *opts, "device=cuda", "amp=bf16", "channels_last=true"]
    assert main([*args, f"out={tmp_path}"]) == 0
    run = tmp_path / "chase"
    assert (run / "slim.pt").is_file() and (run / "report.md").is_file()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert ckpt["sparsifier"]["surgery"]  # channels were removed on the GPU
    slim = chase.load_slim(get_model("cifar_resnet20", 10), torch.load(run / "slim.pt", weights_only=True))
    assert sum(p.numel() for p in slim.parameters()) < sum(
        p.numel() for p in get_model("cifar_resnet20", 10).parameters()
    )
