"""Device meshes and the tensor-parallel layout of the params.

A mesh has axes ("data", "model"): batches split over "data", weights over "model". The rules below
say, per parameter, which kernel axis goes over "model" (Flax kernels are `[in, out]`):

  column-parallel (out over "model"): q/k/v_proj, gate/up_proj, fc1, linear_1, lm_head
  row-parallel    (in over "model"):  o_proj, down_proj, out_proj, fc2, linear_2
  embed_tokens: the vocab axis over "model"; everything else (norms, biases of row-parallel
  layers, embeddings of the vision tower, image_newline) replicated.

An axis that does not divide by the mesh's "model" size stays whole (replicated). XLA (GSPMD) inserts
the collectives, so the model code itself is the same on one device and on a mesh.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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

    model defaults to all the devices left after `data`. Multi-host: call `jax.distributed.initialize()`
    first in every process; `jax.devices()` then lists the devices of all hosts.
    """
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) // data if model is None else model
    if data * model != len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices; there are {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), AXES)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The partition spec of one parameter; axes that do not divide evenly are left whole."""
    for pattern, spec in RULES:
        if pattern.fullmatch(path):
            break
    axes = [name if name is None or shape[i] % mesh.shape[name] == 0 else None for i, name in enumerate(spec)]
    return P(*axes)


def param_shardings(shapes: Any, mesh: Mesh) -> Any:
    """NamedShardings for a params tree (of arrays or ShapeDtypeStructs), per `RULES`."""
    def one(path, leaf):
        name = "/".join(k.key for k in path)
        return NamedSharding(mesh, spec_for(name, tuple(leaf.shape), mesh))
    return jax.tree_util.tree_map_with_path(one, shapes)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Leading (batch) axis over "data" when it divides evenly, else replicated."""
    lead = "data" if shape and shape[0] % mesh.shape["data"] == 0 else None
    return NamedSharding(mesh, P(lead, *([None] * (len(shape) - 1))))
