"""densenet.tasks.calibration: temperature and Platt scaling recover a known miscalibration, change no
ranking, and halve the calibration error on held-out data; thresholds follow their rule exactly;
the card carries the fit and applies it."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import _checkpoint, _folder
from test_multilabel import ATTRIBUTES, train_argv
from torchmetrics.functional.classification import multilabel_auroc

from densenet import ModelCard, load
from densenet.cli import main
from densenet.data.card import Calibration
from densenet.tasks.calibration import (
    CalibrationError,
    ThresholdRule,
    calibration_metrics,
    choose_thresholds,
    fit_calibration,
    reliability_diagram,
    unpromised,
    wilson_lower_bound,
)
from densenet.weights.checkpoint import read_checkpoint, save_checkpoint


def single_label(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits 4x too confident: labels drawn from softmax(z), the model reports 4 z."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 5, generator=generator, dtype=torch.float64) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=generator).squeeze(1)
    return 4 * z, labels


def multi_label(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Label 0 is 3x too confident; label 1 is 3x too confident and shifted by +2."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64) * 1.5
    targets = torch.bernoulli(z.sigmoid(), generator=generator)
    return 3 * z + torch.tensor([0.0, 2.0 * 3]), targets


def test_temperature_recovers_the_overconfidence_and_halves_the_held_out_error():
    logits, labels = single_label(4000, seed=0)
    fit = fit_calibration(logits, labels, multi_label=False)
    assert fit.temperatures[0] == pytest.approx(4, rel=0.1) and fit.bias is None
    test_logits, test_labels = single_label(4000, seed=1)
    before = calibration_metrics(test_logits.softmax(1), test_labels, False, [])
    calibrated = fit.apply(test_logits).softmax(1)
    after = calibration_metrics(calibrated, test_labels, False, [])
    assert after["ece"] < before["ece"] / 2
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert torch.equal(calibrated.argmax(1), test_logits.argmax(1))  # accuracy unchanged


def test_platt_only_where_the_offset_pays_and_rankings_unchanged():
    logits, targets = multi_label(4000, seed=0)
    fit = fit_calibration(logits, targets, multi_label=True)
    assert fit.bias is not None
    assert fit.bias[0] == 0  # temperature was enough for label 0
    assert fit.scale[0] == pytest.approx(1 / 3, rel=0.1)
    assert fit.scale[1] == pytest.approx(1 / 3, rel=0.1) and fit.bias[1] == pytest.approx(-2, 0.15)
    test_logits, test_targets = multi_label(4000, seed=1)
    before_p, after_p = test_logits.sigmoid(), fit.apply(test_logits).sigmoid()
    before = calibration_metrics(before_p, test_targets, True, ["a", "b"])
    after = calibration_metrics(after_p, test_targets, True, ["a", "b"])
    for label in ("a", "b"):
        assert after["labels"][label]["ece"] < before["labels"][label]["ece"] / 2
    auroc = [multilabel_auroc(p.float(), test_targets.long(), 2) for p in (before_p, after_p)]
    assert abs(float(auroc[0] - auroc[1])) < 1e-4  # float32 rounding only


def brute_force(scores, positive, score):
    """The candidate threshold with the best ``score(tp, fp, fn, tn)``, first in decreasing order."""
    best = None
    for t in sorted(set(scores.tolist()), reverse=True):
        predicted = scores >= t
        counts = [int((predicted & positive).sum()), int((predicted & ~positive).sum())]
        counts += [int((~predicted & positive).sum()), int((~predicted & ~positive).sum())]
        value = score(*counts)
        if best is None or value > best[0]:
            best = (value, t)
    return best[1]


def test_thresholds_follow_their_rule():
    generator = torch.Generator().manual_seed(0)
    positive = torch.rand(300, generator=generator) < 0.3
    scores = positive.double() * 0.3 + torch.rand(300, generator=generator, dtype=torch.float64)
    scores = (scores * 20).round() / 20  # ties
    probabilities, targets = scores[:, None], positive[:, None].double()

    def one(rule: str) -> float:
        return choose_thresholds(probabilities, targets, ThresholdRule.parse(rule))[0]

    assert one("f1") == brute_force(
        scores, positive, lambda tp, fp, fn, tn: 2 * tp / (2 * tp + fp + fn)
    )
    youden = brute_force(scores, positive, lambda tp, fp, fn, tn: tp / (tp + fn) - fp / (fp + tn))
    assert one("youden") == youden
    for s in (0.5, 0.8):  # met with 95% confidence: the Wilson bound at the threshold
        t = one(f"sensitivity={s}")
        rate = wilson_lower_bound(
            torch.tensor(float((scores[positive] >= t).sum())), positive.sum()
        )
        assert rate >= s
        higher = scores[scores > t]
        if len(higher):  # the next higher threshold would not promise it
            hits = float((scores[positive] >= higher.min()).sum())
            assert wilson_lower_bound(torch.tensor(hits), positive.sum()) < s
    assert one("sensitivity=0.999") == scores.min()  # none can promise it: the most lenient
    unmet = {"sensitivity=0.8": [], "precision=0.6": [], "sensitivity=0.999": [0]}
    for text, labels in {**unmet, "precision=0.99": [0]}.items():  # 0: too few images for it
        rule = ThresholdRule.parse(text)
        thresholds = choose_thresholds(probabilities, targets, rule)
        assert unpromised(probabilities, targets, thresholds, rule) == labels, text
    t = one("precision=0.6")
    called = positive[scores >= t]
    assert wilson_lower_bound(called.double().sum(), len(called)) >= 0.6
    lower = scores[scores < t]
    if len(lower):
        called = positive[scores >= lower.max()]
        assert wilson_lower_bound(called.double().sum(), len(called)) < 0.6


def test_the_wilson_bound_is_below_the_rate_and_tightens_with_more_images():
    few = wilson_lower_bound(torch.tensor(9.0), 10)
    many = wilson_lower_bound(torch.tensor(900.0), 1000)
    assert 0.6 < float(few) < float(many) < 0.9
    assert float(wilson_lower_bound(torch.tensor(0.0), 10)) == 0.0


@pytest.mark.parametrize(
    "text",
    ["f2", "sensitivity=1.5", "precision=", "youden=0.3", "", "sensitivity=.", "precision=1.."],
)
def test_unknown_threshold_rules_are_refused(text):
    with pytest.raises(CalibrationError, match="use f1, youden"):
        ThresholdRule.parse(text)


@pytest.mark.parametrize("text", ["sensitivity=1", "precision=1.0", "sensitivity=1."])
def test_a_rate_of_one_cannot_be_promised_and_is_refused(text):
    with pytest.raises(CalibrationError, match="a rate of 1 cannot be promised"):
        ThresholdRule.parse(text)
    assert ThresholdRule.parse("sensitivity=.95").target == 0.95


def test_no_images_is_an_error():
    with pytest.raises(CalibrationError, match="no validation images"):
        fit_calibration(torch.zeros(0, 3), torch.zeros(0), multi_label=False)


NAN, INF = float("nan"), float("inf")
BOTH = torch.tensor([[0, 1.0], [1, 0]] * 3)  # each of two labels present and absent


@pytest.mark.parametrize(
    "logits, targets, multi_label, message",
    [
        pytest.param(
            torch.randn(6, 3), torch.zeros(6), False, r"all 6 .* are of one class \(a\)", id="one"
        ),
        pytest.param(
            torch.randn(6, 2),
            torch.tensor([[0, 1.0], [1, 1]] * 3),
            True,
            r"label\(s\) b have one class only",
            id="always",
        ),
        pytest.param(
            torch.randn(6, 2),
            torch.tensor([[0, 1.0], [0, 0]] * 3),
            True,
            r"label\(s\) a have one class only",
            id="never",
        ),
        pytest.param(
            torch.tensor([[NAN, 0, 0], [0, 1, 0]] * 3),
            torch.tensor([0, 1] * 3),
            False,
            "outputs for a are not finite",
            id="nan",
        ),
        pytest.param(
            torch.tensor([[0, NAN]] * 6), BOTH, True, "outputs for b are not finite", id="nan-ml"
        ),
        pytest.param(
            torch.tensor([[INF, 0]] * 6), BOTH, True, "outputs for a are not finite", id="inf-ml"
        ),
    ],
)
def test_what_cannot_be_fitted_is_refused(logits, targets, multi_label, message):
    """One class only, a label always or never present, and outputs that are not finite are each
    one ``CalibrationError``."""
    with pytest.raises(CalibrationError, match=message):
        fit_calibration(logits, targets, multi_label, ["a", "b", "c"][: logits.shape[1]])


def test_a_fit_that_diverges_is_refused(monkeypatch):
    """A fit whose scale is 0 or infinite (in float32, as the card applies it) is refused."""
    monkeypatch.setattr(
        "densenet.tasks.calibration._minimise",
        lambda loss, shape: torch.zeros(shape, dtype=torch.float64) + 1000,  # e^-1000, e^1000
    )
    with pytest.raises(CalibrationError, match="calibration of the model diverged"):
        fit_calibration(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), multi_label=False)
    with pytest.raises(CalibrationError, match="calibration of a, b diverged"):
        fit_calibration(torch.randn(6, 2), BOTH, multi_label=True, names=["a", "b"])


def test_the_card_carries_the_fit_and_applies_it():
    fit = Calibration((0.5, 2.0), (0.0, -1.0))
    card = ModelCard(("a", "b"), multi_label=True, calibration=fit)
    assert ModelCard.from_dict(card.to_dict()) == card
    logits = torch.tensor([[2.0, 1.0]])
    assert torch.allclose(card.probabilities(logits), torch.tensor([[1.0, 1.0]]).sigmoid())
    single = ModelCard(("a", "b"), calibration=Calibration((0.5,)))
    assert torch.allclose(single.probabilities(logits), torch.tensor([[1.0, 0.5]]).softmax(1))
    assert torch.allclose(ModelCard(("a", "b")).probabilities(logits), logits.softmax(1))


def test_reliability_diagram_draws_a_png(tmp_path):
    logits, labels = single_label(500, seed=0)
    confidence, predicted = logits.softmax(1).max(1)
    path = tmp_path / "reliability.png"
    image = reliability_diagram({"before": (confidence, (predicted == labels).double())})
    image.save(path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (480, 480)
        assert len(image.getcolors(1 << 16)) > 3  # more than axes on white


def digits_in_three_splits(root: Path, n: int = 1050) -> Path:
    """scikit-learn's digits as grey 32x32 PNGs with attribute labels, rows spread over train,
    val and test (3:2:2, interleaved so that each split has every writer)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True)
    splits = ["train", "val", "train", "test", "train", "val", "test"]
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", *ATTRIBUTES, "split"])
        for i in range(n):
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            image = Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR)
            image.save(root / "images" / f"{i}.png")
            flags = [int(rule(int(digits.target[i]))) for rule in ATTRIBUTES.values()]
            writer.writerow([f"images/{i}.png", *flags, splits[i % len(splits)]])
    return root / "labels.csv"


