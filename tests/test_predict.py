"""Classifier and `densenet predict`: the Hub page's top-5, batching, bad images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
import torch
from conftest import TINY, randomize_batchnorm, tiny_model
from PIL import Image
from test_transforms import HUB_PAGE

import densenet
from densenet.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(skimage.data.chelsea()).save(folder / "chelsea.jpg")
    Image.fromarray(skimage.data.coffee()).save(folder / "coffee.png")
    Image.fromarray(skimage.data.camera()).save(folder / "camera.png")  # grayscale
    return folder


@pytest.fixture(scope="module")
def reference(weights_file):
    """The top-5 by the Hub page's recipe: torchvision transform, eager model, softmax."""
    model = densenet.densenet121(weights=weights_file).eval()
    return lambda path: reference_top5(model, path)


def reference_top5(model, path):
    with torch.no_grad():
        probs = model(HUB_PAGE(Image.open(path).convert("RGB"))[None]).softmax(1)[0]
    p, i = probs.topk(5)
    return [densenet.imagenet_classes()[k] for k in i], p.tolist()


@pytest.mark.slow
def test_predict_matches_the_hub_page_recipe(weights_file, images, reference):
    classifier = densenet.Classifier("densenet121", weights=weights_file, device="cpu")
    paths = sorted(str(p) for p in images.iterdir())
    results = classifier.predict(paths, topk=5)
    assert len(results) == 3
    for path, top in zip(paths, results):
        labels, probabilities = reference(path)
        assert [label for label, _ in top] == labels
        assert np.allclose([p for _, p in top], probabilities, rtol=1e-4)
        assert probabilities == sorted(probabilities, reverse=True)


def test_inputs_of_every_kind_agree(images):
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=1000))
    classifier = densenet.Classifier(model, device="cpu", batch_size=2)
    path = images / "chelsea.jpg"
    pil = Image.open(path)
    as_uint8 = torch.from_numpy(np.array(pil.convert("RGB"))).permute(2, 0, 1).contiguous()
    preprocessed = HUB_PAGE(pil.convert("RGB"))
    results = classifier.predict([str(path), path, path.read_bytes(), pil, as_uint8, preprocessed])
    for other in results[1:]:
        assert [label for label, _ in other] == [label for label, _ in results[0]]
        assert np.allclose([p for _, p in other], [p for _, p in results[0]], rtol=1e-5)
    assert (
        classifier.predict(preprocessed[None].repeat(3, 1, 1, 1), topk=2)[2][0][0]
        == results[0][0][0]
    )


