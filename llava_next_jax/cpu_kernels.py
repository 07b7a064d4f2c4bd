"""Native kernels for XLA:CPU: the few-row matmul of a decode step (`cpu_kernels.cc`), and a decode
step's attention and attention over a prompt with its gradient (`cpu_attention.cc`).

XLA:CPU multiplies a few rows (a decode step of batch 2-8) by a float32 weight kernel as a general
matmul that packs the kernel first, and any number of rows by a bfloat16 kernel after converting
the kernel to float32 in memory: both at about half the speed at which the kernel can be streamed.
The native kernel streams it once, widening bfloat16 weights to float32 in registers (float32 sums,
as XLA's product; docs/benchmarks.md). Both sources are compiled into one library on first use with
the machine's C++ compiler (`$CXX`, else `g++`) against the XLA FFI headers that jaxlib ships, cached
under `$LLAVA_NEXT_CACHE` (default `~/.cache/llava_next_jax`) by a hash of the sources, jaxlib's
version, the compiler and the CPU (builds unused for `STALE_DAYS` are removed when a new one is made),
and registered with `jax.ffi`. Where it cannot be built (no
compiler), a warning says why once and XLA's operations are used. `LLAVA_NEXT_CPU_KERNELS=0` turns
the kernels off.

Used by `modeling.decoder.matmul` for products of 2 to 8 float32 rows, or 1 to 8 bfloat16 rows, on a
single-device CPU backend (a mesh keeps XLA's products, which its partitioner knows how to split).
`decode_attention` runs a decode step's attention over a float32 or bf16 cache in one pass per (row,
kv head), where XLA:CPU wrote the logits and weights to memory between its batched few-row products,
which read the cache at about half the speed (a bf16 cache at an eighth).
`flash_attention` runs attention over a prompt in one pass over tiles of keys (online softmax), where
XLA:CPU writes each block's logits to memory and reads them back three times; `flash_attention_backward`
its gradient from the forward pass's log-sum-exp (`modeling.decoder.native_attention` pairs them).
`gemm` runs products of `GEMM_MIN_ROWS` rows or more (a prefill, a training pass) on oneDNN's gemm
functions where the `onednn-cpu-gomp` package is installed (a dependency on x86-64 Linux; its
library is found in the environment's lib/ and loaded with ctypes, `LLAVA_NEXT_ONEDNN=0` leaves it
out): in a program XLA:CPU's float32 products ran ~1.2x slower, and its bfloat16 ones ~3x slower
(docs/benchmarks.md).
On a CPU with AMX tiles, where Linux lets the process use them (`EnableAmx`, asked once), bfloat16
runs on the tiles (`cpu_amx.cc`, `amx_applies`; `LLAVA_NEXT_AMX=0` leaves them out): attention over a
prompt (`flash_attention`), and products from `AMX_MIN_ROWS` rows whose depth is a multiple of 32
(`gemm`'s forward products), ~3x faster than the float32 kernel and oneDNN's bf16 gemm.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = tuple(Path(__file__).with_name(name) for name in ("cpu_kernels.cc", "cpu_attention.cc", "cpu_amx.cc"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_attention.h", "cpu_products.h", "cpu_tasks.h"))
TARGET = "llava_next_fewrow_matmul"
DECODE_TARGET = "llava_next_decode_attention"
FLASH_TARGET = "llava_next_flash_attention"
FLASH_BACKWARD_TARGET = "llava_next_flash_attention_backward"
FLASH_BF16_TARGET = "llava_next_flash_attention_bf16"
GEMM_BF16_TARGET = "llava_next_gemm_bf16"
GEMM_TARGET = "llava_next_gemm"
COPY_TARGET = "llava_next_copy"
TAKE_ROWS_TARGET = "llava_next_take_rows"
WRITE_CACHE_TARGET = "llava_next_write_cache"
SILU_MUL_TARGET = "llava_next_silu_mul"
MAX_ROWS = 8
_log = logging.getLogger(__name__)


def cpu_name() -> str:
    """The CPU's model and instruction-set flags (the library is built for this CPU: -march=native)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(dict.fromkeys(line for line in lines if line.startswith(("model name", "flags"))))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build() -> Path:
    """The shared library's path, compiling it first if this source/jaxlib/compiler/CPU has none."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{include}"]
    texts = [source.read_text() for source in SOURCES + HEADERS]
    key = hashlib.sha256("\0".join([*texts, jax.lib.__version__, compiler, " ".join(flags),
                                     cpu_name()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("LLAVA_NEXT_CACHE", Path.home() / ".cache" / "llava_next_jax"))
    library = cache / f"cpu_kernels-{key}.so"
    if library.exists():
        os.utime(library)   # in use: kept by `_prune`
        return library
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        built = Path(tmp) / library.name
        run = subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True,
                             timeout=300)
        if run.returncode:
            raise RuntimeError(f"{compiler} {' '.join(map(str, SOURCES))} failed:\n{run.stderr[-2000:]}")
        os.replace(built, library)  # atomic: concurrent processes each build, one file wins
    _prune(cache)
    return library


STALE_DAYS = 30


def _prune(cache: Path, days: float = STALE_DAYS) -> list[Path]:
    """Removes the builds in `cache` that no process has loaded for `days` (each source or jaxlib
    version leaves one behind; a build in use is touched on each load). Returns what it removed."""
    import time
    removed, cutoff = [], time.time() - days * 86400
    for old in cache.glob("cpu_kernels-*.so"):
        try:
            if old.stat().st_mtime < cutoff:
                old.unlink()
                removed.append(old)
        except OSError:   # gone already, or not ours to remove
            pass
    return removed


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call), unless
    `LLAVA_NEXT_CPU_KERNELS=0` (read when a program is traced)."""
    return os.environ.get("LLAVA_NEXT_CPU_KERNELS", "1") != "0" and _load()