@pytest.mark.slow
def test_calibration_halves_the_held_out_error_and_thresholds_keep_their_promise(tmp_path, capsys):
    """A multi-label model trained on digits, made overconfident (its logits x8), calibrated on
    the val rows with sensitivity=0.9: on the test rows the calibration error halves, AUROC
    stays, and every label keeps at least 0.9 sensitivity."""
    labels = digits_in_three_splits(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_argv(tmp_path, labels, tmp_path / "run", "--epochs", "4")) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    checkpoint = read_checkpoint(tmp_path / "run" / "best.pth")
    for name in ("classifier.weight", "classifier.bias"):
        checkpoint.model[name] *= 8
    overconfident = tmp_path / "overconfident.pth"
    save_checkpoint(checkpoint, overconfident)
    common = ["--labels", str(labels), "--workers", "0", "--no-progress", "--json"]
    assert main(["calibrate", str(overconfident), str(tmp_path), *common,
                 "--threshold", "sensitivity=0.9"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 300 and report["after"]["ece"] < report["before"]["ece"]
    assert Path(report["diagram"]).is_file() and overconfident.is_file()
    results = []
    for model in (overconfident, tmp_path / "overconfident.calibrated.pth"):
        assert (
            main(["eval", str(tmp_path), "--weights", str(model), "--split", "test", *common]) == 0
        )
        results.append(json.loads(capsys.readouterr().out))
    before, after = results
    assert after["calibrated"] and not before["calibrated"]
    assert after["ece"] <= before["ece"] / 2, (before["ece"], after["ece"])
    assert abs(after["mean_auroc"] - before["mean_auroc"]) <= 0.005
    for name, row in after["labels"].items():
        assert row["positives"] >= 30 and row["sensitivity"] >= 0.9, (name, row)


def test_predict_and_bulk_apply_the_cards_calibration(tmp_path):
    from densenet import Classifier, get_model, load
    from densenet.tasks.bulk import Options, Outputs
    from densenet.weights.checkpoint import TrainCheckpoint

    torch.manual_seed(0)
    model = get_model("densenet_bc_100_k12", num_classes=4).eval()
    card = ModelCard.for_model(model, calibration=Calibration((0.25,)))
    path = tmp_path / "calibrated.pth"
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), {"num_classes": 4}), path)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = (model(images) * 0.25).softmax(1)
    classifier = Classifier(weights=str(path), device="cpu", optimize=False)
    torch.testing.assert_close(classifier.probabilities(images), expected)
    loaded = load(weights=str(path))
    columns = Outputs(loaded, Options(task="predict", topk=4), torch.device("cpu"), False)(images)
    top = torch.from_numpy(columns["probabilities"])
    torch.testing.assert_close(top, expected.sort(1, descending=True).values)


