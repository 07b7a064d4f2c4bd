"""The Llama-family decoder (Llama, Mistral, Qwen2): pre-norm blocks, RoPE, GQA, optional KV cache.

Params mirror HF names under `language_model/`: `embed_tokens/embedding [V, D]`, `norm/scale [D]`,
and `layers/{i}/...` (`layers/3/self_attn/q_proj/kernel [D, N*H]` is HF's `layers.3.self_attn.q_proj`).

Shapes: B batch, T query positions, S key positions (T without a cache, the cache length with one),
D hidden, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import cpu_kernels, xla_cpu
from ..config import RopeConfig, TextConfig
from . import activations

Params = dict[str, Any]


def full_float32(fn):
    """`fn`, whose `dtype` argument is the compute dtype, with its matmuls computed in full float32 on
    GPUs and TPUs when that dtype is float32, as PyTorch computes HF's (JAX alone lets a GPU round
    float32 inputs to TF32 and a TPU to bf16 passes). bf16/fp16 compute and the CPU (exact float32
    already) are left as they are. Decided when `fn` is traced."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if jax.default_backend() == "cpu" or jnp.dtype(bound.arguments["dtype"]) != jnp.float32:
            return fn(*args, **kwargs)
        with jax.default_matmul_precision("float32"):
            return fn(*args, **kwargs)
    return wrapped


class RMSNorm(nn.Module):
    """`scale * (x / rms(x))`, the normalisation computed in float32 and cast back before the scale."""
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale * x32.astype(x.dtype)


