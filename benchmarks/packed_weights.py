"""Packed bfloat16 weights (`packed_weights`) against the bf16 kernels they replace, on the CPU.

    .venv/bin/python benchmarks/packed_weights.py [--rows 1 4 8] [--kernels 20] [--repeats 10]

Decode products (`decoder.matmul` of 1 to 8 rows): a chain of --kernels distinct kernels per shape (the
mid-size model's MLP and lm_head shapes; 20 of `[1024, 4096]` are 168 MB of bf16, more than the
caches hold, as a decode step's ~320 MB), one jitted call, the bf16 kernels and the packed ones in
turns; ms per kernel, the GB/s each reads, and the speed-up. Then a prefill's product (2432 rows) on
the bf16 kernel, on the packed kernel (AMX tiles where the CPU has them: panels packed from it), and
unpacked first; and the time `pack` takes. Medians of --repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import median_seconds  # noqa: E402   (it puts the repository on the path too)

SHAPES = ((1024, 4096), (4096, 1024), (1024, 32064))   # MLP up/gate, MLP down, lm_head


def turns(runs: dict, repeats: int) -> dict:
    """Median seconds of each run, the runs taking turns (load from other work falls on all)."""
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(median_seconds(run, 1))
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--kernels", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    from llava_next_jax import cpu_kernels, packed_weights
    from llava_next_jax.modeling import decoder
    rng = np.random.default_rng(0)
    chain = jax.jit(lambda x, kernels: [decoder.matmul(x, k) for k in kernels])
    print("| kernel x count | rows | bf16 ms a kernel (GB/s) | packed ms a kernel (GB/s) | speed-up |")
    print("|---|---|---|---|---|")
    for K, N in SHAPES:
        count = max(1, args.kernels * 1024 * 4096 // (K * N))
        bf16 = [jnp.asarray((rng.standard_normal((K, N), np.float32) * 0.02).astype(jnp.bfloat16))
                for _ in range(count)]
        packed = [packed_weights.pack(w) for w in bf16]
        for rows in args.rows:
            x = jnp.asarray(rng.standard_normal((rows, K)), jnp.bfloat16)
            runs = {name: (lambda ks=ks: jax.block_until_ready(chain(x, ks))) for name, ks in
                    (("bf16", bf16), ("packed", packed))}
            for run in runs.values():
                run()
            seconds = turns(runs, args.repeats)
            cell = lambda name, ks: (f"{seconds[name] / count * 1e3:.3f} "
                                     f"({sum(k.nbytes for k in ks) / seconds[name] / 1e9:.1f})")
            print(f"| `[{K}, {N}]` x {count} | {rows} | {cell('bf16', bf16)} | {cell('packed', packed)} | "
                  f"{seconds['bf16'] / seconds['packed']:.2f}x |", flush=True)

    K, N = 1024, 4096
    w = jnp.asarray((rng.standard_normal((K, N), np.float32) * 0.02).astype(jnp.bfloat16))
    start = time.perf_counter()
    packed = packed_weights.pack(w)
    pack_s = time.perf_counter() - start
    x = jnp.asarray(rng.standard_normal((2432, K)), jnp.bfloat16)
    product = jax.jit(decoder.matmul)
    unpacked = jax.jit(lambda x, p: decoder.matmul(x, packed_weights.unpack(p)))
    runs = {"bf16": lambda: jax.block_until_ready(product(x, w)),
            "packed": lambda: jax.block_until_ready(product(x, packed)),
            "unpacked first": lambda: jax.block_until_ready(unpacked(x, packed))}
    for run in runs.values():
        run()
    seconds = turns(runs, args.repeats)
    where = "AMX tiles" if cpu_kernels.packed_gemm_applies(2432, x.dtype, K) else "unpacked first"
    print(f"\nprefill product [2432, {K}] @ [{K}, {N}], ms: " + ", ".join(
        f"{name} {s * 1e3:.2f}" for name, s in seconds.items()) + f" (the packed one: {where})")
    print(f"pack [{K}, {N}]: {pack_s * 1e3:.0f} ms ({pack_s / w.size * 1e9:.1f} ns a weight, one thread)")


if __name__ == "__main__":
    main()
