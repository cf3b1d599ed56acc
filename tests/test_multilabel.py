"""Multi-label training and metrics on real data: scikit-learn's handwritten digits as 1-channel
32x32 PNGs labelled with attributes of the digit (even, greater than 4, prime)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from densenet import ModelCard
from densenet.cli import main
from densenet.data.datasets import DataError, collate
from densenet.tasks.multilabel import label_metrics, label_splits, predict_labels, read_labels_csv
from densenet.train import read_checkpoint

ATTRIBUTES = {
    "even": lambda d: d % 2 == 0,
    "gt4": lambda d: d > 4,
    "prime": lambda d: d in (2, 3, 5, 7),
}
ROOT = Path(__file__).resolve().parents[1]
SMALL = {"growth_rate": 8, "block_config": [2, 2, 2], "num_init_features": 16}


def digits_with_attributes(root: Path, n: int = 600, val_fraction: float = 0.25) -> Path:
    """``root/images/<i>.png`` (grey, 32x32) and ``root/labels.csv`` (file, one 0/1 column per
    attribute, split); returns the CSV's path."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (root / "images").mkdir(parents=True)
    split = round(n * (1 - val_fraction))
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", *ATTRIBUTES, "split"])
        for i in range(n):
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, "L").resize((32, 32), Image.BILINEAR).save(
                root / "images" / f"{i}.png"
            )
            digit = int(digits.target[i])
            flags = [int(rule(digit)) for rule in ATTRIBUTES.values()]
            writer.writerow([f"images/{i}.png", *flags, "train" if i < split else "val"])
    return root / "labels.csv"


def train_argv(data: Path, labels: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--recipe", "cifar10+", "--data", str(data), "--labels", str(labels),
        "--out", str(out), "--in-channels", "1", "--set", "model_args=" + json.dumps(SMALL),
        "--image-size", "32", "--batch-size", "32", "--workers", "0", "--no-progress", *extra,
    ]  # fmt: skip


def test_metrics_are_torchmetrics_binary_auroc_and_ap():
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]])
    probabilities = torch.tensor([[0.9, 0.2], [0.1, 0.3], [0.8, 0.6], [0.7, 0.4]])
    result = label_metrics(probabilities, targets, ["a", "b"])
    assert result["labels"]["a"]["auroc"] == pytest.approx(1.0)  # 0.9, 0.8 above 0.7, 0.1
    assert result["labels"]["b"]["auroc"] == pytest.approx(0.75)  # 0.6 > all; 0.3 > 0.2 only
    assert result["mean_auroc"] == pytest.approx(0.875)


def test_thresholds_pick_the_labels_and_travel_with_the_card():
    card = ModelCard(("a", "b", "c"), multi_label=True, thresholds=(0.5, 0.9, 0.1))
    assert card.positive(torch.tensor([[0.6, 0.8, 0.2], [0.1, 0.95, 0.05]])) == [["a", "c"], ["b"]]
    assert ModelCard.from_dict(card.to_dict()) == card
    assert ModelCard(("a", "b"), multi_label=True).positive(torch.tensor([[0.5, 0.4]])) == [["a"]]


def test_no_readable_image_is_one_error():
    """Batches whose every image was skipped as unreadable leave nothing to predict on."""
    empty = [collate([None] * 3), collate([None])]
    with pytest.raises(DataError, match="none of the 4 images could be read"):
        predict_labels(lambda images: pytest.fail("predicted"), empty)


