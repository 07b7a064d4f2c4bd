"""The native CPU kernels (`cpu_kernels`: the few-row matmul and the attention of a decode step, a
prefill's attention) against PyTorch, where the decoder uses them, and what happens when they
cannot be built."""

import logging
import os
import platform
import re
import time
import types

import jax
import jax.numpy as jnp

import numpy as np
import pytest
import torch

from llava_next_jax import cpu_kernels
from llava_next_jax.modeling import decoder

needs_amx = pytest.mark.skipif(not cpu_kernels.amx_applies(jnp.ones(1, jnp.bfloat16)),
                               reason="this CPU has no AMX tiles, or Linux refused them (README)")


def test_kernel_is_built_here():
    """The tests below check the kernel, not XLA's fallback: the suite needs a C++ compiler (README),
    and on x86-64 Linux oneDNN (a dependency there) for the large products."""
    assert jax.default_backend() == "cpu"
    assert cpu_kernels.available(), "the native CPU kernel did not build: is g++ (or $CXX) installed?"
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert "onednn" in cpu_kernels._extras, "oneDNN's gemm is not set: is onednn-cpu-gomp installed?"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows,K,N", [(255, 130, 67), (256, 7, 5), (300, 130, 2051), (1000, 1030, 67)])
def test_large_products_on_onednn_equal_torch(rows, K, N, dtype):
    """`decoder.matmul` of `[rows, 1, K]` by `[K, N]` from `GEMM_MIN_ROWS` rows on oneDNN's gemm (row
    counts that are no multiple of the 16-row blocks the threads take), against torch in float64 on
    the same (bf16-rounded) values, and its gradient (the transposed products): float32 sums, bf16
    results rounded once."""
    if "onednn" not in cpu_kernels._extras:
        pytest.skip("oneDNN is not installed (x86-64 Linux only: README)")
    rng = np.random.default_rng(rows + K)
    x = jnp.asarray(rng.standard_normal((rows, 1, K)), dtype)
    kernel = jnp.asarray(rng.standard_normal((K, N)), dtype)
    up = jnp.asarray(rng.standard_normal((rows, 1, N)), jnp.float32)
    loss = lambda x, kernel: jnp.sum(decoder.matmul(x, kernel).astype(jnp.float32) * up)
    assert (cpu_kernels.GEMM_TARGET in jax.jit(loss).lower(x, kernel).as_text()) == (rows >= cpu_kernels.GEMM_MIN_ROWS)
    ours = jax.jit(decoder.matmul)(x, kernel)
    assert ours.dtype == x.dtype
    gx, gk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    tx, tk = (torch.from_numpy(np.asarray(a, np.float64)).requires_grad_() for a in (x, kernel))
    product = tx @ tk
    torch.sum(product * torch.from_numpy(np.asarray(up, np.float64))).backward()
    rtol = 1e-5 if dtype == "float32" else 2 ** -8
    np.testing.assert_allclose(np.asarray(ours, np.float64), product.detach().numpy(), rtol=rtol,
                               atol=1e-5 * np.sqrt(K))
    # bf16 gradients: the upstream gradient rounded to bf16 before each product, as XLA's bf16 products do
    gtol = dict(rtol=1e-5, atol=1e-4) if dtype == "float32" else dict(rtol=2 ** -6, atol=2 ** -6 * np.sqrt(rows))
    np.testing.assert_allclose(np.asarray(gx, np.float64), tx.grad.numpy(), **gtol)
    np.testing.assert_allclose(np.asarray(gk, np.float64), tk.grad.numpy(), **gtol)


@needs_amx
@pytest.mark.parametrize("rows,K,N", [(9, 32, 5), (40, 96, 2051), (255, 1024, 67), (300, 4096, 1000),
                                      (33, 4192, 300)])
def test_bfloat16_products_on_amx_equal_torch(rows, K, N, monkeypatch):
    """bf16 `decoder.matmul` of `[rows, 1, K]` by `[K, N]` (K a multiple of 32) from `AMX_MIN_ROWS` rows
    on AMX tiles (rows and columns that fill no whole 32 x 32 block, one column panel and several, a
    depth taken in slabs, the last one not a whole number of chunks):
    float32 sums rounded once to bf16, against torch in float64 on the same values; its gradient (on
    oneDNN's transposed products) too. LLAVA_NEXT_AMX=0 leaves the tiles out, and fewer rows keep
    the few-row kernel."""
    monkeypatch.delenv("LLAVA_NEXT_AMX", raising=False)
    rng = np.random.default_rng(rows + K)
    x = jnp.asarray(rng.standard_normal((rows, 1, K)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((K, N)), jnp.bfloat16)
    up = jnp.asarray(rng.standard_normal((rows, 1, N)), jnp.float32)
    loss = lambda x, kernel: jnp.sum(decoder.matmul(x, kernel).astype(jnp.float32) * up)
    assert cpu_kernels.GEMM_BF16_TARGET in jax.jit(decoder.matmul).lower(x, kernel).as_text()
    ours = jax.jit(decoder.matmul)(x, kernel)
    gx, gk = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, kernel)
    tx, tk = (torch.from_numpy(np.asarray(a, np.float64)).requires_grad_() for a in (x, kernel))
    product = tx @ tk
    torch.sum(product * torch.from_numpy(np.asarray(up, np.float64))).backward()
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float64), product.detach().numpy(), rtol=2 ** -8,
                               atol=1e-5 * np.sqrt(K))
    # the upstream gradient rounded to bf16 first, then sums over N (dx) or the rows (dkernel)
    np.testing.assert_allclose(np.asarray(gx, np.float64), tx.grad.numpy(), rtol=2 ** -6, atol=2 ** -6 * np.sqrt(N))
    np.testing.assert_allclose(np.asarray(gk, np.float64), tk.grad.numpy(), rtol=2 ** -6, atol=2 ** -6 * np.sqrt(rows))
    few = x[:cpu_kernels.AMX_MIN_ROWS - 1]
    assert cpu_kernels.GEMM_BF16_TARGET not in jax.jit(decoder.matmul).lower(few, kernel).as_text()
    monkeypatch.setenv("LLAVA_NEXT_AMX", "0")
    assert cpu_kernels.GEMM_BF16_TARGET not in jax.jit(lambda *a: decoder.matmul(*a)).lower(x, kernel).as_text()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", range(1, 10))