@functools.cache
def _load() -> bool:
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.FewRowMatmul), platform="cpu")
        jax.ffi.register_ffi_target(DECODE_TARGET, jax.ffi.pycapsule(library.DecodeAttention), platform="cpu")
        jax.ffi.register_ffi_target(FLASH_TARGET, jax.ffi.pycapsule(library.FlashAttention), platform="cpu")
        jax.ffi.register_ffi_target(FLASH_BACKWARD_TARGET, jax.ffi.pycapsule(library.FlashAttentionBackward),
                                    platform="cpu")
        jax.ffi.register_ffi_target(COPY_TARGET, jax.ffi.pycapsule(library.Copy), platform="cpu")
        jax.ffi.register_ffi_target(TAKE_ROWS_TARGET, jax.ffi.pycapsule(library.TakeRows), platform="cpu")
        jax.ffi.register_ffi_target(WRITE_CACHE_TARGET, jax.ffi.pycapsule(library.WriteCache), platform="cpu")
        jax.ffi.register_ffi_target(SILU_MUL_TARGET, jax.ffi.pycapsule(library.SiluMulBf16), platform="cpu")
    except Exception as error:  # noqa: BLE001 - any failure means XLA's products, said once
        _log.warning("llava_next_jax: the native CPU kernels are unavailable, XLA's operations are used "
                     "(decode and prefill on the CPU run slower): %s", error)
        return False
    if library.EnableAmx():   # built for a CPU with AMX tiles, and Linux lets this process use them
        jax.ffi.register_ffi_target(FLASH_BF16_TARGET, jax.ffi.pycapsule(library.FlashAttentionBf16), platform="cpu")
        jax.ffi.register_ffi_target(GEMM_BF16_TARGET, jax.ffi.pycapsule(library.GemmBf16), platform="cpu")
        _extras.add("amx")
    onednn = _onednn()
    if onednn is not None:
        try:
            address = lambda name: ctypes.cast(getattr(onednn, name), ctypes.c_void_p)
            omp = ctypes.CDLL("libgomp.so.1")   # oneDNN's OpenMP runtime (this package's build of it)
            library.SetGemm(address("dnnl_sgemm"), address("dnnl_gemm_bf16bf16f32"),
                            ctypes.cast(omp.omp_set_num_threads, ctypes.c_void_p))
            jax.ffi.register_ffi_target(GEMM_TARGET, jax.ffi.pycapsule(library.Gemm), platform="cpu")
            _extras.add("onednn")
        except Exception as error:  # noqa: BLE001 - oneDNN's products only: the other kernels stay
            _log.warning("llava_next_jax: oneDNN's gemm could not be set up, XLA's products are used for "
                         "large products: %s", error)
    return True