def bad_images(folder):
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    # EPS under a .jpg name: never handed to Pillow's Ghostscript plugin
    (folder / "vector.jpg").write_text(
        "%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    )
    buffer = folder / "full.jpg"
    Image.fromarray(skimage.data.astronaut()).save(buffer)
    (folder / "truncated.jpg").write_bytes(buffer.read_bytes()[:2000])
    buffer.unlink()
    Image.new("RGB", (1010, 10)).save(folder / "wide.png")
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png")
    return {
        "empty.jpg": "empty",
        "notes.jpg": "not an image",
        "vector.jpg": "not an image",
        "truncated.jpg": "truncated",
        "wide.png": "wider than 100:1",
        "bomb.png": "pixels",
    }


def test_bad_arguments(images):
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        densenet.Classifier(tiny_model(num_classes=1000), device="cpu", batch_size=0)
    classifier = densenet.Classifier(tiny_model(num_classes=1000), device="cpu")
    with pytest.raises(ValueError, match="topk must be at least 1"):
        classifier.predict([str(images / "coffee.png")], topk=0)
    assert len(classifier.predict([str(images / "coffee.png")], topk=5000)[0]) == 1000


def test_bad_images_report_their_own_error(tmp_path, images):
    expected = bad_images(tmp_path / "bad")
    classifier = densenet.Classifier(tiny_model(num_classes=1000), device="cpu")
    sources = [str(images / "chelsea.jpg")] + [str(tmp_path / "bad" / n) for n in expected]
    results = classifier.classify(sources)
    assert results[0].error is None and len(results[0].labels) == 5
    for result, (name, message) in zip(results[1:], expected.items()):
        assert result.error is not None and name in result.error and message in result.error
    with pytest.raises(densenet.ImageError, match="empty"):
        classifier.predict(sources)


@pytest.mark.slow
def test_cli_predict_text_and_json(weights_file, images, reference, capsys):
    args = [str(images), "--weights", str(weights_file), "--device", "cpu", "--topk", "3"]
    assert main(["predict", *args]) == 0
    text = capsys.readouterr().out
    labels, probabilities = reference(images / "chelsea.jpg")
    assert f"{probabilities[0]:7.2%}  {labels[0]}" in text
    assert main(["predict", *args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["source"] for d in data] == sorted(str(p) for p in images.iterdir())
    chelsea = next(d for d in data if d["source"].endswith("chelsea.jpg"))
    assert [t["label"] for t in chelsea["top"]] == labels[:3]
    assert chelsea["top"][0]["index"] == densenet.imagenet_classes().index(labels[0])


def test_cli_predict_bad_images_among_good(weights_file, images, tmp_path, capsys):
    expected = bad_images(tmp_path / "bad")
    args = [str(images / "coffee.png"), str(tmp_path / "bad"), "--weights", str(weights_file)]
    assert main(["predict", *args, "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "coffee.png" in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == len(expected)
    assert all(line.startswith("densenet predict: error: ") for line in errors)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "densenet999"], "unknown model 'densenet999'; choose one of: densenet121"),
        (["--weights", "IMAGENET1K_V9"], "valid names: DEFAULT, IMAGENET1K_V1"),
        (["--weights", "/nonexistent/model.pth"], "does not exist"),
        (["--device", "tpu"], "device"),
    ],
)
def test_cli_errors_are_one_line(images, args, message, capsys):
    assert main(["predict", str(images / "coffee.png"), *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cli_cuda_without_a_gpu(images, capsys):
    assert main(["predict", str(images / "coffee.png"), "--device", "cuda"]) == 2
    assert "no CUDA GPU is available; use --device cpu" in capsys.readouterr().err


def test_cli_no_weights_offline_names_url_and_path(images, torch_home, monkeypatch, capsys):
    monkeypatch.setenv("DENSENET_WEIGHTS_URL", "http://127.0.0.1:9/")
    assert main(["predict", str(images / "coffee.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/densenet121-a639ec97.pth" in err
    assert "--weights FILE" in err and "--weights none" in err
    assert str(torch_home / "densenet121-a639ec97.pth") in err


def test_training_checkpoint_brings_its_classes_and_transform(tmp_path, images):
    from test_evaluate import _checkpoint

    trained = _checkpoint(tmp_path / "best.pth", ["ant", "bee", "cow"]).eval()
    classifier = densenet.Classifier(
        weights=str(tmp_path / "best.pth"), device="cpu", optimize=False
    )
    assert classifier.categories == ["ant", "bee", "cow"]
    x = classifier.transform(Image.open(images / "coffee.png"))
    assert x.shape == (3, 12, 12)  # the checkpoint's 12/12 transform, not 256/224
    with torch.no_grad():
        expected = trained(x[None]).softmax(1)[0]
    (top,) = classifier.predict([str(images / "coffee.png")], topk=3)
    assert [label for label, _ in top] == [
        ["ant", "bee", "cow"][i] for i in expected.argsort(descending=True)
    ]


@pytest.mark.slow
def test_new_classifier_drops_the_imagenet_names(publish):
    publish("densenet121", densenet.densenet121().state_dict())
    with pytest.warns(UserWarning, match="classifier"):
        model = densenet.densenet121(weights="DEFAULT", num_classes=3)
    assert densenet.Classifier(model, device="cpu").categories == ["class 0", "class 1", "class 2"]
    full = densenet.load("densenet121", weights="DEFAULT")
    assert full.card == densenet.get_weights("densenet121").card
    full.module.reset_classifier(5)
    assert densenet.Classifier(full.module, device="cpu").categories[-1] == "class 4"


def test_small_images_are_checked_after_preprocessing(images):
    """The network's minimum applies to its input: a 28x28 image resized to 32x32 is fine."""
    classifier = densenet.Classifier(densenet.densenet_bc_100_k12(), device="cpu")
    assert classifier.min_size == (4, 4)
    small = Image.open(images / "coffee.png").convert("RGB").resize((28, 28))
    (top,) = classifier.predict([small], topk=3)
    assert len(top) == 3
    imagenet = densenet.Classifier(tiny_model(num_classes=1000), device="cpu", optimize=False)
    assert len(imagenet.predict([small.resize((8, 8))], topk=1)[0]) == 1  # resized to 224
    with pytest.raises(
        densenet.ImageError, match=r"at least 5x5 \(smaller than the model's minimum"
    ) as raised:
        imagenet.predict([torch.zeros(3, 4, 4)])
    assert raised.value.reason is densenet.data.images.Reason.BAD_SHAPE
    with pytest.raises(densenet.ImageError, match="has 1 channels, the model takes 3"):
        imagenet.predict([torch.zeros(1, 32, 32)])


def test_cifar_model_without_weights_sees_32x32(images):
    classifier = densenet.Classifier(densenet.densenet_bc_100_k12(), device="cpu")
    assert classifier.transform(Image.open(images / "coffee.png")).shape == (3, 32, 32)


def test_buckets_pad_each_batch_and_warm_every_size(images):
    """With buckets the model only ever sees batch sizes 1, 2, 4 (for batch_size 4): 3 images run
    padded to 4, and the results equal the unbucketed classifier's."""
    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=1000)).eval()
    plain = densenet.Classifier(model, device="cpu", batch_size=4, buckets=False)
    bucketed = densenet.Classifier(model, device="cpu", batch_size=4, buckets=True)
    seen: list[int] = []
    bucketed.model.model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    bucketed.warm_up()
    assert seen == [1, 2, 4]
    seen.clear()
    paths = sorted(str(p) for p in images.iterdir()) * 2  # 6 images: a batch of 4, then 2
    expected = plain.classify(paths, topk=3)
    got = bucketed.classify(paths, topk=3)
    assert seen == [4, 2]
    for a, b in zip(expected, got):
        assert a.labels == b.labels
        assert np.allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-7)
    seen.clear()
    bucketed.classify(paths[:3], topk=1)
    assert seen == [4]  # 3 images padded up to the next bucket


def test_dtype_choice(images, monkeypatch, capsys):
    """``dtype`` sets the fast form's precision; "auto" follows the hardware's bfloat16 support;
    ``densenet predict --dtype bfloat16`` classifies with it."""
    model = randomize_batchnorm(tiny_model(num_classes=1000)).eval()
    assert densenet.Classifier(model, device="cpu").model.dtype == torch.float32  # exact default
    half = densenet.Classifier(model, device="cpu", dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16
    for native in (True, False):
        monkeypatch.setattr("densenet.infer.cpu.native_bfloat16", lambda native=native: native)
        auto = densenet.Classifier(model, device="cpu", dtype="auto")
        assert auto.model.dtype == (torch.bfloat16 if native else torch.float32)
    exact = densenet.Classifier(model, device="cpu").classify([images / "chelsea.jpg"], topk=3)
    assert half.classify([images / "chelsea.jpg"], topk=3)[0].labels[0] == exact[0].labels[0]
    with pytest.raises(ValueError, match="dtype must be auto or one of"):
        densenet.Classifier(model, device="cpu", dtype="int4")
    args = ["predict", str(images / "chelsea.jpg"), "--weights", "none", "--device", "cpu"]
    assert main([*args, "--dtype", "bfloat16", "--topk", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]["top"]) == 1


def test_test_time_augmentation_averages_the_views_and_changes_nothing_when_off(tmp_path):
    """tta=None is the single view; hflip averages the probabilities of the center crop and its
    mirror; ten-crop those of the paper's ten crops."""
    from densenet.data.transforms import views_transform

    torch.manual_seed(0)
    model = randomize_batchnorm(tiny_model(num_classes=5)).eval()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 52, 3), np.uint8))
    plain = densenet.Classifier(model, device="cpu", optimize=False)
    single = plain.probabilities(plain.preprocess(image, "x")[None])
    with torch.no_grad():
        center = plain.transform(image)
        expected = model(torch.stack([center, center.flip(-1)])).softmax(1).mean(0)
        pre = plain.preprocessing
        crops = views_transform("ten-crop", pre.resize_size, pre.crop_size, pre.mean, pre.std)
        ten = model(crops(image)).softmax(1).mean(0)
    for tta, want in ((None, single[0]), ("hflip", expected), ("ten-crop", ten)):
        classifier = densenet.Classifier(model, device="cpu", optimize=False, tta=tta)
        [prediction] = classifier.classify([image], topk=5)
        got = torch.tensor(prediction.probabilities)
        torch.testing.assert_close(got, want.sort(descending=True).values)
    assert not torch.allclose(expected, single[0])  # the mirror changed something


