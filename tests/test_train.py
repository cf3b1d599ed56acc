"""Tests for densenet.train: the recipes, real learning on real images, bit-exact resume after
kill -9, DistributedDataParallel against one process, and the failure modes (bad checkpoint,
NaN loss, full disk, unreadable images)."""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data import digits_folder, fake_cifar10

from densenet import ModelCard
from densenet.cli import main
from densenet.data.datasets import DataError
from densenet.train import (
    RECIPES,
    CheckpointError,
    TrainCheckpoint,
    Trainer,
    TrainingError,
    eval_resize,
    make_config,
    milestone_epochs,
    parse_override,
    read_checkpoint,
    save_checkpoint,
    train,
)

TINY = {"growth_rate": 4, "block_config": [2, 2, 2], "num_init_features": 8}
SMALL = {"growth_rate": 8, "block_config": [2, 2, 2], "num_init_features": 16}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """All 1797 digits, 16x16: 1348 training and 449 validation images."""
    return digits_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def few_digits(tmp_path_factory) -> Path:
    """128 digits, 16x16: 96 training and 32 validation images."""
    return digits_folder(tmp_path_factory.mktemp("few"), n=128)


def tiny_config(data: Path, out: Path, **overrides):
    settings = dict(
        data=str(data), out=str(out), model_args=TINY, image_size=16, epochs=1, batch_size=16,
        workers=0, progress=False, drop_rate=0.0,
    )  # fmt: skip
    recipe = overrides.pop("recipe", "cifar10")
    settings.update(overrides)
    return make_config(recipe, **settings)


def test_recipes_are_the_papers():
    for name in ("cifar10", "cifar100", "svhn"):
        assert RECIPES[name].drop_rate == 0.2 and RECIPES[name].augment == "none"
    for name in ("cifar10+", "cifar100+"):
        assert RECIPES[name].drop_rate == 0.0 and RECIPES[name].augment == "crop-flip"
    for name in ("cifar10", "cifar10+", "cifar100", "cifar100+"):
        r = RECIPES[name]
        assert (r.epochs, r.batch_size, r.lr, r.lr_milestones) == (300, 64, 0.1, (0.5, 0.75))
    assert (RECIPES["svhn"].epochs, RECIPES["svhn"].holdout) == (40, 6000)
    assert RECIPES["svhn"].data == "svhn" and RECIPES["cifar100+"].data == "cifar100"
    imagenet = RECIPES["imagenet"]
    assert (imagenet.epochs, imagenet.batch_size, imagenet.augment) == (90, 256, "imagenet")
    assert milestone_epochs(imagenet) == [30, 60]
    assert milestone_epochs(RECIPES["cifar10+"]) == [150, 225]
    assert milestone_epochs(RECIPES["svhn"]) == [20, 30]
    assert milestone_epochs(make_config("cifar10", epochs=1)) == [1, 1]  # never before epoch 1
    assert (imagenet.image_size, eval_resize(imagenet)) == (224, 256)
    assert eval_resize(make_config("imagenet", data="x", image_size=112)) == 128
    for r in (r for r in RECIPES.values() if r.recipe != "rdnet"):  # the paper's: SGD
        assert (r.momentum, r.nesterov, r.weight_decay, r.lr_gamma) == (0.9, True, 1e-4, 0.1)
    assert RECIPES["finetune"].weights == "DEFAULT"


def test_an_unknown_model_argument_is_one_error_before_training(tmp_path, capsys):
    argv = ["train", "--recipe", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path / "r"),
            "--set", 'model_args={"bogus": 1}']  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown DenseNet argument(s) bogus" in err, err


