"""The CLIP ViT vision tower, run only as deep as the selected feature layers.

Params under `vision_tower/` mirror HF's CLIP names: `embeddings/{patch_embedding/kernel [p, p, C, Dv],
class_embedding [Dv], position_embedding/embedding [n*n+1, Dv]}`, `pre_layrnorm`, `layers/{i}/...`,
`post_layernorm` (kept for round trips; never used: LLaVA reads hidden states).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import VisionConfig
from . import activations, decoder

Params = dict[str, Any]


class SelfAttention(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x `[N, T, Dv]` -> `[N, T, Dv]`: full (unmasked) multi-head attention, scale `head_dim ** -0.5`."""
        c = self.config
        N, T, _ = x.shape
        dense = lambda name: decoder.Dense(c.hidden_size, True, self.dtype, name=name)
        q, k, v = (dense(name)(x).reshape(N, T, c.num_attention_heads, c.head_dim)
                   for name in ("q_proj", "k_proj", "v_proj"))
        scale = c.head_dim ** -0.5
        if decoder.attention_implementation(self.dtype, c.head_dim) == "native":   # the CPU kernel
            out = decoder.native_attention(q, k.swapaxes(1, 2), v.swapaxes(1, 2), jnp.ones((N, T, T), bool), scale)
        else:
            out = jax.nn.dot_product_attention(q, k, v, scale=scale)
        return dense("out_proj")(out.reshape(N, T, -1))


class MLP(nn.Module):
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda features, name: decoder.Dense(features, True, self.dtype, name=name)
        act = activations.get(self.config.hidden_act)
        return dense(self.config.hidden_size, "fc2")(act(dense(self.config.intermediate_size, "fc1")(x)))


class EncoderLayer(nn.Module):
    """Pre-LN block: `x += self_attn(layer_norm1(x))`; `x += mlp(layer_norm2(x))`."""
    config: VisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        norm = lambda name: nn.LayerNorm(self.config.layer_norm_eps, dtype=self.dtype, param_dtype=self.dtype,
                                         name=name)
        x = x + SelfAttention(self.config, self.dtype, name="self_attn")(norm("layer_norm1")(x))
        return x + MLP(self.config, self.dtype, name="mlp")(norm("layer_norm2")(x))


def embed_patches(params: Params, config: VisionConfig, pixels: jax.Array, dtype=jnp.float32) -> jax.Array:
    """pixels `[N, C, S, S]` -> `pre_layrnorm(patch tokens + positions)` `[N, 1 + n*n, Dv]` (CLS first).

    The patch conv has kernel = stride = p and no bias, so it is one matmul over flattened patches (an
    image_size that is not a multiple of p leaves the last S - n*p rows and columns out, as the conv does).
    """
    p, n = config.patch_size, config.image_size // config.patch_size
    N, C = pixels.shape[:2]
    if pixels.shape[2:] != (config.image_size, config.image_size):
        raise ValueError(f"pixel_values tiles are {tuple(pixels.shape[2:])}; the vision tower takes "
                         f"{config.image_size}x{config.image_size} (CLIP has no position interpolation)")
    emb = params["embeddings"]
    patches = pixels[:, :, :n * p, :n * p].astype(dtype).reshape(N, C, n, p, n, p).transpose(0, 2, 4, 3, 5, 1)  # [N, n, n, p, p, C]
    tokens = jnp.einsum("nyxijc,ijcd->nyxd", patches, emb["patch_embedding"]["kernel"].astype(dtype))
    tokens = tokens.reshape(N, n * n, -1)
    cls = jnp.broadcast_to(emb["class_embedding"].astype(dtype), (N, 1, tokens.shape[-1]))
    x = jnp.concatenate([cls, tokens], axis=1) + emb["position_embedding"]["embedding"].astype(dtype)
    norm = nn.LayerNorm(config.layer_norm_eps, dtype=dtype, param_dtype=dtype)
    return norm.apply({"params": params["pre_layrnorm"]}, x)


def hidden_states(params: Params, config: VisionConfig, pixels: jax.Array, wanted: tuple[int, ...],
                  dtype=jnp.float32) -> list[jax.Array]:
    """The hidden states with indices `wanted` (0 = embeddings, l = output of layer l), `[N, 1+n*n, Dv]` each.

    Runs layers only up to the deepest wanted index (LLaVA's -2 skips the last layer).
    """
    layer = EncoderLayer(config, dtype)
    states = [embed_patches(params, config, pixels, dtype)]
    for i in range(max(wanted)):
        with jax.named_scope(f"vision_layer_{i}"):
            states.append(layer.apply({"params": params["layers"][str(i)]}, states[-1]))
    return [states[i] for i in wanted]


def image_features(params: Params, config: VisionConfig, pixels: jax.Array, feature_layers: tuple[int, ...],
                   dtype=jnp.float32) -> jax.Array:
    """pixels `[N, C, S, S]` -> patch features `[N, n*n, Dv * len(feature_layers)]` (CLS dropped: `default`)."""
    states = hidden_states(params, config, pixels, feature_layers, dtype)
    return jnp.concatenate(states, axis=-1)[:, 1:]


def init_layer_params(config: VisionConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random encoder-layer params `{"0": {...}, "1": ...}`."""
    x = jnp.zeros((1, 1, config.hidden_size), dtype)
    init = lambda k: EncoderLayer(config, dtype).init(k, x)["params"]
    return {str(i): init(k) for i, k in enumerate(jax.random.split(key, config.num_hidden_layers))}
