"""Device meshes and the tensor-parallel layout of the params.

A mesh has axes ("data", "model"): batches split over "data", weights over "model". The rules below
say, per parameter, which kernel axis goes over "model" (Flax kernels are `[in, out]`):

  column-parallel (out over "model"): q/k/v_proj, gate/up_proj, fc1, linear_1, lm_head
  row-parallel    (in over "model"):  o_proj, down_proj, out_proj, fc2, linear_2
  embed_tokens: the vocab axis over "model"; everything else (norms, biases of row-parallel
  layers, embeddings of the vision tower, image_newline) replicated.

An axis that does not divide by the mesh's "model" size stays whole (replicated). XLA (GSPMD) inserts
the collectives, so the model code itself is the same on one device and on a mesh.

With `fsdp=True` (fully sharded data parallel, for training) each parameter is also split over
"data": along its largest axis that the rules leave whole and that divides by the "data" size (the
input axis of a column-parallel kernel, the output axis of a row-parallel one, a norm's only axis).
A device then holds 1/(data x model) of the weights, and the optimizer state, which takes the params'
layout, shrinks with them; XLA's partitioner inserts the collectives (a weight gathered over "data"
where a product needs it, gradients summed over the rows' devices). Inference should keep the default:
a decode step would gather every weight again.

`memory_per_device` sizes a config on a mesh from these same rules (weights), and from `cache_spec`
(the KV cache as `generate` lays it out); docs/scaling.md tables it for the released checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .checks import is_positive_int

AXES = ("data", "model")

# (pattern over the "/"-joined params path, partition spec of the leaf); first match wins.
RULES: list[tuple[re.Pattern, P]] = [(re.compile(p), spec) for p, spec in [
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|linear_1)/kernel", P(None, "model")),
    (r".*(q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|linear_1)/bias", P("model")),
    (r".*(o_proj|down_proj|out_proj|fc2|linear_2)/kernel", P("model", None)),
    (r"lm_head/kernel", P(None, "model")),
    (r"language_model/embed_tokens/embedding", P("model", None)),
    (r".*", P()),
]]


def make_mesh(data: int = 1, model: int | None = None, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: every device of every process).

    model defaults to all the devices left after `data`. Multi-host: call
    `llava_next_jax.distributed.initialize()` first in every process; `jax.devices()` then lists the
    devices of all hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not all(is_positive_int(n) for n in (data, 1 if model is None else model)):
        raise ValueError(f"mesh sizes must be ints >= 1; got data={data!r}, model={model!r}")
    if model is None and len(devices) % data:
        raise ValueError(f"data={data} does not divide the {len(devices)} devices (model, left out, is the devices "
                         f"left after data); pass model too, and devices=[...] to use fewer devices")
    model = len(devices) // data if model is None else model
    if data * model != len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), AXES)


def check_mesh(mesh) -> Mesh:
    """`mesh` if it is a Mesh with axes ("data", "model"), else a TypeError or ValueError saying what it is."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh with axes {AXES} (e.g. sharding.make_mesh(data=2, "
                        f"model=4)); got {type(mesh).__name__} {mesh!r}")
    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"mesh axes are {tuple(mesh.axis_names)}; expected {AXES} (sharding.make_mesh)")
    return mesh


def axis_sizes(mesh: Mesh | Mapping[str, int]) -> dict[str, int]:
    """{"data": d, "model": m} of a Mesh, or of a mapping such as `{"data": 2, "model": 4}` (no devices needed)."""
    sizes = dict(mesh.shape if isinstance(mesh, Mesh) else mesh)
    if set(sizes) != set(AXES):
        raise ValueError(f"a mesh shape needs exactly the axes {AXES}; got {sizes}")
    if not all(is_positive_int(n) for n in sizes.values()):
        raise ValueError(f"mesh sizes must be ints >= 1; got {sizes}")
    return sizes


def canonical(*axes) -> P:
    """P(*axes) without trailing Nones: the spec a compiled program's outputs carry. jax.jit caches
    inputs laid out by P("model", None) apart from the same layout as P("model"), so params placed
    with the first compiled a second training step for the second, its first step's output."""
    axes = list(axes)
    while axes and axes[-1] is None:
        axes.pop()
    return P(*axes)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh | Mapping[str, int], fsdp: bool = False) -> P:
    """The partition spec of one parameter (`canonical`); axes that do not divide evenly are left
    whole. fsdp: also split the largest whole axis that divides by the "data" size over "data"
    (module docstring)."""
    for pattern, spec in RULES:
        if pattern.fullmatch(path):
            break
    sizes = axis_sizes(mesh)
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    axes = [name if name is None or shape[i] % sizes[name] == 0 else None for i, name in enumerate(spec)]
    if fsdp and sizes["data"] > 1:
        free = [i for i, name in enumerate(axes) if name is None and shape[i] % sizes["data"] == 0]
        if free:
            axes[max(free, key=lambda i: shape[i])] = "data"
    return canonical(*axes)


