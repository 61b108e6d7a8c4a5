"""Geometry of the paper's five-crop augmentation (§4.1, after Wang et al. 2015).

Resize the image to ``base x base`` (256 for the paper's 224 output), crop a square patch at one
of five positions (four corners, centre) with a side from {256, 224, 192, 168, 128}, resize the
patch to ``image_size`` (224). For another output size every length scales by image_size / 224.

Every backend (torch, torchvision-gpu, DALI) takes its crop windows from these functions, so the
same (position, size index) gives the same window everywhere.
"""

from __future__ import annotations

PAPER_IMAGE_SIZE = 224
PAPER_BASE_SIZE = 256
PAPER_CROP_SIDES = (256, 224, 192, 168, 128)
POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
NUM_POSITIONS = len(POSITIONS)
NUM_SIZES = len(PAPER_CROP_SIDES)


def base_size(image_size: int) -> int:
    """Side of the square the image is first resized to: 256 for a 224 output."""
    return int(round(image_size * PAPER_BASE_SIZE / PAPER_IMAGE_SIZE))


def crop_sides(image_size: int) -> tuple[int, ...]:
    """The five crop sides for this output size: (256, 224, 192, 168, 128) at 224."""
    base = base_size(image_size)
    return tuple(int(round(s * base / PAPER_BASE_SIZE)) for s in PAPER_CROP_SIDES)


def crop_window(position: int, size_index: int, image_size: int) -> tuple[int, int, int]:
    """(top, left, side) of the crop in the ``base x base`` resized image."""
    if not 0 <= position < NUM_POSITIONS:
        raise ValueError(f"crop position must be in [0, {NUM_POSITIONS}), got {position}")
    if not 0 <= size_index < NUM_SIZES:
        raise ValueError(f"crop size index must be in [0, {NUM_SIZES}), got {size_index}")
    base = base_size(image_size)
    side = crop_sides(image_size)[size_index]
    far = base - side
    top, left = {
        0: (0, 0),
        1: (0, far),
        2: (far, 0),
        3: (far, far),
        4: (far // 2, far // 2),
    }[position]
    return top, left, side


def crop_window_normalized(position: int, size_index: int, image_size: int) -> tuple[float, float, float, float]:
    """The crop window as fractions of the image: (y0, x0, y1, x1) in [0, 1].

    Resizing to base x base is a linear map, so the same fractions locate the window in the
    original image (used for region-of-interest decoding)."""
    top, left, side = crop_window(position, size_index, image_size)
    base = base_size(image_size)
    return top / base, left / base, (top + side) / base, (left + side) / base