def test_sizes_and_windows_the_model_cannot_take_are_one_error_before_anything(tmp_path, capsys):
    """A crop or volume below the model's smallest input, a volume size over the voxel limit, a
    batch that cannot fit in memory (a 640^3 volume's batch needs hundreds of GiB), a
    window that is not finite or whose width overflows: one line each, nothing written."""
    base = ["train", "--recipe", "cifar10", "--data", str(tmp_path), "--out", str(tmp_path / "r")]
    below = "is below the smallest input of densenet_bc_100_k12"
    cases = {
        f"image_size 2 {below} (4x4 pixels)": ["--image-size", "2"],
        f"volume_size (1, 1, 1) {below} ((4, 4, 4) voxels": ["--volume-size", "1,1,1"],
        f"volume_size (2, 2, 2) {below}": ["--volume-size", "2,2,2"],
        "over the limit of 268,435,456 voxels": ["--volume-size", "10000,10000,10000"],
        "GiB for its stem's output alone": ["--volume-size", "640,640,640"],
        "at image_size (100000, 100000) needs at least": ["--image-size", "100000"],
        "got (-inf, inf)": ["--volume-size", "8,8,8", "--window=-inf,inf"],
        "got (-1e+308, 1e+308)": ["--volume-size", "8,8,8", "--window", "-1e308,1e308"],
        "got (-3e+38, 3e+38)": ["--volume-size", "8,8,8", "--window", "-3e38,3e38"],
        "got (nan, 1.0)": ["--volume-size", "8,8,8", "--window", "nan,1"],
    }
    for message, argv in cases.items():
        assert main(base + argv) == 2, message
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and message in err, err
    assert not (tmp_path / "r").exists()
    # an axis the ImageNet stem keeps (stem_stride 1) is only halved by the transitions
    thin = dict(model="densenet121", data="x", model_args={"stem_stride": [1, 2, 2]})
    assert make_config("imagenet", volume_size=(8, 29, 29), **thin).volume_size == (8, 29, 29)
    for size in ((7, 29, 29), (8, 28, 29)):
        with pytest.raises(ValueError, match=r"\(8, 29, 29\) voxels"):
            make_config("imagenet", volume_size=size, **thin)


def test_every_setting_can_be_overridden():
    assert parse_override("lr=0.5") == ("lr", 0.5)
    assert parse_override("lr_milestones=0.3,0.6") == ("lr_milestones", (0.3, 0.6))
    assert parse_override("nesterov=false") == ("nesterov", False)
    assert parse_override("weights=none") == ("weights", None)
    assert parse_override('model-args={"growth_rate": 4}') == ("model_args", {"growth_rate": 4})
    with pytest.raises(ValueError, match="unknown setting 'lrr'"):
        parse_override("lrr=1")
    with pytest.raises(ValueError, match="not a valid"):
        parse_override("epochs=many")
    config = make_config("imagenet", data="x", epochs=3, lr_milestones=[0.5])
    assert (config.epochs, config.lr_milestones, config.batch_size) == (3, (0.5,), 256)
    with pytest.raises(ValueError, match="unknown recipe"):
        make_config("mnist")
    with pytest.raises(ValueError, match="needs data"):
        make_config("imagenet")
    assert parse_override("memory_efficient=triton") == ("memory_efficient", "triton")
    assert parse_override("memory_efficient=yes") == ("memory_efficient", True)
    with pytest.raises(ValueError, match='true, false or "triton"'):
        make_config("imagenet", data="x", memory_efficient="fast")


def test_the_trainer_reaches_the_triton_memory_efficient_blocks(few_digits, tmp_path):
    """``--set memory_efficient=triton`` selects the fused kernels (they run on CUDA and under
    the interpreter; elsewhere the memory-efficient block runs in PyTorch)."""
    config = tiny_config(few_digits, tmp_path / "run", memory_efficient="triton")
    trainer = Trainer(config, resume=False, rank=0, world_size=1, device=torch.device("cpu"))
    blocks = [m for m in trainer.net.modules() if hasattr(m, "triton")]
    assert blocks and all(b.triton and b.memory_efficient for b in blocks)


