"""The multimodal projector: `linear_2(act(linear_1(x)))`, act the config's (exact, erf GELU in the releases).

Params: `multi_modal_projector/linear_1/{kernel [Dv*k, D], bias}`, `linear_2/{kernel [D, D], bias}`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from . import activations, decoder


class Projector(nn.Module):
    hidden_size: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    act: str = "gelu"

    @nn.compact
    def __call__(self, x):
        """x `[..., Dv*k]` vision features -> `[..., D]` text embeddings."""
        dense = lambda name: decoder.Dense(self.hidden_size, self.use_bias, self.dtype, name=name)
        return dense("linear_2")(activations.get(self.act)(dense("linear_1")(x)))
