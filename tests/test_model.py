"""The DenseNet module: torchvision parity, parameter counts, configurations, interface."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from conftest import randomize_batchnorm, tiny_model

import densenet
from densenet import DenseNet

IMAGENET_PARAMS = {
    "densenet121": 7_978_856,
    "densenet161": 28_681_000,
    "densenet169": 14_149_480,
    "densenet201": 20_013_928,
}
# The paper's Table 2 (millions, 10 classes).
CIFAR_PARAMS_M = {
    "densenet_40_k12": 1.0,
    "densenet_100_k12": 7.0,
    "densenet_100_k24": 27.2,
    "densenet_bc_100_k12": 0.8,
    "densenet_bc_250_k24": 15.3,
    "densenet_bc_190_k40": 25.6,
}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_matches(model: torch.nn.Module, reference: torch.nn.Module, size: tuple[int, int]):
    """``model`` with ``reference``'s (randomised) state, in float64: the same keys, outputs in
    eval and train mode, and running-statistics update."""
    reference = randomize_batchnorm(reference).double()
    model = model.double()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        for train in (False, True):
            model.train(train)
            reference.train(train)
            assert relative_error(model(x), reference(x)) < 1e-10
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(IMAGENET_PARAMS))
def test_matches_torchvision_in_float64(name):
    torch.manual_seed(0)
    assert_matches(getattr(densenet, name)(), getattr(torchvision.models, name)(), (64, 64))


def test_a_tiny_configuration_matches_torchvisions_in_float64():
    """The quick set's parity check (the full-size models: the slow test above)."""
    config = {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "bn_size": 2}
    torch.manual_seed(0)
    reference = torchvision.models.DenseNet(**config, num_classes=7)
    assert_matches(densenet.DenseNet(**config, num_classes=7), reference, (40, 44))


@pytest.mark.parametrize("name, params", IMAGENET_PARAMS.items())
def test_imagenet_parameter_counts(name, params):
    with torch.device("meta"):
        model = densenet.get_model(name)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize("name, millions", CIFAR_PARAMS_M.items())
def test_cifar_parameter_counts_match_the_paper(name, millions):
    with torch.device("meta"):
        model = densenet.get_model(name)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.1


