"""Command line of `scripts/convert_torch_weights.py` (also the `llava-next-convert` entry point)."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

from . import checkpoint, convert
from .config import LlavaNextConfig


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def convert_checkpoint(src_dir: str, out_dir: str, dtype: str | None = None, log=print) -> dict:
    """Converts SRC_DIR into OUT_DIR; returns a summary (tensors, bytes, seconds, peak RSS, largest tensor)."""
    start = time.time()
    config = LlavaNextConfig.from_file(src_dir)
    tensors = convert.iter_tensors(src_dir, config, dtype)   # checks names and shapes before any is read
    stats = {"tensors": 0, "bytes": 0, "largest_tensor_bytes": 0}

    def on_tensor(path, tensor: np.ndarray):
        stats["tensors"] += 1
        stats["bytes"] += tensor.nbytes
        stats["largest_tensor_bytes"] = max(stats["largest_tensor_bytes"], tensor.nbytes)

    copied = checkpoint.save_streaming(out_dir, tensors, src_dir, dict(source=os.path.abspath(src_dir),
                                                                       dtype=dtype or "as stored"), on_tensor)
    stats.update(seconds=time.time() - start, peak_rss_bytes=peak_rss_bytes(), side_files=copied)
    log(f"converted {stats['tensors']} tensors ({stats['bytes'] / 2**30:.3f} GiB) in {stats['seconds']:.1f} s; "
        f"largest {stats['largest_tensor_bytes'] / 2**30:.3f} GiB; peak RSS {stats['peak_rss_bytes'] / 2**30:.3f} GiB; "
        f"copied {', '.join(copied)}")
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src_dir", help="HF LLaVA-NeXT checkpoint directory")
    parser.add_argument("out_dir", help="where to write the converted checkpoint: a new or empty directory, "
                        "or an earlier conversion (replaced once this one has succeeded)")
    parser.add_argument("--dtype", choices=sorted(convert.DTYPES), default=None,
                        help="store parameters in this dtype (default: as stored in SRC_DIR)")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.src_dir, args.out_dir, args.dtype)
    except (ValueError, OSError, ImportError) as e:   # OSError's message names its path
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
