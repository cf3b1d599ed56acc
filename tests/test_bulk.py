"""Bulk embeddings and predictions into Parquet: one row per input, the model's own numbers,
resuming after kill -9, torchrun ranks, settings checks, input listings; densenet.tasks.ray's
Embedder and Predictor on a local Ray instance give the same rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import densenet
from densenet.cli import main
from densenet.data.card import Preprocessing
from densenet.tasks import bulk
from densenet.tasks.bulk import BulkError, Options, iter_inputs
from densenet.tasks.bulk.decoding import DeviceDecoder
from densenet.weights.checkpoint import TrainCheckpoint, save_checkpoint

pa = pytest.importorskip("pyarrow", reason="bulk output needs pyarrow (the 'bulk' extra)")
import pyarrow.dataset as pads  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from conftest import TINY, randomize_batchnorm  # noqa: E402

N_DIGITS = 2000
BROKEN = {"empty.png": b"", "garbage.png": b"\x00not an image\xff" * 8}
ENV = {**os.environ, "PYTHONPATH": str(Path(densenet.__file__).parents[1])}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """2,000 of scikit-learn's 8x8 digits as PNGs in one folder per label, plus an empty file,
    garbage bytes and a truncated PNG in ``broken/``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = tmp_path_factory.mktemp("digits")
    for i in range(N_DIGITS):
        j = i % len(digits.images)
        label = root / str(digits.target[j])
        label.mkdir(exist_ok=True)
        Image.fromarray((digits.images[j] * 255 / 16).astype(np.uint8)).save(label / f"{i:04d}.png")
    broken = root / "broken"
    broken.mkdir()
    for name, data in BROKEN.items():
        (broken / name).write_bytes(data)
    whole = (root / "0" / "0000.png").read_bytes()
    (broken / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return root


def save_tiny(path: Path, multi_label: bool = False) -> Path:
    """A `densenet train` checkpoint of a tiny 10-class DenseNet (non-trivial BatchNorm, the
    same weights on every call), its card with class names and a 16/16 transform."""
    torch.manual_seed(0)
    model = densenet.get_model("densenet_bc_100_k12", num_classes=10, **TINY)
    randomize_batchnorm(model)
    pre = densenet.Preprocessing(16, 16, mean=(0.5,) * 3, std=(0.25,) * 3)
    classes = tuple(f"digit {i}" for i in range(10))
    card = densenet.ModelCard(classes, pre, multi_label=multi_label, arch="densenet_bc_100_k12")
    args = {"num_classes": 10, **TINY}
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), model_args=args), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny.pth")


@pytest.fixture(scope="module")
def model(checkpoint) -> densenet.LoadedModel:
    return densenet.load(checkpoint)


def read(out: Path):
    """Every row of an output folder, in shard order."""
    return pads.dataset(out, format="parquet").to_table().combine_chunks()


