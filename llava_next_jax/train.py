"""The training loss: mean next-token cross-entropy over labels != -100, as HF's causal-LM loss.

    logits  [B, T, V]  from `forward`; position t predicts token t+1
    labels  [B, T]     token ids, or IGNORE (-100) where nothing is to be learned (prompt, image, pad)

loss = sum over (b, t < T-1) with labels[b, t+1] != IGNORE of -log softmax(logits[b, t])[labels[b, t+1]],
divided by the number of such terms (HF shifts the labels left and pads them with -100).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from . import lora as lora_lib, xla_cpu
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


STATIC = ("config", "dtype", "remat", "lora")

def _loss(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask, labels,
          dtype=jnp.float32, remat: bool = False, lora: lora_lib.LoraConfig | None = None) -> jax.Array:
    """Mean cross-entropy (scalar float32); the inputs as `llava_next.forward` takes them, plus labels `[B, T]`.

    dtype is the compute dtype: float32 params with dtype=bfloat16 train in bf16 with float32 master
    weights (kernels are cast per matmul; norms, softmax and the loss stay float32). remat recomputes
    each decoder layer in the backward pass. lora: params is `{"base", "lora"}` (`lora.attach`) and the
    forward pass uses the merged weights.
    """
    logits = llava_next.forward(lora_lib.model_params(params, lora), config, input_ids, pixel_values, sources,
                                attention_mask, dtype, remat)
    total, count = cross_entropy(logits, labels)
    return total / jnp.maximum(count, 1)


loss_fn = xla_cpu.jit(_loss, static_argnames=STATIC)
"""The jitted loss: `loss_fn(params, config, input_ids, pixel_values, sources, attention_mask, labels,
dtype=float32, remat=False, lora=None)` (see `_loss`)."""
loss_and_grad = xla_cpu.jit(jax.value_and_grad(_loss), static_argnames=STATIC)
"""(loss, gradient pytree shaped like params) of `loss_fn`."""


# --- optimisation ---------------------------------------------------------------------------------

TRAINABLE = ("projector", "projector+decoder", "all", "lora", "lora+projector")


def trainable_mask(params, which: str = "projector+decoder"):
    """A pytree of bools shaped like params: True where `which` trains.

    projector: the multimodal projector (LLaVA's stage-1 pretraining); projector+decoder: also the
    language model, image_newline and lm_head (the vision tower stays frozen, as in LLaVA's stage 2);
    all: everything. For a LoRA tree `{"base", "lora"}` (`lora.attach`): lora trains the adapters
    alone, lora+projector the adapters and the base's projector.
    """
    if which not in TRAINABLE:
        raise ValueError(f"trainable={which!r}; choose one of {TRAINABLE}")
    is_lora_tree = set(params) == {"base", "lora"}
    if is_lora_tree != which.startswith("lora"):
        raise ValueError(f"trainable={which!r} needs {'a' if which.startswith('lora') else 'no'} LoRA tree "
                         f"({{'base', 'lora'}} from lora.attach); the params have top-level keys {sorted(params)}")
    def keep(path, _):
        keys = [k.key for k in path]
        if is_lora_tree:
            return keys[0] == "lora" or (which == "lora+projector" and keys[1] == "multi_modal_projector")
        if which == "all":
            return True
        if which == "projector":
            return keys[0] == "multi_modal_projector"
        return keys[0] != "vision_tower"
    return jax.tree_util.tree_map_with_path(keep, params)


def learning_rate_schedule(learning_rate: float, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 over `warmup_steps` updates, then cosine decay to 0 at `total_steps`: the
    learning rate of update i is transformers' `get_cosine_schedule_with_warmup`'s."""
    import optax
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1))


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation that compares and hashes by the settings that built it, so `train_step`
    (which takes it as a static argument) compiles once per settings, not once per `make_optimizer` call."""
    settings: tuple
    transform: Any = dataclasses.field(compare=False, repr=False)

    def init(self, params):
        return self.transform.init(params)

    def update(self, updates, state, params=None):
        return self.transform.update(updates, state, params)


def make_optimizer(params, learning_rate: float = 1e-4, warmup_steps: int = 0, total_steps: int = 1000,
                   weight_decay: float = 0.0, max_grad_norm: float = 1.0, accumulate: int = 1,
                   trainable: str = "projector+decoder") -> Optimizer:
    """AdamW with linear warmup + cosine decay, global-norm clipping, gradient accumulation over
    `accumulate` micro-batches, and frozen (zero-update) parameters outside `trainable`."""
    import optax
    schedule = learning_rate_schedule(learning_rate, warmup_steps, total_steps)
    mask = trainable_mask(params, trainable)
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    optimizer = optax.multi_transform(
        {"train": optax.chain(optax.clip_by_global_norm(max_grad_norm),
                              optax.adamw(schedule, weight_decay=weight_decay)),
         "freeze": optax.set_to_zero()}, labels)
    if accumulate > 1:
        optimizer = optax.MultiSteps(optimizer, accumulate)
    settings = (learning_rate, warmup_steps, total_steps, weight_decay, max_grad_norm, accumulate, trainable,
                jax.tree.structure(params))
    return Optimizer(settings, optimizer)


@partial(xla_cpu.jit, static_argnames=("config", "optimizer") + STATIC[1:], donate_argnames=("state",))
def train_step(state: dict, batch: dict, config: LlavaNextConfig, optimizer, dtype=jnp.float32,
               remat: bool = False, lora: lora_lib.LoraConfig | None = None):
    """One optimiser step: state {"params", "opt_state", "step", "rng"} -> (new state, {"loss"}).

    batch: input_ids, pixel_values (or None), sources, attention_mask, labels, as `loss_fn` takes them
    (with `make_optimizer(accumulate=n)`, one micro-batch: the update lands every n-th step).
    dtype/remat/lora: as in `loss_fn`. `rng` is the key of the run's random draws; the released configs
    have no dropout, so it is only split, every step, to stay in step with `step` across a resume.
    """
    import optax
    loss, grads = jax.value_and_grad(_loss)(state["params"], config, batch["input_ids"], batch["pixel_values"],
                                            batch["sources"], batch["attention_mask"], batch["labels"], dtype,
                                            remat, lora)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    rng, _ = jax.random.split(state["rng"])
    new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "rng": rng}
    return new_state, {"loss": loss}


def init_state(params, optimizer, seed: int = 0) -> dict:
    """The train state. `train_step` donates it, so the params given here are consumed by the first
    step: keep using `state["params"]` (e.g. `LlavaNext(config, state["params"])`), not the originals.

    Every leaf is committed where the params are: the counters, the key and what else was made on the
    default device (LoRA's adapters) replicated over the params' mesh, or put on their device. A
    step's outputs are committed, and jax.jit caches committed inputs apart from uncommitted ones, so
    the second step compiled `train_step` again (on a mesh, or on a host with several devices)."""
    state = {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0),
             "rng": jax.random.key_data(jax.random.key(seed))}
    placed = [leaf.sharding for leaf in jax.tree.leaves(params) if getattr(leaf, "committed", False)]
    mesh = next((s.mesh for s in placed if isinstance(s, NamedSharding)), None)
    home = (NamedSharding(mesh, PartitionSpec()) if mesh is not None else placed[0] if placed
            else jax.sharding.SingleDeviceSharding(jax.tree.leaves(params)[0].devices().pop()))
    return jax.tree.map(lambda leaf: leaf if getattr(leaf, "committed", True) else jax.device_put(leaf, home), state)
