"""What a bulk run computes (``Options``), and the error of a run that cannot start."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from densenet.choices import VECTOR_DTYPES as DTYPES
from densenet.deprecation import renamed_keywords
from densenet.errors import DenseNetError

TASKS = ("embed", "predict")


class BulkError(DenseNetError):
    """A bulk run that cannot start: a missing input, a bad manifest, a mismatched out folder."""


# the settings file's names of the options renamed since (a folder written before resumes)
RECORDED_AS = {"vector_dtype": "dtype", "calibration_images": "calibration"}


@renamed_keywords(dtype="vector_dtype", calibration="calibration_images")
@dataclass(frozen=True)
class Options:
    """What a run computes; a resumed run must use the same.

    task: ``"embed"`` (pooled features, the input of the classifier) or ``"predict"`` (top-k).
    normalize: embed: scale each vector to unit L2 norm.
    vector_dtype: embed: ``"float32"`` or ``"float16"``, the stored vectors' type (the
        Parquet column's); the model computes in the run's ``precision``. ``dtype=`` is its
        deprecated spelling.
    topk: predict: the number of (label, probability) pairs per image; a multi-label model card
        gives independent sigmoid probabilities instead of a softmax, and every label's
        probability in a ``scores`` column.
    shard_size: rows per Parquet file.
    calibration_images: with precision ``"int8"``, the folder of images the quantization is
        calibrated on (``calibration=``: the deprecated spelling).
    exact_decode: decode every JPEG at full size, as ``densenet predict`` does; by default a
        large one is decoded at a reduced scale (``densenet.data.images.open_image``'s
        ``shorter_side``: faster, within a few grey levels after the resize).
    """

    task: str = "embed"
    normalize: bool = False
    vector_dtype: str = "float32"
    topk: int = 5
    shard_size: int = 10_000
    calibration_images: str | None = None
    exact_decode: bool = False

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.vector_dtype not in DTYPES:
            raise ValueError(f"vector_dtype must be one of {DTYPES}, got {self.vector_dtype!r}")
        if self.topk < 1 or self.shard_size < 1:
            raise ValueError(
                f"topk and shard_size must be >= 1, got {self.topk}, {self.shard_size}"
            )

    def recorded(self) -> dict[str, Any]:
        """The options as the output folder's settings record them."""
        return {RECORDED_AS.get(name, name): value for name, value in asdict(self).items()}
