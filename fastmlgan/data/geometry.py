"""The one image geometry every backend shares: decoding, the paper's five-crop augmentation (§4.1,
after Wang et al. 2015), the evaluation resize and ImageNet normalisation.

Resize the image to ``base x base`` (256 for the paper's 224 output), crop a square patch at one
of five positions (four corners, centre) with a side from {256, 224, 192, 168, 128}, resize the
patch to ``image_size`` (224). For another output size every length scales by image_size / 224.
Test time resizes the whole image to ``image_size`` (one crop).

Every backend (torch, torchvision-gpu, DALI, the decoded-image cache) takes its crop windows from
these functions, so the same (position, size index) gives the same window everywhere; the CPU
decode (``decode_rgb``) is the one of training, evaluation, ``predict``, the cache build and
``check``.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fastmlgan.errors import DataError
from fastmlgan.safeio import open_regular

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ON_BAD_IMAGE = ("skip", "error")

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


def decode_rgb(path) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor, as it is meant to be seen: EXIF
    orientation applied, 16-bit and float pixels scaled to 8 bits (``image_to_rgb8``). ``DataError``
    naming the file on failure; a FIFO or device is refused without being opened for a blocking
    read. Every backend's CPU decode, the cache build, ``predict`` and ``check`` come through here."""
    try:
        with open_regular(path, "image file") as f, Image.open(f) as img:
            img.load()  # decode now: a truncated file fails here, not later
            rgb = image_to_rgb8(img, path)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # PIL raises OSError ("image file is truncated"), UnidentifiedImageError (an OSError),
        # SyntaxError or ValueError for broken files, depending on the format and the damage.
        raise DataError(f"{path}: cannot decode image: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


_ORIENTATION = 0x0112  # the EXIF tag


def rotated_jpeg(data: bytes) -> bool:
    """Whether JPEG bytes carry an EXIF orientation other than upright (nvJPEG cannot apply it)."""
    if b"Exif\x00\x00" not in data[:65536]:  # EXIF lives in an APP1 segment before the image data
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the headers only
            return img.getexif().get(_ORIENTATION, 1) != 1
    except Exception:  # noqa: BLE001 - unreadable headers: the decoder will say what is wrong
        return False
# PIL modes of 16-bit grey (PNG, TIFF); ``convert("RGB")`` clips them at 255 (a near-white image).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def image_to_rgb8(img: Image.Image, path) -> np.ndarray:
    """(H, W, 3) uint8 of a loaded PIL image. EXIF orientation is applied (a phone photo stored
    sideways is turned upright, as viewers show it). 16-bit grey (PNG and TIFF) is scaled by
    255/65535; float pixels (mode F) in [0, 1] by 255; float pixels outside [0, 1] and 32-bit integer
    pixels (mode I, other than a PNG's 16 bits) have no known white level and are refused by name."""
    with contextlib.suppress(Exception):  # a damaged EXIF block: the pixels are still good, upright or not
        if img.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in _MODES_16BIT or (mode == "I" and img.format == "PNG"):
        grey = np.rint(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)).clip(0, 255).astype(np.uint8)
    elif mode == "F":
        values = np.asarray(img, dtype=np.float32)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise DataError(
                f"{path}: float pixels (PIL mode F) outside [0, 1] (min {np.nanmin(values):g}, max {np.nanmax(values):g}): "
                "their white level is unknown; convert the image to 8 or 16 bits"
            )
        grey = np.rint(values * 255.0).astype(np.uint8)
    elif mode in ("I", "I;32", "I;32B", "I;32L"):
        raise DataError(f"{path}: 32-bit integer pixels (PIL mode {mode}) have no known white level; convert the image to 8 or 16 bits")
    else:
        return np.array(img.convert("RGB"))
    return np.repeat(grey[:, :, None], 3, axis=2)


