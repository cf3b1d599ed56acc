"""Class activation maps: exact (their mean is the logit), the same on the eager model and its
inference form, on the object of a real photograph, and drawn by ``densenet predict --cam``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
from conftest import randomize_batchnorm, tiny_model
from PIL import Image
from skimage.filters import threshold_otsu

import densenet
from densenet.cli import main
from densenet.infer.cam import ExplainError

SMALL = {"growth_rate": 8, "block_config": (2, 2, 2), "num_init_features": 16, "stem": "cifar"}


def small_model(**kwargs) -> densenet.DenseNet:
    torch.manual_seed(0)
    model = randomize_batchnorm(densenet.DenseNet(**{**SMALL, "num_classes": 4, **kwargs}))
    torch.nn.init.normal_(model.classifier.bias)
    return model.eval()


@pytest.mark.parametrize("backend", ["eager", "onednn"])
def test_maps_average_to_the_logits_and_the_inference_form_gives_the_same_maps(backend):
    model = small_model()
    x = torch.randn(3, 3, 40, 48)
    eager = densenet.explain(model, x)
    fast = densenet.explain(densenet.optimize(model, backend=backend), x)
    assert eager.maps.shape == (3, 4, 10, 12)
    torch.testing.assert_close(eager.logits, model(x).detach(), rtol=1e-5, atol=1e-5)
    # the final BN-ReLU's scale and offset sit in the inference form's classifier: same maps
    torch.testing.assert_close(fast.maps, eager.maps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.logits, eager.logits, rtol=1e-5, atol=1e-5)
    # sum_k w_ck F_k(x, y): the maps without the bias, from the features directly
    features = model.forward_features(x).detach()
    weight, bias = model.classifier.weight.detach(), model.classifier.bias.detach()
    expected = torch.einsum("ck,nkhw->nchw", weight, features)
    torch.testing.assert_close(eager.maps - bias.view(1, -1, 1, 1), expected)


@pytest.mark.parametrize("optimized", [False, True])
def test_a_model_without_a_linear_classifier_is_one_error(optimized):
    model = randomize_batchnorm(densenet.DenseNet(**SMALL, num_classes=0)).eval()
    model = densenet.optimize(model) if optimized else model
    with pytest.raises(ExplainError, match="no linear classifier"):
        densenet.explain(model, torch.randn(1, 3, 32, 32))


def coins() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image's coins photograph as a (1, 1, H, W) input in [-1, 1] and its (H, W) coin
    mask (Otsu's threshold), downsampled by 2 to (152, 192)."""
    image = skimage.data.coins()[::2, ::2].astype(np.float32)
    mask = torch.from_numpy(image > threshold_otsu(image))
    return torch.from_numpy(image / 127.5 - 1)[None, None], mask


