"""Decoding folders of image files (GTSRB's PPMs, Tiny-ImageNet's JPEGs) into one uint8 array.

Why threads: PIL releases the GIL while decoding and resampling, so a pool decodes tens of
thousands of small files in seconds; chunks amortise the per-task overhead. A missing or
unreadable file is the user's data, so it becomes a one-line UsageError naming it.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from d3tune.errors import UsageError

CHUNK = 256  # images per thread-pool task


def one_line(text: object) -> str:
    return " ".join(str(text).split())


def _decode_into(out: np.ndarray, paths: Sequence[Path], start: int, side: int, name: str,
                 listed_in: str) -> None:
    from PIL import Image

    for i, p in enumerate(paths, start):
        try:
            with Image.open(p) as im:
                im = im.convert("RGB")  # some files are greyscale or palette images
                if im.size != (side, side):
                    im = im.resize((side, side), Image.Resampling.BILINEAR)
                out[i] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
        except FileNotFoundError:
            raise UsageError(f"{name}: {p} not found (listed in {listed_in})") from None
        except Exception as e:  # noqa: BLE001 -- a bad image file is the user's, not a bug
            raise UsageError(f"{name}: {p} is not a readable image: {type(e).__name__}: "
                             f"{one_line(e)}") from None


def decode_images(paths: Sequence[Path], side: int, name: str, listed_in: str) -> np.ndarray:
    """(N, 3, side, side) uint8, every image converted to RGB and resized to side x side."""
    out = np.empty((len(paths), 3, side, side), dtype=np.uint8)
    starts = range(0, len(paths), CHUNK)
    workers = max(1, min(32, os.cpu_count() or 1, len(starts)))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"{name}-decode")
    try:
        futures = [pool.submit(_decode_into, out, paths[s:s + CHUNK], s, side, name, listed_in)
                   for s in starts]
        for fut in futures:
            fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return out
