"""The Hugging Face Hub, offline: repo ids resolved through a populated cache, clear errors when that fails,
push_to_hub against a recording stand-in for the Hub's API, and the model card's YAML metadata."""

from __future__ import annotations

import hashlib
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import chase
from chase.card import card_metadata

hf = pytest.importorskip("huggingface_hub")
import huggingface_hub.constants  # noqa: E402  (the package loads its submodules lazily)
import huggingface_hub.errors  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

pytest.importorskip("safetensors")
yaml = pytest.importorskip("yaml")

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
ROOT = pathlib.Path(__file__).resolve().parents[1]


def cache_repo(cache: pathlib.Path, repo_id: str, files: dict[str, bytes], commit: str, ref: str = "main"):
    """Put ``files`` where huggingface_hub's cache keeps a model repo's snapshot: the contents under
    ``blobs/<hash>``, ``snapshots/<commit>/<name>`` linking to them, ``refs/<ref>`` holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it


def folder_files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path and offline mode, in the environment and in huggingface_hub's
    constants (read once, when it was first imported in this process)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _resnet(seed: int):
    from chase.models import get_model

    torch.manual_seed(seed)
    model = get_model("cifar_resnet20", num_classes=10)
    result = chase.prune_channels(
        model, torch.randn(1, 3, 32, 32), channels=chase.ChannelSpec(channel_sparsity=0.5)
    )
    return model.eval(), result.history


def _save(model, history, folder, **kwargs):
    return chase.save_pretrained(
        model,
        folder,
        history=history,
        model_name="cifar_resnet20",
        model_kwargs={"num_classes": 10},
        **kwargs,
    )


def _same(a, b) -> bool:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# ---------------------------------------------------------------------------------------- from the cache
def test_a_repo_id_loads_from_the_offline_cache_at_each_revision(tmp_path, offline_cache):
    first, history_a = _resnet(0)
    second, history_b = _resnet(1)
    cache_repo(offline_cache, "user/repo", folder_files(_save(first, history_a, tmp_path / "a")), COMMIT_A)
    cache_repo(
        offline_cache, "user/repo", folder_files(_save(second, history_b, tmp_path / "b")), COMMIT_B, "v2"
    )
    assert _same(chase.from_pretrained("user/repo"), first)  # refs/main
    assert _same(chase.from_pretrained("user/repo", revision=COMMIT_A), first)  # a commit hash
    assert _same(chase.from_pretrained("user/repo", revision="v2"), second)  # a branch or tag
    assert _same(chase.from_pretrained("user/repo", revision=COMMIT_B), second)


def test_offline_and_not_cached_says_so_and_how_to_fix_it(tmp_path, offline_cache):
    model, history = _resnet(0)
    cache_repo(offline_cache, "user/repo", folder_files(_save(model, history, tmp_path / "a")), COMMIT_A)
    for name, revision in [("user/missing", None), ("user/repo", "c" * 40), ("user/repo", "v9")]:
        with pytest.raises(FileNotFoundError) as raised:
            chase.from_pretrained(name, revision=revision)
        message = str(raised.value)
        assert "not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message, message
        assert name in message and str(offline_cache) in message


def test_a_cached_repo_that_is_not_a_chase_model_is_named(tmp_path, offline_cache):
    cache_repo(offline_cache, "user/bert", {"config.json": b'{"model_type": "bert"}'}, COMMIT_A)
    with pytest.raises(ValueError, match=r"models--user--bert.*transformers' own format.*AutoModel"):
        chase.from_pretrained("user/bert")


def test_what_is_neither_a_folder_nor_a_repo_id(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        chase.from_pretrained(tmp_path / "file")
    for name in (tmp_path / "absent", str(tmp_path / "absent"), "./absent/model", "a//b", "user/re po"):
        with pytest.raises(FileNotFoundError, match="is not a folder"):
            chase.from_pretrained(name)


def test_a_local_folder_wins_over_a_repo_id(tmp_path, monkeypatch):
    model, history = _resnet(0)
    _save(model, history, tmp_path / "user" / "repo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf, "snapshot_download", lambda *a, **k: pytest.fail("the Hub was asked"))
    assert _same(chase.from_pretrained("user/repo", revision="main"), model)


def _http_error(cls, status: int):
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    return cls(f"{status} error", response=response)


@pytest.mark.parametrize(
    "error, words, kind",
    [
        (
            (huggingface_hub.errors.RepositoryNotFoundError, 404),
            "neither a local folder nor a model repo",
            FileNotFoundError,
        ),
        ((huggingface_hub.errors.RevisionNotFoundError, 404), "has no revision 'v3'", FileNotFoundError),
        ((huggingface_hub.errors.GatedRepoError, 403), "gated repo", PermissionError),
        ((huggingface_hub.errors.HfHubHTTPError, 401), "refused", FileNotFoundError),
    ],
)
def test_hub_errors_say_what_to_do(monkeypatch, error, words, kind):
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        raise _http_error(*error)

    monkeypatch.setattr(hf, "snapshot_download", snapshot_download)
    with pytest.raises(kind, match=words):
        chase.from_pretrained("user/repo", revision="v3", token="hf_x")
    ((repo_id, kwargs),) = calls
    assert repo_id == "user/repo" and kwargs["revision"] == "v3" and kwargs["token"] == "hf_x"
    assert kwargs["allow_patterns"] == ["config.json", "model.safetensors"]  # only what chase reads
    assert kwargs["library_name"] == "chase"


def test_hf_hub_offline_in_a_fresh_process(tmp_path):
    """HF_HOME and HF_HUB_OFFLINE=1 set in the environment before anything is imported, as a user sets
    them: the model loads from HF_HOME/hub with no network."""
    model, history = _resnet(0)
    cache_repo(
        tmp_path / "home" / "hub", "user/repo", folder_files(_save(model, history, tmp_path / "a")), COMMIT_A
    )
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(x), tmp_path / "y.pt")
    code = (
        "import sys, torch, chase\n"
        f"x, y = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'y.pt')!r})\n"
        "with torch.no_grad():\n"
        "    print(torch.equal(chase.from_pretrained('user/repo')(x), y))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"


# -------------------------------------------------------------------------------------------- push_to_hub
class RecordingHub:
    """Stands in for the Hub's API: records every call and what upload_folder would send (the files of the
    folder that its allow_patterns select, read during the call), and never touches the network."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.tokens: list = []
        hub = self
        original_init = hf.HfApi.__init__

        def init(api, *args, **kwargs):
            hub.tokens.append(kwargs.get("token"))
            original_init(api, *args, **kwargs)

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", (repo_id,), kwargs))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, **kwargs):
            hub.calls.append(("create_branch", (repo_id,), kwargs))

        def upload_folder(api, **kwargs):
            hub.calls.append(("upload_folder", (), kwargs))
            folder = pathlib.Path(kwargs["folder_path"])
            names = [p.name for p in folder.iterdir()]
            for name in filter_repo_objects(names, allow_patterns=kwargs["allow_patterns"]):
                hub.uploaded[name] = (folder / name).read_bytes()
            return f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT_A}"

        monkeypatch.setattr(hf.HfApi, "__init__", init)
        for name, fn in [
            ("create_repo", create_repo),
            ("create_branch", create_branch),
            ("upload_folder", upload_folder),
        ]:
            monkeypatch.setattr(hf.HfApi, name, fn)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def test_push_to_hub_saves_and_uploads_and_the_upload_loads_back(tmp_path, monkeypatch, offline_cache):
    model, history = _resnet(0)
    hub = RecordingHub(monkeypatch)  # online for the push
    url = chase.push_to_hub(
        model, "user/slim-resnet", private=True, token="hf_write", commit_message="first", history=history,
        model_name="cifar_resnet20", model_kwargs={"num_classes": 10}, datasets=["cifar10"],
    )  # fmt: skip
    assert url.endswith(f"/commit/{COMMIT_A}")
    assert hub.names() == ["create_repo", "upload_folder"] and hub.tokens == ["hf_write"]
    assert hub.calls[0][1:] == (
        ("user/slim-resnet",),
        {"private": True, "exist_ok": True, "repo_type": "model"},
    )
    upload = hub.calls[1][2]
    assert upload["repo_id"] == "user/slim-resnet" and upload["commit_message"] == "first"
    assert upload["revision"] is None and upload["repo_type"] == "model"
    assert sorted(hub.uploaded) == ["README.md", "config.json", "model.safetensors"]
    assert 'chase.from_pretrained("user/slim-resnet")' in hub.uploaded["README.md"].decode()
    assert not pathlib.Path(upload["folder_path"]).exists()  # the temporary folder is gone
    # What was uploaded is what a user downloads: load it by repo id from the cache.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache_repo(offline_cache, "user/slim-resnet", hub.uploaded, COMMIT_A)
    assert _same(chase.from_pretrained("user/slim-resnet"), model)