def expected(model: densenet.LoadedModel, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, logits) of the eager model on the same preprocessed images."""
    transform = model.card.preprocessing.transform()
    x = torch.stack([transform(Image.open(p)) for p in paths])
    net = model.module.eval()
    with torch.no_grad():
        features = net.forward_head(net.forward_features(x), pre_logits=True)
        return features, net.classifier(features)


def test_embed_writes_a_row_per_file_and_the_pre_logits_features(
    folder, model, checkpoint, tmp_path
):
    out = tmp_path / "out"
    summary = bulk.run(folder, out, Options(shard_size=700), checkpoint, workers=2, progress=False)
    assert (summary.shards_written, summary.rows, summary.errors) == (3, N_DIGITS + 3, 3)
    assert sorted(p.name for p in out.iterdir()) == [
        "_densenet_bulk.json", "part-000000.parquet", "part-000001.parquet", "part-000002.parquet",
    ]  # fmt: skip
    table = read(out)
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    assert sorted(table["path"].to_pylist()) == files
    errors = {
        Path(p).name: e for p, e in zip(table["path"].to_pylist(), table["error"].to_pylist()) if e
    }
    assert errors.keys() == {"empty.png", "garbage.png", "truncated.png"}
    assert "empty" in errors["empty.png"] and "not an image" in errors["garbage.png"]
    assert "truncated" in errors["truncated.png"]
    assert table.filter(table["error"].is_valid())["embedding"].null_count == 3
    good = table.filter(table["error"].is_null())
    vectors = np.stack(good["embedding"].to_numpy(zero_copy_only=False))
    features, _ = expected(model, good["path"].to_pylist())
    assert vectors.shape == (N_DIGITS, model.module.num_features) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, features.numpy(), rtol=1e-4, atol=1e-5)
    meta = json.loads(pq.read_schema(out / "part-000001.parquet").metadata[b"densenet"])
    assert meta["model"] == "densenet_bc_100_k12" and meta["weights_sha256"]
    assert meta["preprocessing"]["crop_size"] == 16 and meta["shard"] == 1
    assert meta["first_row"] == 700 and meta["version"] == densenet.__version__


def test_eager_normalized_float16_embeddings(folder, model, checkpoint, tmp_path):
    manifest = tmp_path / "some.txt"
    paths = [str(p) for p in sorted((folder / "3").glob("*.png"))[:40]]
    manifest.write_text("\n".join(paths) + "\n")
    options = Options(normalize=True, vector_dtype="float16", shard_size=16)
    bulk.run(
        manifest, tmp_path / "out", options, checkpoint, workers=0, optimize=False, progress=False
    )
    table = read(tmp_path / "out")
    assert table["path"].to_pylist() == paths
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    assert vectors.dtype == np.float16
    features, _ = expected(model, paths)
    unit = torch.nn.functional.normalize(features, dim=1).numpy()
    np.testing.assert_allclose(vectors.astype(np.float32), unit, atol=2e-3)


@pytest.mark.parametrize("multi_label", [False, True])
def test_predict_writes_top_k_labels_and_probabilities(folder, model, tmp_path, multi_label):
    """Softmax probabilities, or for a multi-label card sigmoids and every label's score."""
    checkpoint = save_tiny(tmp_path / "tiny.pth", multi_label)
    paths = [str(p) for p in sorted((folder / "7").glob("*.png"))[:30]] + [
        str(folder / "broken" / "garbage.png")
    ]
    manifest = tmp_path / "list.csv"
    manifest.write_text("label,path\n" + "".join(f"x,{p}\n" for p in paths))
    options = Options(task="predict", topk=3, shard_size=100)
    bulk.run(manifest, tmp_path / "out", options, checkpoint, workers=1, progress=False)
    table = read(tmp_path / "out")
    assert table["path"].to_pylist() == paths and table["error"].null_count == 30
    good = table.slice(0, 30)
    _, logits = expected(model, paths[:30])
    scores = logits.sigmoid() if multi_label else logits.softmax(dim=1)
    top_p, top_i = scores.topk(3, dim=1)
    assert np.stack(good["indices"].to_numpy(zero_copy_only=False)).tolist() == top_i.tolist()
    probabilities = np.stack(good["probabilities"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(probabilities, top_p.numpy(), rtol=1e-4, atol=1e-6)
    assert good["labels"][0].as_py() == [f"digit {i}" for i in top_i[0].tolist()]
    assert table["labels"][30].as_py() is None and table["probabilities"][30].as_py() is None
    assert ("scores" in table.column_names) == multi_label
    if multi_label:
        all_scores = np.stack(good["scores"].to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(all_scores, scores.numpy(), rtol=1e-4, atol=1e-6)


def test_a_shard_of_only_broken_files_has_the_same_columns(folder, checkpoint, tmp_path):
    names = ["broken/empty.png", "broken/garbage.png", "0/0000.png"]
    manifest = tmp_path / "broken.txt"  # relative paths are taken from the manifest's folder
    manifest.write_text("".join(os.path.relpath(folder / n, tmp_path) + "\n" for n in names))
    out = tmp_path / "out"
    bulk.run(manifest, out, Options(shard_size=2), checkpoint, workers=0, progress=False)
    schemas = [pq.read_schema(p).remove_metadata() for p in sorted(out.glob("*.parquet"))]
    assert len(schemas) == 2 and schemas[0] == schemas[1]
    table = read(out)
    assert [Path(p).resolve() for p in table["path"].to_pylist()] == [folder / n for n in names]
    assert table["error"].to_pylist()[2] is None and table["embedding"].null_count == 2


def test_inputs_folder_manifests_and_glob_list_the_same_paths(folder, tmp_path):
    walked = iter_inputs(folder)
    assert not isinstance(walked, list)  # a lazy walk
    files = list(walked)
    assert files == list(iter_inputs(folder))
    assert len(files) == N_DIGITS + 3 and files[0] == str(folder / "0" / "0000.png")
    pngs = sorted(str(p) for p in folder.rglob("*.png"))
    assert sorted(files) == pngs
    text = tmp_path / "list.txt"
    text.write_text("\n".join(files))
    csv = tmp_path / "list.csv"
    csv.write_text("path\n" + "\n".join(files) + "\n")
    parquet = tmp_path / "list.parquet"
    pq.write_table(pa.table({"path": files}), parquet)
    for manifest in (text, csv, parquet):
        assert list(iter_inputs(manifest)) == files
    assert list(iter_inputs(f"{folder}/**/00*.png")) == [
        f for f in files if Path(f).name.startswith("00")
    ]
    assert list(iter_inputs(f"{folder}/[12]/*.png")) == [
        f for f in files if Path(f).parent.name in "12"
    ]


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(BulkError, match="no such file"):
        iter_inputs(tmp_path / "missing")
    (tmp_path / "list.csv").write_text("file\na.png\n")
    with pytest.raises(BulkError, match="no 'path' column"):
        list(iter_inputs(tmp_path / "list.csv"))
    with pytest.raises(ValueError, match="task"):
        Options(task="classify")


def test_refuses_to_resume_with_other_settings(folder, tmp_path, checkpoint):
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(str(p) for p in sorted((folder / "1").glob("*.png"))[:8]))
    out = tmp_path / "out"
    bulk.run(manifest, out, Options(shard_size=4), checkpoint, workers=0, progress=False)
    again = bulk.run(manifest, out, Options(shard_size=4), checkpoint, workers=0, progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 2)
    with pytest.raises(BulkError, match="normalize: False there, True now"):
        bulk.run(manifest, out, Options(normalize=True, shard_size=4), checkpoint, progress=False)
    other = densenet.get_model("densenet_bc_100_k12", num_classes=10, **TINY).eval()
    with pytest.raises(BulkError, match="weights_sha256: '[0-9a-f]+' there, None now"):
        bulk.run(manifest, out, Options(shard_size=4), other, progress=False)


def test_renamed_options_keep_their_old_keywords_and_their_names_in_the_folder(
    folder, tmp_path, checkpoint
):
    """``vector_dtype`` (the stored vectors' type) and ``calibration_images`` (int8) were
    ``dtype`` and ``calibration``: the old keywords still work, with a DeprecationWarning, and
    the output folder records them under their old names, so a folder written before resumes."""
    with pytest.warns(DeprecationWarning, match=r"dtype= is deprecated; use vector_dtype="):
        old = Options(dtype="float16", calibration="photos", shard_size=4)
    assert old == Options(vector_dtype="float16", calibration_images="photos", shard_size=4)
    with pytest.raises(TypeError, match="give vector_dtype= only"):
        Options(dtype="float16", vector_dtype="float16")
    with pytest.raises(ValueError, match="vector_dtype must be one of"):
        Options(vector_dtype="int8")
    manifest, out = tmp_path / "list.txt", tmp_path / "out"
    manifest.write_text("\n".join(str(p) for p in sorted((folder / "2").glob("*.png"))[:4]))
    options = Options(vector_dtype="float16", shard_size=4)
    bulk.run(manifest, out, options, checkpoint, workers=0, optimize=False, progress=False)
    recorded = json.loads((out / "_densenet_bulk.json").read_text())
    assert (recorded["dtype"], recorded["calibration"]) == ("float16", None)
    assert not {"vector_dtype", "calibration_images"} & set(recorded)
    assert read(out).schema.field("embedding").type.value_type == pa.float16()


def test_the_ray_embedders_vector_dtype_keeps_its_old_keyword(checkpoint):
    from densenet.tasks.ray import Embedder

    with pytest.warns(DeprecationWarning, match=r"Embedder\(\): dtype= is deprecated"):
        embedder = Embedder(str(checkpoint), dtype="float16", device="cpu", optimize=False)
    assert embedder.outputs.options.vector_dtype == "float16"
    assert Embedder(str(checkpoint), device="cpu").outputs.options.vector_dtype == "float32"


def test_only_this_runs_complete_shards_count_and_a_changed_input_set_is_rewritten(
    folder, tmp_path, checkpoint
):
    """A foreign part file is refused, a truncated or empty shard is written again, and after
    images are added and removed the output holds each current input once."""
    images = sorted(str(p) for p in (folder / "1").glob("*.png"))[:10]
    manifest, out = tmp_path / "list.txt", tmp_path / "out"

    def run(paths):
        manifest.write_text("\n".join(paths))
        return bulk.run(manifest, out, Options(shard_size=3), checkpoint, workers=0, progress=False)

    out.mkdir()
    pq.write_table(pa.table({"x": [1]}), out / "part-000000.parquet")  # unrelated
    with pytest.raises(BulkError, match="part-000000.parquet is not the output of this run"):
        run(images[:8])
    (out / "part-000000.parquet").unlink()
    run(images[:8])
    (out / "part-000001.parquet").write_bytes((out / "part-000001.parquet").read_bytes()[:100])
    (out / "part-000002.parquet").write_bytes(b"")
    again = run(images[:8])
    assert (again.shards_skipped, again.shards_written) == (1, 2)
    assert read(out)["path"].to_pylist() == images[:8]
    changed = [images[0], *images[2:8], images[8], images[9]]  # one removed, two added
    run(changed)
    assert read(out)["path"].to_pylist() == changed
    shrunk = run(changed[:4])
    assert read(out)["path"].to_pylist() == changed[:4] and shrunk.shards_skipped == 1


def test_device_decoding_needs_a_gpu(folder, checkpoint, tmp_path):
    with pytest.raises(BulkError, match="CUDA"):
        bulk.run(folder, tmp_path / "out", Options(), checkpoint, device="cpu", device_decode=True)


def test_embeddings_of_a_model_that_is_not_a_densenet_are_refused(folder, tmp_path):
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10))
    with pytest.raises(BulkError, match="come from a DenseNet .* not a Sequential"):
        bulk.run(folder, tmp_path / "out", Options(task="embed"), module, progress=False)


