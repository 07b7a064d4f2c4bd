"""A decode step's attention over a float32 (or --dtype bfloat16) cache on the CPU: the native kernel
(`cpu_kernels.decode_attention`) against XLA's operations (the path without the kernels), in the
same process on the same inputs.

    .venv/bin/python benchmarks/decode_attention.py [--slots 2496] [--heads 16 4] [--head-dim 64]
        [--layers 8] [--repeats 30] [--dtype bfloat16]

Times `decoder._attend_new` in a chain of --layers layers (each with its own cache, so that no cache
level holds them all: 8 x 5.1 MB at batch 1 for the defaults, the mid-size model at one 480x640
image), for batch 1 and 4 and 1 and 4 new tokens a row (4: a prompt-lookup pass of 3 drafts); ms a
layer (median of --repeats) and the cache bytes it reads a second. Checks first that the two
agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=2496)
    parser.add_argument("--heads", type=int, nargs=2, default=(16, 4), metavar=("QUERY", "KV"))
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the cache's")
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    from llava_next_jax import cpu_kernels
    from llava_next_jax.modeling import decoder
    assert cpu_kernels.available(), "the native kernels did not build"
    N, K, H, S, L = *args.heads, args.head_dim, args.slots, args.layers
    native = cpu_kernels.decode_applies
    print(f"| batch | new tokens | XLA ms/layer | kernel ms/layer | XLA GB/s | kernel GB/s | kernel/XLA time |")
    print("|---|---|---|---|---|---|---|")
    for B in (1, 4):
        rng = np.random.default_rng(B)
        caches = [[jnp.asarray(rng.standard_normal((B, K, H, S)), args.dtype) for _ in range(2)] for _ in range(L)]
        for T in (1, 4):
            q = jnp.asarray(rng.standard_normal((B, T, N, H), np.float32))
            new = jnp.asarray(rng.standard_normal((B, K, T, H), np.float32))
            earlier = jnp.ones((B, T, S), bool)
            own = jnp.asarray(np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T)))
            times, outputs = {}, {}
            for name, applies in (("xla", lambda dtype: False), ("kernel", native)):
                cpu_kernels.decode_applies = applies    # read when the chain is traced
                def chain(q, caches):
                    for k, v in caches:
                        q = decoder._attend_new(q, k, v, new, new, earlier, own, H ** -0.5)
                    return q
                run = jax.jit(chain)
                outputs[name] = np.asarray(run(q, caches))
                samples = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    jax.block_until_ready(run(q, caches))
                    samples.append(time.perf_counter() - start)
                times[name] = statistics.median(samples) / L * 1e3
            cpu_kernels.decode_applies = native
            np.testing.assert_allclose(outputs["kernel"], outputs["xla"], rtol=1e-4, atol=1e-4)
            megabytes = 2 * B * K * H * S * np.dtype(caches[0][0].dtype).itemsize / 1e6
            print(f"| {B} | {T} | {times['xla']:.3f} | {times['kernel']:.3f} | {megabytes / times['xla']:.1f} | "
                  f"{megabytes / times['kernel']:.1f} | {times['kernel'] / times['xla']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