CLI = ["--workers", "0", "--no-progress"]


@pytest.fixture
def tiny(tmp_path):
    """A tiny single-label training checkpoint (classes a and b, 12x12 images) and a folder of
    two images per class: ``tmp_path/best.pth`` and ``tmp_path/val``."""
    _checkpoint(tmp_path / "best.pth", ["a", "b"])
    _folder(tmp_path / "val", ["a", "b"])
    return tmp_path


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_calibrate_writes_the_model_and_a_png_diagram(tiny, capsys):
    assert main(["calibrate", str(tiny / "best.pth"), str(tiny / "val"), *CLI]) == 0
    assert read_checkpoint(tiny / "best.calibrated.pth").card.calibration is not None
    with Image.open(tiny / "best.calibrated.reliability.png") as image:
        assert image.format == "PNG"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "c/o.pth", "--diagram", "c/link.png"], "c/link.png is a symbolic link"),
        (["--out", "c/link.pth"], "c/link.pth is a symbolic link"),  # its default diagram too
        (["--out", "c/"], "--out c/ names a folder"),
        (["--out", "c"], "c is a folder"),
        (["--out", "nodir/y.pth"], "--out nodir/y.pth: the folder nodir does not exist"),
        (["--out", "o.pth", "--diagram", "nodir/d.png"], "--diagram nodir/d.png: the folder"),
        (["--out", "o.pth", "--diagram", "o.pth"], "--diagram o.pth is the --out file"),
        (["--out", "nodir/"], "--out nodir/ names a folder"),
        (["--out", "o.pth", "--diagram", "best.pth"], "--diagram best.pth is the input"),
        (["--out", "val/a/1.png"], "--out val/a/1.png would replace a file of the input"),
        (["--out", "o.pth", "--diagram", "val/a/0.png"], "--diagram val/a/0.png would replace"),
    ],
)
def test_calibrate_checks_its_outputs_before_any_work(tiny, capsys, monkeypatch, args, message):
    """A symbolic link (the file it points to stays as it was), a folder, a missing folder: one
    line before the model loads, and nothing written."""
    (tiny / "c").mkdir()
    (tiny / "precious.txt").write_text("precious")
    for link in ("link.png", "link.pth", "link.reliability.png"):
        (tiny / "c" / link).symlink_to(tiny / "precious.txt")
    before = files_under(tiny)
    monkeypatch.chdir(tiny)
    monkeypatch.setattr("densenet.tasks.evaluate.load", lambda *a, **k: pytest.fail("loaded"))
    assert main(["calibrate", "best.pth", "val", *args, *CLI]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert files_under(tiny) == before
    assert not any(".tmp" in p.name for p in tiny.rglob("*"))


def test_calibrate_refuses_the_models_it_cannot_write_before_running_them(
    tiny, capsys, monkeypatch
):
    """Random weights and a model that is no densenet checkpoint (here a TorchScript file) are
    refused before a single image is classified."""
    from densenet.tasks.export import to_torchscript

    monkeypatch.setattr("densenet.tasks.evaluate.predict_labels", lambda *a: pytest.fail("ran"))
    loaded = load(weights=str(tiny / "best.pth"))
    to_torchscript(loaded.module, tiny / "model.pt", card=loaded.card, method="trace")
    argv = ["calibrate", str(tiny / "model.pt"), str(tiny / "val"), "--out", str(tiny / "o.pth")]
    assert main([*argv, *CLI]) == 2
    assert "model.pt: calibrate writes a densenet checkpoint" in capsys.readouterr().err
    argv = ["calibrate", "densenet_bc_100_k12", str(tiny / "val"), "--weights", "none"]
    assert main([*argv, "--out", str(tiny / "o.pth"), *CLI]) == 2
    assert "random weights have nothing to calibrate" in capsys.readouterr().err
    assert not (tiny / "o.pth").exists()


def test_calibrate_refuses_data_it_cannot_fit_before_writing(tiny, capsys):
    """Images of one class only, no readable image, a model whose outputs are not finite: one
    line, exit 2, nothing written."""
    _folder(tiny / "one", ["a"])
    (tiny / "bad" / "a").mkdir(parents=True)
    (tiny / "bad" / "b").mkdir()
    for name in ("a/1.png", "b/1.png"):
        (tiny / "bad" / name).write_bytes(b"not an image")
    checkpoint = read_checkpoint(tiny / "best.pth")
    checkpoint.model["classifier.weight"][0] = 3e38  # finite weights, an infinite logit
    save_checkpoint(checkpoint, tiny / "nan.pth")
    for model, data, message in [
        ("best.pth", "one", r"all 2 validation images are of one class \(a\)"),
        ("best.pth", "bad", "none of the 2 images could be read"),
        ("nan.pth", "val", "(?i)not finite|nan"),  # by the fit, or by the runner before it
    ]:
        argv = ["calibrate", str(tiny / model), str(tiny / data), "--out", str(tiny / "o.pth")]
        assert main([*argv, *CLI]) == 2, (model, data)
        assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])
        assert not list(tiny.glob("o.*"))