@pytest.mark.parametrize("K,N", [(7, 5), (130, 67), (1030, 2051)])
def test_matmul_equals_torch_and_uses_the_kernel_for_few_rows(rows, K, N, dtype):
    """`decoder.matmul` of `[rows, 1, K]` by `[K, N]` against torch in float64 on the same (for bf16:
    bf16-rounded) values (K not a multiple of the kernel's 4-row step, N not of a vector width; 130
    and 1030 are split over threads), and the lowered program calls the kernel for 2 to 8 float32
    rows and 1 to 8 bfloat16 rows. bf16 results are float32 sums rounded once: within a bf16 step."""
    rng = np.random.default_rng(rows * K)
    x = jnp.asarray(rng.standard_normal((rows, 1, K)), dtype)
    kernel = jnp.asarray(rng.standard_normal((K, N)), dtype)
    fn = jax.jit(decoder.matmul)
    ours = fn(x, kernel)
    assert ours.dtype == x.dtype
    as64 = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    ref = (as64(x) @ as64(kernel)).numpy()
    rtol = 1e-5 if dtype == "float32" else 2 ** -8
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=rtol, atol=1e-5 * np.sqrt(K))
    native = cpu_kernels.TARGET in fn.lower(x, kernel).as_text()
    assert native == ((2 if dtype == "float32" else 1) <= rows <= 8)


