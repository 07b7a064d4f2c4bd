"""The training loss: mean next-token cross-entropy over labels != -100, as HF's causal-LM loss.

    logits  [B, T, V]  from `forward`; position t predicts token t+1
    labels  [B, T]     token ids, or IGNORE (-100) where nothing is to be learned (prompt, image, pad)

loss = sum over (b, t < T-1) with labels[b, t+1] != IGNORE of -log softmax(logits[b, t])[labels[b, t+1]],
divided by the number of such terms (HF shifts the labels left and pads them with -100).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from .config import LlavaNextConfig
from .modeling import llava_next

IGNORE = -100


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed negative log-likelihood, number of counted tokens) of next-token prediction, in float32."""
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)


@partial(jax.jit, static_argnames=("config", "dtype"))
def loss_fn(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask, labels,
            dtype=jnp.float32) -> jax.Array:
    """Mean cross-entropy (scalar float32); the inputs as `llava_next.forward` takes them, plus labels `[B, T]`."""
    logits = llava_next.forward(params, config, input_ids, pixel_values, sources, attention_mask, dtype)
    total, count = cross_entropy(logits, labels)
    return total / jnp.maximum(count, 1)


loss_and_grad = jax.jit(jax.value_and_grad(loss_fn), static_argnames=("config", "dtype"))
"""(loss, gradient pytree shaped like params) of `loss_fn`."""