def resize(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) -> side x side, antialiased bilinear."""
    # uint8 in, uint8 out: torchvision's antialiased bilinear path on uint8 matches PIL's
    # BILINEAR resize to within 1 grey level (measured), like the references that used PIL.
    return TF.resize(image, [side, side], interpolation=InterpolationMode.BILINEAR, antialias=True)


def five_crop(image: torch.Tensor, position: int, size_index: int, image_size: int) -> torch.Tensor:
    """The paper's training crop (§4.1): resize to base x base, crop, resize to image_size.

    ``image`` is uint8 (3, H, W); returns uint8 (3, image_size, image_size)."""
    top, left, side = crop_window(position, size_index, image_size)
    resized = resize(image, base_size(image_size))
    patch = resized[:, top : top + side, left : left + side]
    return resize(patch, image_size)


def eval_resize(image: torch.Tensor, image_size: int) -> torch.Tensor:
    """The paper's test protocol (§4.1): the whole image resized to image_size x image_size."""
    return resize(image, image_size)


def resize_into(window: torch.Tensor, out: torch.Tensor) -> None:
    """``resize(window, out's side)`` written into ``out`` (both (B, 3, h, w) uint8): the same
    kernel without a new tensor, so a loader fills its batch in place (the cache loader)."""
    # What TF.resize runs for uint8 bilinear antialiased on a tensor, with out=; equality with
    # ``resize`` is tests/test_uint8_path.py::test_resize_into_equals_resize.
    torch._C._nn._upsample_bilinear2d_aa(window, list(out.shape[-2:]), False, None, None, out=out)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) in [0, 255] -> float32 normalised with ImageNet mean/std."""
    if images.dim() not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) images, got shape {tuple(images.shape)}")
    mean, std = _mean_std(images.device)
    return (images.to(torch.float32) - mean) / std


def _mean_std(device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's mean and std in grey levels, float32 (3, 1, 1): what every normalisation uses."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=device).view(3, 1, 1) * 255.0
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=device).view(3, 1, 1) * 255.0
    return mean, std


def normalize_batch(images: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """The consumer's half of the uint8 path: uint8 (B, 3, H, W) on any device -> float32
    normalised in ``memory_format``, equal to ``normalize`` bit for bit (the same float32
    subtraction and division, in place on the converted copy). The trainer runs it as the first
    op of its step, on its device (``Trainer._images``); under ``torch.compile`` it is one kernel."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (the loaders' output=uint8), got {images.dtype}")
    mean, std = _mean_std(images.device)
    return images.to(dtype=torch.float32, memory_format=memory_format).sub_(mean).div_(std)


def crop_for(seed: int, epoch: int, index: int) -> tuple[int, int]:
    """The (position, size index) of sample ``index`` in ``epoch``: uniform over the 25 pairs."""
    k = int(np.random.default_rng([seed, epoch, index]).integers(NUM_POSITIONS * NUM_SIZES))
    return k // NUM_SIZES, k % NUM_SIZES


# -- crop_for for a whole batch at once ------------------------------------------------------------
# crop_for builds a numpy Generator per sample: 33 us holding the GIL, 15 % of the cache loader's
# CPU time per image (issue 20's profile). crops_for computes the same draws for many indices with
# array arithmetic: numpy's SeedSequence (entropy [seed, epoch, index], one 32-bit word each), PCG64
# seeded from its state (XSL-RR output after two steps) and Generator.integers(25)'s Lemire
# reduction of the first 32-bit output. tests/test_crops_for.py compares it with crop_for.
_M32 = np.uint64(0xFFFFFFFF)
_PCG_MULT = (np.uint64(0x2360ED051FC65DA4), np.uint64(0x4385DF649FCCF645))  # PCG_DEFAULT_MULTIPLIER_128 (hi, lo)


