"""Weights: the registry, legacy keys, local files, the download path and its failures."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import legacy, randomize_batchnorm, save_published_like
from PIL import Image
from safetensors.torch import save_file

import densenet
from densenet.data.transforms import IMAGENET_MEAN
from densenet.nn.registry import model_info
from densenet.weights import adapt, convert, download, published
from densenet.weights.convert import convert_legacy_keys, load_checkpoint
from densenet.weights.download import sha256_file, verify_file
from densenet.weights.published import WeightsError, get_weights

SMALL = "densenet_bc_100_k12"  # a small architecture to stand in for a published one
TINY_NET = {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "num_classes": 5}


def small_entry(file_name: str) -> densenet.Weights:
    return dataclasses.replace(get_weights("densenet121"), arch=SMALL, file_name=file_name)


@pytest.mark.slow
def test_registry_metadata_is_consistent():
    for arch in ("densenet121", "densenet161", "densenet169", "densenet201"):
        entry = get_weights(arch)
        assert entry is get_weights(arch, "IMAGENET1K_V1")
        info = model_info(arch)
        assert entry.num_params == info["params"]
        assert abs(entry.gflops - info["gflops"]) < 0.01
        assert entry.url == f"https://download.pytorch.org/models/{entry.file_name}"
        assert len(entry.sha256_prefix) == 8 and entry.file_name.startswith(arch)
        assert len(entry.categories) == 1000 and entry.categories[0] == "tench"
        assert 70 < entry.acc1 < 80  # min_size: test_architectures, against a forward pass
    assert densenet.list_weights("densenet_40_k12") == []


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(WeightsError, match="DEFAULT, IMAGENET1K_V1"):
        densenet.densenet121(weights="IMAGENET1K_V9")
    with pytest.raises(WeightsError, match="none are published"):
        densenet.densenet_40_k12(weights="DEFAULT")


def test_legacy_keys_are_renamed_and_current_keys_kept():
    state = torchvision.models.densenet121().state_dict()
    old = legacy(state)
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    assert list(convert_legacy_keys(old)) == list(state)
    assert list(convert_legacy_keys(state)) == list(state)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["legacy-pth", "current-pt", "safetensors"])
def test_local_checkpoint_loads_with_torchvision_parity(tmp_path, fmt):
    torch.manual_seed(0)
    reference = randomize_batchnorm(torchvision.models.densenet121()).eval()
    state = reference.state_dict()
    if fmt == "legacy-pth":
        path = tmp_path / "model.pth"
        torch.save(legacy(state), path)
    elif fmt == "current-pt":
        path = tmp_path / "model.pt"
        torch.save(state, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    model = densenet.densenet121(weights=str(path)).eval().double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        error = (model(x) - reference.double()(x)).norm() / reference(x).norm()
    assert error < 1e-10


def test_a_files_head_is_kept_and_another_num_classes_needs_new_head(tmp_path):
    source = randomize_batchnorm(densenet.get_model(SMALL, num_classes=7))
    path = tmp_path / "my_finetuned.pth"
    torch.save(source.state_dict(), path)
    own = densenet.get_model(SMALL, weights=path)
    assert torch.equal(own.classifier.weight, source.classifier.weight)
    with pytest.raises(WeightsError, match="7-class classifier, not num_classes=5.*new_head=True"):
        densenet.get_model(SMALL, weights=path, num_classes=5)
    with pytest.warns(UserWarning, match="classifier"):
        model = densenet.get_model(SMALL, weights=path, num_classes=5, new_head=True)
    assert model.classifier.out_features == 5
    assert torch.equal(model.features.conv0.weight, source.features.conv0.weight)


def test_file_for_another_architecture_names_the_keys(tmp_path):
    path = tmp_path / "d169.pth"
    torch.save(torchvision.models.densenet169().state_dict(), path)
    with pytest.raises(
        WeightsError, match=r"unexpected keys \(first: features\.denseblock3\.denselayer25"
    ):
        densenet.densenet121(weights=path)
    path = tmp_path / "d161.pth"
    torch.save(torchvision.models.densenet161().state_dict(), path)
    with pytest.raises(
        WeightsError,
        match=r"shapes differ \(features\.conv0\.weight: file \(96, 3, 7, 7\) vs model \(64, 3, 7, 7\)",
    ):
        densenet.densenet121(weights=path)


class Foreign:
    """Not a tensor: loading it would need pickle code execution."""


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": densenet.get_model(SMALL).state_dict(), "payload": Foreign()}, path)
    with pytest.raises(WeightsError, match="code execution.*refused"):
        load_checkpoint(path)


def test_a_pickle_that_calls_a_function_is_refused(tmp_path):
    path = tmp_path / "system.pth"
    # protocol 2: GLOBAL posix.system (or nt.system), then REDUCE on ("true",)
    path.write_bytes(
        b"\x80\x02c" + os.system.__module__.encode() + b"\nsystem\nX\x04\x00\x00\x00true\x85R."
    )
    with pytest.raises(WeightsError, match=r"needs code execution.*system.*refused"):
        load_checkpoint(path)


def test_truncated_file(tmp_path):
    good = tmp_path / "good.pth"
    torch.save(densenet.get_model(SMALL).state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(WeightsError, match=f"{truncated} is truncated or corrupt"):
        load_checkpoint(truncated)


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.pth", b"not a checkpoint"),
        ("hello.pth", b"hello world, this is not a checkpoint at all"),
        ("noise.pt", bytes(range(256)) * 8),
        ("bad.safetensors", b"\xff" * 64),
    ],
)
def test_foreign_files_name_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeightsError, match=f"weights file {path} is truncated or corrupt"):
        load_checkpoint(path)


def test_files_without_a_state_dict(tmp_path):
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WeightsError, match="no state_dict"):
        load_checkpoint(tensor)
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


def test_verify_file_checks_a_published_names_hash_only(tmp_path):
    """A published file's name carries its hash prefix; another name's hex digits (a date) are
    not taken for one."""
    path = save_published_like(tmp_path, SMALL, densenet.get_model(SMALL).state_dict())
    digest = verify_file(path)
    assert verify_file(path, path.stem.split("-")[-1]) == digest
    with open(path, "ab") as file:
        file.write(b"x")
    with pytest.raises(WeightsError, match="corrupt"):
        verify_file(path, digest[:8])
    official = path.rename(tmp_path / "densenet121-a639ec97.pth")
    with pytest.raises(WeightsError, match="corrupt"):
        verify_file(official)
    dated = official.rename(tmp_path / "mymodel-20240101.pth")
    assert len(verify_file(dated)) == 64


def test_nan_weights_are_refused_and_convert_writes_only_safetensors(tmp_path):
    from densenet.infer.load import convert_weights, verify_weights

    state = densenet.get_model(SMALL, num_classes=3).state_dict()
    state["classifier.weight"][0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(state, path)
    for check in (lambda: verify_weights(str(path)), lambda: densenet.load(path)):
        with pytest.raises(WeightsError, match="NaN or infinite values.*classifier.weight"):
            check()
    with pytest.raises(WeightsError, match="NaN or infinite"):
        convert_weights(str(path), str(tmp_path / "out.safetensors"))
    with pytest.raises(WeightsError, match="name the file \\*.safetensors"):
        convert_weights(str(path), str(tmp_path / "converted.pth"))
    assert not (tmp_path / "converted.pth").exists()


def test_download_verify_cache_then_offline(torch_home, file_server, monkeypatch):
    root, base_url, server = file_server
    source = densenet.get_model(SMALL, num_classes=1000)
    path = save_published_like(root, SMALL, source.state_dict())
    monkeypatch.setenv("DENSENET_WEIGHTS_URL", base_url)
    entry = small_entry(path.name)
    assert entry.url == base_url + path.name
    model = densenet.get_model(SMALL, weights=entry, progress=False)
    cached = torch_home / path.name
    assert cached.read_bytes() == path.read_bytes()
    assert not list(torch_home.glob("*.tmp*"))  # no temporary file left
    assert torch.equal(model.classifier.weight, source.classifier.weight)
    server.shutdown()  # the second load must not touch the network
    again = densenet.get_model(SMALL, weights=entry, progress=False)
    assert torch.equal(again.features.conv0.weight, source.features.conv0.weight)


def test_corrupt_download_leaves_nothing(torch_home, file_server, monkeypatch):
    root, base_url, _ = file_server
    path = save_published_like(
        root, SMALL, densenet.get_model(SMALL, num_classes=1000).state_dict()
    )
    monkeypatch.setenv("DENSENET_WEIGHTS_URL", base_url)
    wrong = path.with_name(f"{SMALL}-00000000.pth")
    path.rename(wrong)
    with pytest.raises(WeightsError, match="corrupt.*nothing was cached"):
        densenet.get_model(SMALL, weights=small_entry(wrong.name), progress=False)
    assert list(torch_home.iterdir()) == []


def test_truncated_download_leaves_nothing(torch_home, file_server, monkeypatch):
    root, base_url, server = file_server
    path = save_published_like(
        root, SMALL, densenet.get_model(SMALL, num_classes=1000).state_dict()
    )
    monkeypatch.setenv("DENSENET_WEIGHTS_URL", base_url)
    server.handler.truncate = True
    with pytest.raises(WeightsError, match="truncated"):
        densenet.get_model(SMALL, weights=small_entry(path.name), progress=False)
    assert list(torch_home.iterdir()) == []


def test_no_network_names_the_url_and_the_cache_path(torch_home, monkeypatch):
    monkeypatch.setenv("DENSENET_WEIGHTS_URL", "http://127.0.0.1:9/models/")
    with pytest.raises(WeightsError) as raised:
        densenet.densenet121(weights="DEFAULT", progress=False)
    message = str(raised.value)
    assert "http://127.0.0.1:9/models/densenet121-a639ec97.pth" in message
    assert str(torch_home / "densenet121-a639ec97.pth") in message
    assert list(torch_home.iterdir()) == []


def test_pretrained_true_uses_the_torchvision_cache(publish):
    torch.manual_seed(0)
    reference = torchvision.models.densenet121()
    publish("densenet121", reference.state_dict())
    model = densenet.densenet121(pretrained=True)
    assert densenet.load("densenet121").card == get_weights("densenet121").card
    assert torch.equal(model.classifier.weight, reference.classifier.weight)


@pytest.fixture
def float64():
    """Build models and files in float64 (the adapted kernels then carry no float32 rounding)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.mark.parametrize("channels", [1, 6])
