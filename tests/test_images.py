"""densenet.data.images: what the openers refuse, each with its reason: devices, pipes and symbolic
link loops by name; Pillow's decompression-bomb warning below the documented pixel limit is not
a refusal."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from densenet.data.images import MAX_PIXELS, ImageError, Reason, open_image


def refusal(path) -> ImageError:
    with pytest.raises(ImageError) as caught:
        open_image(path)
    return caught.value


def test_a_pipe_a_device_and_a_link_loop_are_named_for_what_they_are(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    assert "not a regular file" in str(refusal(tmp_path / "pipe.png"))  # and it does not block
    assert refusal("/dev/zero").reason == Reason.UNREADABLE
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    error = refusal(tmp_path / "a.png")
    assert "a loop of symbolic links" in str(error) and error.reason == Reason.UNREADABLE
    (tmp_path / "empty.png").write_bytes(b"")
    assert refusal(tmp_path / "empty.png").reason == Reason.EMPTY


def test_images_up_to_the_documented_pixel_limit_open(tmp_path):
    """95 million pixels: over Pillow's warning threshold (89.5 million), under MAX_PIXELS."""
    assert Image.MAX_IMAGE_PIXELS < 95_000_000 < MAX_PIXELS
    path = tmp_path / "large.png"
    Image.new("1", (9_500, 10_000)).save(path)
    assert open_image(path).size == (9_500, 10_000)
    Image.new("1", (10_001, 10_000)).save(path)
    assert refusal(path).reason == Reason.TOO_MANY_PIXELS


def test_predict_and_bulk_walk_a_folder_the_same_way(tmp_path):
    """One walker: image files by suffix, depth first, sorted per folder; a link back to a
    parent folder is not followed."""
    from densenet.data.images import find_images
    from densenet.tasks.bulk import iter_inputs

    for name in ("b/2.png", "b/1.JPG", "a.jpg", "a-b/3.webp", "c/notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "b" / "loop").symlink_to(tmp_path, target_is_directory=True)
    expected = [str(tmp_path / n) for n in ("a-b/3.webp", "a.jpg", "b/1.JPG", "b/2.png")]
    assert find_images([tmp_path]) == expected
    assert list(iter_inputs(tmp_path)) == expected


def photo(path, size: tuple[int, int]):
    """A JPEG photo of ``size`` (width, height): scikit-image's astronaut, resized."""
    from skimage import data

    Image.fromarray(data.astronaut()).resize(size).save(path, quality=90)
    return path


def test_a_large_jpeg_is_decoded_at_the_smallest_scale_twice_the_resize(tmp_path):
    big = photo(tmp_path / "big.jpg", (1600, 1200))
    assert open_image(big).size == (1600, 1200)
    assert open_image(big, shorter_side=256).size == (800, 600)  # 1/4 would be under 512
    assert open_image(big, shorter_side=100).size == (400, 300)
    small = photo(tmp_path / "small.jpg", (600, 400))
    assert open_image(small, shorter_side=256).size == (600, 400)
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert open_image(png, shorter_side=256).size == (1600, 1200)  # JPEGs only
