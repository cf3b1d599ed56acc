"""End to end on the CPU: images/s of ``densenet predict DIR --out`` (``densenet.tasks.bulk.run``, task
predict, the openvino engine) against a plain loop around the same OpenVINO model.

The photos are JPEGs of the sizes photos have (800x600 to 2048x1536, quality 82-94): random
crops of scikit-image's and scikit-learn's sample pictures, scaled up where they are smaller.
"plain" is what a user writes by hand: for each batch of ``--batch-size`` paths, PIL decodes each
file and applies the card's transform, then the compiled OpenVINO model (``compile_model(...,
"CPU")``, OpenVINO's defaults, or ``--precision float32``) is called and the top-5 taken, in turn.
"densenet" is the bulk run as the command line runs it: decoding in worker processes, the
throughput form of the openvino engine, Parquet shards. Both run in OpenVINO's default precision
(``--precision auto``, bfloat16 where the CPU computes it) or both in float32. Each is timed in
its own block of calls, ``--rounds`` times alternating, best kept.

python benchmarks/bench_end_to_end.py --images 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import densenet
from densenet.data.files import write_json
from densenet.infer.engines import cpu_flags, cpu_name
from densenet.tasks import bulk

SIZES = ((800, 600), (1024, 768), (1600, 1200), (2048, 1536), (1200, 1600))


def sample_pictures() -> list[Image.Image]:
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina")
    pictures = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    return pictures + [Image.fromarray(array) for array in load_sample_images().images]


def write_photos(folder: Path, count: int) -> None:
    """``count`` JPEGs of ``SIZES``: random crops of the sample pictures, scaled to cover."""
    rng = np.random.default_rng(0)
    pictures = sample_pictures()
    for i in range(count):
        picture = pictures[i % len(pictures)]
        width, height = SIZES[rng.integers(len(SIZES))]
        scale = max(width / picture.width, height / picture.height) * rng.uniform(1, 1.3)
        size = (round(picture.width * scale), round(picture.height * scale))
        picture = picture.resize(size, Image.BICUBIC)
        x = rng.integers(0, picture.width - width + 1)
        y = rng.integers(0, picture.height - height + 1)
        quality = int(rng.integers(82, 95))
        picture.crop((x, y, x + width, y + height)).save(folder / f"{i:06d}.jpg", quality=quality)


def plain_loop(model, paths: list[Path], batch_size: int, precision: str):
    """The hand-written loop, compiled once; returns the timed call."""
    import openvino as ov

    config = {} if precision == "auto" else {"INFERENCE_PRECISION_HINT": "f32"}
    example = torch.zeros(1, *model.card.input_shape)
    converted = ov.convert_model(model.module, example_input=example)
    compiled = ov.Core().compile_model(converted, "CPU", config)
    transform = model.card.preprocessing.transform()
    compiled(torch.zeros(batch_size, *model.card.input_shape).numpy())  # warm-up

    def run() -> float:
        start = time.perf_counter()
        for i in range(0, len(paths), batch_size):
            batch = torch.stack(
                [transform(Image.open(p).convert("RGB")) for p in paths[i : i + batch_size]]
            )
            torch.from_numpy(compiled(batch.numpy())[0]).softmax(1).topk(5)
        return len(paths) / (time.perf_counter() - start)

    return run, compiled.get_property("INFERENCE_PRECISION_HINT").to_string()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, help="default: densenet.tasks.bulk.run's")
    parser.add_argument("--precision", choices=("auto", "float32"), default="auto")
    parser.add_argument("--exact-decode", action="store_true")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--photos", help="a folder of JPEGs to use (default: written to a temp folder)"
    )
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = densenet.load(densenet.get_model(args.model))  # random weights, the 256/224 card
    options = bulk.Options(task="predict", exact_decode=args.exact_decode)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(args.photos or Path(tmp) / "photos")
        if not args.photos:
            photos.mkdir()
            write_photos(photos, args.images)
        paths = sorted(photos.glob("*.jpg"))
        plain, plain_precision = plain_loop(model, paths, args.batch_size, args.precision)
        summaries: list[str] = []  # the precision each bulk run computed in

        def ours() -> float:
            out = Path(tmp) / "out"
            shutil.rmtree(out, ignore_errors=True)
            summary = bulk.run(
                photos, out, options, model.module, device="cpu", batch_size=args.batch_size,
                workers=args.workers, precision=args.precision, backend="openvino", progress=False,
            )  # fmt: skip
            assert summary.rows == len(paths) and summary.errors == 0
            summaries.append(json.loads((out / bulk.SETTINGS_FILE).read_text())["precision"])
            return summary.rows / summary.seconds

        rates: dict[str, list[float]] = {"plain": [], "densenet": []}
        for _ in range(args.rounds):
            rates["plain"].append(plain())
            rates["densenet"].append(ours())
    result = {
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpus": os.cpu_count(),
        "model": args.model,
        "images": len(paths),
        "batch_size": args.batch_size,
        "precision": {"plain": plain_precision, "densenet": summaries[0]},
        "exact_decode": args.exact_decode,
        "workers": args.workers,
        "plain_images_per_second": rates["plain"],
        "densenet_images_per_second": rates["densenet"],
        "ratio": max(rates["densenet"]) / max(rates["plain"]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
