"""`LlavaNext`: holds (config, params) and calls the pure jitted functions with HF-layout inputs."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import anyres, checkpoint, convert
from .config import LlavaNextConfig
from .modeling import llava_next


class LlavaNext:
    """A loaded LLaVA-NeXT model.

    Attributes: `config` (LlavaNextConfig), `params` (pytree of jax Arrays), `dtype` (compute dtype,
    the params' dtype).
    """

    def __init__(self, config: LlavaNextConfig, params: Any):
        self.config = config
        self.params = params
        self.dtype = jnp.dtype(params["language_model"]["embed_tokens"]["embedding"].dtype)

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | Any | None = None) -> "LlavaNext":
        """Loads a directory written by `scripts/convert_torch_weights.py`, or an HF checkpoint directory.

        dtype: "float32", "bfloat16", "float16" (or a numpy/jax dtype); None keeps the stored dtype.
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a directory (expected a converted or HF LLaVA-NeXT checkpoint)")
        config = LlavaNextConfig.from_file(path)
        dtype = None if dtype is None else jnp.dtype(dtype)
        if checkpoint.is_converted(path):
            params = checkpoint.load_params(path, dtype)
        else:
            name = None if dtype is None else dtype.name
            params = convert.stack_layers(convert.nest(dict(convert.iter_tensors(path, config, name))))
            params = jax.tree.map(jnp.asarray, params)
        return cls(config, params)

    def image_token_sources(self, input_ids: np.ndarray, image_sizes: Any, tiles_per_image: int) -> np.ndarray:
        """Where each position's image feature comes from (`anyres.token_sources`); validates counts."""
        return anyres.token_sources(input_ids, self.config.image_token_id, image_sizes, self.config.geometry,
                                    tiles_per_image)

    def _inputs(self, input_ids, pixel_values, image_sizes, attention_mask):
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {ids.shape}")
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if pixel_values is None:
            return ids, None, self.image_token_sources(ids, None, 0), mask
        S = self.config.vision.image_size
        pixels = jnp.asarray(pixel_values)
        if pixels.ndim != 5 or pixels.shape[2:] != (self.config.vision.num_channels, S, S):
            raise ValueError(f"pixel_values must be [images, tiles, {self.config.vision.num_channels}, {S}, {S}]; "
                             f"got shape {tuple(pixels.shape)}")
        if image_sizes is None or np.asarray(image_sizes).shape != (pixels.shape[0], 2):
            raise ValueError(f"image_sizes must be [{pixels.shape[0]}, 2] (height, width per image); got "
                             f"{None if image_sizes is None else np.asarray(image_sizes).shape}")
        return ids, pixels, self.image_token_sources(ids, image_sizes, pixels.shape[1]), mask

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None) -> jnp.ndarray:
        """Logits `[B, T, V]` (float32).

        input_ids `[B, T]` with each `<image>` already expanded (the processor does it);
        pixel_values `[B_img, P, C, S, S]`, image_sizes `[B_img, 2]` (height, width);
        attention_mask `[B, T]`, 1 for real tokens (default all ones).
        """
        ids, pixels, sources, mask = self._inputs(input_ids, pixel_values, image_sizes, attention_mask)
        return llava_next.forward(self.params, self.config, ids, pixels, sources if pixels is not None else None,
                                  mask, self.dtype)
