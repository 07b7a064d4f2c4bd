"""Prefill attention of one decoder layer, each of our implementations (`decoder.attention_implementation`)
beside PyTorch's `scaled_dot_product_attention` (what HF runs) on the same inputs.

    .venv/bin/python benchmarks/prefill_attention.py [--tokens 3072] [--heads 32 8] [--head-dim 128]
        [--dtype bfloat16] [--repeats 10]

Checks first, on two rows (the second left-padded, as `generate` pads a short prompt): each
implementation against float32 attention on the same inputs, ‖out - ref‖ / ‖ref‖ over the rows'
real queries. Then times one row of --tokens queries (median of --repeats after a warm-up; compile
time apart). "cudnn" runs on a GPU only; "native-float32" (the native kernel computing bf16 in float32)
where bf16 "native" runs on AMX tiles; an implementation that fails prints its error and the
others go on. Defaults: Mistral-7B's heads at the prompt bucket of one 672x672 image (3072).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}   # relative error against float32: rounding of the inputs


def inputs(rng, B, T, N, K, H, pad):
    """q `[B, T, N, H]`, k/v `[B, K, T, H]`, and a causal mask `[B, T, T]` whose last row starts with
    `pad` padding slots."""
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for shape in ((B, T, N, H), (B, K, T, H), (B, K, T, H)))
    valid = np.ones((B, T), bool)
    valid[-1, :pad] = False
    mask = np.tril(np.ones((T, T), bool))[None] & valid[:, None, :]
    return q, k, v, mask, valid


def ours(implementation: str, scale: float):
    """`decoder.attention` with `implementation`; "native-float32": the native kernel with the AMX one
    switched off (bfloat16 computed in float32)."""
    import jax
    from llava_next_jax.modeling import decoder
    os.environ["LLAVA_NEXT_AMX"] = "0" if implementation == "native-float32" else "1"  # read when traced, below
    os.environ["LLAVA_NEXT_ATTENTION"] = implementation.split("-")[0]
    fn = jax.jit(lambda q, k, v, m: decoder.attention(q, k, v, m, scale, causal_prefix=True, fused=True))
    return lambda *a: jax.block_until_ready(fn(*a))


def torch_sdpa(q, k, v, device: str, dtype: str):
    """A call of PyTorch's causal SDPA (GQA) on copies of q `[B, T, N, H]`, k/v `[B, K, T, H]`."""
    import torch
    import torch.nn.functional as F
    q, k, v = (torch.from_numpy(np.array(a, np.float32)).to(device, getattr(torch, dtype)) for a in (q, k, v))
    q = q.transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def timed(fn, repeats, sync=lambda: None):
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("QUERY", "KV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    import torch
    from llava_next_jax.modeling import decoder
    (N, K), H, T = args.heads, args.head_dim, args.tokens
    scale = H ** -0.5
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    q, k, v, mask, valid = inputs(rng, 2, 512, N, K, H, pad=37)
    reference = np.asarray(decoder._attend(*(jnp.asarray(a) for a in (q, k, v, mask)), scale))
    check = lambda out: (np.linalg.norm((np.asarray(out, np.float32) - reference)[valid])
                         / np.linalg.norm(reference[valid]))
    print(f"# {jax.devices()[0].device_kind}, {args.dtype}, heads {N}/{K}, head dim {H}, {T} queries")
    print("| implementation | error vs float32 | first call s | ms |")
    print("|---|---|---|---|")
    big = [jnp.asarray(a, dtype) for a in inputs(rng, 1, T, N, K, H, pad=0)[:3]]
    big_mask = jnp.asarray(np.tril(np.ones((T, T), bool))[None])
    usable = []
    from llava_next_jax import cpu_kernels
    native = ["native", "native-float32"] if cpu_kernels.amx_applies(*big) else ["native"]
    for implementation in ["blocks", "xla"] + (["cudnn"] if gpu else native):
        try:
            fn = ours(implementation, scale)
            error = check(fn(*(jnp.asarray(a, dtype) for a in (q, k, v)), jnp.asarray(mask)))
            first, median = timed(lambda: fn(*big, big_mask), args.repeats)
            if error > TOLERANCE[args.dtype]:
                raise ValueError(f"error {error:.1e} over the {args.dtype} tolerance {TOLERANCE[args.dtype]}")
            usable.append(implementation)
            print(f"| {implementation} | {error:.1e} | {first:.2f} | {median * 1e3:.2f} |", flush=True)
        except Exception as e:  # one failing implementation must not hide the others' numbers
            print(f"| {implementation} | failed: {type(e).__name__}: {str(e)[:300]} | | |", flush=True)
    device = "cuda" if gpu and torch.cuda.is_available() else "cpu"
    sdpa = torch_sdpa(*big, device, args.dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        first, median = timed(sdpa, args.repeats, sync)
    print(f"| torch SDPA ({device}, is_causal) | | {first:.2f} | {median * 1e3:.2f} |")
    print(f"usable: {' '.join(usable)}")


if __name__ == "__main__":
    main()