def test_cifar_structure_follows_the_paper():
    model = densenet.densenet_bc_100_k12()
    blocks = [m for m in model.modules() if isinstance(m, densenet.nn.model.DenseBlock)]
    assert [len(b) for b in blocks] == [16, 16, 16]
    assert model.features.conv0.out_channels == 24 and model.features.conv0.kernel_size == (3, 3)
    assert model.features.transition1.conv.out_channels == (24 + 16 * 12) // 2
    plain = densenet.densenet_40_k12()
    assert plain.features.conv0.out_channels == 16
    layer = plain.features.denseblock1.denselayer1
    assert layer.conv1.kernel_size == (3, 3) and layer.conv2 is None
    assert plain.features.transition1.conv.out_channels == 16 + 12 * 12  # no compression
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_custom_configuration_and_interface():
    model = DenseNet(
        growth_rate=6, block_config=(3, 2, 1), num_init_features=10, bn_size=2,
        compression=0.7, num_classes=7, in_channels=1, stem="cifar",
    ).eval()  # fmt: skip
    x = torch.randn(3, 1, 20, 20)
    features = model.forward_features(x)
    assert features.shape == (3, model.num_features, 5, 5)
    assert (features >= 0).all()  # after the final BN-ReLU
    pooled = model.forward_head(features, pre_logits=True)
    assert pooled.shape == (3, model.num_features)
    assert torch.allclose(model(x), model.get_classifier()(pooled))
    model.reset_classifier(4)
    assert model(x).shape == (3, 4) and model.num_classes == 4
    model.reset_classifier(0)
    assert model(x).shape == (3, model.num_features)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"growth_rate": 0}, "growth_rate"),
        ({"block_config": ()}, "block_config"),
        ({"compression": 0}, "compression"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"stem": "tiny"}, "stem"),
        ({"bn_size": -1}, "bn_size"),
    ],
)
def test_bad_configuration_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_dropout_only_in_training():
    model = tiny_model(drop_rate=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("name", ["densenet121", "densenet_40_k12"])
def test_torchscript_gives_the_same_outputs(name):
    model = randomize_batchnorm(densenet.get_model(name)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(scripted(x), model(x))


def test_builders_are_generated_for_every_architecture():
    assert set(densenet.list_models()) >= {"densenet264", *IMAGENET_PARAMS, *CIFAR_PARAMS_M}
    for name in densenet.list_models():
        assert getattr(densenet, name).__name__ == name
    with pytest.raises(ValueError, match="densenet121"):
        densenet.get_model("densenet999")


def test_builder_keyword_arguments():
    model = densenet.densenet_bc_100_k12(num_classes=100, drop_rate=0.2, in_channels=1)
    assert model.num_classes == 100 and model.config["drop_rate"] == 0.2
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 100)


SMALL_ND = {"growth_rate": 4, "block_config": (2, 3), "num_init_features": 8, "num_classes": 5}


@pytest.mark.parametrize(
    ("kwargs", "shape", "conv0"),
    [
        ({"spatial_dims": 3}, (2, 3, 9, 9, 9), (8, 3, 7, 7, 7)),
        ({"spatial_dims": 3, "stem": "cifar", "in_channels": 1}, (2, 1, 4, 4, 4), (8, 1, 3, 3, 3)),
        ({"spatial_dims": 1}, (2, 3, 17), (8, 3, 7)),
    ],
)
def test_volume_and_signal_models(kwargs, shape, conv0):
    model = DenseNet(**SMALL_ND, **kwargs).eval()
    assert model.features.conv0.weight.shape == conv0
    assert model(torch.randn(shape)).shape == (2, 5)
    assert model.config["spatial_dims"] == kwargs["spatial_dims"]
    # the same keys as the 2D model: checkpoints differ only in kernel shapes
    flat = DenseNet(**SMALL_ND, stem=kwargs.get("stem", "imagenet"))
    assert model.state_dict().keys() == flat.state_dict().keys()


def test_2d_config_and_modules_unchanged():
    model = densenet.densenet121()
    assert "spatial_dims" not in model.config and "stem_stride" not in model.config
    assert repr(model.features.conv0) == repr(torchvision.models.densenet121().features.conv0)


def test_thin_volume_stem_keeps_depth():
    model = densenet.densenet121(spatial_dims=3, in_channels=1, num_classes=2,
                                 stem_stride=(1, 2, 2)).eval()  # fmt: skip
    stem = model.features[:4](torch.randn(1, 1, 8, 32, 32))
    assert stem.shape[2:] == (8, 8, 8)
    assert model.config["stem_stride"] == (1, 2, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spatial_dims": 4}, "spatial_dims must be 1, 2 or 3"),
        ({"spatial_dims": 3, "stem_stride": (2, 2)}, "stem_stride must be 3 values"),
        ({"stem_stride": (3, 2)}, "stem_stride must be 2 values"),
    ],
)
def test_bad_spatial_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseNet(**SMALL_ND, **kwargs)


@pytest.mark.parametrize(
    ("spatial_dims", "extra"),
    [(1, {}), (3, {}), (3, {"stem_stride": (1, 2, 2)}), (3, {"stem": "cifar"})],
)
def test_optimize_folds_volumes_and_signals_exactly(spatial_dims, extra):
    """The inference form (BatchNorms folded, block buffers) in 1D and 3D: float64 equal to the
    model within 1e-12, float32 within 1e-5, channels-last (3D) or not."""
    torch.manual_seed(0)
    model = randomize_batchnorm(DenseNet(**SMALL_ND, spatial_dims=spatial_dims, **extra)).eval()
    x = torch.randn(2, 3, *(20,) * spatial_dims, dtype=torch.float64)
    with torch.no_grad():
        reference = model.double()(x)
        for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            for channels_last in (True, False):
                fast = densenet.optimize(model, dtype=dtype, channels_last=channels_last)
                out = fast(x.to(dtype)).double()
                assert (out - reference).norm() / reference.norm() < tolerance
    with pytest.raises(ValueError, match="runs 2D models only"):
        densenet.optimize(model, backend="onednn")
