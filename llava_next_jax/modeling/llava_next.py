"""LLaVA-NeXT composed from its parts: vision tower -> projector -> anyres packing -> decoder -> logits.

Every function here is pure: `params` is a plain pytree, the config is a static (hashable) argument.
The anyres packing arrives precomputed as `sources [B, T]` (see `anyres.token_sources`): for each
token position, which row of the batch's flattened image features (or the newline vector) to put
there. That turns packing and the scatter into token positions into one fixed-shape gather, so a
new image size never changes a shape and never recompiles.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from .. import xla_cpu
from ..config import LlavaNextConfig
from . import decoder, vision
from .projector import Projector

Params = dict[str, Any]


def init_params(config: LlavaNextConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random params with the converted checkpoints' tree structure and shapes."""
    v, t = config.vision, config.text
    keys = iter(jax.random.split(key, 12))
    normal = lambda shape, scale=0.02: (scale * jax.random.normal(next(keys), shape)).astype(dtype)
    n_pos = v.num_positions
    vision_width = v.hidden_size * len(config.vision_feature_layers)
    params = {
        "vision_tower": {
            "embeddings": {
                "patch_embedding": {"kernel": normal((v.patch_size, v.patch_size, v.num_channels, v.hidden_size))},
                "class_embedding": normal((v.hidden_size,)),
                "position_embedding": {"embedding": normal((n_pos, v.hidden_size))},
            },
            "pre_layrnorm": {"scale": jnp.ones((v.hidden_size,), dtype), "bias": jnp.zeros((v.hidden_size,), dtype)},
            "layers": vision.init_layer_params(v, next(keys), dtype),
            "post_layernorm": {"scale": jnp.ones((v.hidden_size,), dtype), "bias": jnp.zeros((v.hidden_size,), dtype)},
        },
        "multi_modal_projector": Projector(t.hidden_size, config.multimodal_projector_bias, dtype,
                                           config.projector_hidden_act).init(
            next(keys), jnp.zeros((1, vision_width), dtype))["params"],
        "image_newline": normal((t.hidden_size,)),
        "language_model": {
            "embed_tokens": {"embedding": normal((t.vocab_size, t.hidden_size))},
            "layers": decoder.init_layer_params(t, next(keys), dtype),
            "norm": {"scale": jnp.ones((t.hidden_size,), dtype)},
        },
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": normal((t.hidden_size, t.vocab_size))}
    return params


def image_embeddings(params: Params, config: LlavaNextConfig, pixel_values: jax.Array, dtype) -> jax.Array:
    """pixel_values `[B_img, P, C, S, S]` -> feature table `[B_img * P * n*n + 1, D]`, newline last.

    Padded tiles are computed too (fixed shapes) and simply never gathered.
    """
    tiles = pixel_values.reshape(-1, *pixel_values.shape[2:])
    feats = vision.image_features(params["vision_tower"], config.vision, tiles, config.vision_feature_layers, dtype)
    projector = Projector(config.text.hidden_size, config.multimodal_projector_bias, dtype, config.projector_hidden_act)
    feats = projector.apply({"params": params["multi_modal_projector"]}, feats)
    newline = params["image_newline"].astype(dtype)[None]
    return jnp.concatenate([feats.reshape(-1, feats.shape[-1]), newline], axis=0)


def embed_inputs(params: Params, config: LlavaNextConfig, input_ids: jax.Array, pixel_values: jax.Array | None,
                 sources: jax.Array | None, dtype) -> jax.Array:
    """Token embeddings `[B, T, D]` with image features placed where `sources >= 0`."""
    table = params["language_model"]["embed_tokens"]["embedding"]
    is_image = sources >= 0 if sources is not None else None
    ids = input_ids if is_image is None else jnp.where(is_image, 0, input_ids)  # image ids may be >= vocab
    x = decoder.embed_tokens(table, ids, dtype)
    if pixel_values is None:
        return x
    feats = image_embeddings(params, config, pixel_values, dtype)
    return jnp.where(is_image[..., None], feats[jnp.maximum(sources, 0)], x)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions for left-padded rows: `cumsum(mask) - 1`, 0 at pads."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


@partial(xla_cpu.jit, static_argnames=("config", "dtype", "remat"))
@decoder.full_float32
def forward(params: Params, config: LlavaNextConfig, input_ids: jax.Array, pixel_values: jax.Array | None,
            sources: jax.Array | None, attention_mask: jax.Array, dtype=jnp.float32, remat: bool = False) -> jax.Array:
    """Logits `[B, T, V]` (float32) for a full sequence, no cache.

    input_ids `[B, T]`, pixel_values `[B_img, P, C, S, S]` or None, sources `[B, T]` from
    `anyres.token_sources`, attention_mask `[B, T]` (1 = real token; left or right padding).
    remat: recompute each decoder layer in the backward pass (see `decoder.decode_hidden`); for training.
    """
    hidden = hidden_states(params, config, input_ids, pixel_values, sources, attention_mask, dtype, remat)
    return decoder.lm_logits(params, hidden, config.tie_word_embeddings)


def hidden_states(params, config, input_ids, pixel_values, sources, attention_mask, dtype, remat=False):
    """Final-normed decoder hidden states `[B, T, D]` (what `forward` feeds the lm_head)."""
    x = embed_inputs(params, config, input_ids, pixel_values, sources, dtype)
    mask = attention_mask.astype(bool)
    slots = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    attend = decoder.attention_mask(slots, slots[0], mask)
    hidden, _ = decoder.decode_hidden(params["language_model"], config.text, x, positions_from_mask(mask), attend,
                                      slots, slots[0], dtype=dtype, remat=remat)
    return hidden