def test_pretrained_stem_is_adapted_to_other_input_channels(tmp_path, float64, channels):
    """One channel: a grey image gives the RGB model's activations of that image replicated to
    RGB (the kernels summed); C channels: an RGB image repeated to C channels gives the RGB
    activations (kernels repeated, scaled by 3 / C). A torchvision-format file, float64."""
    path = tmp_path / "densenet121.pth"
    torch.save(randomize_batchnorm(torchvision.models.densenet121()).state_dict(), path)
    rgb = densenet.densenet121(weights=path).eval()
    model = densenet.densenet121(weights=path, in_channels=channels).eval()
    assert model.features.conv0.weight.shape[1] == channels
    image = torch.rand(2, 1 if channels == 1 else 3, 48, 48, dtype=torch.float64)
    if channels == 1:
        expected, given = rgb.forward_features(image.expand(-1, 3, -1, -1)), image
    else:
        index = [c % 3 for c in range(channels)]
        expected, given = rgb.forward_features(image), image[:, index]
    torch.testing.assert_close(model.forward_features(given), expected, rtol=1e-10, atol=1e-10)


def test_preprocessing_follows_the_input_channels():
    card = densenet.ModelCard.for_model(densenet.get_model(SMALL, in_channels=1))
    assert card.in_channels == 1
    assert card.preprocessing.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))
    grey = Image.new("L", (40, 30), 128)
    assert card.preprocessing.transform()(grey).shape == (1, 32, 32)
    rgb = densenet.ModelCard.for_model(densenet.get_model(SMALL, in_channels=4)).preprocessing
    assert rgb.mean == IMAGENET_MEAN + IMAGENET_MEAN[:1]


