"""Bulk embedding throughput: images/s of ``densenet.tasks.bulk.run`` (embed) over a folder of JPEG
photos against the forward pass alone on the same batches, already decoded and preprocessed.

The photos are scikit-image's sample pictures, cropped at random to ``--photo-size`` and saved as
JPEG (quality 90). "forward" times ``bulk.Outputs`` (the model, the copy back and the
normalisation) on the preprocessed batches held in memory; "embed" times the whole run: listing,
reading and decoding in ``--workers`` DataLoader processes, transfers, the same forward pass and
the Parquet shards. Their ratio is how much of the decoding the workers hide (goal: >= 0.9). Each
is timed ``--rounds`` times, interleaved, best kept.

CPU:  python benchmarks/bench_bulk.py --images 128 --workers 1
GPU:  python benchmarks/bench_bulk.py --device cuda --images 4096 --batch-size 256 --workers 8
      python benchmarks/bench_bulk.py --device cuda --images 4096 --batch-size 256 --device-decode
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
from densenet.tasks import bulk

PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    """``count`` JPEGs of ``size`` (width, height): random crops of the sample pictures, each
    resized up to cover ``size`` first when it is smaller."""
    from skimage import data

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in PICTURES]
    for i in range(count):
        picture = pictures[i % len(pictures)]
        scale = max(size[0] / picture.width, size[1] / picture.height, 1.0) * rng.uniform(1, 1.5)
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
        x = rng.integers(0, picture.width - size[0] + 1)
        y = rng.integers(0, picture.height - size[1] + 1)
        picture.crop((x, y, x + size[0], y + size[1])).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--photo-size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, help="default: densenet.tasks.bulk.run's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--device-decode", action="store_true", help="decode JPEGs on the GPU")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = densenet.load(densenet.get_model(args.model))  # random weights, the 256/224 card
    options = bulk.Options(task="embed", shard_size=1024)
    device = torch.device(args.device)
    outputs = bulk.Outputs(model, options, device)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        write_photos(photos, args.images, tuple(args.photo_size))
        transform = model.card.preprocessing.transform()
        images = torch.stack([transform(Image.open(p)) for p in sorted(photos.iterdir())])
        batches = list(images.split(args.batch_size))
        outputs(batches[0].to(device))  # warm-up

        def forward() -> float:
            start = time.perf_counter()
            for batch in batches:
                outputs(batch.to(device, non_blocking=True))
            return args.images / (time.perf_counter() - start)

        summaries = []

        def embed() -> float:
            out = Path(tmp) / "out"
            shutil.rmtree(out, ignore_errors=True)
            summary = bulk.run(
                photos, out, options, model.module, device=args.device, batch_size=args.batch_size,
                workers=args.workers, device_decode=args.device_decode, progress=False,
            )  # fmt: skip
            assert summary.rows == args.images and summary.errors == 0
            summaries.append(summary)
            return summary.rows / summary.seconds

        rates: dict[str, list[float]] = {"forward": [], "embed": []}
        for _ in range(args.rounds):
            rates["forward"].append(forward())
            rates["embed"].append(embed())
    result = {
        "model": args.model,
        "device": str(device),
        "device_decode": args.device_decode,
        "images": args.images,
        "photo_size": list(args.photo_size),
        "batch_size": args.batch_size,
        "workers": summaries[0].workers,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "forward_images_per_second": max(rates["forward"]),
        "embed_images_per_second": max(rates["embed"]),
        "ratio": max(rates["embed"]) / max(rates["forward"]),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