@pytest.mark.parametrize("tasks", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("K", [100, 1030])
def test_any_split_equals_torch(tasks, K):
    """The product split into `tasks` pieces (the rows of the kernel in halves from K = 128, its 2051
    columns in up to 8 ranges), as a many-core machine splits it, against torch: float32 and bf16."""
    rng = np.random.default_rng(tasks)
    for dtype, rtol in (("float32", 1e-5), ("bfloat16", 2 ** -8)):
        x = jnp.asarray(rng.standard_normal((4, K)), dtype)
        kernel = jnp.asarray(rng.standard_normal((K, 2051)), dtype)
        ours = jax.jit(cpu_kernels.fewrow_matmul, static_argnums=2)(x, kernel, tasks)
        as64 = lambda a: torch.from_numpy(np.asarray(a, np.float64))
        np.testing.assert_allclose(np.asarray(ours, np.float64), (as64(x) @ as64(kernel)).numpy(), rtol=rtol,
                                   atol=1e-5 * np.sqrt(K))


@pytest.mark.parametrize("group", [1, 4, 7, 8])
@pytest.mark.parametrize("T", [1, 3, 5])
@pytest.mark.parametrize("H,S", [(64, 2497), (13, 9)])
def test_decode_attention_equals_torch_sdpa(group, T, H, S):
    """A decode step's attention on the kernel (T new tokens a row over the cache plus their own keys)
    against PyTorch's SDPA in float64: rows left-padded by different amounts with the slots past the
    step unwritten (the kernel reads only the slots some query sees), random holes, a row that sees
    none of the cache (its own keys only); S and H not multiples of the kernel's 8-float vectors, the
    rows (T x group: 1 to 40) not of its groups of 4 and its 4 value dims. Rows 1 and 2 alone too:
    fewer (row, kv head) pairs than the kernel wants tasks, so their slots go in chunks (of >= 512)
    whose partial softmaxes are joined. bf16 queries and new keys are computed in float32, the
    result in bf16; a bf16 cache, or its bits in uint16 as the decoder keeps it, is read as it is
    (each value widened to float32)."""
    B, K = 4, 2
    N = K * group
    rng = np.random.default_rng(group + 10 * T + S)
    q = rng.standard_normal((B, T, N, H))
    k_cache, v_cache = rng.standard_normal((2, B, K, H, S)).astype(np.float32)
    k_new, v_new = rng.standard_normal((2, B, K, T, H))
    slots = np.arange(S)
    start, end = np.array([0, S // 3, 1, 0]), np.array([S, S - 2, S // 2, 0])       # row 3: no cache slot
    earlier = (slots >= start[:, None]) & (slots < end[:, None])
    earlier = np.repeat(earlier[:, None], T, 1) & (rng.random((B, T, S)) < 0.9)
    own = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
    attend = jax.jit(cpu_kernels.decode_attention, static_argnums=7)
    t = lambda a: torch.from_numpy(np.asarray(np.asarray(a, np.float32), np.float64))
    cases = [("float32", "float32", slice(None)), ("float32", "float32", slice(1, 3)),
             ("bfloat16", "float32", slice(None)), ("bfloat16", "bfloat16", slice(None)), ("bfloat16", "bfloat16", slice(1, 3)),
             ("bfloat16", "bits", slice(None))]
    for dtype, cache_dtype, rows in cases:
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2 ** -8, atol=2 ** -8)
        qx, kx, vx = (jnp.asarray(a[rows], dtype) for a in (q, k_new, v_new))
        kc, vc = (jnp.asarray(a[rows], "bfloat16" if cache_dtype == "bits" else cache_dtype) for a in (k_cache, v_cache))
        stored = [decoder.store_in_cache(c, jnp.uint16) if cache_dtype == "bits" else c for c in (kc, vc)]
        ours = attend(qx, *stored, kx, vx, jnp.asarray(earlier[rows]), jnp.asarray(own[rows]), H ** -0.5)
        assert ours.dtype == jnp.dtype(dtype)
        keys = torch.cat([t(kc).transpose(2, 3), t(kx)], 2).repeat_interleave(group, 1)   # [B, N, S+T, H]
        values = torch.cat([t(vc).transpose(2, 3), t(vx)], 2).repeat_interleave(group, 1)
        allowed = torch.from_numpy(np.concatenate([earlier[rows], own[rows]], 2))[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(t(qx).transpose(1, 2), keys, values, attn_mask=allowed)
        np.testing.assert_allclose(np.asarray(ours, np.float64), ref.transpose(1, 2).numpy(), **tolerance)


def test_decode_step_attention_is_one_kernel_call():
    """`decoder._attend_new` over a float32 or bf16 cache lowers to one call of the decode-attention
    kernel (its values are also held to PyTorch's SDPA by `test_model.test_decode_attention_equals_torch_sdpa`),
    so with bf16 compute on a CPU the cache keeps bf16 (as its bits in uint16, which XLA:CPU updates
    in place); a float16 cache stays on XLA's operations (and the decoder keeps it in float32)."""
    B, K, G, H, S = 2, 2, 4, 16, 50
    lower = lambda dtype: jax.jit(decoder._attend_new, static_argnums=7).lower(
        jnp.ones((B, 1, K * G, H), dtype), jnp.ones((B, K, H, S), dtype), jnp.ones((B, K, H, S), dtype),
        jnp.ones((B, K, 1, H), dtype), jnp.ones((B, K, 1, H), dtype), jnp.ones((B, 1, S), bool),
        jnp.ones((B, 1, 1), bool), 0.25).as_text()
    assert lower(jnp.float32).count(cpu_kernels.DECODE_TARGET) == 1
    assert lower(jnp.bfloat16).count(cpu_kernels.DECODE_TARGET) == 1
    assert cpu_kernels.DECODE_TARGET not in lower(jnp.float16)
    assert lower(jnp.uint16).count(cpu_kernels.DECODE_TARGET) == 1        # a bf16 cache as the decoder keeps it
    assert decoder.cache_dtype(jnp.bfloat16) == jnp.uint16 and decoder.cache_dtype(jnp.float16) == jnp.float32


ATTENTION_CASES = [(1, 300, 16, 4, 64), (3, 77, 6, 6, 24), (2, 130, 7, 1, 128), (1, 5, 2, 1, 16)]
WINDOWS = [0, 40, "holes"]


def prefill_mask(B, T, window):
    """A prefill's bool mask `[B, T, T]`: causal, row b left-padded by b * T // 4 (its first queries see
    nothing), with a sliding window where given; "holes": a quarter of the keys before each query's own
    hidden from it at random (no mask a model makes, but the kernels take any)."""
    valid = np.arange(T)[None, :] >= (np.arange(B) * T // 4)[:, None]
    slots = jnp.arange(T)
    mask = decoder.attention_mask(jnp.broadcast_to(slots, (B, T)), slots, jnp.asarray(valid))
    if window == "holes":
        mask &= (np.random.default_rng(T).random((B, T, T)) < 0.75) | np.eye(T, dtype=bool)
    elif window:
        mask = decoder._window_mask(mask, jnp.broadcast_to(slots, (B, T)), slots, window)
    return np.array(mask)


@pytest.mark.parametrize("B,T,N,K,H", ATTENTION_CASES)
@pytest.mark.parametrize("window", WINDOWS)
def test_flash_attention_equals_torch_sdpa(B, T, N, K, H, window, monkeypatch):
    """A prefill's attention on the kernel against PyTorch's SDPA in float64 with the same bool mask:
    causal, the later rows left-padded (so some queries see nothing: zeros), with and without a
    sliding window, and with random holes; GQA groups of 4, 1 and 7; T not a multiple of the kernel's
    64-key tiles, head dims not multiples of its 16-float register tiles; float32 inputs, and bf16 ones
    computed in float32 (the AMX kernel switched off; it has a test of its own below)."""
    monkeypatch.setenv("LLAVA_NEXT_AMX", "0")
    rng = np.random.default_rng([T * H, WINDOWS.index(window)])
    q, k, v = rng.standard_normal((B, T, N, H)), *rng.standard_normal((2, B, K, T, H))
    mask = prefill_mask(B, T, window)
    sees = mask.any(-1)[..., None, None]                                             # [B, T, 1, 1]
    for dtype in ("float32", "bfloat16"):
        x = [jnp.asarray(a, dtype) for a in (q, k, v)]
        attend = jax.jit(lambda *a: cpu_kernels.flash_attention(*a, H ** -0.5))
        assert cpu_kernels.FLASH_BF16_TARGET not in attend.lower(*x, jnp.asarray(mask)).as_text()
        ours = attend(*x, jnp.asarray(mask))
        assert ours.dtype == jnp.dtype(dtype)
        t = lambda a: torch.from_numpy(np.asarray(np.asarray(a, np.float32), np.float64))
        ref = torch.nn.functional.scaled_dot_product_attention(
            t(x[0]).transpose(1, 2), t(x[1]).repeat_interleave(N // K, 1), t(x[2]).repeat_interleave(N // K, 1),
            attn_mask=torch.from_numpy(mask)[:, None]).transpose(1, 2).numpy()
        ref = np.where(sees, ref, 0.0)
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2 ** -8, atol=2 ** -8)
        np.testing.assert_allclose(np.asarray(ours, np.float64), ref, **tolerance)
    assert sees.all() == (B == 1) and (np.asarray(ours)[~sees[..., 0, 0]] == 0).all()


@needs_amx
@pytest.mark.parametrize("B,T,N,K,H", ATTENTION_CASES)
@pytest.mark.parametrize("window", WINDOWS)
def test_amx_flash_attention_equals_torch_sdpa(B, T, N, K, H, window, monkeypatch):
    """bfloat16 attention over a prompt on AMX tiles, the masks and shapes of the float32 test (head dims
    no multiple of the tiles' 32): as close to PyTorch's SDPA in float64 as PyTorch's own bf16 SDPA (which
    also rounds the weights to bf16), and its log-sum-exp as float32's; queries that see nothing get
    zeros and +inf. LLAVA_NEXT_AMX=0 leaves the tiles out."""
    monkeypatch.delenv("LLAVA_NEXT_AMX", raising=False)
    rng = np.random.default_rng([T * H, WINDOWS.index(window)])
    x = [jnp.asarray(a, jnp.bfloat16) for a in (rng.standard_normal((B, T, N, H)),
                                                *rng.standard_normal((2, B, K, T, H)))]
    mask = prefill_mask(B, T, window)
    sees = mask.any(-1)                                                              # [B, T]
    attend = jax.jit(lambda *a: cpu_kernels.flash_attention(*a, H ** -0.5, with_lse=True))
    assert cpu_kernels.FLASH_BF16_TARGET in attend.lower(*x, jnp.asarray(mask)).as_text()
    ours, lse = attend(*x, jnp.asarray(mask))
    assert ours.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
    sdpa = lambda t: torch.nn.functional.scaled_dot_product_attention(
        t[0].transpose(1, 2), t[1].repeat_interleave(N // K, 1), t[2].repeat_interleave(N // K, 1),
        attn_mask=torch.from_numpy(mask)[:, None]).transpose(1, 2)
    f64 = [torch.from_numpy(np.asarray(a, np.float64)) for a in x]
    ref = np.where(sees[..., None, None], sdpa(f64).numpy(), 0.0)
    torch_bf16 = sdpa([t.to(torch.bfloat16) for t in f64]).double().numpy()
    error, torch_error = (np.abs(np.asarray(a, np.float64) - ref)[sees] for a in (ours, torch_bf16))
    assert (error <= 2 ** -4 * (np.abs(ref[sees]) + 2 ** -4)).all()     # the weights' and output's roundings
    assert error.mean() <= 1.02 * torch_error.mean() and error.max() <= 1.02 * torch_error.max()
    logits = (f64[0].transpose(1, 2) @ f64[1].repeat_interleave(N // K, 1).transpose(2, 3)) * H ** -0.5
    ref_lse = torch.logsumexp(logits.masked_fill(~torch.from_numpy(mask)[:, None], -torch.inf), -1).transpose(1, 2)
    np.testing.assert_allclose(np.asarray(lse)[sees], ref_lse.numpy()[sees], rtol=1e-5, atol=1e-5)
    assert (np.asarray(ours)[~sees] == 0).all() and (np.asarray(lse)[~sees] == np.inf).all()
    monkeypatch.setenv("LLAVA_NEXT_AMX", "0")
    assert cpu_kernels.FLASH_BF16_TARGET not in jax.jit(lambda *a: cpu_kernels.flash_attention(
        *a, H ** -0.5)).lower(*x, jnp.asarray(mask)).as_text()


@needs_amx
def test_amx_attention_gradient_equals_torch():
    """bfloat16 `decoder.native_attention` runs its forward pass on AMX tiles and its backward pass on
    the float32 kernel from that log-sum-exp: gradients of q, k and v under left padding and GQA within
    bf16 roundings of PyTorch SDPA's in float64 on the same values."""
    B, T, N, K, H = 2, 150, 4, 2, 16
    rng = np.random.default_rng(3)
    x = [jnp.asarray(a, jnp.bfloat16)
         for a in (rng.standard_normal((B, T, N, H)), *rng.standard_normal((2, B, K, T, H)))]
    valid = np.arange(T)[None, :] >= np.array([0, 9])[:, None]
    mask = np.tril(np.ones((T, T), bool))[None] & valid[:, None, :]
    weight = rng.standard_normal((B, T, N, H)) * valid[:, :, None, None]
    loss = lambda q, k, v: jnp.sum(decoder.native_attention(q, k, v, jnp.asarray(mask), H ** -0.5) * weight)
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*x).as_text()
    assert cpu_kernels.FLASH_BF16_TARGET in lowered and cpu_kernels.FLASH_BACKWARD_TARGET in lowered
    ours = jax.grad(loss, argnums=(0, 1, 2))(*x)
    tq, tk, tv = (torch.from_numpy(np.asarray(a, np.float64)).requires_grad_() for a in x)
    out = torch.nn.functional.scaled_dot_product_attention(
        tq.transpose(1, 2), tk.repeat_interleave(N // K, 1), tv.repeat_interleave(N // K, 1),
        attn_mask=torch.from_numpy(mask | np.eye(T, dtype=bool))[:, None]).transpose(1, 2)  # padding: no NaN
    torch.sum(out * torch.from_numpy(weight)).backward()
    for a, t in zip(ours, (tq, tk, tv)):
        assert a.dtype == jnp.bfloat16
        ref = t.grad.numpy()
        assert (np.abs(np.asarray(a, np.float64) - ref) <= 2 ** -4 * (np.abs(ref) + np.abs(ref).mean())).all()


@pytest.mark.parametrize("B,T,N,K,H", ATTENTION_CASES)
@pytest.mark.parametrize("window", WINDOWS)
def test_flash_attention_backward_equals_torch(B, T, N, K, H, window):
    """The backward kernel (and the forward's log-sum-exp it takes) against PyTorch in float64, the masks
    of the forward test: dq, dk and dv of a weighted sum of the outputs; a query that sees nothing gets
    no gradient and a log-sum-exp of +inf."""
    rng = np.random.default_rng([T * H, WINDOWS.index(window), 1])
    q, k, v = rng.standard_normal((B, T, N, H)), *rng.standard_normal((2, B, K, T, H))
    mask = prefill_mask(B, T, window)
    sees = mask.any(-1)                                                              # [B, T]
    up = rng.standard_normal((B, T, N, H))
    x = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    out, lse = cpu_kernels.flash_attention(*x, jnp.asarray(mask), H ** -0.5, with_lse=True)
    grads = cpu_kernels.flash_attention_backward(*x, jnp.asarray(mask), H ** -0.5, out, lse,
                                                 jnp.asarray(up, jnp.float32))
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    keys, values = tk.repeat_interleave(N // K, 1), tv.repeat_interleave(N // K, 1)
    seen = torch.from_numpy(mask | np.eye(T, dtype=bool))[:, None]          # a query seeing nothing: no NaN
    ref = torch.nn.functional.scaled_dot_product_attention(tq.transpose(1, 2), keys, values, attn_mask=seen)
    torch.sum(ref.transpose(1, 2) * torch.from_numpy(up * sees[..., None, None])).backward()
    for ours, t in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(np.asarray(ours), t.grad.numpy(), rtol=1e-4, atol=1e-5)
    logits = (tq.detach().transpose(1, 2) @ keys.detach().transpose(2, 3)) * H ** -0.5
    ref_lse = torch.logsumexp(logits.masked_fill(~torch.from_numpy(mask)[:, None], -torch.inf), -1).transpose(1, 2)
    np.testing.assert_allclose(np.asarray(lse)[sees], ref_lse.numpy()[sees], rtol=1e-5, atol=1e-5)
    assert (np.asarray(lse)[~sees] == np.inf).all() and sees.all() == (B == 1)


def test_bfloat16_silu_mul_equals_torch():
    """`silu(gate) * up` in bf16 on the kernel (a prompt's MLP) equals PyTorch's bf16 `silu(gate) * up`
    value for value, infinities and NaN included (over 2**16 values, several tasks and a partial last
    step); its gradient is within bf16 rounding of torch's float64 one. Few rows and float32 keep XLA's."""
    rng = np.random.default_rng(0)
    gate = rng.standard_normal((300, 1000)).astype(np.float32) * 4
    gate[0, :6] = [np.inf, -np.inf, np.nan, 100, -100, 0]
    up = rng.standard_normal((300, 1000)).astype(np.float32)
    g, u = (jnp.asarray(a, jnp.bfloat16) for a in (gate, up))
    assert cpu_kernels.silu_mul_applies(g, u) and not cpu_kernels.silu_mul_applies(g[:8], u[:8])
    assert not cpu_kernels.silu_mul_applies(g.astype(jnp.float32), u.astype(jnp.float32))
    ours = np.asarray(jax.jit(cpu_kernels.silu_mul)(g, u), np.float32)
    tg, tu = (torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16) for a in (g, u))
    ref = (torch.nn.functional.silu(tg) * tu).float().numpy()
    np.testing.assert_array_equal(ours, ref)
    weight = rng.standard_normal(gate.shape)
    dg, du = jax.grad(lambda a, b: jnp.sum(cpu_kernels.silu_mul(a, b).astype(jnp.float32) * weight[1:]),
                      argnums=(0, 1))(g[1:], u[1:])
    tg, tu = (torch.from_numpy(np.asarray(a[1:], np.float64)).requires_grad_() for a in (g, u))
    torch.sum(torch.nn.functional.silu(tg) * tu * torch.from_numpy(weight[1:])).backward()
    for ours, t in ((dg, tg), (du, tu)):
        np.testing.assert_allclose(np.asarray(ours, np.float64), t.grad.numpy(), rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_take_rows_equals_torch_embedding(dtype):
    """`cpu_kernels.take_rows` (what `decoder.embed_tokens` gathers bf16 tables with on the CPU) equals
    torch's embedding lookup for in-range ids, jnp indexing for negative and out-of-range ones (from the
    end; clamped), and its gradient equals the float32 gather's."""
    import torch
    table = jnp.asarray(np.random.default_rng(0).standard_normal((523, 48)), dtype)
    ids = jnp.asarray([[0, 522, 17], [5, 5, 300]], jnp.int32)
    assert cpu_kernels.take_rows_applies(table) and not cpu_kernels.take_rows_applies(table.astype(jnp.float32))
    got = jax.jit(cpu_kernels.take_rows)(table, ids)
    want = torch.nn.functional.embedding(torch.from_numpy(np.asarray(ids, np.int64)),
                                         torch.from_numpy(np.asarray(table, np.float32)))
    assert got.dtype == dtype and got.shape == (2, 3, 48)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want.numpy())
    odd = jnp.asarray([-1, -523, 523, 10**6, -10**6], jnp.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.take_rows)(table, odd), np.float32),
                                  np.asarray(table.astype(jnp.float32)[odd]))
    weights = jnp.arange(48, dtype=jnp.float32)
    loss = lambda f: lambda t: jnp.sum(f(t, ids).astype(jnp.float32) * weights)
    np.testing.assert_array_equal(np.asarray(jax.grad(loss(cpu_kernels.take_rows))(table), np.float32),
                                  np.asarray(jax.grad(loss(lambda t, i: t[i]))(table.astype(jnp.float32))))


def test_decode_loop_embeds_without_copying_the_table():
    """A loop that embeds a token a step from a bf16 table compiles to no operation on the whole table:
    XLA:CPU converted (or copied, for a gather of its bits) the table before the loop, once a call."""
    V, D = 523, 48
    table = jnp.ones((V, D), jnp.bfloat16)

    def loop(table, token):
        def body(carry):
            i, token, total = carry
            row = decoder.embed_tokens(table, token[None], jnp.float32)
            return i + 1, (token + 7) % V, total + row.sum()
        return jax.lax.while_loop(lambda c: c[0] < 4, body, (0, token, jnp.float32(0)))[2]

    text = jax.jit(loop).lower(table, jnp.int32(3)).compile().as_text()
    ops = re.findall(rf"= \w+\[{V},{D}\]\S* ([\w-]+)\(", text)   # operations whose result is a whole table
    whole = [op for op in ops if op not in ("parameter", "get-tuple-element", "bitcast")]
    assert cpu_kernels.TAKE_ROWS_TARGET in text and not whole, whole
    assert float(jax.jit(loop)(table, jnp.int32(3))) == 4 * D


def test_rope_tables_are_materialized_once():
    """A prefill's RoPE tables go through the copy kernel (so XLA:CPU computes them once, not inside each
    layer's rotation); the copy is exact, float32 and bf16 alike, vmapped too."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 8)), jnp.float32)
    for a in (x, x.astype(jnp.bfloat16)):
        assert (np.asarray(jax.jit(cpu_kernels.materialize)(a)) == np.asarray(a)).all()
    assert (np.asarray(jax.vmap(cpu_kernels.materialize)(x)) == np.asarray(x)).all()
    from llava_next_jax.config import RopeConfig, TextConfig
    config = TextConfig("mistral", 64, 32, 64, 2, 4, 2, 8, 1e-6, RopeConfig(), 128, sliding_windows=(0, 0))
    params = {"layers": decoder.init_layer_params(config, jax.random.PRNGKey(0)),
              "norm": {"scale": jnp.ones(32)}}
    T = 7
    positions, slots = jnp.broadcast_to(jnp.arange(T), (1, T)), jnp.arange(T)
    mask = decoder.attention_mask(positions, slots, jnp.ones((1, T), bool))
    hidden = lambda p: decoder.decode_hidden(p, config, jnp.ones((1, T, 32)), positions, mask, positions, slots)[0]
    assert jax.jit(hidden).lower(params).as_text().count(cpu_kernels.COPY_TARGET) == 2     # cos and sin


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.uint16])
@pytest.mark.parametrize("T,H,slot", [(37, 24, 0), (16, 16, 5), (1, 8, 30)])
def test_cache_write_equals_numpy(dtype, T, H, slot):
    """The prefill's cache write (`cpu_kernels.write_cache`): keys `[B, K, T, H]` transposed into slots
    [slot, slot + T) of a `[B, K, H, S]` cache, the other slots kept, float32 and bf16 bits alike (T
    and H no multiple of the 16 x 16 blocks); a prefill's layer lowers to it."""
    rng = np.random.default_rng(T + H)
    B, K, S = 2, 3, 40
    cache = rng.integers(0, 60000, (B, K, H, S)).astype(dtype)
    update = rng.integers(0, 60000, (B, K, T, H)).astype(dtype)
    ours = jax.jit(cpu_kernels.write_cache, static_argnums=2)(jnp.asarray(cache), jnp.asarray(update), slot)
    expected = cache.copy()
    expected[..., slot:slot + T] = update.swapaxes(2, 3)
    np.testing.assert_array_equal(np.asarray(ours), expected)
    full, new = jnp.zeros((1, 2, 16, 32)), jnp.ones((1, 2, 8, 16))
    assert cpu_kernels.WRITE_CACHE_TARGET in jax.jit(lambda f, n: decoder._write_cache(f, n, 0, True)).lower(
        full, new).as_text()
    assert cpu_kernels.WRITE_CACHE_TARGET not in jax.jit(lambda f, n: decoder._write_cache(f, n, 0, False)).lower(
        full, new).as_text()


@needs_amx
def test_bfloat16_prompt_runs_on_the_amx_kernels(monkeypatch):
    """A bf16 prompt of 256 tokens through the decoder layers (with a cache, as a prefill) lowers to the
    AMX attention and products, the SiLU kernel and the cache write; LLAVA_NEXT_AMX=0 to neither AMX
    kernel."""
    monkeypatch.delenv("LLAVA_NEXT_AMX", raising=False)
    from llava_next_jax.config import RopeConfig, TextConfig
    config = TextConfig("mistral", 64, 64, 128, 1, 4, 2, 16, 1e-6, RopeConfig(), 512, sliding_windows=(0,))
    params = {"layers": decoder.init_layer_params(config, jax.random.PRNGKey(0), jnp.bfloat16),
              "norm": {"scale": jnp.ones(64, jnp.bfloat16)}}
    T = 256
    positions, slots = jnp.broadcast_to(jnp.arange(T), (1, T)), jnp.arange(T)
    mask = decoder.attention_mask(positions, slots, jnp.ones((1, T), bool))
    cache = decoder.init_cache(config, 1, T, jnp.bfloat16)
    prefill = lambda p, c: decoder.decode_hidden(p, config, jnp.ones((1, T, 64), jnp.bfloat16), positions, mask,
                                                 positions, slots, c, 0, jnp.bfloat16)
    text = jax.jit(prefill).lower(params, cache).as_text()
    for target in (cpu_kernels.FLASH_BF16_TARGET, cpu_kernels.GEMM_BF16_TARGET, cpu_kernels.SILU_MUL_TARGET,
                   cpu_kernels.WRITE_CACHE_TARGET):
        assert target in text, target
    monkeypatch.setenv("LLAVA_NEXT_AMX", "0")
    text = jax.jit(lambda p, c: prefill(p, c)).lower(params, cache).as_text()
    assert cpu_kernels.FLASH_BF16_TARGET not in text and cpu_kernels.GEMM_BF16_TARGET not in text


def test_prefill_attention_uses_flash_attention(monkeypatch):
    """A prefill (`fused`) and a pass whose gradient may be taken lower to the attention kernel on this
    CPU; `LLAVA_NEXT_ATTENTION=blocks` keeps the query blocks."""
    monkeypatch.delenv("LLAVA_NEXT_ATTENTION", raising=False)
    q, kv, mask = jnp.ones((1, 200, 4, 16)), jnp.ones((1, 2, 200, 16)), jnp.tril(jnp.ones((1, 200, 200), bool))
    lowered = lambda fused: jax.jit(lambda *a: decoder.attention(*a, 0.25, causal_prefix=True, fused=fused)).lower(
        q, kv, kv, mask).as_text()
    assert cpu_kernels.FLASH_TARGET in lowered(True) and cpu_kernels.FLASH_TARGET in lowered(False)
    monkeypatch.setenv("LLAVA_NEXT_ATTENTION", "blocks")
    assert cpu_kernels.FLASH_TARGET not in lowered(True)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_gradient_equals_torch(causal):
    """`decoder.native_attention` (the forward and backward kernels) is differentiable: gradients of q, k
    and v under left padding and GQA, causal or not, against PyTorch SDPA's in float64, and its
    gradient pass lowers to the backward kernel."""
    B, T, N, K, H = 2, 150, 4, 2, 16
    rng = np.random.default_rng(3)
    q, k, v, up = rng.standard_normal((B, T, N, H)), *rng.standard_normal((2, B, K, T, H)), rng.standard_normal(
        (B, T, N, H))
    valid = np.arange(T)[None, :] >= np.array([0, 9])[:, None]
    mask = (np.tril(np.ones((T, T), bool)) if causal else np.ones((T, T), bool))[None] & valid[:, None, :]
    weight = up * valid[:, :, None, None]          # the padding rows' outputs are read by nothing
    loss = lambda q, k, v: jnp.sum(decoder.native_attention(q, k, v, jnp.asarray(mask), H ** -0.5) * weight)
    assert cpu_kernels.FLASH_TARGET in jax.jit(loss).lower(q, k, v).as_text()
    assert cpu_kernels.FLASH_BACKWARD_TARGET in jax.jit(jax.grad(loss)).lower(q, k, v).as_text()
    ours = jax.grad(loss, argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)))
    tq, tk, tv = (torch.from_numpy(a).requires_grad_() for a in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        tq.transpose(1, 2), tk.repeat_interleave(N // K, 1), tv.repeat_interleave(N // K, 1),
        attn_mask=torch.from_numpy(mask | np.eye(T, dtype=bool))[:, None]).transpose(1, 2)  # padding: no NaN
    torch.sum(out * torch.from_numpy(weight)).backward()
    for a, t in zip(ours, (tq, tk, tv)):
        np.testing.assert_allclose(np.asarray(a), t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_gradient_equals_torch():
    """The kernel is differentiable (its JVP is XLA's product): gradients of a 3-row product."""
    rng = np.random.default_rng(1)
    x, kernel, up = (rng.standard_normal(s).astype(np.float32) for s in [(3, 200), (200, 90), (3, 90)])
    loss = lambda x, k: jnp.sum(decoder.matmul(x, k) * up)
    assert cpu_kernels.TARGET in jax.jit(loss).lower(x, kernel).as_text()
    gx, gk = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
    tx, tk = (torch.from_numpy(a).double().requires_grad_() for a in (x, kernel))
    torch.sum((tx @ tk) * torch.from_numpy(up).double()).backward()
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(gk), tk.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_switched_off_and_unbuildable(monkeypatch, tmp_path, caplog):
    """`LLAVA_NEXT_CPU_KERNELS=0` keeps XLA's product, and `LLAVA_NEXT_ONEDNN=0` for large ones; a missing
    or failing compiler is an error that names it, turned into one warning and XLA's products."""
    x, kernel = jnp.ones((4, 64)), jnp.ones((64, 32))
    monkeypatch.setenv("LLAVA_NEXT_CPU_KERNELS", "0")
    text = jax.jit(lambda a, b: decoder.matmul(a, b) + 0).lower(x, kernel).as_text()
    assert cpu_kernels.TARGET not in text and "dot_general" in text
    monkeypatch.delenv("LLAVA_NEXT_CPU_KERNELS")
    monkeypatch.setenv("LLAVA_NEXT_ONEDNN", "0")
    text = jax.jit(lambda a, b: decoder.matmul(a, b) + 0).lower(jnp.ones((512, 64)), kernel).as_text()
    assert cpu_kernels.GEMM_TARGET not in text and "dot_general" in text
    monkeypatch.delenv("LLAVA_NEXT_ONEDNN")
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        cpu_kernels._build()
    monkeypatch.setenv("CXX", "false")   # exists, fails
    with pytest.raises(RuntimeError, match="false .*cpu_kernels.cc .*cpu_attention.cc .*cpu_amx.cc failed"):
        cpu_kernels._build()
    assert not list(tmp_path.glob("*.so"))
    with caplog.at_level(logging.WARNING, logger="llava_next_jax.cpu_kernels"):
        assert cpu_kernels._load.__wrapped__() is False
    assert "native CPU kernels are unavailable" in caplog.text and "cpu_amx.cc failed" in caplog.text


def test_onednn_that_fails_keeps_the_other_kernels(monkeypatch, caplog):
    """A oneDNN library without its gemm functions is one warning that names the problem; the native
    kernels still load (large products then stay on XLA)."""
    monkeypatch.setattr(cpu_kernels, "_onednn", lambda: types.SimpleNamespace())
    with caplog.at_level(logging.WARNING, logger="llava_next_jax.cpu_kernels"):
        assert cpu_kernels._load.__wrapped__() is True
    assert "oneDNN's gemm could not be set up" in caplog.text and "dnnl_sgemm" in caplog.text
    assert "native CPU kernels are unavailable" not in caplog.text


def test_builds_unused_for_a_month_are_removed(monkeypatch, tmp_path):
    """A new build removes the builds no process has loaded for STALE_DAYS; loading one keeps it."""
    compiler = tmp_path / "fake-cxx"   # writes the -o file: a build without compiling
    compiler.write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho built > "$2"\n')
    compiler.chmod(0o755)
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(cache))
    month, now = (cpu_kernels.STALE_DAYS + 1) * 86400, time.time()
    stale, recent = cache / "cpu_kernels-stale.so", cache / "cpu_kernels-recent.so"
    for path, age in ((stale, month), (recent, 86400)):
        path.write_text("old")
        os.utime(path, (now - age, now - age))
    library = cpu_kernels._build()
    assert library.read_text() == "built\n" and not stale.exists() and recent.exists()
    os.utime(library, (now - month, now - month))
    assert cpu_kernels._build() == library    # loaded again: touched, so not stale
    assert cpu_kernels._prune(cache) == [] and library.exists()


def test_bfloat16_decode_step_close_to_hf_bfloat16(tmp_path):
    """A bf16 decode step of a batch of 3 (its products on the kernel) against HF in bf16 and float32 on
    the prompt plus that token: finite, and off HF's bf16 logits by no more than bf16 rounding moves
    HF's own (as `test_model.test_bfloat16_close_to_hf_bfloat16` holds the forward pass)."""
    import tiny_models as tm
    from llava_next_jax import LlavaNext, generate
    from llava_next_jax.convert_cli import main as convert
    hf = tm.build_model("mistral")
    tm.save_checkpoint(hf, str(tmp_path / "hf"))
    convert([str(tmp_path / "hf"), str(tmp_path / "out"), "--dtype", "bfloat16"])
    model = LlavaNext.from_pretrained(str(tmp_path / "out"))
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 4), (5, [(88, 55)], 2), (9, [], 3)], seed=2)
    ids, pixels, sources, mask = model._inputs(batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                               batch["attention_mask"])
    (B, T), bf16 = ids.shape, jnp.bfloat16
    _, cache, valid = generate.prefill_program(model.params, model.config, ids, jnp.asarray(pixels, bf16), sources,
                                               mask, bf16, T + 1)
    tokens = np.random.default_rng(0).integers(10, hf.config.text_config.vocab_size, B).astype(np.int32)
    step = jax.jit(lambda p, c, v, t, pos: generate.decode_step(p, model.config, t, pos, T, v, c, bf16))
    args = (model.params, cache, valid, tokens, mask.sum(1).astype(np.int32))
    assert cpu_kernels.TARGET in step.lower(*args).as_text()
    ours = np.asarray(step(*args)[0])
    longer = dict(batch, input_ids=np.concatenate([ids, tokens[:, None]], 1),
                  attention_mask=np.concatenate([mask, np.ones((B, 1), mask.dtype)], 1))
    ref32 = tm.hf_logits(hf, longer)[:, -1]
    ref16 = tm.hf_logits(hf.to(torch.bfloat16), longer, torch.bfloat16)[:, -1]
    assert np.isfinite(ours).all()
    hf_drift = np.abs(ref16 - ref32).max()
    assert np.abs(ours - ref16).max() <= 2 * hf_drift + 0.05
    assert np.abs(ours - ref32).max() <= 2 * hf_drift + 0.05
