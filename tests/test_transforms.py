"""Preprocessing: identical to the PyTorch Hub page's torchvision pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms

import densenet
from densenet.data.transforms import ChannelError, to_channels, to_rgb

# The pipeline printed on the PyTorch Hub DenseNet page, applied to an RGB image.
HUB_PAGE = transforms.Compose(
    [
        transforms.Resize(256),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)


def photographs() -> dict[str, Image.Image]:
    return {
        n: Image.fromarray(getattr(skimage.data, n)())
        for n in ("astronaut", "coffee", "chelsea", "camera")
    }


def odd_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
    return {
        "grayscale": Image.fromarray(rgb[..., 0]),
        "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
        "palette": Image.fromarray(rgb).convert("P"),
        "tiny": Image.fromarray(rgb[:5, :7]),
        "very wide": Image.fromarray(rgb[:30, :]).resize((3000, 30)),
        "very tall": Image.fromarray(rgb[:, :20]),
        "exact 224": Image.fromarray(rgb[:224, :224]),
    }


@pytest.mark.parametrize("name, image", {**photographs(), **odd_images()}.items())
def test_identical_to_the_hub_page(name, image):
    ours = densenet.eval_transform()(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.equal(ours, HUB_PAGE(image.convert("RGB")))


def test_weights_carry_the_same_transform():
    image = photographs()["coffee"]
    entry = densenet.get_weights("densenet121")
    assert torch.equal(entry.transforms()(image), HUB_PAGE(image))


def test_imagenet_classes():
    names = densenet.imagenet_classes()
    assert len(names) == 1000 and len(set(names)) >= 998
    assert (
        names[0] == "tench" and names[207] == "golden retriever" and names[999] == "toilet tissue"
    )


def test_images_keep_their_channels_and_a_colour_image_is_not_turned_grey():
    grey, rgba = Image.new("L", (8, 8), 7), Image.new("RGBA", (8, 8))
    assert to_channels(grey, 1) is grey
    assert to_channels(rgba, 4) is rgba
    assert to_channels(grey, 3).mode == "RGB"  # grey replicated, as before
    with pytest.raises(ChannelError, match=r"RGB image has 3 channel\(s\), the model takes 1"):
        to_channels(Image.new("RGB", (8, 8)), 1)
    assert densenet.eval_transform(8, 8, (0.5,), (0.5,))(grey).shape == (1, 8, 8)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_are_scaled_by_their_bit_depth(tmp_path, mode):
    """A 16-bit grey image at half its range is mid-grey, not white (PIL's own conversion
    clips at 255), from a file as from a PIL image, for 1- and 3-channel models."""
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    image = Image.fromarray(values).convert(mode) if mode != "I;16" else Image.fromarray(values)
    expected = [0, 1, 128, 255]
    assert np.asarray(to_channels(image, 1))[0].tolist() == expected
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == expected
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(path)
    eight = Image.new("L", (32, 32), 128)
    transform = densenet.eval_transform(32, 32)
    from densenet.data.images import open_image

    torch.testing.assert_close(transform(open_image(path)), transform(eight))


@pytest.mark.parametrize("channels", [1, 3])
def test_the_tensor_path_of_device_decoding_gives_the_pil_paths_input(channels):
    """``Preprocessing.tensor_transform`` (what --device-decode runs on decoded pixels) and the
    PIL transform agree on a 256/224 card, for the model's own channel count."""
    from torchvision.transforms.functional import pil_to_tensor

    pre = densenet.Preprocessing().for_channels(channels)
    image = Image.fromarray(skimage.data.chelsea()).convert("L" if channels == 1 else "RGB")
    pil = pre.transform()(image)
    tensor = pre.tensor_transform()(pil_to_tensor(image))
    assert tensor.shape == pil.shape == (channels, 224, 224)
    step = 1 / 255 / min(pre.std)  # one uint8 level after normalisation
    assert (tensor - pil).abs().mean() < 1e-3 and (tensor - pil).abs().max() <= step + 1e-5
