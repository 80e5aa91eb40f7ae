"""Reading IDX files, the format of MNIST and Fashion-MNIST (LeCun's "idx3-ubyte", "idx1-ubyte").

The format: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then
each dimension as a big-endian uint32, then the values in row-major order. Distributions ship
the files gzipped (Debian's ``dataset-fashion-mnist``, the original site) or extracted
(torchvision's ``raw/`` folder); both read the same. Why our own reader: torchvision's wants its
own folder layout and raises tracebacks on a damaged file; ours reads any of them and turns a
bad file into one line naming it.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from d3tune.data.images import one_line
from d3tune.errors import UsageError

UBYTE = 0x08
MAGIC_IMAGES = 0x00000803  # 2051: uint8, 3 dimensions (N, rows, cols)
MAGIC_LABELS = 0x00000801  # 2049: uint8, 1 dimension (N,)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 array of ``ndim`` dimensions from an IDX file, gzipped when its name ends in .gz."""
    bad = f"{path} is not an IDX file of {ndim}-D uint8 data"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path} not found") from None
    except OSError as e:  # unreadable, or gzip's BadGzipFile (an OSError) / EOFError below
        raise UsageError(f"{bad}: {type(e).__name__}: {one_line(e)}") from None
    except (EOFError, zlib.error) as e:
        raise UsageError(f"{bad}: truncated or corrupt gzip stream ({one_line(e) or 'EOF'})") \
            from None
    header = 4 + 4 * ndim
    if len(raw) < 4:
        raise UsageError(f"{bad}: {len(raw)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    expected = (UBYTE << 8) | ndim
    if magic != expected:
        raise UsageError(f"{bad}: magic number {magic} (0x{magic:08x}), expected {expected} "
                         f"(0x{expected:08x})")
    if len(raw) < header:
        raise UsageError(f"{bad}: truncated header ({len(raw)} of {header} bytes)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != size:
        raise UsageError(f"{bad}: header says {'x'.join(map(str, dims))} = {size} values, the file "
                         f"holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims).copy()


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzipped for a .gz name). Tests and tools make small real
    files with it; the inverse of ``read_idx``."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    data = (((UBYTE << 8) | a.ndim).to_bytes(4, "big")
            + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes())
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
