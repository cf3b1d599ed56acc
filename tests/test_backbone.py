"""DenseNet as a backbone: the feature map after each dense block, exactly the eager forward's
intermediates, with the channels and strides ``feature_info`` gives for every registry model;
``features_only`` builders with weights, input channels and memory-efficient training; a
torchvision detector on it trains."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import randomize_batchnorm, tiny_model
from torch import nn

import densenet
from densenet import DenseNet, DenseNetFeatures

# four blocks, like the ImageNet models (strides 4, 8, 16, 32), a few thousand parameters
FOUR_BLOCKS = {"growth_rate": 4, "block_config": (1, 1, 1, 1), "num_init_features": 8}


def hooked_outputs(model: DenseNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every ``features.*`` module's output in the plain forward, by module name."""
    outputs, handles = {}, []
    for name, module in model.features.named_children():

        def keep(module, inputs, output, name=name) -> None:
            outputs[f"features.{name}"] = output

        handles.append(module.register_forward_hook(keep))
    logits = model(x)
    for handle in handles:
        handle.remove()
    outputs["logits"] = logits
    return outputs


@pytest.mark.parametrize("config", [FOUR_BLOCKS, {"stem": "cifar", "block_config": (2, 1, 2)}])
def test_each_stage_is_the_eager_forwards_intermediate(config):
    model = randomize_batchnorm(tiny_model(**config)).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        maps, seen = model.forward_intermediates(x), hooked_outputs(model, x)
        assert torch.equal(maps[-1], model.forward_features(x))
        assert torch.equal(model.forward_head(maps[-1]), seen["logits"])
    for info, feature_map in zip(model.feature_info, maps[:-1]):
        assert torch.equal(feature_map, seen[info["module"]])
    assert model.feature_info[-1]["module"] == "features.norm5"


@pytest.mark.parametrize("name", densenet.list_models("densenet*"))
def test_feature_info_gives_every_models_channels_and_strides(name):
    with torch.device("meta"):
        model = densenet.get_model(name)
        size = 224 if model.config["stem"] == "imagenet" else 32
        maps = model.forward_intermediates(torch.empty(1, 3, size, size))
    assert len(maps) == len(model.config["block_config"])
    for info, feature_map in zip(model.feature_info, maps):
        assert feature_map.shape == (1, info["num_chs"], size // info["reduction"],
                                     size // info["reduction"])  # fmt: skip
    assert maps[-1].shape[1] == model.num_features
    if name == "densenet121":
        assert [(i["num_chs"], i["reduction"]) for i in model.feature_info] == [
            (256, 4), (512, 8), (1024, 16), (1024, 32)
        ]  # fmt: skip


def test_features_only_with_weights_and_input_channels(weights_file):
    backbone = densenet.densenet121(
        weights=str(weights_file), in_channels=1, features_only=True, out_indices=(1, -1)
    ).eval()
    assert isinstance(backbone, DenseNetFeatures)
    assert backbone.out_indices == (1, 3)
    assert [i["reduction"] for i in backbone.feature_info] == [8, 32]
    full = densenet.densenet121(weights=str(weights_file), in_channels=1).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = full.forward_intermediates(x)
        assert all(torch.equal(a, b) for a, b in zip(backbone(x), [expected[1], expected[3]]))
    assert set(backbone.state_dict()) == {k for k in full.state_dict() if k.startswith("features.")}


def test_bad_out_indices_are_refused():
    with pytest.raises(ValueError, match=r"out_indices must be dense-block indices in 0..1"):
        DenseNetFeatures(tiny_model(), (0, 2))


def test_memory_efficient_backbone_gradients_equal_plain():
    torch.manual_seed(0)
    plain = tiny_model(**FOUR_BLOCKS).double()
    efficient = tiny_model(**FOUR_BLOCKS, memory_efficient=True).double()
    efficient.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    grads = []
    for model in (plain, efficient):
        backbone = DenseNetFeatures(model)
        sum(m.square().mean() for m in backbone(x)).backward()
        grads.append([p.grad for p in backbone.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_the_backbone_compiles():
    backbone = DenseNetFeatures(randomize_batchnorm(tiny_model(**FOUR_BLOCKS)).eval())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(torch.compile(backbone)(x), backbone(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_backbone_exports():
    backbone = DenseNetFeatures(randomize_batchnorm(tiny_model(**FOUR_BLOCKS)).eval())
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(backbone, (x,))
    with torch.no_grad():
        for a, b in zip(program.module()(x), backbone(x)):
            torch.testing.assert_close(a, b)


class DenseNetFPN(nn.Module):
    """The README's detection backbone: the dense blocks' maps through a feature pyramid."""

    def __init__(self, backbone: DenseNetFeatures, out_channels: int = 32) -> None:
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        super().__init__()
        self.body = backbone
        channels = [info["num_chs"] for info in backbone.feature_info]
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(self.body(x))))


@pytest.mark.slow
def test_a_torchvision_detector_on_the_backbone_trains():
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    backbone = DenseNetFPN(DenseNetFeatures(tiny_model(**FOUR_BLOCKS)))
    detector = FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96)
    images = [torch.rand(3, 96, 96) for _ in range(2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 20.0, 90.0, 70.0]]), "labels": torch.tensor([2])},
    ]
    optimizer = torch.optim.SGD(detector.parameters(), lr=0.01, momentum=0.9)
    stem = detector.backbone.body.features.conv0.weight
    before, losses = stem.detach().clone(), []
    detector.train()
    for _ in range(8):
        loss = sum(detector(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert not torch.equal(stem, before)  # the gradients reach the DenseNet
    detector.eval()
    with torch.no_grad():
        [detections] = detector(images[:1])
    assert set(detections) == {"boxes", "labels", "scores"}