@pytest.mark.slow
def test_learns_real_digits_and_eval_reads_the_checkpoint(digits, tmp_path, capsys):
    """A small DenseNet-BC learns scikit-learn's handwritten digits: >= 95% held out."""
    out = tmp_path / "run"
    config = tiny_config(digits, out, model_args=SMALL, epochs=6, batch_size=32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fastest on 2 shared cores for so small a model
    try:
        summary = train(config)
    finally:
        torch.set_num_threads(threads)
    assert summary["best_val_top1"] >= 95.0, summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert records[-1]["lr"] == pytest.approx(0.001)  # / 10 at epochs 3 and 4 (50%, 75%)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["mean"] == [0.485, 0.456, 0.406] and resolved["resize_size"] == 16
    checkpoint = read_checkpoint(out / "best.pth")
    assert checkpoint.card.classes == tuple(str(d) for d in range(10))
    assert (
        checkpoint.card.arch == "densenet_bc_100_k12" and checkpoint.model_args["growth_rate"] == 8
    )
    assert torch.load(out / "best.pth", weights_only=True)["format"] == "densenet-train-2"
    # `densenet eval` rebuilds the model from the checkpoint and gets the same accuracy
    assert main(["eval", str(digits), "--weights", str(out / "best.pth"), "--workers", "0",
                 "--json", "--no-progress"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 449
    assert result["top1"] == pytest.approx(summary["best_val_top1"])
    # int8, calibrated on training images: top-1 within 0.5 points of float32 on the same 449
    assert main(["eval", str(digits), "--weights", str(out / "best.pth"), "--workers", "0",
                 "--json", "--no-progress", "--dtype", "int8",
                 "--calibration", str(digits / "train")]) == 0  # fmt: skip
    int8 = json.loads(capsys.readouterr().out)
    assert int8["precision"] == "int8" and int8["images"] == 449
    assert abs(int8["top1"] - result["top1"]) <= 0.5, (int8["top1"], result["top1"])


_KILLABLE = """
import sys
import densenet.weights.checkpoint as c
from densenet.cli import main

block, save = sys.argv[1] == "block", c.save_checkpoint

def save_then_block(checkpoint, path):
    save(checkpoint, path)
    print("saved", flush=True)
    sys.stdin.read()  # until killed

if block:
    c.save_checkpoint = save_then_block
sys.exit(main(sys.argv[2:]))
"""


def _train_cli(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--recipe", "cifar10+", "--data", str(data), "--out", str(out),
        "--set", "model_args=" + json.dumps(TINY), "--image-size", "16", "--epochs", "2",
        "--batch-size", "16", "--workers", "0", "--no-progress", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.mark.slow
def test_kill_9_and_resume_gives_the_weights_of_an_uninterrupted_run(few_digits, tmp_path):
    """Augmentation (crop-flip) and dropout both draw random numbers: resuming must restore them."""
    script = [sys.executable, "-c", _KILLABLE]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    options = ["--drop-rate", "0.2", "--deterministic", "--checkpoint-every-steps", "2"]
    subprocess.run(
        [*script, "run", *_train_cli(few_digits, straight, *options)], env=_env(), check=True
    )
    process = subprocess.Popen(
        [*script, "block", *_train_cli(few_digits, killed, *options)], env=_env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout.readline() == "saved\n"  # the first checkpoint is on disk
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    interrupted = read_checkpoint(killed / "last.pth")
    assert (interrupted.epoch, interrupted.step) == (0, 2)  # killed in the first epoch
    (killed / ".last.pth.12345.tmp").write_bytes(b"half a checkpoint")  # as a kill can leave
    resume = _train_cli(few_digits, killed, *options, "--resume")
    subprocess.run([*script, "run", *resume], env=_env(), check=True)
    a, b = read_checkpoint(straight / "last.pth"), read_checkpoint(killed / "last.pth")
    assert (a.epoch, b.epoch) == (2, 2)
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key
    assert not list(killed.glob(".*.tmp*"))
    lines = [(d / "metrics.jsonl").read_text().splitlines() for d in (straight, killed)]
    strip = ("seconds", "images_per_second")
    assert [{k: v for k, v in json.loads(x).items() if k not in strip} for x in lines[0]] == [
        {k: v for k, v in json.loads(x).items() if k not in strip} for x in lines[1]
    ]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(few_digits, tmp_path, capsys):
    """torchrun, 2 gloo processes x 8 images vs 1 process with the same global batch of 16 in
    2 micro-batches of 8 (so BatchNorm sees the same batches); validation and `densenet eval`
    sharded over both processes give the numbers of one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    single = _train_cli(few_digits, one, "--drop-rate", "0", "--accumulate", "2")
    subprocess.run([sys.executable, "-m", "densenet", *single], env=_env(), check=True)
    # --standalone: the rendezvous binds a free port itself (no port picked in advance)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
    ]
    ddp = _train_cli(few_digits, two, "--drop-rate", "0")
    subprocess.run([*torchrun, "-m", "densenet", *ddp], env=_env(), check=True, timeout=300)
    a, b = read_checkpoint(one / "last.pth"), read_checkpoint(two / "last.pth")
    assert b.config["batch_size"] == 16
    for name, value in a.model.items():
        if value.is_floating_point() and "running" not in name:  # BN statistics are per process
            torch.testing.assert_close(b.model[name], value, rtol=1e-4, atol=1e-5)
    distributed_val = json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])
    assert distributed_val["val_images"] == 32
    evaluation = ["eval", str(few_digits), "--weights", str(two / "last.pth"), "--workers", "0",
                  "--json", "--no-progress"]  # fmt: skip
    assert main(evaluation) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["top1"] == pytest.approx(distributed_val["val_top1"])
    shown = subprocess.run(
        [*torchrun, "-m", "densenet", *evaluation],
        env=_env(), check=True, timeout=300, capture_output=True, text=True,
    )  # fmt: skip
    sharded = json.loads(shown.stdout)  # printed by rank 0 only
    assert (sharded["processes"], sharded["images"]) == (2, 32)
    assert sharded["top1"] == pytest.approx(single["top1"])
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)


def test_held_out_validation_then_the_best_model_is_tested(tmp_path, monkeypatch):
    """The SVHN recipe's scheme (validate on images held out of the training set, test the best
    epoch's model at the end), here on a small stand-in CIFAR-10 copy."""
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args: True)
    cifar_root = fake_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    config = tiny_config("cifar10", out, data_root=str(cifar_root), holdout=8, image_size=32)
    summary = train(config)
    assert summary["test"]["images"] == 16
    record = json.loads((out / "metrics.jsonl").read_text())
    assert (record["train_images"], record["val_images"]) == (32, 8)
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])  # CIFAR-10's statistics


def copy_digits(few_digits: Path, data: Path) -> Path:
    """A writable copy of the digits folder."""
    for split in ("train", "val"):
        for folder in (few_digits / split).iterdir():
            (data / split / folder.name).mkdir(parents=True)
            for image in folder.iterdir():
                (data / split / folder.name / image.name).write_bytes(image.read_bytes())
    return data


def test_unreadable_images_are_skipped_and_counted(few_digits, tmp_path):
    data = copy_digits(few_digits, tmp_path / "data")
    (data / "train" / "3" / "corrupt.png").write_bytes(b"\x89PNG broken")
    (data / "train" / "4" / "empty.jpg").write_bytes(b"")
    (data / "val" / "5" / "text.png").write_text("not an image")
    train(tiny_config(data, tmp_path / "run", batch_size=98))  # one step: all 98 training files
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert (record["train_skipped"], record["train_images"]) == (2, 96)
    assert (record["val_skipped"], record["val_images"]) == (1, 32)
    with pytest.raises(TrainingError, match="2 of 98 training images could not be read"):
        train(tiny_config(data, tmp_path / "strict", batch_size=98, max_unreadable=0.01))


def test_an_epoch_without_a_readable_training_image_fails(few_digits, tmp_path):
    data = copy_digits(few_digits, tmp_path / "data")
    for image in (data / "train").rglob("*.png"):
        image.write_bytes(b"\x89PNG broken")
    with pytest.raises(TrainingError, match="epoch 1: 96 of 96 training images could not be read"):
        train(tiny_config(data, tmp_path / "run"))
    assert not (tmp_path / "run" / "best.pth").exists()


def test_an_empty_class_folder_is_refused_unless_allowed(few_digits, tmp_path, caplog):
    data = copy_digits(few_digits, tmp_path / "data")
    for split in ("train", "val"):
        (data / split / "z").mkdir()
    with pytest.raises(DataError, match=r"1 class folder\(s\) without images \(z\)"):
        train(tiny_config(data, tmp_path / "run"))
    summary = train(tiny_config(data, tmp_path / "run", allow_empty_classes=True))
    assert "class folders without images (z)" in caplog.text
    assert read_checkpoint(tmp_path / "run" / "last.pth").card.classes[-1] == "z"
    assert summary["epochs"] == 1


def test_resume_refuses_another_models_or_recipes_checkpoint(few_digits, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(few_digits, out))
    with pytest.raises(TrainingError, match="already holds a run"):
        train(tiny_config(few_digits, out))
    other = {**TINY, "growth_rate": 6}
    with pytest.raises(CheckpointError, match=r"model_args: .*'growth_rate': 4.* there, .*6.* now"):
        train(tiny_config(few_digits, out, model_args=other), resume=True)
    with pytest.raises(CheckpointError, match="recipe: 'cifar10' there, 'cifar10\\+' now"):
        train(tiny_config(few_digits, out, recipe="cifar10+"), resume=True)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny_config(few_digits, tmp_path / "new"), resume=True)
    # resuming a finished run with the same settings changes nothing
    before = read_checkpoint(out / "last.pth").model
    train(tiny_config(few_digits, out), resume=True)
    after = read_checkpoint(out / "last.pth").model
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(few_digits, tmp_path):
    out = tmp_path / "run"
    config = tiny_config(few_digits, out, lr=1e30, epochs=3, checkpoint_every_steps=1)
    with pytest.raises(TrainingError, match=r"loss is (nan|inf).*diverged.*last good checkpoint"):
        train(config)
    checkpoint = read_checkpoint(out / "last.pth")
    assert all(torch.isfinite(v).all() for v in checkpoint.model.values())
    assert checkpoint.step >= 1


def _tiny_checkpoint(epoch: int = 0, size: int = 3) -> TrainCheckpoint:
    return TrainCheckpoint(ModelCard(("a", "b")), {"w": torch.ones(size)}, epoch=epoch)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint(_tiny_checkpoint(epoch=1), path)

    def disk_full(obj, file, *args, **kwargs):
        Path(file).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint"):
        save_checkpoint(_tiny_checkpoint(epoch=2), path)
    monkeypatch.undo()
    assert read_checkpoint(path).epoch == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left


def test_checkpoint_round_trip_and_foreign_files(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(_tiny_checkpoint(epoch=3), path)
    loaded = read_checkpoint(path)
    assert (loaded.card, loaded.epoch) == (ModelCard(("a", "b")), 3)
    assert torch.equal(loaded.model["w"], torch.ones(3))
    torch.save({"model": {"w": torch.ones(3)}}, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="not a densenet training checkpoint"):
        read_checkpoint(tmp_path / "plain.pth")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pth"
    save_checkpoint(_tiny_checkpoint(size=1000), path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(path)


def test_finetune_starts_from_the_given_weights_with_a_new_classifier(few_digits, tmp_path):
    from densenet import get_model

    source = get_model("densenet121", num_classes=7, **{**TINY, "block_config": [2, 2]})
    torch.save(source.state_dict(), tmp_path / "pretrained.pth")
    config = tiny_config(
        few_digits, tmp_path / "run", recipe="finetune", model="densenet121",
        model_args={**TINY, "block_config": [2, 2]}, weights=str(tmp_path / "pretrained.pth"),
        lr=0.0, image_size=32, resize_size=32,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="classifier"):
        train(config)
    tuned = read_checkpoint(tmp_path / "run" / "last.pth").model
    assert tuned["classifier.weight"].shape == (10, source.num_features)
    # lr 0: the backbone's weights are the file's (only BatchNorm statistics move)
    assert torch.equal(tuned["features.conv0.weight"], source.state_dict()["features.conv0.weight"])


def test_every_micro_batch_runs_a_backward_even_without_images(few_digits, tmp_path):
    """A micro-batch whose images were all unreadable still runs one backward (with a zero
    gradient), so every DDP process joins each gradient all-reduce; a step without any image
    changes no weight, and fp16's GradScaler does not assert."""
    config = tiny_config(few_digits, tmp_path / "run", accumulate=2, amp="fp16")
    trainer = Trainer(config, resume=False, rank=0, world_size=1, device=torch.device("cpu"))
    backwards = []
    trainer.net.classifier.weight.register_hook(lambda grad: backwards.append(grad.abs().sum()))
    empty = (torch.empty(0), torch.empty(0, dtype=torch.long), 8)
    images = torch.randn(8, 3, 16, 16)
    full = (images, torch.arange(8) % 10, 0)
    trainer.model.train()
    stats = trainer._train_step(iter([empty, full]))
    assert len(backwards) == 2 and backwards[0] == 0 and backwards[1] > 0
    assert stats.tolist()[2:] == [8.0, 8.0]  # images, skipped
    before = copy.deepcopy(trainer.net.state_dict())
    stats = trainer._train_step(iter([empty, empty]))
    assert len(backwards) == 4 and stats.tolist()[2:] == [0.0, 16.0]
    assert all(torch.equal(v, trainer.net.state_dict()[k]) for k, v in before.items())


def test_checkpoints_of_the_first_format_still_read(tmp_path):
    state = {
        "format": "densenet-train-1", "arch": "densenet_bc_100_k12", "classes": ["a", "b"],
        "transform": {"resize_size": 36, "crop_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3},
        "model_args": {"num_classes": 2}, "model": {"w": torch.ones(2)}, "epoch": 4,
    }  # fmt: skip
    torch.save(state, tmp_path / "old.pth")
    checkpoint = read_checkpoint(tmp_path / "old.pth")
    assert checkpoint.card.arch == "densenet_bc_100_k12" and checkpoint.card.classes == ("a", "b")
    pre = checkpoint.card.preprocessing
    assert (pre.resize_size, pre.crop_size, pre.mean) == (36, 32, (0.5,) * 3)
    assert checkpoint.epoch == 4 and checkpoint.model_args == {"num_classes": 2}


def test_grayscale_training_is_remembered_by_eval_and_predict(few_digits, tmp_path, capsys):
    """--in-channels 1: a one-channel network, stored in the checkpoint's card, which eval and
    predict then use (the grey PNGs are fed as they are, not turned into RGB)."""
    out = tmp_path / "grey"
    assert main([*_train_cli(few_digits, out), "--in-channels", "1", "--epochs", "1"]) == 0
    checkpoint = read_checkpoint(out / "best.pth")
    assert checkpoint.card.in_channels == 1 and checkpoint.model_args["in_channels"] == 1
    assert len(checkpoint.card.preprocessing.mean) == 1
    assert checkpoint.model["features.conv0.weight"].shape[1] == 1
    capsys.readouterr()
    assert main(["eval", str(few_digits), "--weights", str(out / "best.pth"), "--workers", "0",
                 "--json", "--no-progress"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["images"] == 32
    image = next((few_digits / "val").rglob("*.png"))
    assert main(["predict", str(image), "--weights", str(out / "best.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"]


def test_in_channels_that_do_not_match_the_images_is_one_error(tmp_path, capsys):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            Image.new("RGB", (16, 16), (200, 10, 10)).save(
                tmp_path / "data" / split / name / "0.png"
            )
    argv = [*_train_cli(tmp_path / "data", tmp_path / "run"), "--in-channels", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has 3 channel(s), the model takes 1" in err, err
