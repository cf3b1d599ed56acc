"""What the package's eager classifiers share (``DenseNet``, ``RDNet``): one small base class, so
that the Runner, class activation maps, embeddings and checkpoints take either without asking
which it is, and the backbone helpers both use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

__all__ = ["Network", "new_classifier", "take_indices"]


class Network(nn.Module):
    """An image classifier of this package: ``forward_features`` (N, C, H, W) -> the final
    feature map (N, num_features, h, w), ``forward_head`` its pooled features or logits,
    ``cam_features`` the map whose spatial mean the linear ``classifier`` reads (class
    activation maps), ``reset_classifier``; attributes ``arch``, ``config`` (the constructor's
    arguments), ``num_classes``, ``num_features``, ``min_input_size`` and ``feature_info``.

    ``CLASSIFIER`` is the prefix of the classifier's state_dict keys and ``STEM_WEIGHT`` the key
    of the first convolution's kernel (the one adapted to other input channels)."""

    # (no annotations of the instance attributes: TorchScript would read them as its types)
    CLASSIFIER: ClassVar[str] = "classifier."
    STEM_WEIGHT: ClassVar[str] = "features.conv0.weight"

    def cam_features(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, num_features, h, w), the map whose spatial mean the
        linear classifier takes: by default ``forward_features``."""
        return self.forward_features(x)

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError


def take_indices(count: int, out_indices: Sequence[int] | None, what: str) -> tuple[int, ...]:
    """``out_indices`` (default all; negative counts from the end) as indices in 0..count-1,
    or ``ValueError`` naming ``what`` they index."""
    positions = range(count)
    try:
        return tuple(positions[i] for i in (positions if out_indices is None else out_indices))
    except (IndexError, TypeError):
        raise ValueError(
            f"out_indices must be {what} indices in 0..{count - 1} (or negative), "
            f"got {out_indices!r}"
        ) from None


def new_classifier(num_features: int, num_classes: int) -> nn.Module:
    """A fresh classifier: (N, num_features) -> (N, num_classes), zero bias; for 0 classes the
    identity (the pooled features are the output)."""
    if num_classes == 0:
        return nn.Identity()
    linear = nn.Linear(num_features, num_classes)
    nn.init.zeros_(linear.bias)
    return linear
