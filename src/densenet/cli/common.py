"""What the command modules share: output formatting and the common arguments."""

from __future__ import annotations

import argparse
import json


def print_json(data) -> None:
    print(json.dumps(data, indent=2))


def print_report(report: dict | list[dict], as_json: bool) -> None:
    """JSON, or one ``key: value`` line per record (nested values and None left out)."""
    if as_json:
        print_json(report)
        return
    for record in report if isinstance(report, list) else [report]:
        fields = (
            f"{k}: {v}" for k, v in record.items() if v is not None and not isinstance(v, dict)
        )
        print("  ".join(fields))


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def weights_value(text: str) -> str | None:
    """A ``--weights`` value: ``none`` means random initialisation."""
    return None if text.lower() == "none" else text


def add_model_args(parser: argparse.ArgumentParser, default_model: str | None = None) -> None:
    """``--model`` and ``--weights``, as ``densenet.load`` takes them."""
    parser.add_argument(
        "--model",
        default=default_model,
        help="architecture (see `densenet info`) or an exported/checkpoint file "
        f"(default {default_model or 'densenet121, or the checkpoint --weights names'})",
    )
    parser.add_argument(
        "--weights",
        type=weights_value,
        default="DEFAULT",
        help="weights name (DEFAULT, IMAGENET1K_V1), a local .pth/.pt/.safetensors file, "
        "a checkpoint of `densenet train`, or none (random initialisation)",
    )


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-root",
        help="folder of named data sets (default $DENSENET_DATA, ~/.cache/densenet/data)",
    )
    p.add_argument("--no-download", action="store_true", help="never download a named data set")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1..."
    )
