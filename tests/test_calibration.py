"""densenet.calibration: temperature and Platt scaling recover a known miscalibration, change no
ranking, and halve the calibration error on held-out data; thresholds follow their rule exactly;
the card carries the fit and applies it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_multilabel import ATTRIBUTES, train_argv
from torchmetrics.functional.classification import multilabel_auroc

from densenet import ModelCard
from densenet.calibration import (
    Calibration,
    CalibrationError,
    ThresholdRule,
    calibration_metrics,
    choose_thresholds,
    fit_calibration,
    reliability_diagram,
    wilson_lower_bound,
)
from densenet.checkpoint import read_checkpoint, save_checkpoint
from densenet.cli import main


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
    assert one("sensitivity=1.0") == scores.min()  # no threshold can promise it: the most lenient
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


@pytest.mark.parametrize("text", ["f2", "sensitivity=1.5", "precision=", "youden=0.3", ""])
def test_unknown_threshold_rules_are_refused(text):
    with pytest.raises(CalibrationError, match="use f1, youden"):
        ThresholdRule.parse(text)


def test_no_images_is_an_error():
    with pytest.raises(CalibrationError, match="no validation images"):
        fit_calibration(torch.zeros(0, 3), torch.zeros(0), multi_label=False)


def test_the_card_carries_the_fit_and_applies_it():
    fit = Calibration((0.5, 2.0), (0.0, -1.0))
    card = ModelCard(("a", "b"), multi_label=True, calibration=fit)
    assert ModelCard.from_dict(card.to_dict()) == card
    logits = torch.tensor([[2.0, 1.0]])
    assert torch.allclose(card.probabilities(logits), torch.tensor([[1.0, 1.0]]).sigmoid())
    single = ModelCard(("a", "b"), calibration=Calibration((0.5,)))
    assert torch.allclose(single.probabilities(logits), torch.tensor([[1.0, 0.5]]).softmax(1))
    assert torch.allclose(ModelCard(("a", "b")).probabilities(logits), logits.softmax(1))


def test_reliability_diagram_is_a_png(tmp_path):
    logits, labels = single_label(500, seed=0)
    confidence, predicted = logits.softmax(1).max(1)
    path = tmp_path / "reliability.png"
    reliability_diagram({"before": (confidence, (predicted == labels).double())}, str(path))
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
    from densenet.bulk import Options, Outputs
    from densenet.checkpoint import TrainCheckpoint

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