def test_push_a_saved_folder_to_a_branch_uploads_only_its_chase_files(tmp_path, monkeypatch):
    model, history = _resnet(0)
    folder = _save(model, history, tmp_path / "m")
    (folder / "notes.txt").write_text("private notes")
    hub = RecordingHub(monkeypatch)
    chase.push_to_hub(folder, "user/repo", revision="experiment")
    assert hub.names() == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[1][2]["branch"] == "experiment" and hub.calls[1][2]["exist_ok"] is True
    assert hub.calls[2][2]["revision"] == "experiment"
    assert hub.uploaded == {
        n: (folder / n).read_bytes() for n in ("README.md", "config.json", "model.safetensors")
    }


def test_push_to_hub_refuses_before_any_call(tmp_path, monkeypatch):
    model, history = _resnet(0)
    hub = RecordingHub(monkeypatch)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved chase model"):
        chase.push_to_hub(tmp_path / "empty", "user/repo")
    folder = _save(model, history, tmp_path / "m")
    with pytest.raises(TypeError, match="is a folder"):
        chase.push_to_hub(folder, "user/repo", history=history)
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id"):
        chase.push_to_hub(folder, "user/my repo")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        chase.push_to_hub(model, "user/repo", history=history)
    assert hub.calls == []


# ----------------------------------------------------------------------------------------------- the card
def _front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    head, _, body = text[4:].partition("\n---\n")
    return yaml.safe_load(head), body


