"""The native few-row matmul of a CPU decode step (`cpu_kernels`) against PyTorch, where the decoder
uses it, and what happens when it cannot be built."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llava_next_jax import cpu_kernels
from llava_next_jax.modeling import decoder


def test_kernel_is_built_here():
    """The tests below check the kernel, not XLA's fallback: the suite needs a C++ compiler (README)."""
    assert jax.default_backend() == "cpu"
    assert cpu_kernels.available(), "the native CPU kernel did not build: is g++ (or $CXX) installed?"


@pytest.mark.parametrize("rows", range(1, 10))
@pytest.mark.parametrize("K,N", [(7, 5), (130, 67), (1030, 2051)])
def test_matmul_equals_torch_and_uses_the_kernel_for_2_to_8_rows(rows, K, N):
    """`decoder.matmul` of `[rows, 1, K]` by `[K, N]` against torch (K not a multiple of the kernel's
    4-row step, N not of a vector width; 130 and 1030 are split over threads), and the lowered program
    calls the kernel exactly for 2 to 8 rows."""
    rng = np.random.default_rng(rows * K)
    x = rng.standard_normal((rows, 1, K)).astype(np.float32)
    kernel = rng.standard_normal((K, N)).astype(np.float32)
    fn = jax.jit(decoder.matmul)
    ours = np.asarray(fn(jnp.asarray(x), jnp.asarray(kernel)))
    ref = (torch.from_numpy(x).double() @ torch.from_numpy(kernel).double()).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.sqrt(K))
    native = cpu_kernels.TARGET in fn.lower(jnp.asarray(x), jnp.asarray(kernel)).as_text()
    assert native == (2 <= rows <= 8)


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
    """`LLAVA_NEXT_CPU_KERNELS=0` keeps XLA's product; a missing or failing compiler is an error that
    names it, turned into one warning and XLA's products."""
    x, kernel = jnp.ones((4, 64)), jnp.ones((64, 32))
    monkeypatch.setenv("LLAVA_NEXT_CPU_KERNELS", "0")
    text = jax.jit(lambda a, b: decoder.matmul(a, b) + 0).lower(x, kernel).as_text()
    assert cpu_kernels.TARGET not in text and "dot_general" in text
    monkeypatch.delenv("LLAVA_NEXT_CPU_KERNELS")
    monkeypatch.setenv("LLAVA_NEXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(RuntimeError, match="no-such-compiler"):
        cpu_kernels._build()
    monkeypatch.setenv("CXX", "false")   # exists, fails
    with pytest.raises(RuntimeError, match="false .*cpu_kernels.cc failed"):
        cpu_kernels._build()
    assert not list(tmp_path.glob("*.so"))
    with caplog.at_level(logging.WARNING, logger="llava_next_jax.cpu_kernels"):
        assert cpu_kernels._load.__wrapped__() is False
    assert "native CPU decode kernel is unavailable" in caplog.text and "cpu_kernels.cc failed" in caplog.text