def test_the_map_of_a_class_built_to_find_coins_lies_on_the_coins():
    """A one-channel network whose class 1 is a linear probe fitted to tell coin features from
    background features in the top half of the photograph; its map of the bottom half (not
    used for fitting) puts its mass on the coins more than on the background."""
    model = small_model(in_channels=1, num_classes=2)
    image, mask = coins()
    with torch.no_grad():
        features = model.forward_features(image)[0]  # (K, H / 4, W / 4)
    small_mask = mask[2::4, 2::4]
    top = slice(0, features.shape[1] // 2)
    coin = features[:, top][:, small_mask[top]].mean(1)
    background = features[:, top][:, ~small_mask[top]].mean(1)
    probe = (coin - background) / (coin - background).norm()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.stack([-probe, probe]))
        model.classifier.bias.zero_()
    bottom = image[..., image.shape[-2] // 2 :, :]
    cam = densenet.explain(model, bottom).select(torch.tensor([1]), bottom.shape[-2:])[0]
    mass = cam - cam.min()
    inside = mask[image.shape[-2] // 2 :]
    share = float(mass[inside].sum() / mass.sum())
    assert share > 1.5 * float(inside.float().mean()), share
    assert cam[inside].mean() > cam[~inside].mean()


@pytest.fixture
def checkpoint(tmp_path) -> str:
    """A 3-class state_dict file of a small registry architecture."""
    model = densenet.get_model("densenet_bc_100_k12", num_classes=3)
    path = tmp_path / "densenet_bc_100_k12-toy.pth"
    torch.save(randomize_batchnorm(model).state_dict(), path)
    return str(path)


def test_classifier_explain_and_predict_cam_write_one_overlay_per_image(
    checkpoint, tmp_path, capsys
):
    photos = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
    paths = []
    for name, pixels in photos.items():
        paths.append(str(tmp_path / f"{name}.png"))
        Image.fromarray(pixels).save(paths[-1])
    classifier = densenet.Classifier("densenet_bc_100_k12", weights=checkpoint, device="cpu")
    explanations = classifier.explain(paths)
    top = classifier.predict(paths, topk=1)
    assert [(e.label, round(e.probability, 5)) for e in explanations] == [
        (label, round(p, 5)) for [(label, p)] in top
    ]
    assert explanations[0].cam.shape == (32, 32) and explanations[0].view.size == (32, 32)
    assert classifier.explain(paths[0], target="class 2")[0].index == 2
    out = tmp_path / "cams"
    assert main(["predict", *paths, "--weights", checkpoint, "--cam", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["cam"] for r in results] == [
        str(out / "chelsea.cam.png"),
        str(out / "coffee.cam.png"),
    ]
    overlay = Image.open(out / "chelsea.cam.png")
    assert overlay.size == (32, 32) and overlay.mode == "RGB"
    assert overlay.tobytes() != explanations[0].view.convert("RGB").tobytes()


def test_images_sharing_a_file_name_get_distinct_maps(checkpoint, tmp_path, capsys):
    """a/x.png, e/x-2.png, b/x.png: three maps, none overwriting another."""
    paths = []
    for folder, name, value in (("a", "x", 30), ("e", "x-2", 120), ("b", "x", 220)):
        (tmp_path / folder).mkdir()
        paths.append(str(tmp_path / folder / f"{name}.png"))
        Image.new("RGB", (40, 40), (value, 255 - value, value // 2)).save(paths[-1])
    out = tmp_path / "cams"
    assert main(["predict", *paths, "--weights", checkpoint, "--cam", str(out), "--json"]) == 0
    cams = [r["cam"] for r in json.loads(capsys.readouterr().out)]
    assert cams == [str(out / "x.cam.png"), str(out / "x-2.cam.png"), str(out / "x-3.cam.png")]
    pictures = {Image.open(path).tobytes() for path in cams}
    assert len(pictures) == 3


def test_a_cam_folder_inside_an_input_folder_is_refused_and_no_map_replaces_a_file(
    checkpoint, tmp_path, capsys
):
    """--cam into an input folder or below it, or into a given file's folder (symbolic links
    resolved), is one error before anything is written; elsewhere a map takes the next free
    name rather than replace a file already there."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.new("RGB", (40, 40), "red").save(inputs / "x.png")
    Image.new("RGB", (40, 40), "blue").save(inputs / "x.cam.png")
    (tmp_path / "link").symlink_to(inputs)
    before = {path.name: path.read_bytes() for path in inputs.iterdir()}
    for source, cam, where in (
        (inputs, inputs, "inside the input folder"),
        (inputs, inputs / "maps", "inside the input folder"),
        (inputs, tmp_path / "link", "inside the input folder"),
        (tmp_path / "link", inputs, "inside the input folder"),
        (inputs / "x.png", tmp_path / "link", "the folder of the input"),
    ):
        assert main(["predict", str(source), "--weights", checkpoint, "--cam", str(cam)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"--cam {cam} is {where} {source}" in err, err
    assert {path.name: path.read_bytes() for path in inputs.iterdir()} == before
    out = inputs / "maps"  # below a given file's folder (not an input folder): allowed
    out.mkdir()
    (out / "x.cam.png").write_bytes(b"not ours")
    argv = ["predict", str(inputs / "x.png"), "--weights", checkpoint, "--cam", str(out), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)[0]["cam"] == str(out / "x-2.cam.png")
    assert (out / "x.cam.png").read_bytes() == b"not ours"


def test_a_volume_map_takes_a_name_free_for_both_of_its_files(tmp_path):
    """A volume's map and its picture share a stem: a file already there under either name
    moves both to the next stem."""
    pytest.importorskip("nibabel")
    from densenet.tasks.predict import Explanation, write_overlays

    (tmp_path / "a.cam.nii.gz").write_bytes(b"not ours")
    (tmp_path / "b.cam.png").write_bytes(b"not ours either")
    explanations = [
        Explanation(f"{name}.nii.gz", "yes", 1, 0.5, torch.rand(4, 4, 4), torch.rand(1, 4, 4, 4))
        for name in ("a", "b")
    ]
    written = write_overlays(explanations, tmp_path)
    assert [{k: path.name for k, path in w.items()} for w in written] == [
        {"cam": f"{name}-2.cam.nii.gz", "cam_slices": f"{name}-2.cam.png"} for name in ("a", "b")
    ]
    assert (tmp_path / "a.cam.nii.gz").read_bytes() == b"not ours"
    assert (tmp_path / "b.cam.png").read_bytes() == b"not ours either"


def test_with_tta_the_map_is_of_the_class_classify_gives():
    """A two-class model whose bias puts the center crop just on one side of the boundary and
    its mirror further on the other: with tta="hflip" the views' average names the other class,
    and explain() draws that class's map, with the views' probability."""
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=2)).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), np.uint8))
    center = densenet.Classifier(model, device="cpu", optimize=False).transform(image)
    with torch.no_grad():
        pooled = model.forward_features(torch.stack([center, center.flip(-1)])).mean((2, 3))
        model.classifier.weight[1] = -model.classifier.weight[0]
        straight, mirrored = (pooled @ model.classifier.weight[0]).tolist()
        bias = -(straight + mirrored) / 2 - (straight - mirrored) / 4
        model.classifier.bias.copy_(torch.tensor([bias, -bias]))
    plain = densenet.Classifier(model, device="cpu", optimize=False)
    views = densenet.Classifier(model, device="cpu", optimize=False, tta="hflip")
    [single], [averaged] = plain.classify(image, topk=1), views.classify(image, topk=1)
    assert single.indices != averaged.indices
    [explanation] = views.explain(image)
    assert explanation.index == averaged.indices[0]
    assert explanation.probability == pytest.approx(averaged.probabilities[0], abs=1e-6)


def test_an_unknown_target_class_is_one_error(checkpoint):
    classifier = densenet.Classifier("densenet_bc_100_k12", weights=checkpoint, device="cpu")
    image = Image.fromarray(skimage.data.chelsea())
    many = densenet.Classifier(tiny_model(num_classes=1000).eval(), device="cpu")
    with pytest.raises(ValueError) as caught:
        many.explain(image, target="dog")
    assert len(str(caught.value)) < 300 and str(caught.value).endswith("and 990 more")
    with pytest.raises(ValueError, match="unknown class 'dog'"):
        classifier.explain(image, target="dog")
    with pytest.raises(ValueError, match=r"class index 3 is not in 0..2"):
        classifier.explain(image, target=3)


def test_grad_cam_of_the_final_layer_is_the_class_activation_map_up_to_scale():
    """The grad-cam package on the final feature map: relu(cam - b), scaled to [0, 1] and
    resized to the input."""
    pytest.importorskip("pytorch_grad_cam")
    from densenet.infer.cam import grad_cam

    model = small_model()
    x = torch.randn(2, 3, 32, 40)
    maps = densenet.explain(model, x)
    bias = model.classifier.bias.detach()
    classes = (maps.logits - bias).argmax(1)  # maps with positive parts
    plain = (maps.select(classes) - bias[classes].view(-1, 1, 1)).relu()
    low = plain.amin((1, 2), keepdim=True)
    scaled = (plain - low) / (plain.amax((1, 2), keepdim=True) - low)
    expected = torch.nn.functional.interpolate(scaled[:, None], size=(32, 40), mode="bilinear")[
        :, 0
    ]
    result = grad_cam(model, x, classes)
    # the same map; OpenCV's and PyTorch's bilinear resizes differ by about 1% at some pixels
    assert (result - expected).abs().max() < 0.02
    assert torch.corrcoef(torch.stack([result.flatten(), expected.flatten()]))[0, 1] > 0.999
    inner = grad_cam(model, x, classes, layer="features.denseblock2")
    assert inner.shape == (2, 32, 40) and inner.max() == pytest.approx(1, abs=1e-3)


def test_classifier_explain_sees_the_image_predict_sees_on_a_resize_256_crop_224_card():
    """The card resizes to 256 and crops 224: explain must not apply that to its 224 view again."""
    torch.manual_seed(0)
    model = densenet.DenseNet(
        growth_rate=4, block_config=(1, 1, 1, 1), num_init_features=8, num_classes=4
    )
    torch.nn.init.normal_(model.classifier.weight, std=5.0)
    classifier = densenet.Classifier(model.eval(), device="cpu", optimize=False)
    assert (classifier.preprocessing.resize_size, classifier.preprocessing.crop_size) == (256, 224)
    image = Image.fromarray(skimage.data.chelsea())
    [explanation] = classifier.explain(image)
    [[(label, probability)]] = classifier.predict(image, topk=1)
    assert explanation.label == label
    assert explanation.probability == pytest.approx(probability, rel=1e-5, abs=1e-7)