# What `_load` found beyond the kernels every build has: "amx" (the bfloat16 attention and product
# kernels on AMX tiles, registered) and "onednn" (oneDNN's gemm set and registered).
_extras: set[str] = set()


def _onednn() -> ctypes.CDLL | None:
    """oneDNN's library (the `onednn-cpu-gomp` package puts it in the environment's lib/), or None
    where it is not installed or `LLAVA_NEXT_ONEDNN=0`."""
    if os.environ.get("LLAVA_NEXT_ONEDNN", "1") == "0":
        return None
    for directory in dict.fromkeys((sys.prefix, sys.base_prefix)):
        path = Path(directory) / "lib" / "libdnnl.so.3"
        if path.exists():
            try:
                return ctypes.CDLL(str(path))
            except OSError as error:
                _log.warning("llava_next_jax: %s could not be loaded, XLA's products are used for large "
                             "products: %s", path, error)
    return None


def _usable() -> bool:
    """A single-device CPU backend with the kernels built (a mesh keeps XLA's products)."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def _require():
    if not _load():
        raise RuntimeError("the native CPU kernel is unavailable (see the warning above)")


# Fewest rows per kernel dtype: one float32 row stays on XLA's row-blocked products (as fast).
MIN_ROWS = {jnp.dtype(jnp.float32): 2, jnp.dtype(jnp.bfloat16): 1}


def applies(rows: int, x_dtype, kernel: jax.Array) -> bool:
    """Whether a `[rows, in] x kernel [in, out]` product runs on the native kernel."""
    least = MIN_ROWS.get(jnp.dtype(kernel.dtype))
    return (least is not None and least <= rows <= MAX_ROWS and x_dtype == kernel.dtype and kernel.ndim == 2
            and _usable())


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def fewrow_matmul(x: jax.Array, kernel: jax.Array, tasks: int = 0) -> jax.Array:
    """`x [R, K] @ kernel [K, N]` on the native kernel (R <= 8; float32 or bfloat16, both the same):
    float32 sums, the result in their dtype; differentiable. `tasks`: into how many pieces to split
    it (0: one per thread of XLA's CPU pool; more than there are threads is allowed, for tests)."""
    _require()
    out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), kernel, tasks=np.int64(tasks)).astype(x.dtype)


@fewrow_matmul.defjvp
def _fewrow_matmul_jvp(tasks, primals, tangents):
    (x, kernel), (dx, dkernel) = primals, tangents
    return fewrow_matmul(x, kernel, tasks), dx @ kernel + x @ dkernel


# Fewest rows a product takes to run on oneDNN's gemm (fewer: the few-row kernel or XLA's products,
# which ran 16-128 rows of a [1024, 4096] float32 product faster; 256 and more slower: docs/benchmarks.md).
GEMM_MIN_ROWS = 256
GEMM_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


# Fewest rows a bfloat16 product takes to run on AMX tiles (`cpu_amx.cc`'s GemmBf16) where the CPU has
# them: fewer go to the few-row kernel (docs/benchmarks.md).
AMX_MIN_ROWS = MAX_ROWS + 1


def gemm_applies(rows: int, x_dtype, kernel: jax.Array) -> bool:
    """Whether a `[rows, in] x kernel [in, out]` product runs on oneDNN's gemm (`gemm`): `GEMM_MIN_ROWS`
    rows or more, float32 or bfloat16 (both the same), oneDNN installed and not switched off
    (`LLAVA_NEXT_ONEDNN=0`, read when a program is traced), a single-device CPU backend. A bfloat16
    product whose depth `in` is a multiple of 32 runs on AMX tiles instead where `amx_applies`, from
    `AMX_MIN_ROWS` rows (its gradient's transposed products on oneDNN)."""
    if not (x_dtype == kernel.dtype and jnp.dtype(x_dtype) in GEMM_DTYPES and kernel.ndim == 2
            and os.environ.get("LLAVA_NEXT_ONEDNN", "1") != "0" and _usable() and "onednn" in _extras):
        return False
    return rows >= (AMX_MIN_ROWS if _on_tiles(kernel) else GEMM_MIN_ROWS)


