"""RDNet (densenet.nn.rdnet): float64 parity with timm's, timm's and NAVER's state_dicts, the
backbone interface, class activation maps, pooled features and the hub weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import RDNET_SMALL as SMALL
from conftest import randomized
from PIL import Image
from safetensors.torch import save_file

import densenet
from densenet.cli import main
from densenet.infer.cam import explain
from densenet.infer.runner import Runner
from densenet.nn.rdnet import RDNet, RDNetFeatures
from densenet.nn.registry import arch_of_state
from densenet.tasks.export import export
from densenet.train import RECIPES, make_config
from densenet.train.config import base_lr, lr_factor
from densenet.weights import adapt, convert, download, published
from densenet.weights.checkpoint import read_checkpoint

timm = pytest.importorskip("timm")
REPO = str(Path(__file__).resolve().parents[1])

SLOW = pytest.mark.slow
# conftest's four-stage RDNet of a few thousand parameters (SMALL), in timm's spelling
SMALL_TIMM = {"growth_rates": (8, 8, 8, 16), "num_blocks_list": (1, 2, 1, 1),
              "num_init_features": 16, "is_downsample_block": (None, True, False, True),
              "block_type": ("Block", "Block", "BlockESE", "BlockESE"), "num_classes": 5}  # fmt: skip


def stage_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The logits and the output of every stage (``dense_stages.I``)."""
    seen = []
    hooks = [s.register_forward_hook(lambda m, i, o: seen.append(o)) for s in model.dense_stages]
    with torch.no_grad():
        logits = model(x)
    for hook in hooks:
        hook.remove()
    return logits, seen


def assert_same_network(ours: RDNet, theirs: torch.nn.Module, x: torch.Tensor) -> None:
    logits, stages = stage_outputs(ours, x)
    ref_logits, ref_stages = stage_outputs(theirs, x)
    assert len(stages) == len(ref_stages) == len(ours.dense_stages)
    for a, b in zip([logits, *stages], [ref_logits, *ref_stages]):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-10
    with torch.no_grad():
        ref_maps = theirs.forward_intermediates(x, intermediates_only=True)
        maps = ours.forward_intermediates(x)
    assert [m.shape for m in maps] == [m.shape for m in ref_maps]
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(maps, ref_maps))


PARITY = [
    ("rdnet_tiny", 3),
    pytest.param("rdnet_tiny", 1, marks=SLOW),
    *(pytest.param(n, 3, marks=SLOW) for n in ("rdnet_small", "rdnet_base", "rdnet_large")),
]


@pytest.mark.parametrize(("name", "in_channels"), PARITY)
def test_float64_parity_with_timm(name, in_channels):
    torch.manual_seed(0)
    theirs = randomized(timm.create_model(name, in_chans=in_channels))
    with torch.device("meta"):
        ours = densenet.get_model(name, in_channels=in_channels)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    assert ours.feature_info == [
        {k: v for k, v in i.items() if k != "growth_rate"} for i in theirs.feature_info
    ]
    assert_same_network(ours.eval(), theirs, torch.randn(2, in_channels, 64, 64).double())


@pytest.mark.parametrize("in_channels", [3, 1])
def test_small_configuration_matches_timm_and_trains_its_stochastic_depth(in_channels):
    rdnet = timm.models.rdnet.RDNet(**SMALL_TIMM, drop_path_rate=0.3, in_chans=in_channels)
    theirs = randomized(rdnet)
    ours = RDNet(**SMALL, drop_path_rate=0.3, in_channels=in_channels).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, in_channels, 40, 56).double()
    assert_same_network(ours.eval(), theirs, x)
    rates = [b.drop_path_rate for s in ours.dense_stages for b in s[-1]]
    assert rates == pytest.approx(
        [b.drop_path.drop_prob for s in theirs.dense_stages for b in s[-1]]
    )
    ours.train()
    x = torch.randn(8, in_channels, 32, 32).double()
    assert not torch.equal(ours(x), ours(x))  # blocks dropped at random in training


def test_a_timm_state_dict_loads_strictly_from_a_file(tmp_path):
    theirs = randomized(timm.create_model("rdnet_tiny")).float()
    save_file(theirs.state_dict(), tmp_path / "model.safetensors")
    ours = densenet.rdnet_tiny(weights=str(tmp_path / "model.safetensors")).eval()
    loaded = densenet.load("rdnet_tiny", weights=str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x)) and torch.equal(loaded.module(x), theirs(x))
    pre = loaded.card.preprocessing  # the published weights' own
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (248, 224, "bicubic")


