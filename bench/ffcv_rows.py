"""FFCV beside the decoded-image cache in ``bench/loader.py --backend ffcv``: the same decoded
rows written to an FFCV file, served by FFCV's loader with the same crops, threads and batch.

* The file: every row of the split's cache (training: the 256x256 first resize of §4.1;
  evaluation: the 224x224 input) as an ``RGBImageField`` in raw mode (no JPEG: FFCV copies the
  pixels, as the cache does), the multi-hot labels as a float32 ``NDArrayField``.
* Training: a decoder that cuts one of the same 25 five-crop windows (``geometry.crop_window``,
  drawn uniformly with numba's generator, so the same geometry and work, not the same draws) and
  resizes it to the image size with FFCV's own ``resize_crop`` (OpenCV, INTER_AREA), on
  ``--threads`` numba threads; shuffled, last partial batch dropped. Evaluation: the rows as they
  are (``SimpleRGBImageDecoder``), in order.
* Output kinds: ``uint8`` (``ToTensor``, ``ToTorchImage``: (B, 3, S, S) uint8, channels_last,
  like the cache's) and ``float`` (FFCV's ``NormalizeImage`` with ImageNet's mean and std in
  grey levels, float32, on its threads, before ``ToTorchImage``).

FFCV is not a dependency of fastmlgan; install it in a separate environment (the README's
"Benchmarks" names the commands). Without it the backend is skipped with the import error.
"""

from __future__ import annotations

import time

import numpy as np

from fastmlgan.data.geometry import IMAGENET_MEAN, IMAGENET_STD, NUM_POSITIONS, NUM_SIZES, crop_window


def ffcv_missing() -> str:
    """'' when ffcv imports here, else why not (one line)."""
    try:
        import ffcv.loader  # noqa: F401
        import ffcv.writer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken build (numba, libturbojpeg)
        return f"ffcv is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return ""


def ffcv_version() -> str:
    try:
        from importlib.metadata import version

        return version("ffcv")
    except Exception:  # noqa: BLE001
        return "unknown"


class _Rows:
    """The cache's rows as an indexable dataset for FFCV's writer: (HxWx3 uint8, labels float32)."""

    def __init__(self, cache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i):
        return np.ascontiguousarray(self.cache.pixels[i]), self.cache.labels[i].astype(np.float32)


def write_ffcv(cache, path, threads: int) -> dict:
    """Write ``cache``'s rows to the FFCV file ``path``; its time and size."""
    from ffcv.fields import NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    start = time.perf_counter()
    writer = DatasetWriter(str(path), {
        "image": RGBImageField(write_mode="raw", max_resolution=None),
        "label": NDArrayField(dtype=np.dtype("float32"), shape=(cache.labels.shape[1],)),
    }, num_workers=threads)
    writer.from_indexed_dataset(_Rows(cache))
    return {"ffcv_write_s": round(time.perf_counter() - start, 3), "ffcv_file_bytes": path.stat().st_size}


def _five_crop_decoder(image_size: int):
    """An FFCV ``ResizedCropRGBImageDecoder`` whose crop is one of the 25 five-crop windows."""
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

    windows = np.array([crop_window(p, s, image_size) for p in range(NUM_POSITIONS) for s in range(NUM_SIZES)],
                       dtype=np.int64)

    def five_crop(height, width, scale, ratio):
        # FFCV hands ``scale`` and ``ratio`` through to the crop function: here ``scale`` is the window table.
        k = np.random.randint(0, scale.shape[0])
        return scale[k, 0], scale[k, 1], scale[k, 2], scale[k, 2]

    class FiveCropDecoder(ResizedCropRGBImageDecoder):
        def __init__(self):
            super().__init__((image_size, image_size))
            self.scale = windows
            self.ratio = np.zeros(1)

        @property
        def get_crop_generator(self):
            return five_crop

    return FiveCropDecoder()


class FFCVLoader:
    """FFCV's ``Loader`` behind the interface ``bench/loader.py`` times (``set_epoch``, iteration
    yielding ``{"image", "labels"}``, ``close``)."""

    def __init__(self, path, train: bool, image_size: int, batch_size: int, threads: int, output: str, seed: int = 0):
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.fields.rgb_image import SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import NormalizeImage, ToTensor, ToTorchImage

        image = [_five_crop_decoder(image_size) if train else SimpleRGBImageDecoder()]
        if output == "float":
            image.append(NormalizeImage(np.array(IMAGENET_MEAN) * 255, np.array(IMAGENET_STD) * 255, np.float32))
        image += [ToTensor(), ToTorchImage(channels_last=True)]
        self.loader = Loader(
            str(path), batch_size=batch_size, num_workers=threads, os_cache=True,
            order=OrderOption.RANDOM if train else OrderOption.SEQUENTIAL, drop_last=train, seed=seed,
            pipelines={"image": image, "label": [NDArrayDecoder(), ToTensor()]},
        )

    def set_epoch(self, epoch: int) -> None:  # FFCV counts its epochs itself
        pass

    def __iter__(self):
        for image, labels in self.loader:
            yield {"image": image, "labels": labels}

    def close(self) -> None:
        close = getattr(self.loader, "close", None)  # FFCV 1.0 has none; its threads end with the epoch
        if close is not None:
            close()
