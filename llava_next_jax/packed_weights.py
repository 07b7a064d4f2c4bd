"""Packed bfloat16 weights for decoding on the CPU: 12 bits a weight instead of 16, lossless.

A batch-1 decode step on the CPU streams the decoder's weights from memory and spends most of its time
there (docs/benchmarks.md). Packed, a weight is its low byte (the exponent's last bit and the mantissa)
and a 4-bit code for its high byte (the sign and the exponent's other bits): a kernel's weights take
few exponents, so 15 codes cover all but ~1e-4 of them, and the rest are kept apart as escapes
(`cpu_packed.h` has the layout). The products of a decode step (1 to 8 rows) read the packed kernel
and widen it in registers (`cpu_kernels.packed_matmul`); products of more rows (a prefill) unpack it
to bfloat16 first (`unpack`, one pass) and run as before. Either way the numbers are those of the
bfloat16 kernel, bit for bit: the packed product forms its float32 sums as the few-row kernel does.

`pack_params` packs a model's decoder and lm_head kernels (`LlavaNext.pack_weights`); the vision tower,
the projector and the embedding table stay as they are. For inference on a single-device CPU with the
native kernels; a packed model takes no gradient.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import cpu_kernels

BLOCK = 32          # columns per block of codes (`cpu_packed.h` kPackBlock)
ESCAPE = 15         # the code of a weight kept apart
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
    """`kernel` (bfloat16 `[K, N]`) packed, or None where more than `max_escapes` of its weights would be
    escapes (their high byte not among the 15 most frequent)."""
    w = np.asarray(kernel)
    if w.dtype != jnp.bfloat16 or w.ndim != 2:
        raise ValueError(f"pack: want a bfloat16 [K, N] kernel, got {w.dtype} {list(w.shape)}")
    K, N = w.shape
    Np = -(-N // BLOCK) * BLOCK
    bits = w.view(np.uint16)
    high = (bits >> 8).astype(np.uint8)
    counts = np.bincount(high.ravel(), minlength=256)
    top = np.argsort(-counts, kind="stable")[:ESCAPE]
    top = top[counts[top] > 0]
    code_of = np.full(256, ESCAPE, np.uint8)
    code_of[top] = np.arange(len(top), dtype=np.uint8)
    table = np.zeros(16, np.uint8)
    table[:len(top)] = top
    codes = np.full((K, Np), ESCAPE, np.uint8)
    codes[:, :N] = code_of[high]
    escaped = codes[:, :N] == ESCAPE
    if escaped.sum() > max_escapes * w.size:
        return None
    low = np.zeros((K, Np), np.uint8)
    low[:, :N] = np.where(escaped, 0, bits & 0xFF)
    halves = codes.reshape(K, Np // BLOCK, 2, BLOCK // 2)      # byte i: column i low, column 16 + i high
    packed_codes = (halves[:, :, 0] | halves[:, :, 1] << 4).reshape(K, Np // 2)
    rows, columns = np.nonzero(escaped)
    order = np.lexsort((rows % 4, columns, rows // 4))             # by group of four rows, column, row
    rows, columns = rows[order], columns[order]
    groups = np.searchsorted(rows // 4, np.arange(-(-K // 4) + 1))
    as_int32 = lambda a: jnp.asarray(a.astype(np.int32))
    return PackedKernel(jnp.asarray(low), jnp.asarray(packed_codes), jnp.asarray(table), as_int32(rows),
                        as_int32(columns), jnp.asarray(w[rows, columns].astype(np.float32)), as_int32(groups), N)


def applies(rows: int, kernel: PackedKernel) -> bool:
    """Whether a `[rows, K]` product by a packed kernel reads it packed (1 to `cpu_kernels.MAX_ROWS` rows)."""
    return 1 <= rows <= cpu_kernels.MAX_ROWS


def matmul(x: jax.Array, kernel: PackedKernel, tasks: int = 0) -> jax.Array:
    """`x [R, K] @ kernel` for R <= `cpu_kernels.MAX_ROWS` on the packed kernel: float32 sums, the result
    in x's dtype. `tasks` as `cpu_kernels.fewrow_matmul`'s."""
    return cpu_kernels.packed_matmul(x, kernel.arrays(), kernel.columns, tasks)


def unpack(kernel: PackedKernel) -> jax.Array:
    """The bfloat16 kernel `[K, N]`, bit for bit as it was packed."""
    return cpu_kernels.unpack(kernel.arrays(), kernel.columns)


def is_packed(params: Any) -> bool:
    """Whether a params tree holds packed kernels."""
    return any(isinstance(leaf, PackedKernel) for leaf in
               jax.tree_util.tree_leaves(params, is_leaf=lambda a: isinstance(a, PackedKernel)))


def pack_params(params: dict) -> dict:
    """`params` with the decoder's and lm_head's bfloat16 kernels packed: each `{"kernel": ...}` becomes
    `{"packed_kernel": PackedKernel}` (its bias kept), where `pack` packs it. The vision tower, the
    projector and the embedding table are left as they are. Needs the native CPU kernels."""
    if not cpu_kernels.available():
        raise RuntimeError("packed weights need the native CPU kernels (see the warning above, or "
                           "LLAVA_NEXT_CPU_KERNELS=0 is set)")

    def walk(tree):
        if not isinstance(tree, dict):
            return tree
        kernel = tree.get("kernel")
        if kernel is not None and getattr(kernel, "ndim", 0) == 2 and kernel.dtype == jnp.bfloat16:
            packed = pack(kernel)
            if packed is not None:
                return {**{k: v for k, v in tree.items() if k != "kernel"}, "packed_kernel": packed}
        return {k: walk(v) for k, v in tree.items()}
    out = dict(params)
    for name in ("language_model", "lm_head"):
        if name in out:
            out[name] = walk(out[name])
    return out
