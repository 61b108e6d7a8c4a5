"""The decoders that fill a decoded-image cache (``imagecache.build``), fastest first: DALI (nvJPEG and the
hardware JPEG decoder on a GPU), torchvision's batched nvJPEG, and CPU threads running the torch
loader's own decode and resize (so rows built on a CPU equal the torch backend's pixels).

Each is a generator of ``(first row, [row, ...])`` chunks in file order, a row being the image
resized to side x side as (side, side, 3) uint8, or the ``DataError`` that says why it could not
be decoded. The GPU decoders run here on CPU tensors too (``device="cpu"``), which is how the
tests check them against the CPU rows.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastmlgan.data.backends.dali import device_id, require_dali
from fastmlgan.data.backends.torchvision_gpu import TorchvisionLoader
from fastmlgan.data.geometry import decode_rgb, resize
from fastmlgan.errors import DataError


class DaliFailed(Exception):
    """DALI stopped on a file it cannot decode (it cannot skip one); the build falls back."""


def rows_cpu(images, side, chunk_rows, num_threads, device=None):
    """(start, [HWC uint8 array | DataError, ...]) per chunk: the torch loader's decode and resize."""
    def one(i: int):
        try:
            return resize(decode_rgb(images.paths[i]), side).permute(1, 2, 0).contiguous().numpy()
        except DataError as e:
            return e

    n = len(images)
    with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="fastmlgan-cache") as pool:
        pending: deque = deque()
        starts = list(range(0, n, chunk_rows))
        for k, start in enumerate(starts):
            while len(pending) < 2 and k + len(pending) < len(starts):  # the next chunk decodes while this one is written
                s = starts[k + len(pending)]
                pending.append([pool.submit(one, i) for i in range(s, min(n, s + chunk_rows))])
            yield start, [f.result() for f in pending.popleft()]


def rows_torchvision(images, side, chunk_rows, num_threads, device):
    """nvJPEG through ``torchvision_gpu.TorchvisionLoader``'s reader and batched decoder (on CPU
    tensors with ``device="cpu"``: libjpeg-turbo, for tests)."""
    reader = TorchvisionLoader(images, side, chunk_rows, 0, 1, train=False, device=device, num_threads=num_threads)
    n = len(images)
    with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="fastmlgan-cache") as pool:
        for start in range(0, n, chunk_rows):
            indices = list(range(start, min(n, start + chunk_rows)))
            loaded = list(pool.map(reader.load, indices))
            if reader.device.type != "cpu":
                loaded = reader.decode_gpu(indices, loaded)
            yield start, [x if isinstance(x, DataError) else x.permute(1, 2, 0).contiguous().cpu().numpy() for x in loaded]


def rows_dali(images, side, chunk_rows, num_threads, device):
    """A DALI pipeline in file order: decode (nvJPEG, hardware decoder where present) and one
    antialiased resize to side x side, uint8 HWC. DALI cannot skip a bad file: ``DaliFailed``."""
    fn, pipeline_def, types = require_dali()
    gpu = device_id(device)
    on_gpu = gpu is not None

    @pipeline_def
    def rows():
        jpegs, index = fn.readers.file(files=list(images.paths), labels=list(range(len(images))),
                                       pad_last_batch=True, name="Reader")
        kwargs = dict(device="mixed" if on_gpu else "cpu", output_type=types.RGB, adjust_orientation=True)  # as decode_rgb
        if on_gpu:
            kwargs["hw_decoder_load"] = 0.65
        decoded = fn.decoders.image(jpegs, **kwargs)
        return fn.resize(decoded, device="gpu" if on_gpu else "cpu", size=[side, side], antialias=True), index

    pipe = rows(batch_size=chunk_rows, num_threads=max(1, num_threads), device_id=gpu, prefetch_queue_depth=2)
    pipe.build()
    n = len(images)
    for start in range(0, n, chunk_rows):
        try:
            pixels, index = pipe.run()
        except RuntimeError as e:
            raise DaliFailed(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from e
        if on_gpu:
            pixels = pixels.as_cpu()
        arr, idx = np.asarray(pixels.as_array()), np.asarray(index.as_array()).reshape(-1)
        k = min(chunk_rows, n - start)
        if not np.array_equal(idx[:k], np.arange(start, start + k)):
            raise DaliFailed(f"DALI returned rows out of order at row {start}")
        yield start, list(arr[:k])