def test_navers_key_spelling_loads(tmp_path):
    theirs = randomized(timm.models.rdnet.RDNet(**SMALL_TIMM)).float()
    naver = {
        k.replace("stem.", "stem.stem.", 1) if k.startswith("stem.") else k: v
        for k, v in theirs.state_dict().items()
    }
    assert "stem.stem.0.weight" in naver
    torch.save({"model": naver, "epoch": 300}, tmp_path / "rdnet_naver.pth")
    ours = RDNet(**SMALL)
    adapt.load_weights(ours, tmp_path / "rdnet_naver.pth")
    assert torch.equal(ours.stem[0].weight, theirs.stem[0].weight)
    assert convert.convert_rdnet_keys(theirs.state_dict()).keys() == theirs.state_dict().keys()


def test_grey_images_through_rgb_weights(tmp_path):
    rgb = randomized(RDNet(**SMALL)).float()
    save_file(rgb.state_dict(), tmp_path / "rgb.safetensors")
    grey = RDNet(**SMALL, in_channels=1)
    adapt.load_weights(grey, tmp_path / "rgb.safetensors")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(grey.eval()(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5)


def test_registry_builders_and_torch_hub():
    assert densenet.list_models("rdnet*") == [
        "rdnet_tiny",
        "rdnet_small",
        "rdnet_base",
        "rdnet_large",
    ]
    assert set(densenet.list_models()) >= set(densenet.list_models("rdnet*"))
    with torch.device("meta"):
        model = densenet.rdnet_small(num_classes=10, drop_path_rate=0.1)
        hub = torch.hub.load(REPO, "rdnet_tiny", source="local", trust_repo=True)
    assert isinstance(model, RDNet) and model.arch == "rdnet_small"
    assert model.config["drop_path_rate"] == 0.1 and model.head.fc.out_features == 10
    assert isinstance(hub, RDNet) and sum(p.numel() for p in hub.parameters()) == 23_863_008
    info = densenet.nn.registry.model_info("rdnet_tiny")
    assert info["params"] == 23_863_008 and round(info["gflops"], 1) == 10.1


def test_a_files_rdnet_size_is_read_from_its_shapes():
    with torch.device("meta"):
        state = densenet.rdnet_small(num_classes=3, in_channels=1).state_dict()
    naver = {"model": {k.replace("stem.", "stem.stem.", 1): v for k, v in state.items()}}
    assert arch_of_state(convert.state_dict_of(naver, "x.pth"), "x.pth") == "rdnet_small"
    with pytest.raises(published.WeightsError, match="an RDNet of no registered size"):
        arch_of_state(RDNet(**SMALL).state_dict(), "small.pth")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_blocks": (1, 2)}, "one value per stage"),
        ({"growth_rates": (8, 0, 8, 16)}, "growth_rates must be positive"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
        ({"in_channels": 0}, "in_channels must be a positive integer"),
    ],
)
def test_a_bad_configuration_is_named(change, message):
    with pytest.raises(ValueError, match=message):
        RDNet(**{**SMALL, **change})


def test_backbone_interface():
    model = RDNet(**SMALL).eval()
    info = [(i["num_chs"], i["reduction"]) for i in model.feature_info]
    assert info == [(24, 4), (16, 8), (24, 16)]
    assert model.min_input_size == 16
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        maps = model.forward_intermediates(x)
        assert torch.equal(maps[-1], model.forward_features(x))
        assert torch.equal(model.forward_head(maps[-1]), model(x))
        backbone = RDNetFeatures(model, out_indices=(0, -2))
        assert backbone.out_indices == (0, 1) and len(backbone.dense_stages) == 3
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), maps[:2]))
    with pytest.raises(ValueError, match="stage indices"):
        RDNetFeatures(model, out_indices=(3,))
    features = densenet.get_model("rdnet_tiny", features_only=True, out_indices=(-1,))
    assert isinstance(features, RDNetFeatures) and features.feature_info[0]["reduction"] == 32
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 24) and model.config["num_classes"] == 0


def test_class_activation_maps_and_pooled_features():
    model = randomized(RDNet(**SMALL)).float()
    x = torch.randn(2, 3, 64, 64)
    maps = explain(model, x)
    with torch.no_grad():
        logits = model(x)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert maps.maps.shape == (2, 5, 4, 4)
    assert torch.allclose(maps.logits, logits, atol=1e-5)
    assert torch.allclose(maps.maps.mean((2, 3)), logits, atol=1e-5)
    loaded = densenet.load(model)
    runner = Runner(loaded, torch.device("cpu"), headless=True)
    fc = model.head.fc.weight.numel() + model.head.fc.bias.numel()
    assert runner.weights_count == sum(p.numel() for p in model.parameters()) - fc
    assert torch.allclose(runner.logits(x), pooled, atol=1e-6)
    assert torch.allclose(Runner(loaded, torch.device("cpu")).logits(x), logits, atol=1e-6)