def test_a_volume_model_is_refused_by_bulk_and_by_ray(folder, tmp_path):
    from densenet.data.volumes import VolumeTransform
    from densenet.tasks.ray import Predictor

    arch = "densenet_bc_100_k12"
    args = {"num_classes": 2, "spatial_dims": 3, "in_channels": 1, **TINY}
    model = densenet.get_model(arch, **args)
    pre, volume = densenet.Preprocessing(16, 16), VolumeTransform((8, 16, 16))
    card = densenet.ModelCard(("a", "b"), pre, arch=arch, in_channels=1, volume=volume)
    path = tmp_path / "volume.pth"
    save_checkpoint(TrainCheckpoint(card, model.state_dict(), model_args=args), path)
    with pytest.raises(BulkError, match="bulk runs read images"):
        bulk.run(folder, tmp_path / "out", Options(), path, device="cpu", progress=False)
    with pytest.raises(BulkError, match="bulk runs read images"):
        Predictor(str(path), device="cpu")
    assert not (tmp_path / "out").exists()


def as_blob(path: Path) -> torch.Tensor:
    """A file's bytes as device decoding reads them: a uint8 tensor."""
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def test_batched_jpeg_decoding_keeps_rows_and_falls_back_to_the_cpu(folder, model, tmp_path):
    """The device-decoding step, run here with torchvision's CPU decoder (the GPU's takes the
    same calls): JPEGs decoded in a batch, a PNG and a corrupt JPEG on the PIL path, read errors
    kept in their rows."""
    paths = []
    for i, digit in enumerate(sorted((folder / "4").glob("*.png"))[:3]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.open(digit).convert("RGB").resize((40, 30)).save(paths[-1], quality=95)
    paths.insert(1, folder / "0" / "0000.png")
    paths.insert(3, tmp_path / "corrupt.jpg")
    paths[3].write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 10)
    paths.insert(2, tmp_path / "unreadable.jpg")
    errors = [None] * len(paths)
    errors[2] = "unreadable.jpg: cannot be read"
    blobs = [as_blob(p) for i, p in enumerate(paths) if i != 2]
    names = [str(p) for p in paths]
    pre = model.card.preprocessing
    images, errors = DeviceDecoder(pre, "cpu")(blobs, names, errors)
    assert [e is None for e in errors] == [True, True, False, True, False, True]
    assert errors[2] == "unreadable.jpg: cannot be read" and "corrupt.jpg" in errors[4]
    transform = pre.transform()
    reference = torch.stack([transform(Image.open(names[i])) for i in (0, 1, 3, 5)])
    assert images.shape == reference.shape == (4, 3, 16, 16)
    assert torch.equal(images[1], reference[1])  # the PNG: the CPU path itself
    assert (images - reference).abs().mean() < 0.05  # JPEGs: another decoder and resize


