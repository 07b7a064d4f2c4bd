"""LoRA adapters on the decoder's linear layers, kept apart from the base params and mergeable.

For each targeted kernel W `[in, out]` (Flax layout) of every decoder layer, two trainable matrices
A `[in, r]` and B `[r, out]` give the effective weight

    W' = W + (alpha / r) * A @ B

A starts uniform in +-1/sqrt(in) and B at zero (so W' = W before training, as in PEFT's default).
Training differentiates a tree `{"base": params, "lora": adapters}` and only the adapters move (see
`train.trainable_mask`); `merge` folds them into plain params that `LlavaNext`, `save_params` and
`convert.export_hf` take like any other. The adapters are float32 whatever the base dtype; on a mesh
they are laid out as their kernel: A's rows as W's, B's columns as W's (the layout a training step
gives them, so the second step runs the first one's program).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from .sharding import canonical

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (the update is scaled by alpha / r) and the targeted projections."""
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ATTENTION + MLP

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(ATTENTION + MLP))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: unknown {unknown}; choose from {ATTENTION + MLP}")
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _targets(params, config: LoraConfig):
    """(layer, block, name) for every targeted kernel of the decoder."""
    layers = params["language_model"]["layers"]
    return [(i, block, name) for i in layers for block in ("self_attn", "mlp") for name in config.targets
            if name in layers[i][block]]


def init_adapters(params, config: LoraConfig, key: jax.Array):
    """Adapters `{"language_model": {"layers": {i: {block: {name: {"a", "b"}}}}}}` for `params`."""
    adapters: dict = {}
    targets = _targets(params, config)
    for (i, block, name), k in zip(targets, jax.random.split(key, len(targets))):
        kernel = params["language_model"]["layers"][i][block][name]["kernel"]
        d_in, d_out = kernel.shape
        bound = d_in ** -0.5
        ab = {"a": jax.random.uniform(k, (d_in, config.rank), jnp.float32, -bound, bound),
              "b": jnp.zeros((config.rank, d_out), jnp.float32)}
        laid_out = getattr(kernel, "sharding", None)
        if isinstance(laid_out, NamedSharding):
            rows, columns = (tuple(laid_out.spec) + (None, None))[:2]
            ab = {"a": jax.device_put(ab["a"], NamedSharding(laid_out.mesh, canonical(rows))),
                  "b": jax.device_put(ab["b"], NamedSharding(laid_out.mesh, canonical(None, columns)))}
        adapters.setdefault(i, {}).setdefault(block, {})[name] = ab
    return {"language_model": {"layers": adapters}}


def attach(params, config: LoraConfig, key: jax.Array) -> dict:
    """The tree LoRA training differentiates: `{"base": params, "lora": fresh adapters}`."""
    return {"base": params, "lora": init_adapters(params, config, key)}


def merge(params, adapters, config: LoraConfig):
    """params with every adapted kernel replaced by `W + scale * A @ B` (in W's dtype); the rest shared."""
    layers = dict(params["language_model"]["layers"])
    for i, blocks in adapters["language_model"]["layers"].items():
        layer = {**layers[i]}
        for block, names in blocks.items():
            layer[block] = {**layer[block]}
            for name, ab in names.items():
                kernel = layer[block][name]["kernel"]
                delta = config.scale * (ab["a"] @ ab["b"])
                layer[block][name] = {**layer[block][name], "kernel": (kernel + delta).astype(kernel.dtype)}
        layers[i] = layer
    return {**params, "language_model": {**params["language_model"], "layers": layers}}


def model_params(tree, config: LoraConfig | None):
    """The params a forward pass uses: `tree` itself, or its base with the adapters merged."""
    return tree if config is None else merge(tree["base"], tree["lora"], config)