def test_a_pipe_separated_labels_column_is_read(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("file,labels\na.png,cat|dog\nb.png,dog\n")
    table = read_labels_csv(tmp_path / "labels.csv", tmp_path)
    assert table.names == ["cat", "dog"]
    assert table.targets.tolist() == [[1.0, 1.0], [0.0, 1.0]]


@pytest.mark.slow
def test_learns_digit_attributes_and_keeps_the_best_mean_auroc(tmp_path, capsys):
    labels = digits_with_attributes(tmp_path / "data")
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = train_argv(tmp_path / "data", labels, out, "--epochs", "4", "--pos-weight", "auto",
                          "--set", "thresholds=0.5,0.5,0.4")  # fmt: skip
        assert main([*argv, "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(capsys.readouterr().out)
    assert summary["best_val_mean_auroc"] > 0.75, summary  # chance: 0.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["best_val_mean_auroc"] == max(r["val_mean_auroc"] for r in records)
    assert set(records[-1]["val_labels"]) == set(ATTRIBUTES)
    checkpoint = read_checkpoint(out / "best.pth")
    assert checkpoint.card.multi_label and checkpoint.card.classes == tuple(ATTRIBUTES)
    assert checkpoint.card.in_channels == 1 and checkpoint.card.thresholds == (0.5, 0.5, 0.4)
    # densenet eval: the per-label table of the best checkpoint on the CSV's val rows
    evaluation = ["eval", str(tmp_path / "data"), "--weights", str(out / "best.pth"),
                  "--labels", str(labels), "--workers", "0", "--no-progress"]  # fmt: skip
    assert main([*evaluation, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 150
    assert result["mean_auroc"] == pytest.approx(summary["best_val_mean_auroc"], abs=1e-4)
    assert main(evaluation) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[2:]] == [*ATTRIBUTES, "mean"]
    # predict: each label's probability, and the labels at or above their threshold
    image = str(tmp_path / "data" / "images" / "599.png")
    assert main(["predict", image, "--weights", str(out / "best.pth"), "--json"]) == 0
    [prediction] = json.loads(capsys.readouterr().out)
    thresholds = {"even": 0.5, "gt4": 0.5, "prime": 0.4}
    top = prediction["top"]
    expected = [t["label"] for t in top if t["probability"] >= thresholds[t["label"]]]
    assert sorted(prediction["positive"]) == sorted(expected)


@pytest.mark.slow
def test_two_processes_train_the_model_of_one(tmp_path, capsys):
    """torchrun, 2 gloo processes x 16 images vs 1 process with the same global batch of 32 in
    2 micro-batches of 16: the same weights; validation sharded over both processes gives the
    metrics of `densenet eval` of the same checkpoint in one process."""
    labels = digits_with_attributes(tmp_path / "data", n=96)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for name, launcher, extra in (("one", [], ["--accumulate", "2"]), ("two", torchrun, [])):
        argv = train_argv(tmp_path / "data", labels, tmp_path / name, "--epochs", "1",
                          "--drop-rate", "0", *extra)  # fmt: skip
        subprocess.run([sys.executable, *launcher, "-m", "densenet", *argv], env=env, check=True,
                       timeout=300)  # fmt: skip
    a, b = (read_checkpoint(tmp_path / name / "last.pth") for name in ("one", "two"))
    for name, value in a.model.items():
        if value.is_floating_point() and "running" not in name:  # BN statistics are per process
            torch.testing.assert_close(b.model[name], value, rtol=1e-4, atol=1e-5)
    distributed = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    assert distributed["val_images"] == 24
    evaluation = ["eval", str(tmp_path / "data"), "--weights", str(tmp_path / "two" / "last.pth"),
                  "--labels", str(labels), "--workers", "0", "--no-progress", "--json"]  # fmt: skip
    assert main(evaluation) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["images"] == 24
    assert single["mean_auroc"] == pytest.approx(distributed["val_mean_auroc"], abs=1e-5)


def test_a_csv_naming_missing_files_is_one_error(tmp_path, capsys):
    labels = digits_with_attributes(tmp_path / "data", n=40)
    (tmp_path / "data" / "images" / "3.png").unlink()
    assert main(train_argv(tmp_path / "data", labels, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "1 file(s) that do not exist" in err and "3.png" in err, err


def test_a_label_with_one_class_only_is_one_error(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    rows = ["file,always,sometimes,split"]
    for i in range(6):
        Image.new("L", (32, 32), 40 * i).save(tmp_path / "images" / f"{i}.png")
        rows.append(f"images/{i}.png,1,{i % 2},{'train' if i < 4 else 'val'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    assert main(train_argv(tmp_path, tmp_path / "labels.csv", tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "label(s) always have one class only" in err, err


def test_the_validation_images_can_come_from_a_second_csv(tmp_path):
    labels = digits_with_attributes(tmp_path, n=40)
    rows = labels.read_text().splitlines()
    header = rows[0].rsplit(",", 1)[0]
    (tmp_path / "train.csv").write_text(
        "\n".join([header] + [r.rsplit(",", 1)[0] for r in rows[1:31]])
    )
    (tmp_path / "val.csv").write_text(
        "\n".join([header] + [r.rsplit(",", 1)[0] for r in rows[31:]])
    )
    splits = label_splits(tmp_path / "train.csv", tmp_path, tmp_path / "val.csv")
    assert (len(splits.train), len(splits.val), splits.test) == (30, 10, None)
    image, target = splits.val[0]
    assert image.mode == "L" and target.shape == (3,)


def test_a_label_without_positives_has_no_auroc_and_stays_out_of_the_means(tmp_path, capsys):
    """eval on rows where one label never occurs: its AUROC and AP are undefined (None, with a
    warning), not 0.0 averaged into the mean."""
    from densenet import get_model
    from densenet.weights.checkpoint import TrainCheckpoint, save_checkpoint

    labels = digits_with_attributes(tmp_path, n=40)
    rows = labels.read_text().splitlines()
    columns = rows[0].split(",")
    prime = columns.index("prime")
    fixed = [rows[0]] + [
        ",".join(
            "0" if i == prime and r.endswith(",val") else v for i, v in enumerate(r.split(","))
        )
        for r in rows[1:]
    ]
    labels.write_text("\n".join(fixed) + "\n")
    model = get_model("densenet_bc_100_k12", num_classes=3, in_channels=1, **SMALL)
    card = ModelCard.for_model(model, classes=tuple(ATTRIBUTES), multi_label=True)
    args = {"num_classes": 3, "in_channels": 1, **SMALL}
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), args), tmp_path / "m.pth")
    evaluation = ["eval", str(tmp_path), "--weights", str(tmp_path / "m.pth"), "--labels",
                  str(labels), "--workers", "0", "--no-progress"]  # fmt: skip
    assert main([*evaluation, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["undefined"] == ["prime"]
    assert result["labels"]["prime"]["auroc"] is None and result["labels"]["prime"]["ap"] is None
    defined = [result["labels"][n]["auroc"] for n in ("even", "gt4")]
    assert result["mean_auroc"] == pytest.approx(sum(defined) / 2)
    assert main(evaluation) == 0
    out, err = capsys.readouterr()
    assert "prime" in err and "one class only" in err
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("prime")] == [
        ["prime", "-"]
    ]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[:2] + [rows[2].rsplit(",", 2)[0]] + rows[3:], "line 3 has"),
        (lambda rows: rows[:2] + [rows[2] + ",1"] + rows[3:], "line 3 has 6 fields"),
        (
            lambda rows: [
                r.split(",", 1)[0] + "," + r.split(",")[1] + "," + r.rsplit(",", 1)[1] for r in rows
            ],
            "1 label(s) (even)",
        ),  # fmt: skip
        (lambda rows: [rows[0].replace("gt4", "even")] + rows[1:], "even appear twice"),
    ],
)
def test_a_malformed_labels_csv_is_one_error_before_training(tmp_path, capsys, edit, message):
    labels = digits_with_attributes(tmp_path / "data", n=40)
    labels.write_text("\n".join(edit(labels.read_text().splitlines())) + "\n")
    assert main(train_argv(tmp_path / "data", labels, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert not (tmp_path / "run" / "last.pth").exists()