def test_the_card_metadata_is_yaml_the_hub_reads(tmp_path):
    model, history = _resnet(0)
    _save(
        model, history, tmp_path / "m", recipe={"dataset": "cifar10", "lr": 0.1},
        speed={"speedup": 1.28, "backend": "inductor", "device": "cpu", "note": "quiet machine"},
        results={"macs": 20_500_000, "macs_ratio": 0.5, "top1": 91.25, "tiny": 1e-05},
        base_model="user/dense-resnet", tags=["resnet", "cifar"], license="apache-2.0",
    )  # fmt: skip
    meta, body = _front_matter((tmp_path / "m" / "README.md").read_text())
    assert meta["library_name"] == "chase" and meta["license"] == "apache-2.0"
    assert {"chase", "sparse", "pruning", "channel-pruning", "resnet", "cifar"} <= set(meta["tags"])
    assert meta["base_model"] == "user/dense-resnet" and meta["datasets"] == ["cifar10"]
    numbers = meta["chase"]
    assert numbers["macs"] == 20_500_000 and numbers["tiny"] == 1e-05 and numbers["top1"] == 91.25
    assert (numbers["speedup"], numbers["backend"], numbers["device"]) == (1.28, "inductor", "cpu")
    assert "note" not in numbers and numbers["params"] == sum(p.numel() for p in model.parameters())
    assert body.lstrip().startswith("# cifar_resnet20, trained with chase")
    assert "chase.from_pretrained(" in body and "quiet machine" in body  # the body keeps the whole record