def param_shardings(shapes: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """NamedShardings for a params tree (of arrays or ShapeDtypeStructs), per `RULES` (and fsdp)."""
    def one(path, leaf):
        name = "/".join(k.key for k in path)
        return NamedSharding(mesh, spec_for(name, tuple(leaf.shape), mesh, fsdp))
    return jax.tree_util.tree_map_with_path(one, shapes)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Leading (batch) axis over "data" when it divides evenly, else replicated."""
    lead = "data" if shape and shape[0] % mesh.shape["data"] == 0 else None
    return NamedSharding(mesh, canonical(lead))


# --- memory per device -----------------------------------------------------------------------------

def shard_bytes(shape: tuple[int, ...], spec: P, mesh: Mesh | Mapping[str, int], itemsize: int) -> int:
    """Bytes of one device's shard of an array of `shape` laid out by `spec` (axes divide evenly)."""
    sizes = axis_sizes(mesh)
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    split = lambda entry: math.prod(sizes[a] for a in ((entry,) if isinstance(entry, str) else entry or ()))
    return math.prod(n // split(entry) for n, entry in zip(shape, spec)) * itemsize


def cache_spec(config, mesh: Mesh | Mapping[str, int], batch: int) -> P:
    """The layout `generate` gives each KV-cache array (config: a `TextConfig`): keys and values
    `[B, K, H, S]` (`decoder.init_cache`), split over their first two axes.

    The cache is created inside the compiled prefill and XLA's partitioner derives its layout from
    the k/v projections and the inputs: rows over "data" when the batch divides (as
    `batch_sharding`), kv heads over "model" when the projections are split by whole heads
    (tests/test_sharding.py compares this with the compiled prefill).
    """
    sizes = axis_sizes(mesh)
    K, H = config.num_key_value_heads, config.head_dim
    over_data = sizes["data"] > 1 and batch % sizes["data"] == 0
    kv_proj = spec_for("language_model/layers/0/self_attn/k_proj/kernel", (config.hidden_size, K * H), sizes)
    over_model = sizes["model"] > 1 and tuple(kv_proj)[1:2] == ("model",) and K % sizes["model"] == 0
    return canonical("data" if over_data else None, "model" if over_model else None)


@functools.lru_cache(maxsize=16)
def _param_shapes(config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """("language_model/layers/0/...", shape) of every parameter, from `init_params` traced abstractly."""
    from .modeling.llava_next import init_params
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return tuple(("/".join(k.key for k in path), tuple(leaf.shape))
                 for path, leaf in jax.tree_util.tree_leaves_with_path(shapes))


@dataclasses.dataclass(frozen=True)
class DeviceMemory:
    """Bytes held by the most loaded device: the params, and the KV cache of one `generate` call."""
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def memory_per_device(config, mesh: Mesh | Mapping[str, int], batch: int, length: int,
                      dtype="bfloat16", fsdp: bool = False) -> DeviceMemory:
    """Weights and KV-cache bytes on the most loaded device of `mesh` (a Mesh or `{"data": d, "model": m}`).

    config: a `LlavaNextConfig`; batch: rows per `generate` call; length: cache slots (the prompt
    bucket plus the new-token bucket); dtype: of params and cache (`from_pretrained`'s, bfloat16 on
    GPU/TPU; a CPU mesh keeps a bfloat16 model's cache in float32, `decoder.cache_dtype`, twice what
    this counts). Weights follow `RULES` (and fsdp, as `spec_for`) over the abstract params of
    `init_params` (no memory allocated); the cache follows `cache_spec`. Every device holds equal
    shards, so "most loaded" is any of them. Activations and XLA's workspace are not counted.
    """
    itemsize = jnp.dtype(dtype).itemsize
    weights = sum(shard_bytes(shape, spec_for(path, shape, mesh, fsdp), mesh, itemsize)
                  for path, shape in _param_shapes(config))
    t = config.text
    cache_shape = (batch, t.num_key_value_heads, length, t.head_dim)
    per_array = shard_bytes(cache_shape, cache_spec(t, mesh, batch), mesh, itemsize)
    return DeviceMemory(weights=weights, kv_cache=2 * t.num_hidden_layers * per_array)