# Rows a product has at least on a GPU (fewer are padded with zeros). XLA's GPU compiler rewrites a
# one-row product whose kernel is small enough (a batch-1 decode step's k/v projections, [4096, 1024])
# into an elementwise multiply that writes a kernel-sized array of bf16 products to memory, then sums
# it: 32 us a layer on an H100 where the matmul takes ~6, 0.9 ms of a 6.8 ms 7B decode step
# (docs/benchmarks.md). A product of two or more rows stays a matmul.
GPU_MIN_ROWS = 2


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x [..., in] @ kernel [in, out]`, run the fastest way measured for its shape on this backend.

    On a GPU, one row padded to `GPU_MIN_ROWS`. On the CPU (docs/benchmarks.md): 2 to 8 float32 rows
    or 1 to 8 bfloat16 rows (a decode step) on the native kernel of `cpu_kernels`
    (`cpu_kernels.applies`); 256 rows or more on oneDNN's gemm where it is installed, bfloat16 from 9
    rows on AMX tiles where the CPU has them (`cpu_kernels.gemm_applies`); one float32 row as partial
    products over row blocks of the kernel where `xla_cpu.matvec_blocks` says so (partial sums in
    float32). Anything else: XLA's matmul (on the CPU with the gradient of `_cpu_product`)."""
    rows = int(np.prod(x.shape[:-1]))
    if rows < GPU_MIN_ROWS and jax.default_backend() == "gpu":
        padded = jnp.pad(x.reshape(rows, -1), ((0, GPU_MIN_ROWS - rows), (0, 0)))
        return (padded @ kernel)[:rows].reshape(*x.shape[:-1], -1)
    if cpu_kernels.applies(rows, x.dtype, kernel):
        return cpu_kernels.fewrow_matmul(x.reshape(rows, -1), kernel).reshape(*x.shape[:-1], -1)
    if cpu_kernels.gemm_applies(rows, x.dtype, kernel):
        return cpu_kernels.gemm(x.reshape(rows, -1), kernel).reshape(*x.shape[:-1], -1)
    blocks = xla_cpu.matvec_blocks(rows, kernel)
    if blocks == 1:
        if jax.default_backend() == "cpu":
            return _cpu_product(x.reshape(rows, -1), kernel).reshape(*x.shape[:-1], -1)
        return x @ kernel
    parts = jnp.einsum("...ci,cio->...co", x.reshape(*x.shape[:-1], blocks, -1),
                       kernel.reshape(blocks, -1, kernel.shape[-1]), preferred_element_type=jnp.float32)
    return parts.sum(axis=-2).astype(x.dtype)


@jax.custom_vjp
def _cpu_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x [rows, in] @ kernel [in, out]`, whose kernel gradient is `x.T @ g` with `x.T` written out first.

    Left to itself, XLA:CPU computes that gradient as one product contracting both operands' row
    axis, ~90 GFLOP/s on YNNPACK and on its own emitter alike; transposing x (an optimization
    barrier keeps XLA from folding the transpose back into the product) makes it a plain product,
    ~180 GFLOP/s on YNNPACK, with the forward products ~1.8x faster on YNNPACK too. A mid-size
    fine-tuning step: 32 s -> 22 s (docs/benchmarks.md)."""
    return x @ kernel


def _cpu_product_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _cpu_product_bwd(saved, g):
    x, kernel = saved
    return g @ kernel.T, jax.lax.optimization_barrier(x.T) @ g


_cpu_product.defvjp(_cpu_product_fwd, _cpu_product_bwd)


class Dense(nn.Module):
    """`nn.Dense` with its parameters (`kernel [in, out]`, optional `bias`), the product by `matmul`."""
    features: int
    use_bias: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = matmul(x, kernel)
        return y if bias is None else y + bias


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies `[H/2]` in float32, with `linear`, `llama3` or `yarn` scaling applied (as
    transformers' `modeling_rope_utils`; yarn's attention factor is applied by `rope_tables`)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (rope.theta ** exponent.astype(np.float64))).astype(np.float32)
    if rope.type == "yarn":
        # the dims turning fewer than beta_slow times over the original context are interpolated
        # (divided by factor), those turning more than beta_fast times kept, a linear ramp between
        def correction_dim(rotations):
            return head_dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
                2 * math.log(rope.theta))
        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)
        interpolated = (inv_freq / np.float32(rope.factor)).astype(np.float32)
        return (interpolated * (1 - extrapolation) + inv_freq * extrapolation).astype(np.float32)
    if rope.type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = (2 * np.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq).astype(np.float32)
        smooth = ((rope.original_max_position_embeddings / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / rope.factor + smooth * scaled).astype(np.float32)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, H]` (float32) for integer `positions [B, T]`; NeoX layout (halves repeated); both
    times `scale` (yarn's attention factor) unless 1."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * np.float32(scale), jnp.sin(angles) * np.float32(scale)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, heads, H]` rotated by position: `x * cos + rotate_half(x) * sin` (rotate_half = [-x2, x1])."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


# Queries per block of `attention` for one row, and for batches of two or more rows: the fastest
# measured on a 2-core CPU (one layer of 2432 slots; docs/benchmarks.md): 128 at batch 1 (64: same,
# 256: 1.4x slower); 64 at batches 2, 4 and 8 (128: 1.1-1.2x slower; 32 at batch 4 and 8: 1.1-1.2x).
QUERY_BLOCK, BATCH_QUERY_BLOCK = 128, 64


def _group(q, K):
    """q `[B, Tq, N, H]` -> `[B, K, G*Tq, H]`: the query heads of each kv head (GQA) side by side."""
    B, Tq, N, H = q.shape
    return q.reshape(B, Tq, K, N // K, H).transpose(0, 2, 3, 1, 4).reshape(B, K, N // K * Tq, H)


def _ungroup(out, Tq):
    """The inverse of `_group`: `[B, K, G*Tq, H]` -> `[B, Tq, N, H]`."""
    B, K, GT, H = out.shape
    return out.reshape(B, K, GT // Tq, Tq, H).transpose(0, 3, 1, 2, 4).reshape(B, Tq, -1, H)


def _attend(q, k, v, mask, scale):
    """Softmax attention, q `[B, Tq, N, H]`, k/v `[B, K, Sk, H]`, mask `[B, Tq, Sk]` -> `[B, Tq, N, H]`.

    Query heads are grouped by their kv head (GQA) into one `[G*Tq, H] x [H, Sk]` matmul per (row,
    kv head). Logits, softmax weights and their sums are float32; the division by the sum happens
    after the value matmul, on `[.., H]` instead of `[.., Sk]` (one pass less over the weights).
    A query that may see nothing (a left pad) gets zeros, as in HF's SDPA path: its output still
    reaches the loss, whose first real token of a left-padded row is predicted from the last pad.
    """
    B, Tq, N, H = q.shape
    K, Sk = k.shape[1], k.shape[2]
    logits = jnp.einsum("bkmh,bksh->bkms", _group(q, K), k, preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, None, None], logits.reshape(B, K, N // K, Tq, Sk) * scale, jnp.finfo(jnp.float32).min)
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
    total = weights.sum(axis=-1, keepdims=True)                                   # [B, K, G, Tq, 1]
    out = jnp.einsum("bkms,bksh->bkmh", weights.astype(v.dtype).reshape(B, K, -1, Sk), v,
                     preferred_element_type=jnp.float32)
    out = (out.reshape(B, K, N // K, Tq, H) / total).reshape(B, K, -1, H).astype(q.dtype)
    return jnp.where(mask.any(axis=-1)[:, :, None, None], _ungroup(out, Tq), 0)


def _attend_new(q, k_cache, v_cache, k_new, v_new, earlier, own, scale):
    """Decode-step attention for T new queries per row, q `[B, T, N, H]`: over the cache as it was
    (keys and values `[B, K, H, S]`; `earlier` `[B, T, S]` the slots each query may see there, none of
    the T being written) plus this step's own keys and values (`[B, K, T, H]`; `own` `[B, T, T]`,
    causal), one softmax over both. T = 1 is a decode step; T > 1 checks drafted tokens
    (`generate`'s prompt lookup). Reading the cache before this step's write lets XLA update it in
    place afterwards, with no copy of it per step. On a single-device CPU (a float32 cache, or bf16
    kept as uint16 bits: `cache_dtype`), one native kernel call (`cpu_kernels.decode_attention`).
    """
    if cpu_kernels.decode_applies(k_cache.dtype):
        return cpu_kernels.decode_attention(q, k_cache, v_cache, k_new, v_new, earlier, own, scale)
    if k_cache.dtype == jnp.uint16:   # bf16 bits (`cache_dtype`), the kernels since switched off
        k_cache, v_cache = (jax.lax.bitcast_convert_type(c, jnp.bfloat16) for c in (k_cache, v_cache))
    B, T, N, H = q.shape
    K = k_cache.shape[1]
    G = N // K
    grouped = _group(q, K)                                                        # [B, K, G*T, H]
    split = xla_cpu.split_query_heads(G * T)
    low = jnp.finfo(jnp.float32).min
    cached = _group_matmul("bkgh,bkhs->bkgs", grouped, k_cache, split).reshape(B, K, G, T, -1) * scale
    cached = jnp.where(earlier[:, None, None], cached, low)
    mine = jnp.einsum("bkmh,bkth->bkmt", grouped, k_new, preferred_element_type=jnp.float32)
    mine = jnp.where(own[:, None, None], mine.reshape(B, K, G, T, T) * scale, low)
    top = jnp.maximum(cached.max(axis=-1, keepdims=True), mine.max(axis=-1, keepdims=True))
    w_cached, w_mine = jnp.exp(cached - top), jnp.exp(mine - top)
    total = (w_cached.sum(axis=-1, keepdims=True) + w_mine.sum(axis=-1, keepdims=True)).reshape(B, K, G * T, 1)
    out = _group_matmul("bkgs,bkhs->bkgh", w_cached.reshape(B, K, G * T, -1).astype(v_cache.dtype), v_cache, split)
    out = out + jnp.einsum("bkmt,bkth->bkmh", w_mine.reshape(B, K, G * T, T), v_new.astype(jnp.float32))
    return _ungroup((out / total).astype(q.dtype), T)


def _group_matmul(spec: str, grouped: jax.Array, cache: jax.Array, split: bool) -> jax.Array:
    """`einsum(spec)` of `grouped` `[B, K, G, X]` (a kv head's G query heads) with a `cache` array
    `[B, K, H, S]`, in float32: one batched matmul, or with `split` one matrix-vector product per
    query head of the group, stacked on axis 2."""
    if not split:
        return jnp.einsum(spec, grouped, cache, preferred_element_type=jnp.float32)
    one = spec.replace("g", "")
    return jnp.stack([jnp.einsum(one, grouped[:, :, g], cache, preferred_element_type=jnp.float32)
                      for g in range(grouped.shape[2])], axis=2)


def _query_positions(last_only: bool) -> slice:
    """The positions a layer computes its output at: all, or the last alone (a prefill's last layer)."""
    return slice(-1, None) if last_only else slice(None)


def _after(x: jax.Array, earlier: jax.Array) -> jax.Array:
    """x, unchanged, but computed only once `earlier` (`[B, T, N, H]`, like x) is: a data dependency.

    XLA:CPU runs independent operations side by side; for the query blocks of `attention` that
    meant several blocks' logits competing for the same cores and caches, each block about twice
    as slow as alone (docs/benchmarks.md). Adding zero times a finite number from the previous
    block's output (one value per row and head, so it stays on the row's and head's device on a
    mesh) orders the blocks at the cost of one add over the query block.
    """
    last = earlier[:, :1, :, :1].astype(x.dtype)
    return x + jnp.where(jnp.isfinite(last), last, 0) * 0


ATTENTION_IMPLEMENTATIONS = ("blocks", "cudnn", "native", "xla")


def attention_implementation(dtype, head_dim: int) -> str:
    """How `attention` computes causal attention over a prompt: "cudnn" on an NVIDIA GPU of compute
    capability 8.0 or later, in bf16/fp16, with a head dim that is a multiple of 8 up to 128 (cuDNN's
    flash attention through `jax.nn.dot_product_attention`), for a prefill only (passes whose gradient
    may be taken run the blocks); "native" on a single-device CPU with the native kernels built
    (`cpu_kernels.flash_attention`: tiles of logits kept in the core's caches), for every pass, the
    vision tower's too (`native_attention`: its gradient on the backward kernel). Else
    "blocks" (causal query blocks: about half the work of one product, and half the softmax weights a
    backward pass keeps). "xla", one `_attend` over all queries, only when asked for.

    The environment variable LLAVA_NEXT_ATTENTION (blocks, cudnn, native or xla), read when a program
    is traced, overrides the choice, e.g. `xla` where a cuDNN build rejects a shape.
    """
    chosen = os.environ.get("LLAVA_NEXT_ATTENTION", "")
    if chosen:
        if chosen not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"LLAVA_NEXT_ATTENTION={chosen!r}; expected one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if chosen == "native" and not cpu_kernels.flash_applies():
            raise ValueError("LLAVA_NEXT_ATTENTION=native needs a single-device CPU backend with the native "
                             "kernels built (see cpu_kernels)")
        return chosen
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if _flash_gpu() and half and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "native" if cpu_kernels.flash_applies() else "blocks"


def _flash_gpu() -> bool:
    """An NVIDIA GPU with cuDNN's flash attention: compute capability 8.0 (Ampere) or later. A ROCm
    GPU reports no such number."""
    if jax.default_backend() != "gpu":
        return False
    major = str(getattr(jax.devices()[0], "compute_capability", "")).split(".")[0]
    return major.isdigit() and int(major) >= 8


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def native_attention(q, k, v, mask, scale):
    """`_attend` on the CPU kernel (`cpu_kernels.flash_attention`), differentiable by the backward kernel
    (`cpu_kernels.flash_attention_backward`, from the forward pass's log-sum-exp), so a training pass
    keeps no softmax weights between its forward and backward passes. A query that sees no key gets
    zeros, as from `_attend`."""
    return cpu_kernels.flash_attention(q, k, v, mask, scale)


def _native_attention_forward(q, k, v, mask, scale):
    out, lse = cpu_kernels.flash_attention(q, k, v, mask, scale, with_lse=True)
    return out, (q, k, v, mask, out, lse)


def _native_attention_backward(scale, residuals, cotangent):
    q, k, v, mask, out, lse = residuals
    return (*cpu_kernels.flash_attention_backward(q, k, v, mask, scale, out, lse, cotangent), None)


native_attention.defvjp(_native_attention_forward, _native_attention_backward)


def _attend_cudnn(q, k, v, mask, scale):
    """`_attend` through cuDNN's fused flash attention (causal tiles skipped; `mask` as a bias)."""
    out = jax.nn.dot_product_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), mask=mask[:, None], scale=scale,
                                       is_causal=True, implementation="cudnn")
    return out.astype(q.dtype)


def _attend_blocks(q, k, v, mask, scale):
    """`_attend` over causal query blocks (queries in slots [0, T)): a block [i, i+b) can only see keys
    [0, i+b), so each attends to that prefix alone, which skips about half the work, and blocks run one
    after another (`_after`) so that on a CPU one block's logits (`[B, K, G*b, i+b]`) stay in cache."""
    B, T = q.shape[:2]
    block = QUERY_BLOCK if B == 1 else BATCH_QUERY_BLOCK
    if T <= block:
        return _attend(q, k, v, mask, scale)
    blocks = []
    for start in range(0, T, block):
        end = min(start + block, T)
        q_block = q[:, start:end] if not blocks else _after(q[:, start:end], blocks[-1])
        blocks.append(_attend(q_block, k[:, :, :end], v[:, :, :end], mask[:, start:end, :end], scale))
    return jnp.concatenate(blocks, axis=1)


def attention(q, k, v, mask, scale, causal_prefix: bool, fused: bool = False):
    """Attention over q `[B, T, N, H]`, k/v `[B, K, S, H]` with mask `[B, T, S]`, as
    `attention_implementation` chooses.

    causal_prefix: the queries sit in slots [0, T) (a forward pass or a prefill): the native CPU kernel
    (its gradient the backward kernel), else query blocks (`_attend_blocks`). fused (a prefill,
    no gradient taken): on a GPU in half precision, cuDNN's flash attention, which skips the same half.
    Otherwise one `_attend`.
    """
    implementation = attention_implementation(q.dtype, q.shape[-1]) if causal_prefix else "xla"
    if implementation == "cudnn" and fused:
        return _attend_cudnn(q, k, v, mask, scale)
    if implementation == "native":
        return native_attention(q, k, v, mask, scale)
    if implementation == "xla":
        return _attend(q, k, v, mask, scale)
    return _attend_blocks(q, k, v, mask, scale)


def _write_cache(full: jax.Array, new: jax.Array, slot, prefill: bool) -> jax.Array:
    """A layer's cache `[B, K, H, S]` with keys or values `new [B, K, T, H]` (its dtype) at slots
    [slot, slot + T): a prefill's on the CPU kernel where it runs (`cpu_kernels.write_cache`), else
    XLA's dynamic_update_slice of the transpose."""
    written = cpu_kernels.write_cache(full, new, slot) if prefill else None
    if written is None:
        written = jax.lax.dynamic_update_slice(full, new.swapaxes(2, 3), (0, 0, 0, slot))
    return written


class Attention(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, slot=None, last_only=False):
        """x `[B, T, D]`, mask bool `[B, T, S]` -> (out `[B, T, D]`, or `[B, 1, D]` with last_only; cache).

        Without a cache, keys are this call's own T positions (S = T). With this layer's `cache`
        (keys and values `[B, K, H, S]`: `init_cache`), this call's keys and values are
        written in place at slots `[slot, slot+T)`; `mask` says which slots each query may see. A prefill
        (slot 0) attends to its own keys, a decode step (T new tokens) to the cache before the write
        plus its own keys (`_attend_new`). last_only: keys and values
        for all T positions, the query and output for the last one alone (a prefill's last layer).
        """
        c = self.config
        dense = lambda features, bias, name: Dense(features, bias, self.dtype, name=name)
        B, T, _ = x.shape
        queries = _query_positions(last_only)
        q = dense(c.num_attention_heads * c.head_dim, c.qkv_bias, "q_proj")(x[:, queries])
        k = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, "k_proj")(x)
        v = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, "v_proj")(x)
        heads = lambda t: t.reshape(B, t.shape[1], -1, c.head_dim)                         # [B, T, heads, H]
        kv_major = lambda t: t.transpose(0, 2, 1, 3)                                       # [B, K, T, H]
        q = apply_rope(heads(q), cos[:, queries], sin[:, queries])
        k = kv_major(apply_rope(heads(k), cos, sin))
        v = kv_major(heads(v))
        scale = c.head_dim ** -0.5
        prefill = isinstance(slot, int) and slot == 0
        if cache is None or prefill:
            out = attention(q, k, v, mask[:, queries, :T], scale, causal_prefix=not last_only, fused=prefill)
        else:
            earlier = mask & (jnp.arange(mask.shape[-1]) < slot)
            own = jax.lax.dynamic_slice_in_dim(mask, slot, T, axis=2)
            out = _attend_new(q, cache[0], cache[1], k, v, earlier, own, scale)
        if cache is not None:
            cache = tuple(_write_cache(full, store_in_cache(new, full.dtype), slot, prefill)
                          for full, new in zip(cache, (k, v)))
        return dense(c.hidden_size, c.o_bias, "o_proj")(out.reshape(B, q.shape[1], -1)), cache