def test_device_decodings_cpu_fallback_decodes_the_bytes_read_and_names_the_file(
    folder, model, tmp_path
):
    """A file gone since its bytes were read still decodes; a corrupt one's error names it."""
    png, corrupt = tmp_path / "gone.png", tmp_path / "corrupt.png"
    png.write_bytes((folder / "0" / "0000.png").read_bytes())
    corrupt.write_bytes(b"not an image")
    blobs = [as_blob(png), as_blob(corrupt)]
    png.unlink()
    decode = DeviceDecoder(model.card.preprocessing, "cpu")
    images, errors = decode(blobs, [str(png), str(corrupt)], [None, None])
    assert images.shape == (1, 3, 16, 16) and errors[0] is None
    assert errors[1] == f"{corrupt}: not an image (unrecognised format)"


COMMAND = ["embed", "--model", "densenet_bc_100_k12", "--shard-size", "300", "--batch-size", "50", "--no-progress"]  # fmt: skip

HALF_WRITTEN = ".part-000003.parquet.killed.tmp.parquet"  # as atomic_write names it
# Runs the bulk command, stopping for good (until killed) once shard 2 is written and a
# temporary file of shard 3 is half written: ``python -c KILLABLE checkpoint folder out``.
KILLABLE = f"""
import sys
from densenet.cli import main
from densenet.tasks.bulk import job
write = job.atomic_write
def stop_after_shard_2(path, writer):
    write(path, writer)
    if path.name == "part-000002.parquet":
        path.with_name("{HALF_WRITTEN}").write_bytes(b"PAR1 half a shard")
        print("written", flush=True)
        sys.stdin.read()
job.atomic_write = stop_after_shard_2
main(sys.argv[4:] + ["--weights", sys.argv[1], sys.argv[2], "--out", sys.argv[3]])
"""


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_rows_of_an_uninterrupted_run(folder, checkpoint, tmp_path):
    whole = tmp_path / "whole"
    bulk.run(
        folder, whole, Options(shard_size=300), checkpoint, batch_size=50, workers=0, progress=False
    )
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(checkpoint), str(folder), str(out), *COMMAND, "--workers", "1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV, start_new_session=True, text=True,
    )  # fmt: skip
    assert child.stdout.readline() == "written\n"
    os.killpg(child.pid, signal.SIGKILL)  # the command and its DataLoader worker
    child.wait()
    assert sorted(p.name for p in out.glob("*parquet*")) == [
        HALF_WRITTEN, "part-000000.parquet", "part-000001.parquet", "part-000002.parquet",
    ]  # fmt: skip
    rerun = subprocess.run(
        [sys.executable, "-m", "densenet", *COMMAND, "--weights", str(checkpoint), str(folder),
         "--out", str(out), "--workers", "1"],
        env=ENV, capture_output=True, text=True, check=True,
    )  # fmt: skip
    summary = json.loads(rerun.stdout)
    assert (summary["shards_skipped"], summary["shards_written"]) == (3, 4)
    assert not list(out.glob(".*.tmp*"))
    assert_same_rows(read(out), read(whole))