def test_a_colour_image_among_grey_ones_is_that_images_error(tmp_path, capsys):
    """A one-channel model: the RGB image gets its own error naming it, the grey ones are
    classified, the run exits 1."""
    model = tiny_model(in_channels=1, num_classes=3).eval()
    classifier = densenet.Classifier(model, device="cpu", optimize=False)
    grey = [Image.new("L", (40, 40), v) for v in (30, 200)]
    colour = Image.new("RGB", (40, 40), (10, 200, 30))
    results = classifier.classify([grey[0], colour, grey[1]], topk=2)
    assert [r.error is None for r in results] == [True, False, True]
    assert results[1].reason == "bad_shape" and "image 1" in results[1].error
    assert "channel" in results[1].error


def test_a_folder_of_images_and_volumes_says_how_many_of_the_other_kind_it_skipped(
    tmp_path, capsys
):
    Image.new("RGB", (40, 40), "red").save(tmp_path / "x.png")
    for name in ("a.npy", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"never read")
    argv = ["predict", str(tmp_path), "--model", "densenet_bc_100_k12", "--weights", "none"]
    assert main([*argv, "--device", "cpu", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["source"] for r in json.loads(out)] == [str(tmp_path / "x.png")]
    assert err.splitlines()[-1] == (
        f"densenet predict: warning: skipped 2 volume file(s) in {tmp_path}: this model takes "
        "images"
    )


def test_a_model_that_outputs_nan_is_one_error_line_everywhere_and_writes_nothing(tmp_path, capsys):
    """predict (text and --json), eval and calibrate: exit 2, one line naming the model; no
    ``nan%``, no NaN in JSON, no calibrated checkpoint."""
    from densenet.weights.checkpoint import TrainCheckpoint, save_checkpoint

    args = {"num_classes": 2, **TINY}
    model = randomize_batchnorm(densenet.get_model("densenet_bc_100_k12", **args)).eval()
    model.features.norm5.running_var.fill_(-1.0)  # NaN, folded into the inference form too
    card = densenet.ModelCard(
        ("a", "b"), densenet.Preprocessing(32, 32), arch="densenet_bc_100_k12"
    )
    path = tmp_path / "broken.pth"
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), args), path)
    for label, colour in (("a", "red"), ("b", "blue")):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(tmp_path / "data" / label / "x.png")
    image, data = str(tmp_path / "data" / "a" / "x.png"), str(tmp_path / "data")
    quiet = ["--workers", "0", "--no-progress"]
    for argv in (
        ["predict", image, "--weights", str(path), "--device", "cpu"],
        ["predict", image, "--weights", str(path), "--device", "cpu", "--json"],
        ["eval", data, "--weights", str(path), "--device", "cpu", *quiet],
        ["calibrate", str(path), data, "--device", "cpu", *quiet],
    ):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1, argv
        assert "model densenet_bc_100_k12 produced non-finite output" in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pth", "data"]
