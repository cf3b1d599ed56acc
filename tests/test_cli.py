"""The command line as a whole (errors, options) and `densenet info` and `densenet weights`."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import legacy, save_published_like, tiny_model
from PIL import Image
from safetensors.torch import load_file
from test_weights import SMALL

import densenet
from densenet.cli import build_parser, main
from densenet.weights.published import WEIGHTS


@pytest.mark.slow
def test_info_table_and_json(capsys):
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["model", "params", "GFLOPs"]
    row = next(line for line in lines if line.startswith("densenet121 "))
    assert row.split() == [
        "densenet121",
        "7.98M",
        "5.67",
        "224",
        "1000",
        "IMAGENET1K_V1",
        "74.434",
        "91.972",
    ]
    assert len(lines) == 1 + len(densenet.list_models())
    assert main(["info", "densenet_bc_100_k12", "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["params"] == 769_162 and info["weights"] == []


def test_weights_download_into_the_cache(torch_home, file_server, monkeypatch, capsys):
    root, base_url, _ = file_server
    served = save_published_like(root, "densenet121", densenet.densenet121().state_dict())
    entry = dataclasses.replace(densenet.get_weights("densenet121"), file_name=served.name)
    monkeypatch.setitem(WEIGHTS, "densenet121", {"DEFAULT": entry, "IMAGENET1K_V1": entry})
    monkeypatch.setenv("DENSENET_WEIGHTS_URL", base_url)
    assert main(["weights", "download", "densenet121", "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["path"] == str(torch_home / served.name)
    assert (torch_home / served.name).read_bytes() == served.read_bytes()
    wrong = dataclasses.replace(entry, file_name="densenet121-00000000.pth")
    served.rename(root / wrong.file_name)
    monkeypatch.setitem(WEIGHTS, "densenet121", {"DEFAULT": wrong})
    assert main(["weights", "download", "densenet121"]) == 2
    assert "corrupt" in capsys.readouterr().err
    assert [p.name for p in torch_home.glob("[!.]*")] == [served.name]  # the stamp is hidden


def test_weights_verify_and_convert(tmp_path, capsys):
    model = densenet.get_model(SMALL)
    path = save_published_like(tmp_path, SMALL, model.state_dict())
    assert main(["weights", "verify", str(path), "--json"]) == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["loads_into"] == SMALL and path.stem.endswith(report["sha256"][:8])
    out = tmp_path / "converted.safetensors"
    assert main(["weights", "convert", str(path), str(out)]) == 0
    converted = load_file(out)
    assert set(converted) == set(model.state_dict())
    assert torch.equal(converted["features.conv0.weight"], model.features.conv0.weight)
    other = tmp_path / "densenet121-a639ec97.pth"
    torch.save(legacy(model.state_dict()), other)
    assert main(["weights", "verify", str(other)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_convert_takes_a_files_own_classes_and_refuses_what_is_not_a_densenet(tmp_path, capsys):
    """A 10-class densenet_bc_100_k12 file converts (named or inferred); a 100-class CIFAR file
    named densenet121 and a torchvision ResNet are one-line errors, and nothing is written."""
    model = densenet.get_model(SMALL, num_classes=10)
    source = tmp_path / "mine.pth"
    torch.save(model.state_dict(), source)
    for named in ([], ["--model", SMALL]):
        out = tmp_path / f"out{len(named)}.safetensors"
        assert main(["weights", "convert", str(source), str(out), *named]) == 0
        assert load_file(out)["classifier.weight"].shape == (10, model.num_features)
    for name, save in (
        (
            "cifar.pth",
            lambda p: torch.save(densenet.get_model(SMALL, num_classes=100).state_dict(), p),
        ),
        ("resnet.pth", lambda p: torch.save(torchvision.models.resnet18().state_dict(), p)),
    ):
        save(tmp_path / name)
        out = tmp_path / f"{name}.safetensors"
        command = ["weights", "convert", str(tmp_path / name), str(out), "--model", "densenet121"]
        assert main(command) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("densenet weights: error:"), err
        assert not out.exists()


class RunsCode:
    """Unpickling it would run ``os.system``."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize(
    "name, save",
    [
        ("garbage.pth", lambda path: path.write_bytes(bytes(range(256)) * 4)),
        ("payload.pth", lambda path: torch.save(RunsCode(), path)),
        ("resnet.pth", lambda path: torch.save(torchvision.models.resnet18().state_dict(), path)),
        ("list.pth", lambda path: torch.save([1, 2, 3], path)),
        ("garbage.safetensors", lambda path: path.write_bytes(b"\xff" * 64)),
    ],
)
def test_verify_fails_on_files_that_do_not_load(tmp_path, capsys, name, save):
    save(tmp_path / name)
    assert main(["weights", "verify", str(tmp_path / name)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / name) in err and err.count("truncated or corrupt") <= 1


def test_verify_infers_the_architecture_from_keys_and_shapes(tmp_path, capsys):
    torch.save(densenet.get_model(SMALL, num_classes=7).state_dict(), tmp_path / "mine.pth")
    torch.save(tiny_model(num_classes=3).state_dict(), tmp_path / "tiny.pth")
    assert main(["weights", "verify", str(tmp_path / "mine.pth"), "--json"]) == 0
    assert main(["weights", "verify", str(tmp_path / "tiny.pth"), "--json"]) == 0
    reports = capsys.readouterr().out.replace("]\n[", ",")
    small, tiny = json.loads(reports)
    assert small["loads_into"] == SMALL and small["config"]["num_classes"] == 7
    assert tiny["loads_into"] == "DenseNet"
    built = tiny_model(num_classes=3).config
    assert tiny["config"] == {k: v for k, v in built.items() if k != "drop_rate"} | {
        "block_config": [2, 2]
    }


@pytest.mark.slow
def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "densenet", "--help"], capture_output=True, text=True, check=True
    )
    commands = ("predict", "embed", "info", "weights", "bench", "eval", "train", "export", "serve")
    for command in commands:
        assert command in result.stdout


