"""Reading a decoded-image cache's pixels safely (``cache.ImageCache.read_rows`` and ``verify``).

- Rows are read with ``pread`` into the caller's buffer, not through the memory map: a cache
  truncated while a run reads it answers with a short read (a one-line ``CacheError``), where a
  memory map raises SIGBUS and kills the process with no message (issue 18).
- Pixel checksums are checked when a run opens its cache (``ensure_cache``), not lazily: an edited
  cache is refused by name before the run folder exists, like one whose header or label sections
  fail their checks. The pass reads every 32 MiB chunk once and CRC-32s it on ``num_threads``
  threads (``pread`` and ``zlib.crc32`` release the GIL). Its cost is in docs/faults.md.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastmlgan.loaders.cache import CacheError


def read_rows(cache, rows, out: np.ndarray) -> None:
    """Copy pixel rows ``rows`` of ``cache`` into ``out`` (k, side, side, 3) uint8, one pread each."""
    size = cache._row_bytes
    for j, r in enumerate(rows):
        got = os.preadv(cache._fd, [memoryview(out[j]).cast("B")], cache._offset + int(r) * size)
        if got != size:
            raise CacheError(
                f"{cache.path}: row {r} is cut short ({got} of {size} bytes): the file was truncated while this "
                "run read it; delete it to rebuild"
            )


def verify_pixels(cache, num_threads: int = 1) -> None:
    """Every pixel chunk's CRC-32 against the header; ``CacheError`` naming the first bad rows."""
    px = cache.header["sections"]["pixels"]
    rows, crcs, n = int(px["chunk_rows"]), px["crc32"], len(cache)
    if len(crcs) != -(-n // rows):
        raise CacheError(f"{cache.path}: the header lists {len(crcs)} pixel checksums for {n} rows; delete it to rebuild")

    def chunk_ok(c: int) -> bool:
        lo, hi = c * rows, min(n, (c + 1) * rows)
        size = (hi - lo) * cache._row_bytes
        data = os.pread(cache._fd, size, cache._offset + lo * cache._row_bytes)
        return len(data) == size and zlib.crc32(data) == crcs[c]

    with ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="fastmlgan-verify") as pool:
        for c, ok in enumerate(pool.map(chunk_ok, range(len(crcs)))):
            if not ok:
                raise CacheError(
                    f"{cache.path}: pixel rows {c * rows}-{min(n, (c + 1) * rows) - 1} fail their checksum "
                    "(corrupt or edited); delete the file to rebuild"
                )
