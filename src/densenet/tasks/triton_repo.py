"""Triton Inference Server model repositories for exported ONNX files (``densenet export
--triton-repo``): the model's folder with the file, its ``config.pbtxt`` for the ``onnxruntime``
backend and the class names.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from densenet.data.files import write_text
from densenet.infer.exported import (
    INPUT_NAME,
    OUTPUT_NAME,
    ExportError,
    ExportMetadata,
    read_metadata,
)

__all__ = ["triton_config", "write_triton_repo"]

TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def write_triton_repo(
    onnx_path: str | os.PathLike,
    repo: str | os.PathLike,
    name: str | None = None,
    max_batch_size: int = 64,
) -> Path:
    """Put an exported ONNX file into a Triton model repository for the ``onnxruntime`` backend:
    ``repo/<name>/config.pbtxt``, ``repo/<name>/1/model.onnx`` and ``repo/<name>/labels.txt``
    (class names, so Triton's classification extension returns labels).

    Args:
        onnx_path: a file written by ``to_onnx``.
        repo: the model repository folder (created if missing).
        name: the model name; default the architecture's (``densenet121``...).
        max_batch_size: the largest batch Triton forms with dynamic batching; a fixed-batch
            export gets 0 (Triton then passes the batch dimension through unchanged).

    Returns the model's folder.
    """
    meta = read_metadata(onnx_path)
    name = name or meta.card.arch or Path(onnx_path).stem
    if not name or "/" in name or name.startswith("."):
        raise ExportError(
            f"Triton model name {name!r} is not a valid folder name; pass another name"
        )
    if max_batch_size < 1:
        raise ExportError(f"max_batch_size must be at least 1, got {max_batch_size}")
    folder = Path(repo) / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "1" / "model.onnx")
    write_text(folder / "labels.txt", "\n".join(meta.card.classes) + "\n")
    write_text(folder / "config.pbtxt", triton_config(meta, name, max_batch_size))
    return folder


def triton_config(meta: ExportMetadata, name: str, max_batch_size: int = 64) -> str:
    """The ``config.pbtxt`` text of an exported ONNX model described by ``meta``."""
    side = -1 if meta.image_size is None else meta.image_size
    image_dims = [meta.card.in_channels, side, side]
    output_dims = [meta.card.num_classes]
    if meta.batch_size is not None:  # the batch is a fixed part of the tensor shapes
        max_batch_size = 0
        image_dims.insert(0, meta.batch_size)
        output_dims.insert(0, meta.batch_size)
    data_type = TRITON_TYPES[meta.dtype]
    batching = "dynamic_batching { }\n" if max_batch_size else ""
    return (
        f'name: "{name}"\n'
        f'backend: "onnxruntime"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n"
        f"  {{\n"
        f'    name: "{INPUT_NAME}"\n'
        f"    data_type: {data_type}\n"
        f"    dims: [ {', '.join(map(str, image_dims))} ]\n"
        f"  }}\n"
        f"]\n"
        f"output [\n"
        f"  {{\n"
        f'    name: "{OUTPUT_NAME}"\n'
        f"    data_type: {data_type}\n"
        f"    dims: [ {', '.join(map(str, output_dims))} ]\n"
        f'    label_filename: "labels.txt"\n'
        f"  }}\n"
        f"]\n"
        f"{batching}"
    )
