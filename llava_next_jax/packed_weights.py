"""Packed bfloat16 weights for decoding on the CPU: 12 bits a weight instead of 16, lossless.

A batch-1 decode step on the CPU streams the decoder's weights from memory and spends most of its time
there (docs/benchmarks.md). Packed, a weight is its low byte (the exponent's last bit and the mantissa)
and a 4-bit code for its high byte (the sign and the exponent's other bits): a kernel's weights take
few exponents, so 15 codes cover all but ~1e-4 of them, and the rest are kept apart as escapes
(`cpu_packed.h` has the layout). The products of a decode step (1 to 8 rows) read the packed kernel
and widen it in registers (`cpu_kernels.packed_matmul`); products of more rows (a prefill) pack the AMX
tiles' panels from it where the CPU has AMX (`gemm`), else unpack it to bfloat16 first (`unpack`, one
pass) and run as before. Either way the numbers are those of the
bfloat16 kernel, bit for bit: the packed product forms its float32 sums as the few-row kernel does.

`pack_params` packs a model's decoder and lm_head kernels (`LlavaNext.pack_weights`); the vision tower,
the projector and the embedding table stay as they are. For inference on a single-device CPU with the
native kernels; a packed model takes no gradient.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels

MAX_ESCAPES = 0.01  # a kernel with a larger share of escapes stays unpacked (it would save little)


@flax.struct.dataclass
class PackedKernel:
    """A bfloat16 kernel `[K, N]` packed (`cpu_packed.h`): `low` uint8 `[K, Np]` (Np: N rounded up to
    `BLOCK`), `codes` uint8 `[K, Np // 2]`, `table` uint8 `[16]`, the escapes' `escape_rows`,
    `escape_columns` (int32) and `escape_values` (float32) `[E]`, sorted by group of four rows, then
    column, then row, and `escape_groups` (int32 `[ceil(K / 4) + 1]`) where each group's start."""
    low: jax.Array
    codes: jax.Array
    table: jax.Array
    escape_rows: jax.Array
    escape_columns: jax.Array
    escape_values: jax.Array
    escape_groups: jax.Array
    columns: int = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.low.shape[0], self.columns

    dtype = jnp.dtype(jnp.bfloat16)
    ndim = 2

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in jax.tree_util.tree_leaves(self))

    def arrays(self) -> tuple[jax.Array, ...]:
        return (self.low, self.codes, self.table, self.escape_rows, self.escape_columns, self.escape_values,
                self.escape_groups)


def pack(kernel, max_escapes: float = MAX_ESCAPES) -> PackedKernel | None:
    """`kernel` (bfloat16 `[K, N]`) packed (`cpu_kernels.pack_bf16`, ~4 ns a weight), or None where more
    than `max_escapes` of its weights would be escapes (their high byte not among the 15 most frequent)."""
    w = np.asarray(kernel)
    if w.dtype != jnp.bfloat16 or w.ndim != 2:
        raise ValueError(f"pack: want a bfloat16 [K, N] kernel, got {w.dtype} {list(w.shape)}")
    arrays = cpu_kernels.pack_bf16(w, int(max_escapes * w.size))
    if arrays is None:
        return None
    return PackedKernel(*map(jnp.asarray, arrays), w.shape[1])


def applies(rows: int, kernel: PackedKernel) -> bool:
    """Whether a `[rows, K]` product by a packed kernel reads it packed (1 to `cpu_kernels.MAX_ROWS` rows)."""
    return 1 <= rows <= cpu_kernels.MAX_ROWS


def matmul(x: jax.Array, kernel: PackedKernel, tasks: int = 0) -> jax.Array:
    """`x [R, K] @ kernel` for R <= `cpu_kernels.MAX_ROWS` on the packed kernel: float32 sums, the result
    in x's dtype. `tasks` as `cpu_kernels.fewrow_matmul`'s."""
    return cpu_kernels.packed_matmul(x, kernel.arrays(), kernel.columns, tasks)


def gemm_applies(rows: int, x_dtype, kernel: PackedKernel) -> bool:
    """Whether a `[rows, K]` product by a packed kernel runs on AMX tiles straight from it (`gemm`)."""
    return cpu_kernels.packed_gemm_applies(rows, x_dtype, kernel.shape[0])


def gemm(x: jax.Array, kernel: PackedKernel) -> jax.Array:
    """`x [M, K] @ kernel` (bfloat16) on AMX tiles, the tiles' panels packed from the packed kernel
    (`cpu_kernels.packed_gemm`): the numbers of the bf16 kernel's product, without unpacking it whole."""
    return cpu_kernels.packed_gemm(x, kernel.arrays(), kernel.columns)


def unpack(kernel: PackedKernel) -> jax.Array:
    """The bfloat16 kernel `[K, N]`, bit for bit as it was packed."""
    return cpu_kernels.unpack(kernel.arrays(), kernel.columns)


def is_packed(params: Any) -> bool:
    """Whether a params tree holds packed kernels."""
    return any(isinstance(leaf, PackedKernel) for leaf in
               jax.tree_util.tree_leaves(params, is_leaf=lambda a: isinstance(a, PackedKernel)))


def pack_params(params: dict) -> dict:
    """`params` with the decoder's and lm_head's bfloat16 kernels packed: each `{"kernel": ...}` becomes
    `{"packed_kernel": PackedKernel}` (its bias kept), where `pack` packs it; kernels packed on a thread
    each (the packing runs outside the GIL). The vision tower, the projector and the embedding table
    are left as they are. Needs the native CPU kernels."""
    if not cpu_kernels.available():
        raise RuntimeError("packed weights need the native CPU kernels (see the warning above, or "
                           "LLAVA_NEXT_CPU_KERNELS=0 is set)")

    def places(tree, path):   # the paths of the dicts holding a 2-D bf16 "kernel"
        kernel = tree.get("kernel")
        if getattr(kernel, "ndim", 0) == 2 and kernel.dtype == jnp.bfloat16:
            yield path
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from places(value, (*path, key))

    def at(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    paths = [path for name in ("language_model", "lm_head") if name in params for path in places(params[name], (name,))]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        packed = dict(zip(paths, pool.map(lambda path: pack(at(params, path)["kernel"]), paths)))

    def rebuild(tree, path):
        if packed.get(path) is not None:
            return {**{k: v for k, v in tree.items() if k != "kernel"}, "packed_kernel": packed[path]}
        return {k: rebuild(v, (*path, k)) if isinstance(v, dict) else v for k, v in tree.items()}
    return {name: rebuild(tree, (name,)) if name in ("language_model", "lm_head") else tree
            for name, tree in params.items()}
