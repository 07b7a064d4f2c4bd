"""Per-device memory of the released checkpoints on device meshes: the tables of docs/scaling.md.

    .venv/bin/python benchmarks/scaling_table.py [--length 4096] [--batch 1 8] [--write-docs]

Every figure is `sharding.memory_per_device` on `presets.config(name)`: weights by the tensor-parallel
rules table, KV cache as `generate` lays it out (`sharding.cache_spec`). Nothing is allocated,
so it runs on any machine. --write-docs replaces the generated block of docs/scaling.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llava_next_jax import presets, sharding  # noqa: E402

COMMAND = ".venv/bin/python benchmarks/scaling_table.py --write-docs"
BEGIN, END = "<!-- BEGIN scaling_table.py -->", "<!-- END scaling_table.py -->"

# Accelerators per host or slice: (devices jax sees, HBM per device in GiB as the vendor states it, hosts).
MACHINES = {
    "v5e-8": (8, 16, 1),      # TPU v5e: 8 chips of 16 GiB on one host
    "v5p-8": (4, 95, 1),      # TPU v5p: 4 chips (8 TensorCores, one device per chip) of 95 GiB
    "v5p-16": (8, 95, 2),     # 8 v5p chips over 2 hosts
    "8xH100": (8, 80, 1),     # 8 H100 SXM of 80 GB
}

# (checkpoint, machine, data, model): the meshes docs/scaling.md discusses.
RECIPES = [
    ("mistral-7b", "v5e-8", 1, 8), ("mistral-7b", "v5e-8", 2, 4), ("mistral-7b", "v5e-8", 4, 2),
    ("mistral-7b", "8xH100", 8, 1),
    ("vicuna-7b", "v5e-8", 2, 4), ("vicuna-7b", "v5e-8", 4, 2),
    ("llama3-8b", "v5e-8", 2, 4), ("llama3-8b", "v5e-8", 4, 2),
    ("vicuna-13b", "v5e-8", 1, 8), ("vicuna-13b", "v5e-8", 2, 4), ("vicuna-13b", "8xH100", 4, 2),
    ("34b", "v5e-8", 1, 8), ("34b", "v5p-8", 1, 4), ("34b", "v5p-8", 2, 2), ("34b", "8xH100", 2, 4),
    ("72b", "v5p-8", 1, 4), ("72b", "8xH100", 1, 8), ("72b", "v5p-16", 2, 4),
    ("110b", "v5p-8", 1, 4), ("110b", "8xH100", 1, 8), ("110b", "v5p-16", 2, 4),
]

GiB = 2 ** 30
ROWS_LIMIT = 256  # the search for "most rows that fit" stops here


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def weights_table(dtype: str, models=(1, 2, 4, 8)) -> list[str]:
    lines = ["| checkpoint | parameters | " + " | ".join(f"weights, model={m}" for m in models)
             + " | KV cache, 1 row x 1024 slots |",
             "|---|---|" + "---|" * len(models) + "---|"]
    for name in presets.RELEASES:
        config = presets.config(name)
        per_model = [sharding.memory_per_device(config, {"data": 1, "model": m}, 1, 1024, dtype) for m in models]
        params = per_model[0].weights // jnp.dtype(dtype).itemsize
        lines.append(f"| {name} | {params / 1e9:.2f}B | " + " | ".join(gib(mem.weights) for mem in per_model)
                     + f" | {gib(per_model[0].kv_cache)} |")
    return lines


def most_rows(config, mesh_shape: dict[str, int], length: int, dtype: str, usable: float, limit=256) -> int:
    """The largest batch (a multiple of the "data" size, up to `limit`) whose weights + cache fit `usable`."""
    fitting = [b for b in range(mesh_shape["data"], limit + 1, mesh_shape["data"])
               if sharding.memory_per_device(config, mesh_shape, b, length, dtype).total <= usable]
    return max(fitting, default=0)


def recipes_table(dtype: str, batches: list[int], length: int, headroom: float) -> list[str]:
    cols = " | ".join(f"KV cache, batch {b} | total, batch {b} | fits, batch {b}" for b in batches)
    lines = [f"| checkpoint | machine | mesh (data x model) | weights | {cols} | most rows that fit |",
             "|---|---|---|---|" + "---|---|---|" * len(batches) + "---|"]
    for name, machine, data, model in RECIPES:
        devices, hbm_gib, hosts = MACHINES[machine]
        assert data * model == devices, (name, machine, data, model)
        config = presets.config(name)
        usable = (1 - headroom) * hbm_gib * GiB
        cells = []
        for batch in batches:
            mem = sharding.memory_per_device(config, {"data": data, "model": model}, batch, length, dtype)
            cells += [gib(mem.kv_cache), gib(mem.total), "yes" if mem.total <= usable else "**no**"]
        where = f"{machine} ({devices} x {hbm_gib} GiB" + (f", {hosts} hosts)" if hosts > 1 else ")")
        rows = most_rows(config, {"data": data, "model": model}, length, dtype, usable, ROWS_LIMIT)
        lines.append(f"| {name} | {where} | {data} x {model} | {gib(mem.weights)} | " + " | ".join(cells)
                     + f" | {rows}{'+' if rows == ROWS_LIMIT else ''} |")
    return lines


TRAIN_MESHES = [((1, 8), False), ((2, 4), False), ((2, 4), True), ((8, 1), True), ((2, 8), True), ((4, 8), True)]
"""(data, model) meshes of the fine-tuning table, and whether they use FSDP."""


def training_table() -> list[str]:
    """Full fine-tuning state per device: float32 params, gradient and AdamW's two moments (16 bytes a
    parameter), laid out as the params are (`fsdp`: also over "data")."""
    name_of = lambda mesh, fsdp: f"{mesh[0]} x {mesh[1]}{' fsdp' if fsdp else ''}"
    lines = ["| checkpoint | " + " | ".join(name_of(m, f) for m, f in TRAIN_MESHES) + " |",
             "|---|" + "---|" * len(TRAIN_MESHES)]
    for name in presets.RELEASES:
        config = presets.config(name)
        cells = [gib(4 * sharding.memory_per_device(config, {"data": d, "model": m}, 1, 1, "float32", fsdp).weights)
                 for (d, m), fsdp in TRAIN_MESHES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def render(dtype: str, batches: list[int], length: int, headroom: float) -> str:
    return "\n".join([
        f"All figures in GiB per device, {dtype}; from `sharding.memory_per_device` on `presets.config(name)`.",
        "",
        "Weights by the size of the \"model\" axis (weights do not depend on \"data\": they are replicated "
        "over it), and the KV cache of one row per 1024 cache slots on one device:",
        "",
        *weights_table(dtype),
        "",
        f"Recipes: KV cache at {length} cache slots (prompt bucket + new-token bucket) as `generate` lays it "
        f"out (`sharding.cache_spec`: rows over \"data\", kv heads over \"model\"). "
        f"\"fits\": weights + KV cache <= {1 - headroom:.0%} of HBM, the rest left to activations, XLA's "
        "workspace and the runtime (an allowance, not a measurement). \"most rows that fit\": the largest "
        f"batch, a multiple of the data size, that fits at {length} slots.",
        "",
        *recipes_table(dtype, batches, length, headroom),
        "",
        "Full fine-tuning (`--trainable all`, float32 master weights): params, their gradient and AdamW's two "
        "moments, 16 bytes a parameter, per device by mesh (`--mesh DATA,MODEL`, `--fsdp`). Activations are "
        "not counted (`--remat` keeps one decoder layer's); `projector+decoder` saves the vision tower's "
        "moments (~0.3B parameters).",
        "",
        *training_table(),
    ])


def write_docs(block: str) -> None:
    path = os.path.join(ROOT, "docs", "scaling.md")
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to replace")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=4096, help="KV-cache slots per row")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="rows per generate call")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--headroom", type=float, default=0.10, help="share of HBM kept free for activations")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    block = render(args.dtype, args.batch, args.length, args.headroom)
    print(block)
    if args.write_docs:
        write_docs(block)


if __name__ == "__main__":
    main()