def hub_cache(root, repo: str, files: dict) -> None:
    """A Hugging Face hub cache folder (HF_HUB_CACHE layout) holding ``files`` of ``repo``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, state in files.items():
        save_file(state, snapshot / name)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache, offline (no network is ever asked)."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_hub_weights_come_from_the_hub_cache_offline(offline_hub):
    entry = published.get_weights("rdnet_tiny")
    assert entry.name == "NV_IN1K" and entry.hf_hub_id == "naver-ai/rdnet_tiny.nv_in1k"
    with pytest.raises(published.WeightsError, match="HF_HUB_OFFLINE=1"):
        download.fetch(entry)
    state = randomized(RDNet(**SMALL)).float().state_dict()
    hub_cache(offline_hub, entry.hf_hub_id, {"model.safetensors": state})
    path = download.fetch(entry)
    assert path == entry.cache_path and path.is_file()
    model = adapt.load_weights(RDNet(**SMALL), entry)
    assert torch.equal(model.head.fc.weight, state["head.fc.weight"])


def test_hub_weights_download_through_huggingface_hub(offline_hub, file_server, monkeypatch):
    """A stand-in hub on 127.0.0.1 (the file, its commit and content hash in the headers):
    downloaded into the hub cache; a truncated body is refused and leaves no file there."""
    import huggingface_hub

    root, url, server = file_server
    entry = published.get_weights("rdnet_small")
    state = randomized(RDNet(**SMALL)).float().state_dict()
    served = root / entry.hf_hub_id / "resolve" / "main" / entry.file_name
    served.parent.mkdir(parents=True)
    save_file(state, served)
    digest = download.sha256_file(served)

    def end_headers(handler) -> None:
        handler.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        handler.send_header("ETag", f'"{digest}"')
        type(handler).__mro__[1].end_headers(handler)

    server.handler.end_headers = end_headers
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url.rstrip("/"))
    template = url + "{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    server.handler.truncate = True
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub's retries
    with pytest.raises(published.WeightsError, match="cannot fetch model.safetensors"):
        download.fetch(entry)
    assert not [p for p in offline_hub.rglob("*") if p.is_file() and p.stat().st_size > 1000]
    server.handler.truncate = False
    path = download.fetch(entry)
    assert path.is_relative_to(offline_hub) and download.sha256_file(path) == digest
    model = adapt.load_weights(RDNet(**SMALL), entry)
    assert torch.equal(model.stem[0].weight, state["stem.0.weight"])


def test_hub_weights_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(published.WeightsError, match=r"densenet-toolkit\[hub\]"):
        download.fetch(published.get_weights("rdnet_large", "NV_IN1K_FT_IN1K_384"))


def test_the_cards_preprocessing_is_the_weights_own():
    card = published.get_weights("rdnet_base").card
    pre = card.preprocessing
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (248, 224, "bicubic")
    assert pre.mean == (0.485, 0.456, 0.406) and card.arch == "rdnet_base"
    pre = published.get_weights("rdnet_large", "NV_IN1K_FT_IN1K_384").card.preprocessing
    assert (pre.resize_size, pre.crop_size) == (384, 384)
    acc1 = [published.get_weights(n).acc1 for n in densenet.list_models("rdnet*")]
    assert acc1 == [82.8, 83.7, 84.4, 84.8]
    for name in densenet.list_models("rdnet*"):  # the entries' sizes are the networks'
        info = densenet.nn.registry.model_info(name)
        entry = published.get_weights(name)
        assert entry.num_params == info["params"] and entry.gflops == round(info["gflops"], 3)


@pytest.mark.slow
def test_published_weights_load_by_name_from_the_hub_cache(offline_hub):
    theirs = randomized(timm.create_model("rdnet_tiny")).float()
    hub_cache(
        offline_hub, "naver-ai/rdnet_tiny.nv_in1k", {"model.safetensors": theirs.state_dict()}
    )
    loaded = densenet.load("rdnet_tiny")
    assert loaded.card.preprocessing.interpolation == "bicubic"
    assert loaded.card.weights == "NV_IN1K"
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), theirs(x))


def test_the_rdnet_recipe():
    recipe = RECIPES["rdnet"]
    assert (recipe.optimizer, recipe.lr, recipe.lr_batch, recipe.weight_decay) == (
        "adamw",
        4e-3,
        4096,
        0.05,
    )
    assert (recipe.schedule, recipe.warmup_epochs, recipe.label_smoothing) == ("cosine", 20, 0.1)
    assert recipe.drop_path_rate > 0 and recipe.model == "rdnet_tiny"
    assert base_lr(recipe) == pytest.approx(4e-3 * 1024 / 4096)
    factors = [lr_factor(recipe, e) for e in (0, 19, 20, 160, 299)]
    assert factors[:3] == [pytest.approx(1 / 20), 1.0, 1.0] and factors[3] == pytest.approx(0.5)
    assert 0 < factors[4] < 1e-3
    with pytest.raises(ValueError, match="drop_path_rate .* applies to RDNet"):
        make_config("imagenet", data="x", drop_path_rate=0.1)


def image_folder(root: Path) -> Path:
    """``train/`` (6 images) and ``val/`` (2) of classes ``dark`` and ``light``, 36x36 RGB."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", 6), ("val", 2)):
        for label, offset in (("dark", 0), ("light", 128)):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 128, (36, 36, 3), generator=generator) + offset
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(
                    root / split / label / f"{i}.png"
                )
    return root