def _on_tiles(kernel: jax.Array, *others: jax.Array) -> bool:
    """Whether a product by `kernel [K, N]` (with `others`) runs on AMX tiles: K a multiple of 32 (the
    tiles' depth step, which GemmBf16 reads in place), `amx_applies`."""
    return kernel.shape[0] % 32 == 0 and amx_applies(kernel, *others)


def _gemm(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
    """op(a) @ op(b) on oneDNN (`cpu_kernels.cc`'s Gemm), or on AMX tiles (`cpu_amx.cc`'s GemmBf16: bfloat16,
    no transposes, a depth that is a multiple of 32, `amx_applies`): float32 sums, the result in a's dtype."""
    _require()
    if "onednn" not in _extras:
        raise RuntimeError("oneDNN's gemm is unavailable: the onednn-cpu-gomp package is not installed, or "
                           "LLAVA_NEXT_ONEDNN=0")
    M = a.shape[1] if transpose_a else a.shape[0]
    N = b.shape[0] if transpose_b else b.shape[1]
    if not (transpose_a or transpose_b) and _on_tiles(b, a):
        return jax.ffi.ffi_call(GEMM_BF16_TARGET, jax.ShapeDtypeStruct((M, N), a.dtype))(a, b)
    out = jax.ShapeDtypeStruct((M, N), jnp.float32)
    return jax.ffi.ffi_call(GEMM_TARGET, out)(a, b, transpose_a=transpose_a, transpose_b=transpose_b).astype(a.dtype)


@jax.custom_vjp
def gemm(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x [R, K] @ kernel [K, N]` on oneDNN's gemm (`gemm_applies`), float32 or bfloat16 (both the same):
    float32 sums, the result in their dtype. Its gradient is two more such products (g @ kernel.T,
    x.T @ g), the transposes read in place."""
    return _gemm(x, kernel)


def _gemm_fwd(x, kernel):
    return _gemm(x, kernel), (x, kernel)


def _gemm_bwd(saved, g):
    x, kernel = saved
    g = g.astype(x.dtype)
    return _gemm(g, kernel, transpose_b=True), _gemm(x, g, transpose_a=True)


gemm.defvjp(_gemm_fwd, _gemm_bwd)


# float32, bfloat16, or bfloat16 bits held as uint16 (`modeling.decoder.cache_dtype`)
CACHE_DTYPES = tuple(jnp.dtype(t) for t in (jnp.float32, jnp.bfloat16, jnp.uint16))


def decode_applies(cache_dtype) -> bool:
    """Whether a decode step's attention over a cache of `cache_dtype` runs on `decode_attention`."""
    return jnp.dtype(cache_dtype) in CACHE_DTYPES and _usable()


def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, k_new: jax.Array, v_new: jax.Array,
                     earlier: jax.Array, own: jax.Array, scale: float) -> jax.Array:
    """A decode step's attention (`modeling.decoder._attend_new`'s arguments) in one pass per (row, kv
    head) over a float32 or bfloat16 cache (or bf16 bits as uint16; `cpu_attention.cc`): q
    `[B, T, N, H]` over the cache's keys and values `[B, K, H, S]` where the bool `earlier` `[B, T, S]`
    allows and over the step's own `[B, K, T, H]` where `own` `[B, T, T]` allows, one softmax;
    computed in float32, the result in q's dtype. A query that sees nothing gets zeros. Not
    differentiable (no pass takes a gradient through decode)."""
    _require()
    f32 = lambda a: a.astype(jnp.float32)
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(f"decode_attention: want a float32, bfloat16 or uint16 (bf16 bits) cache, got keys "
                         f"{k_cache.dtype} and values {v_cache.dtype}")
    out = jax.ffi.ffi_call(DECODE_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        f32(q), k_cache, v_cache, f32(k_new), f32(v_new), earlier.astype(jnp.bool_), own.astype(jnp.bool_),
        scale=np.float32(scale))
    return out.astype(q.dtype)


def materialize(x: jax.Array) -> jax.Array:
    """x, computed once and whole before its uses: on a single-device CPU with the kernels built, a
    copy through a custom call (`cpu_kernels.cc`'s Copy), which XLA does not fuse through; elsewhere x.
    XLA:CPU fused the RoPE tables' cos and sin into every layer's rotation of the queries and keys and
    evaluated them there, per head (~60 of ~2100 ms of a mid-size float32 prefill; docs/benchmarks.md).
    Not differentiable (for values computed from integers, such as positions)."""
    if not _usable():
        return x
    return jax.ffi.ffi_call(COPY_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="broadcast_all")(x)


def take_rows_applies(table: jax.Array) -> bool:
    """Whether `take_rows` gathers from `table`: 2-byte elements (bf16, f16), a single-device CPU with the
    kernels built. XLA:CPU gathers from such a table only after converting all of it (to float32, or a
    copy of its bits), which a decode loop hoists out of itself: a copy of the table per generate call
    (66 MB for the mid-size model, 262 MB for Mistral-7B's)."""
    return jnp.dtype(table.dtype).itemsize == 2 and table.ndim == 2 and _usable()


@jax.custom_vjp
def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """`table[ids]` (`[*ids.shape, D]`, table's dtype) by `cpu_kernels.cc`'s TakeRows: rows copied from
    the table where it lies; ids as jnp indexing reads them (negative from the end), then clamped."""
    flat = ids.reshape(-1).astype(jnp.int32)
    out = jax.ffi.ffi_call(TAKE_ROWS_TARGET, jax.ShapeDtypeStruct((flat.shape[0], table.shape[1]), table.dtype),
                           vmap_method="sequential")(table, flat)
    return out.reshape(*ids.shape, table.shape[1])


def _take_rows_forward(table, ids):
    return take_rows(table, ids), (table, ids)


def _take_rows_backward(saved, g):
    table, ids = saved
    V, D = table.shape
    rows = jnp.where(ids < 0, ids + V, ids).reshape(-1)
    d_table = jnp.zeros((V, D), jnp.float32).at[rows].add(g.reshape(-1, D).astype(jnp.float32), mode="clip")
    return d_table.astype(table.dtype), None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


def silu_mul_applies(gate: jax.Array, up: jax.Array) -> bool:
    """Whether `silu(gate) * up` runs on `silu_mul`: both bfloat16 of one shape, `GEMM_MIN_ROWS` rows or
    more (a prompt: XLA's fusion is as quick for a decode step's few), a single-device CPU with the
    kernels built."""
    return (gate.dtype == up.dtype == jnp.bfloat16 and gate.shape == up.shape
            and int(np.prod(gate.shape[:-1])) >= GEMM_MIN_ROWS and _usable())


@jax.custom_vjp
def silu_mul(gate: jax.Array, up: jax.Array) -> jax.Array:
    """`silu(gate) * up` for bfloat16 gate and up (`cpu_kernels.cc`'s SiluMul): silu in float32 rounded
    to bf16 once, then the product rounded once, as PyTorch computes it in bf16; where XLA:CPU's bf16
    elementwise code ran at ~6 GB/s. Its gradient is XLA's, of the same formula in float32, rounded once."""
    return jax.ffi.ffi_call(SILU_MUL_TARGET, jax.ShapeDtypeStruct(gate.shape, gate.dtype),
                            vmap_method="broadcast_all")(gate, up)


def _silu_mul_fwd(gate, up):
    return silu_mul(gate, up), (gate, up)


def _silu_mul_bwd(saved, cotangent):
    f32 = lambda a: a.astype(jnp.float32)
    grads = jax.vjp(lambda gate, up: jax.nn.silu(gate) * up, *map(f32, saved))[1](f32(cotangent))
    return tuple(g.astype(jnp.bfloat16) for g in grads)


silu_mul.defvjp(_silu_mul_fwd, _silu_mul_bwd)


def write_cache(cache: jax.Array, update: jax.Array, slot: int) -> jax.Array | None:
    """`cache [B, K, H, S]` with `update [B, K, T, H]` (its dtype) written transposed at slots
    [slot, slot + T), in place (`cpu_kernels.cc`'s WriteCache), on a single-device CPU with the kernels
    built and a 2- or 4-byte cache (`decoder.cache_dtype`); None elsewhere, for XLA's
    dynamic_update_slice."""
    if not (_usable() and cache.dtype == update.dtype and cache.dtype.itemsize in (2, 4)):
        return None
    return jax.ffi.ffi_call(WRITE_CACHE_TARGET, jax.ShapeDtypeStruct(cache.shape, cache.dtype),
                            input_output_aliases={0: 0})(cache, update, slot=np.int64(slot))


def flash_applies() -> bool:
    """Whether attention over a prompt runs on `flash_attention` (a single-device CPU, kernels built)."""
    return _usable()


def amx_applies(*arrays: jax.Array) -> bool:
    """Whether attention over (`flash_attention`) or a product of (`gemm`) these arrays runs on the AMX
    kernels (`cpu_amx.cc`): all bfloat16, the library built for a CPU with AMX tiles and Linux letting
    this process use them, not switched off (`LLAVA_NEXT_AMX=0`, read when a program is traced)."""
    return (all(a.dtype == jnp.bfloat16 for a in arrays) and os.environ.get("LLAVA_NEXT_AMX", "1") != "0"
            and _usable() and "amx" in _extras)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                    with_lse: bool = False):
    """Softmax attention of q `[B, T, N, H]` over k/v `[B, K, S, H]` (GQA: N a multiple of K) where the
    bool mask `[B, T, S]` allows, in one pass over tiles (`cpu_attention.cc`): float32 throughout, the
    result in q's dtype. bfloat16 q, k and v on a CPU with AMX tiles (`amx_applies`) run on them
    instead (`cpu_amx.cc`): bf16 products summed in float32, float32 softmax, the weights
    rounded to bfloat16 before their product with the values, as PyTorch's CPU flash attention.
    A query that may see no key gets zeros. with_lse: also each query's log-sum-exp of its scaled
    logits `[B, T, N]` float32 (+inf where it sees no key), what `flash_attention_backward` takes. Not
    differentiable itself: `modeling.decoder.native_attention` gives it a gradient."""
    _require()
    lse_shape = jax.ShapeDtypeStruct(q.shape[:3], jnp.float32)
    if amx_applies(q, k, v):
        out, lse = jax.ffi.ffi_call(FLASH_BF16_TARGET, (jax.ShapeDtypeStruct(q.shape, q.dtype), lse_shape))(
            q, k, v, mask.astype(jnp.bool_), scale=np.float32(scale))
        return (out, lse) if with_lse else out
    f32 = lambda a: a.astype(jnp.float32)
    out, lse = jax.ffi.ffi_call(FLASH_TARGET, (jax.ShapeDtypeStruct(q.shape, jnp.float32), lse_shape))(
        f32(q), f32(k), f32(v), mask.astype(jnp.bool_), scale=np.float32(scale))
    return (out.astype(q.dtype), lse) if with_lse else out.astype(q.dtype)


def flash_attention_backward(q, k, v, mask, scale: float, out, lse, d_out):
    """(dq, dk, dv) of `flash_attention(q, k, v, mask, scale)` = out (with its `lse`) given d_out, in one
    pass over the key tiles (`cpu_attention.cc`), float32 throughout, each in its input's dtype."""
    _require()
    f32 = lambda a: a.astype(jnp.float32)
    delta = jnp.sum(f32(d_out) * f32(out), axis=-1)
    shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    grads = jax.ffi.ffi_call(FLASH_BACKWARD_TARGET, shapes)(
        f32(q), f32(k), f32(v), mask.astype(jnp.bool_), f32(d_out), lse, delta, scale=np.float32(scale))
    return tuple(g.astype(a.dtype) for g, a in zip(grads, (q, k, v)))
