"""A decode step's attention on an NVIDIA GPU as one Pallas (Triton) kernel over the KV cache.

XLA runs a batch-1 decode step's attention as seven kernels a layer (the logits product, two softmax
reductions, the value product split over the slots, its sum, the step's own key, a concatenation):
19 us a layer for a 13 MB cache on an H100, ~0.6 ms of a 5.9 ms 7B step (docs/benchmarks.md). Here
one kernel reads each block of `BLOCK` cache slots once, for one (row, kv head) pair: the logits of
the pair's G query heads (padded to `ROWS`, Triton's smallest matmul), the block's softmax maximum
and sum, and its unnormalised output; a few small XLA operations then merge the blocks with the
step's own key and value (the cache is read before this step's write, as `decoder._attend_one` does).

Cache layout as the decoder's: keys and values `[B, K, H, S]`, slots last. Half precision only (a
float32 cache keeps XLA's products, which compute in full float32 where asked).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ROWS = 16                        # query rows a program multiplies: the kv head's G query heads, padded
BLOCKS = (128, 64, 32, 16)       # cache slots a program reads: the largest that divides the cache length
MASKED = -1e30                   # bias of a slot a query may not see (exp underflows to 0)


def nvidia_gpu(min_major: int = 8) -> bool:
    """An NVIDIA GPU of compute capability `min_major`.0 or later is the default backend (a ROCm GPU
    reports no such number)."""
    if jax.default_backend() != "gpu":
        return False
    major = str(getattr(jax.devices()[0], "compute_capability", "")).split(".")[0]
    return major.isdigit() and int(major) >= min_major


def block_size(slots: int) -> int | None:
    """Slots per program for a cache of `slots`: the largest of `BLOCKS` dividing it, else None."""
    return next((b for b in BLOCKS if slots % b == 0), None)


def applies(group: int, head_dim: int, slots: int, dtype) -> bool:
    """Whether `decode_attention` takes a decode step with these sizes: a single-device NVIDIA GPU
    (Ampere or later; a mesh keeps XLA's products), a bf16/fp16 cache, at most `ROWS` query heads per
    kv head, a power-of-two head dim from 16 to 256, and a cache length a multiple of 16."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and group <= ROWS
            and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and block_size(slots) is not None
            and nvidia_gpu() and jax.device_count() == 1)


def _block_kernel(q_ref, k_ref, v_ref, bias_ref, o_ref, m_ref, l_ref, *, scale: float):
    """One (row and kv head, slot block) program: q `[ROWS, H]`, k/v `[H, C]`, bias `[C]` ->
    unnormalised output `[ROWS, H]`, softmax maximum and sum `[ROWS]` (all float32)."""
    from jax.experimental.pallas import triton as plgpu
    logits = plgpu.dot(q_ref[...], k_ref[...]) * scale + bias_ref[...][None, :]
    top = jnp.max(logits, axis=1)
    weights = jnp.exp(logits - top[:, None])
    v = v_ref[...]
    o_ref[...] = plgpu.dot(weights.astype(v.dtype), v, trans_b=True)
    m_ref[...] = top
    l_ref[...] = jnp.sum(weights, axis=1)


def block_partials(grouped, k_cache, v_cache, bias, scale: float, interpret: bool = False):
    """grouped `[B, K, G, H]` (a kv head's query heads), caches `[B, K, H, S]`, bias `[B, S]` (0 or
    `MASKED`) -> per slot block: outputs `[B, K, n, G, H]`, maxima and sums `[B, K, n, G]` (float32)."""
    from jax.experimental import pallas as pl
    B, K, G, H = grouped.shape
    S = k_cache.shape[-1]
    C = block_size(S)
    n = S // C
    q = jnp.pad(grouped.reshape(B * K, G, H).astype(k_cache.dtype), ((0, 0), (0, ROWS - G), (0, 0)))
    kv_spec = pl.BlockSpec((None, H, C), lambda i, j: (i, 0, j))
    o, m, l = pl.pallas_call(
        functools.partial(_block_kernel, scale=scale),
        grid=(B * K, n),
        in_specs=[pl.BlockSpec((None, ROWS, H), lambda i, j: (i, 0, 0)), kv_spec, kv_spec,
                  pl.BlockSpec((None, C), lambda i, j: (i // K, j))],
        out_specs=[pl.BlockSpec((None, None, ROWS, H), lambda i, j: (i, j, 0, 0)),
                   pl.BlockSpec((None, None, ROWS), lambda i, j: (i, j, 0)),
                   pl.BlockSpec((None, None, ROWS), lambda i, j: (i, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((B * K, n, ROWS, H), jnp.float32),
                   jax.ShapeDtypeStruct((B * K, n, ROWS), jnp.float32),
                   jax.ShapeDtypeStruct((B * K, n, ROWS), jnp.float32)],
        interpret=interpret, name="llava_next_decode_attention",
    )(q, k_cache.reshape(B * K, H, S), v_cache.reshape(B * K, H, S), bias.astype(jnp.float32))
    return (o[:, :, :G].reshape(B, K, n, G, H), m[:, :, :G].reshape(B, K, n, G),
            l[:, :, :G].reshape(B, K, n, G))


def decode_attention(grouped, k_cache, v_cache, k_new, v_new, mask, scale: float, interpret: bool = False):
    """Attention of one query per row over the cache as it was plus the step's own key and value:
    grouped `[B, K, G, H]`, caches `[B, K, H, S]`, k_new/v_new `[B, K, 1, H]`, mask bool `[B, S]` (the
    slot being written excluded) -> float32 `[B, K, G, H]`, one softmax over all of it (float32)."""
    bias = jnp.where(mask, 0.0, MASKED)
    o, m, l = block_partials(grouped, k_cache, v_cache, bias, scale, interpret)
    own = jnp.einsum("bkgh,bkth->bkgt", grouped, k_new, preferred_element_type=jnp.float32)[..., 0] * scale
    top = jnp.maximum(m.max(axis=2), own)                                          # [B, K, G]
    w, w_own = jnp.exp(m - top[:, :, None]), jnp.exp(own - top)
    out = jnp.einsum("bkng,bkngh->bkgh", w, o) + w_own[..., None] * v_new.astype(jnp.float32)
    return out / (jnp.einsum("bkng,bkng->bkg", w, l) + w_own)[..., None]