@pytest.mark.slow
def test_train_then_eval_and_predict_through_the_command_line(tmp_path, capsys):
    """``densenet train --recipe rdnet``, narrowed to a few steps, then eval from its checkpoint;
    predict with random weights."""
    data, out = image_folder(tmp_path / "images"), tmp_path / "run"
    argv = ["train", "--recipe", "rdnet", "--data", str(data), "--out", str(out), "--json",
            "--no-progress", "--workers", "0", "--set", "epochs=1", "--set", "batch_size=4",
            "--set", "image_size=32", "--set", "warmup_epochs=0"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    checkpoint = read_checkpoint(out / "best.pth")
    assert checkpoint.card.arch == "rdnet_tiny" and checkpoint.model_args["drop_path_rate"] == 0.1
    argv = ["eval", str(data), "--weights", str(out / "best.pth"), "--workers", "0", "--json",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 4 and result["top1"] == pytest.approx(summary["best_val_top1"])
    image = next((data / "val").rglob("*.png"))
    assert main(["predict", "--model", "rdnet_tiny", "--weights", "none", str(image)]) == 0
    assert "%" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("suffix", "form"),
    [pytest.param(".onnx", "onnx", marks=SLOW), (".pt2", "exported"), (".pt", "torchscript")],
)
def test_onnx_torch_export_and_torchscript(tmp_path, suffix, form):
    """A small RDNet as ONNX (run by ONNX Runtime), a torch.export program and TorchScript,
    loaded back by ``densenet.load`` with its card: the same logits."""
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    model = randomized(RDNet(**SMALL)).float()
    loaded = densenet.load(export(model, tmp_path / f"small{suffix}", form))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), model(x), atol=1e-4)
    assert loaded.card.num_classes == 5


@pytest.mark.parametrize(
    "name", ["rdnet_tiny", pytest.param("rdnet_large", marks=pytest.mark.slow)]
)
def test_the_counts_in_the_table_are_the_networks(name):
    """``densenet info`` reads RDNet's parameters and GFLOPs from a table; counted here on the
    meta device they agree, and the smallest input runs where one pixel less does not."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = densenet.get_model(name).eval()
        with FlopCounterMode(display=False) as counter:
            model(torch.empty(1, 3, 224, 224))
    info = densenet.nn.registry.model_info(name)
    assert info["params"] == sum(p.numel() for p in model.parameters())
    assert info["gflops"] == counter.get_total_flops() / 1e9
    side = published.get_weights(name).min_size[0]
    with torch.device("meta"):
        model(torch.empty(1, 3, side, side))
        with pytest.raises(RuntimeError):
            model(torch.empty(1, 3, side - 1, side - 1))


@pytest.mark.slow
def test_a_narrowed_rdnet_learns_real_digits_through_the_command_line(tmp_path, capsys):
    """``densenet train --recipe rdnet`` with the architecture narrowed by ``--set``: an RDNet
    of three short stages learns scikit-learn's handwritten digits (>= 90% held out; chance is
    10%), and ``densenet eval`` from its checkpoint gets the same accuracy."""
    from test_data import digits_folder

    data, out = digits_folder(tmp_path / "digits"), tmp_path / "run"
    narrow = {"num_init_features": 16, "growth_rates": [16, 24, 32], "num_blocks": [1, 2, 2],
              "downsample": [False, True, True], "se": [False, False, True]}  # fmt: skip
    settings = {"model_args": json.dumps(narrow), "epochs": 6, "batch_size": 32,
                "image_size": 16, "warmup_epochs": 1, "lr_batch": 32, "augment": "none",
                "drop_path_rate": 0}  # fmt: skip
    argv = ["train", "--recipe", "rdnet", "--data", str(data), "--out", str(out), "--json",
            "--no-progress", "--workers", "0"]  # fmt: skip
    assert main(argv + [f"--set={k}={v}" for k, v in settings.items()]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_val_top1"] >= 90.0, summary
    assert read_checkpoint(out / "best.pth").card.arch == "rdnet_tiny"
    argv = ["eval", str(data), "--weights", str(out / "best.pth"), "--workers", "0", "--json",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(summary["best_val_top1"])
