"""`jax.jit` with XLA:CPU compiler options that our programs measured faster with, and calls bound to
the function's signature.

    DECODE:   region analysis in copy insertion. Without it XLA copied every KV-cache array on every
              decode step (read by attention, then updated in place); with it the cache is updated
              in place with no copy. And YNNPACK dot fusions off: XLA's own emitter ran the decode
              step's few-row matmuls faster (batch-4 decode 47 -> 66 tok/s together with the
              slots-last key layout, docs/benchmarks.md).

Other programs (prefill, training) keep XLA's defaults, YNNPACK included.

`jax.jit` caches a call that leaves a static argument at its default apart from one that passes the
same value, and compiles the program again for it (a greedy `generate`, which passes the prefill's
`samples`, and a beam search, which did not, compiled the same prefill twice); `jit` binds each
call's arguments to the signature, defaults filled in, so both are one program.

`matvec_blocks` says how to split a one-row product with a small float32 kernel: XLA:CPU streams
such a kernel up to 1.4x faster as a batch of products over row blocks of it (batch-1 decode).
`split_query_heads` says when a decode step's attention runs as one matrix-vector product per query
head rather than one matmul per kv-head group.

The options apply on the CPU backend only, looked up at the first call rather than at import, so
importing the library never starts a backend (`jax.distributed.initialize` must come first on a
multi-host run).
"""

from __future__ import annotations

import functools
import inspect

import jax

DECODE = {"xla_cpu_copy_insertion_use_region_analysis": True, "xla_cpu_experimental_ynn_fusion_type": ""}


def jit(fn, cpu_options: dict | None = None, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)`, compiled with `cpu_options` when the default backend is CPU, each
    call's arguments bound to `fn`'s signature with its defaults (module docstring).

    The result is called like the jitted function and has its `lower` and `_cache_size`."""
    jitted = {}
    signature = inspect.signature(fn)

    def get():
        if not jitted:
            options = cpu_options if jax.default_backend() == "cpu" else None
            jitted["fn"] = jax.jit(fn, compiler_options=options, **jit_kwargs)
        return jitted["fn"]

    def bound(args, kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        return arguments.args, arguments.kwargs

    @functools.wraps(fn)
    def call(*args, **kwargs):
        args, kwargs = bound(args, kwargs)
        return get()(*args, **kwargs)

    def lower(*args, **kwargs):
        args, kwargs = bound(args, kwargs)
        return get().lower(*args, **kwargs)
    call.lower = lower
    call._cache_size = lambda: get()._cache_size()
    return call


MIB = 1 << 20


def matvec_blocks(rows: int, kernel: jax.Array) -> int:
    """Into how many row blocks to split `kernel` `[in, out]` for a product with `rows` input rows.

    One input row, a float32 kernel of at most 16 MiB, the CPU backend: blocks of about 1 MiB, 2 to 8
    of them (a batch-1 decode step's projections of the mid-size model stream at 44 GB/s instead of
    33). Anything else: 1, one plain matmul (larger kernels, bf16 and several rows measured no faster
    split, or slower: several rows split ran XLA:CPU's batched matmul at a tenth of the speed).
    """
    size = kernel.size * kernel.dtype.itemsize
    if rows != 1 or kernel.dtype != jax.numpy.float32 or size > 16 * MIB or jax.default_backend() != "cpu":
        return 1
    blocks = min(8, max(2, size // MIB))
    while kernel.shape[0] % blocks:
        blocks //= 2
    return blocks


def split_query_heads(group: int) -> bool:
    """Whether a decode step multiplies each query head of a kv-head group with the cache on its own.

    On the CPU with groups of at most 4: XLA:CPU's matrix-vector products stream the cache faster
    than its few-row matmuls (decode attention of the mid-size model: batch 1 0.63 -> 0.40 ms per
    layer, batch 4 2.08 -> 1.52; Mistral-7B's widths at 4k slots 2.90 -> 2.33 ms at batch 1). With
    groups of 8 the cache is read too many times (3.23 -> 3.94 ms), so one matmul stays.
    """
    return group <= 4 and jax.default_backend() == "cpu"