def test_a_cached_file_that_fails_its_hash_is_refused(torch_home):
    entry = get_weights("densenet121")
    torch.save(densenet.densenet121().state_dict(), entry.cache_path)
    digest = hashlib.sha256(entry.cache_path.read_bytes()).hexdigest()
    with pytest.raises(WeightsError) as raised:
        densenet.densenet121(pretrained=True)
    message = str(raised.value)
    assert str(entry.cache_path) in message and digest[:8] in message
    assert "--weights FILE" in message


def test_a_cached_file_is_hashed_once_until_it_changes(publish, monkeypatch):
    path = publish(SMALL, densenet.get_model(SMALL, num_classes=1000).state_dict())
    hashed = []
    monkeypatch.setattr(download, "sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    densenet.get_model(SMALL, weights="DEFAULT")
    densenet.get_model(SMALL, weights="DEFAULT")
    assert hashed == [path]
    with open(path, "ab") as file:  # the file changed since it was verified
        file.write(b"x")
    with pytest.raises(WeightsError, match="not the published"):
        densenet.get_model(SMALL, weights="DEFAULT")


def test_default_weights_inflated_to_3d_give_the_2d_logits(publish, float64):
    """weights="DEFAULT" with spatial_dims=3 and in_channels=1, centre inflation: a volume of
    identical grey slices gives the 2D RGB model's logits of that slice replicated to RGB."""
    torch.manual_seed(0)
    publish(SMALL, randomize_batchnorm(densenet.get_model(SMALL, num_classes=1000)).state_dict())
    rgb = densenet.get_model(SMALL, weights="DEFAULT").eval()
    volume = densenet.get_model(
        SMALL, weights="DEFAULT", spatial_dims=3, in_channels=1, inflate="centre"
    ).eval()
    assert volume.features.conv0.weight.shape == (24, 1, 3, 3, 3)
    grey = torch.rand(2, 1, 8, 8)
    slices = grey.unsqueeze(2).expand(-1, -1, 4, -1, -1)
    expected = rgb(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(volume(slices), expected, rtol=1e-10, atol=1e-10)


def test_mean_inflation_is_i3d_and_exact_away_from_the_depth_borders(tmp_path, float64):
    torch.manual_seed(0)
    flat = randomize_batchnorm(densenet.DenseNet(**TINY_NET)).eval()
    path = tmp_path / "tiny.pth"
    torch.save(flat.state_dict(), path)
    volume = densenet.DenseNet(**TINY_NET, spatial_dims=3)
    adapt.load_weights(volume, path)  # inflate="mean", the default
    w2, w3 = flat.features.conv0.weight, volume.features.conv0.weight
    torch.testing.assert_close(w3, w2.unsqueeze(2).expand_as(w3) / 7, rtol=0, atol=0)
    image = torch.rand(1, 3, 16, 16)
    stem2 = flat.features.conv0(image)
    stem3 = volume.features.conv0(image.unsqueeze(2).expand(-1, -1, 12, -1, -1))
    # output depth j reads input slices 2j-3..2j+3: all inside the volume for j = 2, 3, 4
    for j in (2, 3, 4):
        torch.testing.assert_close(stem3[:, :, j], stem2, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(stem3[:, :, 0], stem2)  # the border sees zero padding


def test_1d_takes_each_kernels_centre_row(tmp_path, float64):
    torch.manual_seed(0)
    flat = randomize_batchnorm(densenet.DenseNet(**TINY_NET)).eval()
    path = tmp_path / "tiny.pth"
    torch.save(flat.state_dict(), path)
    signal = adapt.load_weights(densenet.DenseNet(**TINY_NET, spatial_dims=1), path).eval()
    torch.testing.assert_close(
        signal.features.conv0.weight, flat.features.conv0.weight[:, :, 3], rtol=0, atol=0
    )
    x = torch.rand(2, 3, 20)  # a signal is an image of one row: the stems agree
    torch.testing.assert_close(
        signal.features[:3](x), flat.features[:3](x.unsqueeze(2))[:, :, 0], rtol=1e-10, atol=1e-10
    )
    assert signal(x).shape == (2, TINY_NET["num_classes"])
    with pytest.raises(ValueError, match="inflate must be one of"):
        adapt.load_weights(densenet.DenseNet(**TINY_NET, spatial_dims=3), path, inflate="x")


MONAI_KEYS = {  # MONAI DenseNet keys -> ours
    "features.conv0.weight": "features.conv0.weight",
    "features.norm0.running_var": "features.norm0.running_var",
    "features.denseblock1.denselayer1.layers.norm1.weight": (
        "features.denseblock1.denselayer1.norm1.weight"
    ),
    "features.denseblock4.denselayer16.layers.conv2.weight": (
        "features.denseblock4.denselayer16.conv2.weight"
    ),
    "features.denseblock2.denselayer3.layers.norm2.num_batches_tracked": (
        "features.denseblock2.denselayer3.norm2.num_batches_tracked"
    ),
    "features.transition3.norm.bias": "features.transition3.norm.bias",
    "features.transition1.conv.weight": "features.transition1.conv.weight",
    "features.norm5.running_mean": "features.norm5.running_mean",
    "class_layers.out.weight": "classifier.weight",
    "class_layers.out.bias": "classifier.bias",
}


def test_monai_keys_map_to_ours_strictly():
    state = {key: torch.zeros(1) for key in MONAI_KEYS}
    assert convert.is_monai_state(state)
    assert list(convert.convert_monai_keys(state)) == list(MONAI_KEYS.values())
    with pytest.raises(published.WeightsError, match="features.denseblock1.extra.weight"):
        convert.convert_monai_keys({**state, "features.denseblock1.extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_monai_style_file_loads_strictly(tmp_path, spatial_dims):
    """A file with our model's tensors under MONAI's names loads into an equal model."""
    torch.manual_seed(0)
    model = densenet.DenseNet(**TINY_NET, spatial_dims=spatial_dims)
    inverse = {ours: theirs for theirs, ours in MONAI_KEYS.items()}

    def monai_name(key: str) -> str:
        for layer in ("norm1", "conv1", "norm2", "conv2"):
            key = key.replace(f".{layer}.", f".layers.{layer}.") if "denselayer" in key else key
        return inverse.get(key, key)

    path = tmp_path / "monai.pth"
    torch.save({monai_name(k): v for k, v in model.state_dict().items()}, path)
    loaded = adapt.load_weights(densenet.DenseNet(**TINY_NET, spatial_dims=spatial_dims), path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_monai_densenet121_outputs_equal_in_float64(tmp_path, float64, spatial_dims):
    nets = pytest.importorskip("monai.networks.nets", reason="monai is not installed")
    torch.manual_seed(0)
    theirs = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=1, out_channels=2)
    randomize_batchnorm(theirs).eval()
    path = tmp_path / "monai.pth"
    torch.save(theirs.state_dict(), path)
    ours = densenet.densenet121(
        weights=path, spatial_dims=spatial_dims, in_channels=1, num_classes=2
    ).eval()
    x = torch.randn(2, 1, *(32,) * spatial_dims)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)


def test_weights_are_parsed_once_into_a_typed_value(tmp_path, monkeypatch):
    """``parse_weights`` is the one reading of ``weights``: None, a published entry or a local
    file; a parsed value passes the layers below unchanged, and a file is read once."""
    from densenet.weights.published import WeightsFile, parse_weights

    entry = get_weights("densenet121")
    assert parse_weights(None, "densenet121") is None
    assert parse_weights("DEFAULT", "densenet121") == entry
    assert parse_weights(entry, "densenet121") is entry
    assert parse_weights(f"dir{os.sep}w.bin", "densenet121") == WeightsFile(
        Path(f"dir{os.sep}w.bin")
    )
    assert parse_weights(tmp_path / "w", "densenet121") == WeightsFile(tmp_path / "w")
    with pytest.raises(WeightsError, match="are for densenet121, not densenet169"):
        parse_weights(entry, "densenet169")
    with pytest.raises(WeightsError, match="weights must be None, a name"):
        parse_weights(3, "densenet121")
    source = randomize_batchnorm(densenet.get_model(SMALL, num_classes=7))
    path = tmp_path / "mine.pth"
    torch.save(source.state_dict(), path)
    reads = []
    read = adapt.read_torch_file
    monkeypatch.setattr(adapt, "read_torch_file", lambda *a: reads.append(a) or read(*a))
    spec = parse_weights(str(path), SMALL)
    assert densenet.get_model(SMALL, weights=spec).classifier.out_features == 7
    loaded = densenet.load(SMALL, weights=str(path))
    assert torch.equal(loaded.module.classifier.weight, source.classifier.weight)
    assert len(reads) == 2  # once per call


def test_one_decision_on_the_classifier():
    """``head_classes``: no weights keep the asked number; published weights their categories'
    unless another is asked (backbone); a file its own, another only with ``new_head``."""
    from densenet.weights.adapt import head_classes
    from densenet.weights.published import WeightsFile

    entry = get_weights("densenet121")
    state = densenet.DenseNet(**TINY_NET).state_dict()  # 5 classes
    file = WeightsFile(Path("tiny.pth"), state)
    assert head_classes(None, None, densenet.DenseNet, None) is None
    assert head_classes(entry, None, densenet.DenseNet, None) == 1000
    assert head_classes(entry, None, densenet.DenseNet, 10) == 10
    assert head_classes(file, state, densenet.DenseNet, None) == 5
    assert head_classes(file, state, densenet.DenseNet, 3, new_head=True) == 3
    with pytest.raises(WeightsError, match="tiny.pth holds a 5-class classifier"):
        head_classes(file, state, densenet.DenseNet, 3)