def test_verify_of_an_uncached_model_says_how_to_download(torch_home, capsys):
    assert main(["weights", "verify", "densenet169"]) == 2
    assert "run `densenet weights download densenet169`" in capsys.readouterr().err


def test_debug_zero_keeps_errors_on_one_line(monkeypatch, capsys):
    monkeypatch.setenv("DENSENET_DEBUG", "0")
    assert main(["info", "densenet999"]) == 2
    assert capsys.readouterr().err.startswith("densenet info: error: unknown model 'densenet999'")


def test_programming_errors_keep_their_traceback(monkeypatch, capsys):
    """Only expected errors (the package's, OSError, ValueError) become one line."""

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(densenet.cli.info, "run", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["info"])
    monkeypatch.setattr(
        densenet.cli.info, "run", lambda args: Path("/nonexistent/file").read_text()
    )
    assert main(["info"]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_every_option_is_read_by_its_command():
    """An option whose value no code reads (as ``--dynamic-batch`` once was) does nothing. A
    command's options are read in its module or in the functions of ``cli.common`` that it
    passes ``args`` to (``run_bulk``: the bulk options of ``embed`` and ``predict --out``)."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    shared = inspect.getmembers(densenet.cli.common, inspect.isfunction)
    for name, parser in sub.choices.items():
        module = sys.modules[parser.get_default("run").__module__]
        source = inspect.getsource(module)
        source += "".join(inspect.getsource(f) for n, f in shared if f"{n}(args" in source)
        tables = {**getattr(module, "FLAGS", {}), **getattr(module, "SWITCHES", {})}
        parsers = [parser] + [
            p for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            for p in a.choices.values()
        ]  # fmt: skip
        for action in (a for p in parsers for a in p._actions):
            if action.dest in ("help", "run") or isinstance(action, argparse._SubParsersAction):
                continue
            assert f"args.{action.dest}" in source or action.dest in tables, (name, action.dest)


def command_help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def test_help_shows_defaults_choices_and_recipe_values(capsys):
    assert "(default: 16)" in command_help(capsys, "predict")  # --batch-size
    assert "(default: 256)" in command_help(capsys, "serve")  # --max-queue
    bench = command_help(capsys, "bench")
    assert "(default: 224)" in bench and "densenet.optimize" in bench
    assert "List the architectures" in command_help(capsys, "info")
    train = command_help(capsys, "train")
    assert "--amp {auto,none,bf16,fp16}" in train
    assert "{cifar10,cifar10+,cifar100,cifar100+,svhn,imagenet,rdnet,finetune}" in train
    recipe = " ".join(command_help(capsys, "train", "--recipe", "imagenet").split())
    assert "(recipe imagenet: 90)" in recipe and "(recipe imagenet: densenet121)" in recipe


def test_random_weights_are_announced(tmp_path, capsys):
    image = tmp_path / "grey.png"
    Image.new("RGB", (40, 40), "grey").save(image)
    argv = ["predict", str(image), "--model", "densenet_40_k12", "--weights", "none"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "densenet predict: warning: --weights none: random weights" in capsys.readouterr().err
    argv = [
        "embed",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
        "--workers",
        "0",
    ]
    assert main([*argv, "--model", "densenet_40_k12", "--weights", "none", "--device", "cpu"]) == 0
    assert "densenet embed: warning: --weights none: random weights" in capsys.readouterr().err


def test_a_mistyped_image_is_reported_before_any_download(torch_home, monkeypatch, capsys):
    monkeypatch.setenv("DENSENET_WEIGHTS_URL", "http://127.0.0.1:9/")
    assert main(["predict", "phto.jpg"]) == 2
    assert capsys.readouterr().err == "densenet predict: error: phto.jpg: no such file or folder\n"
    assert list(torch_home.iterdir()) == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--batch-sizes", "-1"], "--batch-sizes: -1 is out of range (1..4096)"),
        (["bench", "--batch-sizes", "0"], "--batch-sizes: 0 is out of range (1..4096)"),
        (["bench", "--image-size", "0"], "--image-size: 0 is out of range (1..4096)"),
        (["bench", "--rounds", "0"], "--rounds: 0 is out of range (>= 1)"),
        (["export", "--format", "onnx", "--image-size", "100000"], "out of range (1..4096)"),
        (["serve", "--port", "70000"], "--port: 70000 is out of range (0..65535)"),
        (["serve", "--port", "-1"], "--port: -1 is out of range (0..65535)"),
        (["serve", "--max-upload-mb", "nan"], "--max-upload-mb: nan must be a finite number"),
        (["serve", "--max-wait-ms", "inf"], "--max-wait-ms: inf must be a finite number"),
        (["predict", "x.png", "--topk", "0"], "--topk: 0 is out of range (>= 1)"),
        (["embed", "x", "--out", "o", "--workers", "100"], "--workers: 100 is out of range"),
        (["eval", "d", "--batch-size", "two"], "--batch-size: 'two' is not a whole number"),
    ],
)
def test_every_numeric_flag_is_range_checked_before_any_work(argv, message, capsys):
    """A value out of range is a one-line usage error, exit status 2, before anything loads."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith(f"densenet {argv[0]}: error: argument")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_is_one_error(capsys):
    assert main(["bench", "--device", "cuda", "--batch-sizes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "densenet bench: error: device 'cuda' was asked for but no CUDA GPU is available; use "
        "--device cpu"
    )


def test_an_output_folder_that_is_a_file_is_one_error_before_any_work(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), "red").save(image)
    taken = tmp_path / "taken"
    taken.write_text("a file")
    model = ["--model", SMALL, "--weights", "none"]
    for argv, flag in (
        (["predict", str(image), *model, "--cam", str(taken)], "--cam"),
        (["embed", str(tmp_path), *model, "--out", str(taken), "--workers", "0"], "--out"),
        (["train", "--recipe", "cifar10", "--data", str(tmp_path), "--out", str(taken)], "out"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert f"{flag} {taken} is a file" in err[-1], err
    assert taken.read_text() == "a file"


def test_eval_with_two_sets_of_views_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "d", "--tta", "hflip", "--ten-crop"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "densenet eval: error: argument --ten-crop: not allowed with argument --tta"


def test_bulk_runs_on_a_folder_of_volumes_say_volumes_are_not_supported(tmp_path, capsys):
    volumes = tmp_path / "volumes"
    volumes.mkdir()
    np.save(volumes / "scan.npy", np.zeros((4, 4, 4), np.float32))
    model = ["--model", SMALL, "--weights", "none", "--workers", "0"]
    for command in ("embed", "predict"):
        argv = [command, str(volumes), *model, "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == (
            f"densenet {command}: error: {volumes} holds volumes and no images: embed and "
            "predict --out do not support volumes (densenet predict without --out classifies them)"
        )
    assert not (tmp_path / "out").exists()


HEAVY = ("torch", "torchvision", "numpy", "PIL")
# Runs ``python -m densenet ARGS`` for each ARGS in turn in one interpreter, then prints the exit
# codes and which heavy modules got imported.
RUN_MAIN = """
import contextlib, io, json, runpy, sys
codes = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["densenet", *argv]
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module("densenet", run_name="__main__")
        except SystemExit as done:
            codes.append(done.code)
print(json.dumps({"codes": codes, "imported": [m for m in HEAVY if m in sys.modules]}))
"""


def command_paths(parser: argparse.ArgumentParser, path=()) -> list[tuple[str, ...]]:
    """Every command and sub-command of ``parser`` (``("weights", "verify")``...), and ``()``."""
    paths = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*path, name))
    return paths


def test_help_and_info_answer_without_importing_torch():
    commands = command_paths(build_parser())
    assert {("info",), ("train",), ("weights", "verify")} <= set(commands)
    runs = [[*command, "--help"] for command in commands] + [["info"], ["info", "--json"]]
    env = {**os.environ, "PYTHONPATH": str(Path(densenet.__file__).parents[1])}
    code = f"HEAVY = {HEAVY!r}\n{RUN_MAIN}"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(runs)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    report = json.loads(done.stdout)
    assert report["codes"] == [0] * len(runs)
    assert report["imported"] == []
