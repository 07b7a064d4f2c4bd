"""The GPU decode-attention kernel (`gpu_kernels`), run here by Pallas's interpreter on the CPU: its
numbers against PyTorch, when the decoder uses it, and the sizes it takes. (Its Triton build and its
speed are checked on a GPU by `benchmarks/gpu_decode.py`; CI has no GPU.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llava_next_jax import gpu_kernels
from llava_next_jax.modeling import decoder


def _inputs(rng, B, K, G, H, S, dtype=jnp.bfloat16):
    """q `[B, 1, K*G, H]`, caches `[B, K, H, S]`, own k/v `[B, K, 1, H]`, and a mask `[B, S]` that hides
    a random third of the slots, row 1's first 40 slots (left padding: whole blocks of 16 and 32
    hidden) and the last slot (the one being written)."""
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    mask = rng.random((B, S)) < 0.67
    mask[1, :40] = False
    mask[:, -1] = False
    return arr(B, 1, K * G, H), arr(B, K, H, S), arr(B, K, H, S), arr(B, K, 1, H), arr(B, K, 1, H), jnp.asarray(mask)


def _torch_reference(q, k_cache, v_cache, k_new, v_new, mask, scale):
    """PyTorch SDPA in float32 over the cache's visible slots plus the own key/value, GQA by repeat."""
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
    B, _, N, H = q.shape
    K = k_cache.shape[1]
    keys = torch.cat([t(k_cache).transpose(2, 3), t(k_new)], dim=2).repeat_interleave(N // K, dim=1)
    values = torch.cat([t(v_cache).transpose(2, 3), t(v_new)], dim=2).repeat_interleave(N // K, dim=1)
    visible = torch.cat([torch.from_numpy(np.array(mask)), torch.ones(B, 1, dtype=torch.bool)], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(t(q).transpose(1, 2), keys, values,
                                                           attn_mask=visible[:, None, None, :], scale=scale)
    return out.transpose(1, 2).numpy()                                             # [B, 1, N, H]


@pytest.mark.parametrize("G,S,scale", [(1, 96, 0.125), (4, 80, 0.125), (8, 128, 0.125), (16, 160, 0.125),
                                       (4, 80, 4.0)])
def test_decode_attention_equals_torch(G, S, scale):
    """Blocks of 32, 16, 128 and 32 slots (the largest of 128/64/32/16 dividing S); a block wholly
    hidden by row 1's padding; G query heads per kv head from 1 to `ROWS`; logits in the hundreds
    (scale 4), where a softmax that does not subtract each block's maximum overflows. The kernel's
    softmax weights meet the values in bf16 (as XLA's path and HF's bf16 attention): within 1e-2."""
    rng = np.random.default_rng(G * S)
    q, k_cache, v_cache, k_new, v_new, mask = _inputs(rng, 2, 2, G, 64, S)
    grouped = decoder._group(q, 2)
    ours = gpu_kernels.decode_attention(grouped, k_cache, v_cache, k_new, v_new, mask, scale, interpret=True)
    ours = decoder._ungroup(ours, 1)
    assert ours.dtype == jnp.float32 and ours.shape == q.shape
    ref = _torch_reference(q, k_cache, v_cache, k_new, v_new, mask, scale)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-2, rtol=0)


def test_block_partials_cover_every_block():
    """Each block's maximum and sum are its own: recombined they give the softmax normaliser of the
    whole row, computed here directly in float64."""
    rng = np.random.default_rng(3)
    q, k_cache, v_cache, _, _, mask = _inputs(rng, 2, 2, 4, 32, 96)
    grouped = decoder._group(q, 2)
    bias = jnp.where(mask, 0.0, gpu_kernels.MASKED)
    _, m, l = gpu_kernels.block_partials(grouped, k_cache, v_cache, bias, 0.5, interpret=True)
    assert m.shape == l.shape == (2, 2, 3, 4)                                      # 96 slots: 3 blocks of 32
    logits = np.einsum("bkgh,bkhs->bkgs", np.asarray(grouped, np.float64), np.asarray(k_cache, np.float64)) * 0.5
    logits = np.where(np.asarray(mask)[:, None, None], logits, -np.inf)
    top = logits.max(-1)
    normaliser = np.exp(logits - top[..., None]).sum(-1)
    ours = (np.exp(np.asarray(m, np.float64) - top[:, :, None]) * np.asarray(l, np.float64)).sum(axis=2)
    np.testing.assert_allclose(ours, normaliser, rtol=1e-4)


def test_decoder_uses_the_kernel_where_it_applies(monkeypatch):
    """`decoder._attend_one` goes through the kernel when `gpu_kernels.applies` says so (here faked,
    the kernel interpreted), with the same result as XLA's products to bf16 rounding; with
    LLAVA_NEXT_ATTENTION=xla it does not."""
    rng = np.random.default_rng(5)
    args = _inputs(rng, 2, 2, 4, 64, 96)
    monkeypatch.setenv("LLAVA_NEXT_ATTENTION", "xla")
    xla = decoder._attend_one(*args, 0.125)
    calls, kernel = [], gpu_kernels.decode_attention

    def interpreted(*a):
        calls.append(a[1].shape)
        return kernel(*a, interpret=True)
    monkeypatch.setattr(gpu_kernels, "applies", lambda group, head_dim, slots, dtype: (group, head_dim, slots) == (4, 64, 96))
    monkeypatch.setattr(gpu_kernels, "decode_attention", interpreted)
    assert np.array_equal(np.asarray(decoder._attend_one(*args, 0.125)), np.asarray(xla)) and not calls
    monkeypatch.delenv("LLAVA_NEXT_ATTENTION")
    ours = decoder._attend_one(*args, 0.125)
    assert calls == [(2, 2, 64, 96)] and ours.dtype == xla.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(xla, np.float32), atol=1e-2)


@pytest.mark.parametrize("backend,capability,devices,dtype,group,head_dim,slots,expected", [
    ("gpu", "9.0", 1, "bfloat16", 4, 128, 3200, True),      # Mistral-7B, one 672x672 image
    ("gpu", "8.0", 1, "float16", 16, 64, 80, True),
    ("gpu", "9.0", 1, "float32", 4, 128, 3200, False),      # float32: XLA, full precision
    ("gpu", "9.0", 1, "bfloat16", 32, 128, 3200, False),    # more query heads per kv head than ROWS
    ("gpu", "9.0", 1, "bfloat16", 4, 96, 3200, False),      # head dim not a power of two
    ("gpu", "9.0", 1, "bfloat16", 4, 128, 3208, False),     # length not a multiple of 16
    ("gpu", "7.5", 1, "bfloat16", 4, 128, 3200, False),     # before Ampere
    ("gpu", "9.0", 2, "bfloat16", 4, 128, 3200, False),     # several devices (a mesh)
    ("cpu", None, 1, "bfloat16", 4, 128, 3200, False),
])
def test_applies(backend, capability, devices, dtype, group, head_dim, slots, expected, monkeypatch):
    device = type("Device", (), {"compute_capability": capability} if capability else {})()
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "devices", lambda: [device] * devices)
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    assert gpu_kernels.applies(group, head_dim, slots, jnp.dtype(dtype)) == expected
