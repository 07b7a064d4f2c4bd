"""The Llama-family decoder (Llama, Mistral, Qwen2): pre-norm blocks, RoPE, GQA, optional KV cache.

Params mirror HF names under `language_model/`: `embed_tokens/embedding [V, D]`, `norm/scale [D]`,
and `layers/...` with every leaf stacked over layers (leading axis L) so one `lax.scan` runs them all
and compile time does not grow with depth.

Shapes: B batch, T query positions, S key positions (T without a cache, the cache length with one),
D hidden, N query heads, K kv heads, H head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..config import RopeConfig, TextConfig

Params = dict[str, Any]


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


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """Inverse frequencies `[H/2]` in float32, with `linear` or `llama3` scaling applied."""
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (rope.theta ** exponent.astype(np.float64))).astype(np.float32)
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


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin `[B, T, H]` (float32) for integer `positions [B, T]`; NeoX layout (halves repeated)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, T, heads, H]` rotated by position: `x * cos + rotate_half(x) * sin` (rotate_half = [-x2, x1])."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, slot=None, layer=None):
        """x `[B, T, D]`, mask bool `[B, T, S]` -> (out `[B, T, D]`, cache).

        Without a cache, keys are this call's own T positions (S = T). With `cache` (k, v each
        `[L, B, S, K, H]`, all layers), this call's keys and values are written in place at
        `[layer, :, slot:slot+T]` and attention runs over the layer's whole cache; `mask` says which
        slots each query may see.
        """
        c = self.config
        dense = lambda features, bias, name: nn.Dense(features, use_bias=bias, dtype=self.dtype,
                                                      param_dtype=self.dtype, name=name)
        B, T, _ = x.shape
        q = dense(c.num_attention_heads * c.head_dim, c.qkv_bias, "q_proj")(x)
        k = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, "k_proj")(x)
        v = dense(c.num_key_value_heads * c.head_dim, c.qkv_bias, "v_proj")(x)
        q = apply_rope(q.reshape(B, T, c.num_attention_heads, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(B, T, c.num_key_value_heads, c.head_dim), cos, sin)
        v = v.reshape(B, T, c.num_key_value_heads, c.head_dim)
        if cache is not None:
            write = lambda full, new: jax.lax.dynamic_update_slice(full, new[None].astype(full.dtype),
                                                                   (layer, 0, slot, 0, 0))
            cache = (write(cache[0], k), write(cache[1], v))
            k, v = (jax.lax.dynamic_index_in_dim(full, layer, 0, keepdims=False) for full in cache)
        out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask[:, None],
                                           scale=c.head_dim ** -0.5)
        return dense(c.hidden_size, c.o_bias, "o_proj")(out.reshape(B, T, -1)), cache


class MLP(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=c.mlp_bias, dtype=self.dtype,
                                                param_dtype=self.dtype, name=name)
        gate = dense(c.intermediate_size, "gate_proj")(x)
        up = dense(c.intermediate_size, "up_proj")(x)
        return dense(c.hidden_size, "down_proj")(nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    config: TextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None, slot=None, layer=None):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        h, cache = Attention(c, self.dtype, name="self_attn")(h, cos, sin, mask, cache, slot, layer)
        x = x + h
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + MLP(c, self.dtype, name="mlp")(h), cache


def attention_mask(q_index: jax.Array, kv_index: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """Causal mask with padding: bool `[B, T, S]`, True where query t may attend to key s.

    q_index `[B, T]` / kv_index `[S]` are sequence slots (not RoPE positions): with left padding,
    slot 0 of a short row is a pad, masked out through `kv_valid [B, S]`. A pad query may see
    nothing at all; attention then returns a harmless average and its logits are ignored.
    """
    return (kv_index[None, None, :] <= q_index[:, :, None]) & kv_valid[:, None, :]


def _window_mask(mask, q_index, kv_index, window):
    """Restricts `mask` to keys with slot > query slot - window (window 0: unrestricted)."""
    inside = kv_index[None, None, :] > q_index[:, :, None] - window
    return mask & (inside | (window == 0))


def init_cache(config: TextConfig, batch: int, length: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache: k, v `[L, B, S, K, H]`."""
    shape = (config.num_hidden_layers, batch, length, config.num_key_value_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def decode_hidden(params: Params, config: TextConfig, embeds: jax.Array, positions: jax.Array,
                  mask: jax.Array, q_index: jax.Array, kv_index: jax.Array, cache: dict | None = None,
                  slot=None, dtype=jnp.float32):
    """Runs every decoder layer over embeds `[B, T, D]` with one `lax.scan`, then the final norm.

    positions `[B, T]` (RoPE), mask `[B, T, S]`, q_index `[B, T]` / kv_index `[S]` (sequence slots,
    for sliding windows). With `cache`, keys/values are written at `slot` and the updated cache is
    returned (carried through the scan, so XLA updates it in place); else the cache is None.
    Returns (hidden `[B, T, D]`, cache).
    """
    cos, sin = rope_tables(positions, rope_inv_freq(config.rope, config.head_dim))
    layer = DecoderLayer(config, dtype)
    use_windows = any(config.sliding_windows)

    def body(carry, per_layer):
        h, kv = carry
        layer_params, window, index = per_layer
        layer_mask = _window_mask(mask, q_index, kv_index, window) if use_windows else mask
        h, kv = layer.apply({"params": layer_params}, h, cos, sin, layer_mask, kv, slot, index)
        return (h, kv), None

    kv = None if cache is None else (cache["k"], cache["v"])
    per_layer = (params["layers"], jnp.asarray(config.sliding_windows, jnp.int32),
                 jnp.arange(config.num_hidden_layers))
    (x, kv), _ = jax.lax.scan(body, (embeds.astype(dtype), kv), per_layer)
    x = RMSNorm(config.rms_norm_eps, dtype).apply({"params": params["norm"]}, x)
    return x, None if kv is None else {"k": kv[0], "v": kv[1]}


def lm_logits(params: Params, hidden: jax.Array, tied: bool) -> jax.Array:
    """Hidden `[B, T, D]` -> float32 logits `[B, T, V]` through lm_head (or the tied embedding)."""
    if tied:
        w = params["language_model"]["embed_tokens"]["embedding"]
        return jnp.einsum("btd,vd->btv", hidden, w.astype(hidden.dtype)).astype(jnp.float32)
    w = params["lm_head"]["kernel"]
    return jnp.einsum("btd,dv->btv", hidden, w.astype(hidden.dtype)).astype(jnp.float32)


def init_layer_params(config: TextConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random stacked layer params `{...: [L, ...]}` (for benchmarks and demos; real weights are converted)."""
    D = config.hidden_size
    x = jnp.zeros((1, 1, D), dtype)
    cos = sin = jnp.zeros((1, 1, config.head_dim), jnp.float32)
    mask = jnp.ones((1, 1, 1), bool)
    init = lambda k: DecoderLayer(config, dtype).init(k, x, cos, sin, mask)["params"]
    return jax.vmap(init)(jax.random.split(key, config.num_hidden_layers))