class MLP(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda features, name: Dense(features, c.mlp_bias, self.dtype, name=name)
        gate = dense(c.intermediate_size, "gate_proj")(x)
        up = dense(c.intermediate_size, "up_proj")(x)
        if c.hidden_act in ("silu", "swish") and cpu_kernels.silu_mul_applies(gate, up):
            return dense(c.hidden_size, "down_proj")(cpu_kernels.silu_mul(gate, up))   # bf16 on the CPU
        return dense(c.hidden_size, "down_proj")(activations.get(c.hidden_act)(gate) * up)


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, slot=None, last_only=False):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, cache = Attention(c, self.dtype, name="self_attn")(h, cos, sin, mask, cache, slot, last_only)
        x = x[:, _query_positions(last_only)] + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(c, self.dtype, name="mlp")(h), cache


def attention_mask(q_index: jax.Array, kv_index: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """Causal mask with padding: bool `[B, T, S]`, True where query t may attend to key s.

    q_index `[B, T]` / kv_index `[S]` are sequence slots (not RoPE positions): with left padding,
    slot 0 of a short row is a pad, masked out through `kv_valid [B, S]`. A pad query may see
    nothing at all; attention then returns zeros for it (`_attend`), as HF's does.
    """
    return (kv_index[None, None, :] <= q_index[:, :, None]) & kv_valid[:, None, :]


def _window_mask(mask, q_index, kv_index, window: int):
    """Restricts `mask` to keys with slot > query slot - window."""
    return mask & (kv_index[None, None, :] > q_index[:, :, None] - window)


def cache_dtype(dtype) -> jnp.dtype:
    """The KV cache's dtype for compute `dtype`: `dtype` on an accelerator. On a CPU float32, except
    bf16 compute where the native decode-attention kernel runs (`cpu_kernels.decode_applies`: one
    device, kernels built): there the cache holds the bf16 values' bits as uint16 (`store_in_cache`).

    XLA:CPU's bf16 attention products stream a cache at a quarter of the speed of float32 ones (a
    decode step's attention over 2.5k slots, mid-size model: 2.4 against 0.5 ms a layer at batch 1),
    so without the kernel the keys and values computed in bf16 are stored exactly in float32: the
    same numbers in twice the memory. The kernel reads bf16 as it is, but XLA:CPU writes a step's
    slot into a bf16 buffer by converting the whole buffer to float32 and back (~1.5 ms for one
    layer's 5 MB); into uint16 in place.
    """
    if jax.default_backend() != "cpu":
        return jnp.dtype(dtype)
    if jnp.dtype(dtype) == jnp.bfloat16 and cpu_kernels.decode_applies(jnp.bfloat16):
        return jnp.dtype(jnp.uint16)
    return jnp.dtype(jnp.float32)


def store_in_cache(x: jax.Array, dtype) -> jax.Array:
    """Keys or values `x` as a cache of `dtype` holds them (`cache_dtype`: uint16 holds bf16 bits)."""
    if jnp.dtype(dtype) == jnp.uint16:
        return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return x.astype(dtype)


def init_cache(config: TextConfig, batch: int, length: int, dtype=jnp.float32) -> list[tuple[jax.Array, jax.Array]]:
    """An empty KV cache for compute `dtype` (stored as `cache_dtype(dtype)`): per layer, keys and values
    `[B, K, H, S]`.

    Both are kv-head major, so one row's head is a contiguous block (on a mesh rows split over
    "data" and kv heads over "model"), with the slots last: a decode step's query logits are then
    `[G, H] x [H, S]` per head and its output `[G, S] x [H, S]^T`, each streaming the cache along
    its contiguous axis (on XLA:CPU as G matrix-vector products, `xla_cpu.split_query_heads`;
    docs/benchmarks.md).
    """
    K, H = config.num_key_value_heads, config.head_dim
    zeros = lambda *shape: jnp.zeros(shape, cache_dtype(dtype))
    return [(zeros(batch, K, H, length), zeros(batch, K, H, length)) for _ in range(config.num_hidden_layers)]


def decode_hidden(params: Params, config: TextConfig, embeds: jax.Array, positions: jax.Array,
                  mask: jax.Array, q_index: jax.Array, kv_index: jax.Array, cache: list | None = None,
                  slot=None, dtype=jnp.float32, remat: bool = False, last_only: bool = False):
    """Runs every decoder layer over embeds `[B, T, D]`, then the final norm.

    positions `[B, T]` (RoPE), mask `[B, T, S]`, q_index `[B, T]` / kv_index `[S]` (sequence slots,
    for sliding windows). With `cache`, keys/values are written at `slot` and the updated cache is
    returned (XLA updates it in place); else the cache is None. Returns (hidden `[B, T, D]`, cache).

    The layers are a Python loop over separate per-layer arrays, not a `lax.scan` over stacked ones:
    on XLA:CPU a scan slices (copies) every layer's weights each step, which made batch-1 decode
    three times slower (docs/benchmarks.md). Compile time grows with depth instead.

    remat: keep only each layer's input for the backward pass and recompute the rest
    (`jax.checkpoint` per layer): activation memory of one layer instead of all, for about one more
    forward pass of compute. Only for training (no cache).

    last_only: the last layer computes its output at the last position alone (hidden `[B, 1, D]`),
    while every layer still writes all T keys and values: what a prefill needs, for one layer's
    query, attention and MLP work less.
    """
    cos, sin = map(cpu_kernels.materialize, rope_tables(positions, rope_inv_freq(config.rope, config.head_dim),
                                                        config.rope.attention_factor))   # not per layer, per head
    layer = DecoderLayer(config, dtype)

    def run_layer(p, x, mask, kv, last=False):
        return layer.apply({"params": p}, x, cos, sin, mask, kv, slot, last)
    if remat:
        if cache is not None:
            raise ValueError("remat is for training (no KV cache)")
        run_layer = jax.checkpoint(run_layer, static_argnums=(4,))
    n_layers = len(config.sliding_windows)
    x, new_cache = embeds.astype(dtype), []
    for i, window in enumerate(config.sliding_windows):
        layer_mask = _window_mask(mask, q_index, kv_index, window) if window else mask
        with jax.named_scope(f"layer_{i}"):
            x, kv = run_layer(params["layers"][str(i)], x, layer_mask, None if cache is None else cache[i],
                              last_only and i == n_layers - 1)
        new_cache.append(kv)
    x = RMSNorm(config.rms_norm_eps, dtype).apply({"params": params["norm"]}, x)
    return x, None if cache is None else new_cache


def embed_tokens(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of the embedding table `[V, D]`, in `dtype`. A bf16 table on the CPU is gathered by a
    kernel of ours (`cpu_kernels.take_rows`): XLA:CPU converted the whole table before gathering from
    it, once per generate call (hoisted out of the decode loop: ~25 ms to float32 for 32064 x 1024,
    ~3 ms for a copy of its bits as uint16; docs/benchmarks.md)."""
    if cpu_kernels.take_rows_applies(table):
        return cpu_kernels.take_rows(table, ids).astype(dtype)
    return table[ids].astype(dtype)


def lm_logits(params: Params, hidden: jax.Array, tied: bool) -> jax.Array:
    """Hidden `[B, T, D]` -> float32 logits `[B, T, V]` through lm_head (or the tied embedding)."""
    if tied:
        w = params["language_model"]["embed_tokens"]["embedding"]
        return jnp.einsum("btd,vd->btv", hidden, w.astype(hidden.dtype)).astype(jnp.float32)
    return matmul(hidden, params["lm_head"]["kernel"].astype(hidden.dtype)).astype(jnp.float32)


def init_layer_params(config: TextConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random layer params `{"0": {...}, "1": ...}` (for benchmarks and demos; real weights are converted)."""
    D = config.hidden_size
    x = jnp.zeros((1, 1, D), dtype)
    cos = sin = jnp.zeros((1, 1, config.head_dim), jnp.float32)
    mask = jnp.ones((1, 1, 1), bool)
    init = lambda k: DecoderLayer(config, dtype).init(k, x, cos, sin, mask)["params"]
    return {str(i): init(k) for i, k in enumerate(jax.random.split(key, config.num_hidden_layers))}
