"""The native few-row matmul (`cpu_kernels.fewrow_matmul`) by row count, on the mid-size model's
decode-step kernels: ms per product and the GB/s of weights it streams.

    .venv/bin/python benchmarks/fewrow_matmul.py [--rows 2 3 4 5 6 7 8] [--repeats 30]

Each product jitted alone, float32, median of --repeats calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import median_seconds  # noqa: E402   (it puts the repository on the path too)

SHAPES = ((1024, 4096), (4096, 1024), (1024, 32064))   # MLP up/gate, MLP down, lm_head


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(2, 9)))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    from llava_next_jax import cpu_kernels
    rng = np.random.default_rng(0)
    product = jax.jit(cpu_kernels.fewrow_matmul)
    print("| kernel | " + " | ".join(f"{r} rows ms (GB/s)" for r in args.rows) + " |")
    print("|---|" + "---|" * len(args.rows))
    for K, N in SHAPES:
        w = jnp.asarray(rng.standard_normal((K, N)), jnp.float32)
        cells = []
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, K)), jnp.float32)
            run = lambda: jax.block_until_ready(product(x, w))
            run()
            seconds = median_seconds(run, args.repeats)
            cells.append(f"{seconds * 1e3:.2f} ({w.nbytes / seconds / 1e9:.0f})")
        print(f"| `[{K}, {N}]` | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