def test_a_trained_sparsifier_card_carries_its_density_and_a_synthetic_dataset_is_not_named(tmp_path):
    from tests.nets import TinyResNet, make_optimizer, train_step

    torch.manual_seed(0)
    model = TinyResNet(width=16)
    opt = make_optimizer("sgd", model)
    sp = chase.RigL(model, opt, density=0.3, total_steps=8)
    for i in range(8):
        train_step(model, opt, sp, i)
    chase.save_pretrained(sp, tmp_path / "m", recipe={"dataset": "synthetic"})
    meta, body = _front_matter((tmp_path / "m" / "README.md").read_text())
    assert meta["chase"]["method"] == "RigL" and meta["chase"]["density"] == pytest.approx(0.3, abs=0.01)
    noisy = {"method": "Chase", "density": 0.30000003580369267, "channel_sparsity": 0.49999998, "params": 7}
    assert card_metadata(noisy)["chase"] == {  # what was counted in float32, as people read it
        "method": "Chase", "density": 0.3, "channel_sparsity": 0.5, "params": 7
    }  # fmt: skip
    assert "datasets" not in meta and "base_model" not in meta
    assert "build=MyModel" in body  # saved without a name: the example says a builder is needed


def test_a_transformers_card_names_its_base_model_and_model_type(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=100
    )
    model = transformers.BertForSequenceClassification(config).eval()
    model.config._name_or_path = "user/tiny-bert"  # as transformers' from_pretrained("user/tiny-bert") sets
    chase.save_pretrained(model, tmp_path / "m")
    meta, body = _front_matter((tmp_path / "m" / "README.md").read_text())
    assert meta["base_model"] == "user/tiny-bert" and {"transformers", "bert"} <= set(meta["tags"])
    assert "# BertForSequenceClassification" in body and "build=" not in body
    model.config._name_or_path = str(tmp_path / "m")  # a local folder is no Hub id
    chase.save_pretrained(model, tmp_path / "n")
    assert "base_model" not in _front_matter((tmp_path / "n" / "README.md").read_text())[0]


def test_yaml_writer_round_trips_awkward_values():
    from chase.card import to_yaml

    data = {
        "plain": "chase", "yes": "yes", "on": "off", "number-like": "1.0", "hex-like": "0x10",
        "colon": "a: b", "hash": "#tag", "empty": "", "lines": "one\ntwo", "quote": 'say "hi"',
        "separator": "a\u2028b", "emoji": "fast 🚀", "dash": "-dash", "repo": "user/model-v1.2",
        "tiny": 1e-05, "huge": 1e20, "negative": -0.0, "int": 7, "inf": math.inf, "bool": True,
        "none": None, "list": ["a", 1, 2.5, "no"], "nested": {"deeper": {"x": 1}, "empty": {}},
        "empty_list": [], "key with space": 1,
    }  # fmt: skip
    back = yaml.safe_load(to_yaml(data))
    assert back == data and math.copysign(1, back["negative"]) == -1
    assert math.isnan(yaml.safe_load(to_yaml({"nan": math.nan}))["nan"])
    with pytest.raises(TypeError, match="card metadata"):
        to_yaml({"x": [{"nested": "dict in a list"}]})


def test_card_options_are_checked_before_anything_is_written(tmp_path):
    model, history = _resnet(0)
    with pytest.raises(ValueError, match="datasets must be a list"):
        _save(model, history, tmp_path / "m", datasets="cifar10")
    with pytest.raises(ValueError, match="plain JSON"):
        _save(model, history, tmp_path / "m", results={"macs": torch.tensor(1.0)})
    assert not (tmp_path / "m").exists()