def assert_same_rows(table, reference) -> None:
    assert table["path"].to_pylist() == reference["path"].to_pylist()
    assert table["error"].to_pylist() == reference["error"].to_pylist()
    good = reference["error"].is_null()
    ours, theirs = (np.stack(t.filter(good)["embedding"].to_numpy(zero_copy_only=False)) for t in (table, reference))  # fmt: skip
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_torchrun_two_processes_write_the_rows_of_one(folder, checkpoint, tmp_path):
    one = tmp_path / "one"
    bulk.run(
        folder, one, Options(shard_size=300), checkpoint, batch_size=50, workers=0, progress=False
    )
    out = tmp_path / "two"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "densenet", *COMMAND, "--weights", str(checkpoint), str(folder), "--out", str(out),
         "--workers", "0", "--device", "cpu"],
        env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    ranks = {}
    for part in sorted(out.glob("part-*.parquet")):
        ranks[part.name] = json.loads(pq.read_schema(part).metadata[b"densenet"])["shard"] % 2
    assert len(ranks) == 7 and set(ranks.values()) == {0, 1}
    assert_same_rows(read(out), read(one))


def test_cli_predict_out_and_its_one_line_errors(folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", f"{folder}/9/*.png", "--model", str(checkpoint), "--out", str(out),
            "--workers", "0", "--no-progress"]  # fmt: skip
    assert main([*argv, "--topk", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = read(out)
    assert summary["rows"] == table.num_rows == len(list(folder.glob("9/*.png")))
    assert set(table.column_names) == {"path", "error", "labels", "indices", "probabilities"}
    assert table["labels"][0].as_py()[0].startswith("digit ")
    assert main([*argv, "--topk", "3"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("densenet predict: error: ") and "topk: 2 there, 3 now" in line
    assert main(["predict", "a.png", "b.png", "--out", str(out)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == "densenet predict: error: --out takes one INPUT (a folder, a manifest or a quoted glob), got 2"  # fmt: skip


def test_cli_embed_writes_rows_and_a_bad_input_is_one_line(folder, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["embed", str(folder / "2"), "--model", str(checkpoint), "--out", str(out),
            "--workers", "0", "--no-progress", "--normalize", "--shard-size", "64"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    table = read(out)
    assert summary["rows"] == table.num_rows == len(list(folder.glob("2/*.png")))
    assert summary["shards_written"] == len(list(out.glob("part-*.parquet"))) > 1
    assert set(table.column_names) == {"path", "error", "embedding"}
    norms = np.linalg.norm(np.stack(table["embedding"].to_numpy(zero_copy_only=False)), axis=1)
    np.testing.assert_allclose(norms, 1, rtol=1e-5)
    missing = tmp_path / "missing"
    assert main(["embed", str(missing), "--out", str(tmp_path / "other")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"densenet embed: error: {missing}: no such file, folder or matching glob"
    assert not (tmp_path / "other").exists()


# ---- densenet.tasks.ray ---------------------------------------------------------------------------


@pytest.fixture
def local_ray():
    """A local Ray instance with 2 CPUs (skips the test when Ray Data is not installed), shut
    down after the test: Ray reports actors it kills while they are still starting (benign) on
    standard output, later, which would land in another test's captured output."""
    ray = pytest.importorskip("ray", reason="Ray Data is the optional 'ray' extra")
    pytest.importorskip("ray.data", reason="Ray Data is the optional 'ray' extra")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_embedder_and_predictor_match_the_bulk_output(local_ray, folder, checkpoint, tmp_path):
    paths = [str(p) for p in sorted((folder / "5").glob("*.png"))] + [
        str(p) for p in sorted((folder / "broken").iterdir())
    ]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(paths))
    reference = {}
    for task in ("embed", "predict"):
        out = tmp_path / task
        bulk.run(manifest, out, Options(task=task), checkpoint, workers=0, progress=False)
        reference[task] = read(out).to_pandas().set_index("path")
    from densenet.tasks.ray import Embedder, Predictor

    data = local_ray.data.read_binary_files(paths, include_paths=True)
    for task, callable_class, column in (
        ("embed", Embedder, "embedding"),
        ("predict", Predictor, "probabilities"),
    ):
        rows = data.map_batches(
            callable_class,
            fn_constructor_kwargs={"model": str(checkpoint)},
            batch_size=64,
            concurrency=2,
            num_cpus=0.5,  # two actors leave a CPU of the two to the file reads
        ).to_pandas()
        assert sorted(rows["path"]) == sorted(paths) and "bytes" not in rows.columns
        rows = rows.set_index("path").loc[reference[task].index]
        broken = rows["error"].notna()
        assert sorted(rows.index[broken]) == sorted(paths[-3:])
        assert rows.loc[broken, column].isna().all()
        expected = np.stack(reference[task].loc[~broken, column])
        np.testing.assert_allclose(
            np.stack(rows.loc[~broken, column]), expected, rtol=1e-5, atol=1e-6
        )
        if task == "predict":
            assert list(rows["labels"].iloc[0]) == list(reference[task]["labels"].iloc[0])


def test_a_manifest_with_a_short_row_is_one_error(folder, tmp_path, capsys):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,note\nimg0.png,a\nimg1.png\n")
    out = tmp_path / "out"
    assert main(["embed", str(manifest), "--out", str(out), "--weights", "none",
                 "--model", "densenet_bc_100_k12", "--workers", "0", "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert "manifest" in err[-1] and "line 3 has 1 fields, the header 2" in err[-1]


def test_an_input_without_images_is_one_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "none.txt").write_text("\n")
    for source in (tmp_path / "empty", tmp_path / "none.txt", str(tmp_path / "*.jpg")):
        assert main(["embed", str(source), "--out", str(tmp_path / "out"), "--weights", "none",
                     "--model", "densenet_bc_100_k12", "--workers", "0"]) == 2  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert "no images in" in err[-1], err


def test_a_small_input_gets_no_more_workers_than_batches(tmp_path, capsys):
    """14 images in batches of 8: 2 decoding processes, not the 32 asked for."""
    (tmp_path / "images").mkdir()
    for i in range(14):
        Image.new("RGB", (32, 32), (i * 15, 80, 160)).save(tmp_path / "images" / f"{i}.png")
    argv = ["embed", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--weights",
            "none", "--model", "densenet_bc_100_k12", "--workers", "32", "--batch-size", "8",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["workers"], summary["rows"]) == (2, 14)


def test_reduced_jpeg_decoding_is_within_a_grey_level_of_the_exact(tmp_path):
    from skimage import data

    path = tmp_path / "photo.jpg"
    Image.fromarray(data.astronaut()).resize((2048, 1536)).save(path, quality=90)
    pre = Preprocessing()
    exact, error = bulk.Decoder(pre, exact=True)(str(path))
    assert error is None and torch.equal(exact, pre.transform()(Image.open(path)))
    reduced, _ = bulk.Decoder(pre)(str(path))
    levels = (reduced - exact).abs() * torch.tensor(pre.std)[:, None, None] * 255
    assert levels.mean() < 0.5 and not torch.equal(reduced, exact)