def _seed_sequence_state(words: list[np.ndarray]) -> list[np.ndarray]:
    """``SeedSequence(entropy).generate_state(8)`` (uint32), vectorised over the entries of ``words``."""
    u32 = np.uint32
    hash_const = [u32(0x43B0D7E5)]

    def hashmix(value):
        value = value ^ hash_const[0]
        hash_const[0] = u32(hash_const[0] * u32(0x931E8875))
        value = value * hash_const[0]
        return value ^ (value >> u32(16))

    def mix(x, y):
        result = u32(0xCA01F9DD) * x - u32(0x4973F715) * y
        return result ^ (result >> u32(16))

    with np.errstate(over="ignore"):
        pool = [hashmix(words[i] if i < len(words) else np.zeros_like(words[0])) for i in range(4)]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        out, hash_b = [], u32(0x8B51F9DD)
        for i in range(8):
            value = pool[i % 4] ^ hash_b
            hash_b = u32(hash_b * u32(0x58F38DED))
            value = value * hash_b
            out.append(value ^ (value >> u32(16)))
    return out


def _mulhi64(a: np.ndarray, b: np.uint64) -> np.ndarray:
    a0, a1, b0, b1 = a & _M32, a >> np.uint64(32), b & _M32, b >> np.uint64(32)
    p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
    mid = (p00 >> np.uint64(32)) + (p01 & _M32) + (p10 & _M32)
    return p11 + (p01 >> np.uint64(32)) + (p10 >> np.uint64(32)) + (mid >> np.uint64(32))


def _pcg_step(hi, lo, inc_hi, inc_lo):
    """state * multiplier + inc, mod 2**128, on (hi, lo) uint64 halves."""
    mult_hi, mult_lo = _PCG_MULT
    new_lo = lo * mult_lo
    new_hi = _mulhi64(lo, mult_lo) + hi * mult_lo + lo * mult_hi
    out_lo = new_lo + inc_lo
    return new_hi + inc_hi + (out_lo < new_lo).astype(np.uint64), out_lo


def crops_for(seed: int, epoch: int, indices) -> np.ndarray:
    """(n, 2) int64: ``crop_for(seed, epoch, i)`` for every ``i`` of ``indices``, computed together."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not (0 <= seed < 2**32 and 0 <= epoch < 2**32) or (len(idx) and not (0 <= idx.min() and idx.max() < 2**32)):
        # Values of more than one 32-bit word change SeedSequence's entropy layout: the plain way.
        return np.array([crop_for(seed, epoch, int(i)) for i in idx], dtype=np.int64).reshape(-1, 2)
    u64, shift = np.uint64, np.uint64(32)
    words = [np.full(idx.shape, seed, np.uint32), np.full(idx.shape, epoch, np.uint32), idx.astype(np.uint32)]
    state = _seed_sequence_state(words)
    seed_hi, seed_lo, inc_hi, inc_lo = (state[2 * k].astype(u64) | (state[2 * k + 1].astype(u64) << shift) for k in range(4))
    with np.errstate(over="ignore"):
        inc_hi, inc_lo = (inc_hi << u64(1)) | (inc_lo >> u64(63)), (inc_lo << u64(1)) | u64(1)
        lo = inc_lo + seed_lo  # state 0, one step (state = inc), then += the seed
        hi = inc_hi + seed_hi + (lo < inc_lo).astype(u64)
        hi, lo = _pcg_step(hi, lo, inc_hi, inc_lo)
        hi, lo = _pcg_step(hi, lo, inc_hi, inc_lo)  # the first draw steps, then outputs
        x, rot = hi ^ lo, hi >> u64(58)
        draw = ((x >> rot) | (x << ((u64(64) - rot) & u64(63)))) & _M32  # next_uint32: the low half
        m = draw * u64(NUM_POSITIONS * NUM_SIZES)
    k = (m >> shift).astype(np.int64)
    # Lemire's rejection (probability 4e-9 a draw) needs the next 32 bits: those few the plain way.
    for j in np.flatnonzero((m & _M32) < u64((2**32 - NUM_POSITIONS * NUM_SIZES) % (NUM_POSITIONS * NUM_SIZES))):
        k[j] = np.random.default_rng([seed, epoch, int(idx[j])]).integers(NUM_POSITIONS * NUM_SIZES)
    return np.stack([k // NUM_SIZES, k % NUM_SIZES], axis=1)
