"""Logits against HF transformers on tiny random checkpoints, through the real converter script."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import tiny_models as tm
from llava_next_jax import LlavaNext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Several images per row, different sizes and aspect ratios (incl. the rounding cases), ragged rows
# (left padding), and a text-only row.
ROWS = [(3, [(480, 640), (55, 176)], 4), (5, [(88, 55)], 2), (7, [(1, 300)], 3), (20, [], 3)]


def convert(src, out, *extra):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_torch_weights.py"), src, out,
                             *extra], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def assert_close(ours, ref, mask, tol):
    ours = np.asarray(ours)
    assert ours.shape == ref.shape
    assert np.isfinite(ours).all()
    diff = np.abs(ours - ref)[mask.astype(bool)].max()
    assert diff <= tol, f"max |delta logits| {diff} > {tol} (logits span {np.abs(ref).max():.2f})"


@pytest.mark.parametrize("family,layout,shards", [
    ("mistral", "tf5-file", 1),
    ("llama3", "hub2024", 3),
    ("qwen2", "tf5-live", 2),
    ("vicuna", "bin", 2),
    ("mistral", "tf5-file", 4),
])
def test_converted_logits_equal_hf(tmp_path, family, layout, shards):
    hf = tm.build_model(family, seed=shards)
    tm.save_checkpoint(hf, str(tmp_path / "hf"), layout, shards)
    convert(str(tmp_path / "hf"), str(tmp_path / "out"))
    model = LlavaNext.from_pretrained(str(tmp_path / "out"))
    batch = tm.make_batch(hf.config, ROWS, seed=shards)
    assert_close(model.forward(**batch), tm.hf_logits(hf, batch), batch["attention_mask"], 1e-4)


def test_released_geometry_at_toy_width(tmp_path):
    """336px tiles, the released pinpoints: ~2.3k image tokens per row, as with the real models."""
    hf = tm.build_model("mistral", image_size=336)
    tm.save_checkpoint(hf, str(tmp_path / "hf"))
    model = LlavaNext.from_pretrained(str(tmp_path / "hf"))  # straight from the HF dir
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 4), (5, [(300, 200)], 2)])
    assert batch["input_ids"].shape[1] > 2300
    assert_close(model.forward(**batch), tm.hf_logits(hf, batch), batch["attention_mask"], 1e-4)


def test_text_only(tmp_path):
    hf = tm.build_model("llama3")
    tm.save_checkpoint(hf, str(tmp_path / "hf"))
    model = LlavaNext.from_pretrained(str(tmp_path / "hf"))
    batch = tm.make_batch(hf.config, [(12, [], 0), (30, [], 5)])
    assert_close(model.forward(batch["input_ids"], attention_mask=batch["attention_mask"]), tm.hf_logits(hf, batch),
                 batch["attention_mask"], 1e-4)


def test_bfloat16_close_to_hf_bfloat16(tmp_path):
    hf = tm.build_model("mistral")
    tm.save_checkpoint(hf, str(tmp_path / "hf"))
    convert(str(tmp_path / "hf"), str(tmp_path / "out"), "--dtype", "bfloat16")
    model = LlavaNext.from_pretrained(str(tmp_path / "out"))
    assert model.dtype == np.dtype("bfloat16")
    batch = tm.make_batch(hf.config, ROWS)
    ref32 = tm.hf_logits(hf, batch)
    ref16 = tm.hf_logits(hf.to(torch.bfloat16), batch, torch.bfloat16)
    mask = batch["attention_mask"].astype(bool)
    ours = np.asarray(model.forward(**batch))
    assert np.isfinite(ours).all()
    hf_drift = np.abs(ref16 - ref32)[mask].max()   # how far bf16 rounding moves the reference itself
    assert np.abs(ours - ref16)[mask].max() <= 2 * hf_drift + 0.05
    assert np.abs(ours - ref32)[mask].max() <= 2 * hf_drift + 0.05


def test_input_errors_name_the_problem(tmp_path):
    hf = tm.build_model("vicuna")
    tm.save_checkpoint(hf, str(tmp_path / "hf"))
    model = LlavaNext.from_pretrained(str(tmp_path / "hf"))
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 4)])
    ids = batch["input_ids"].copy()
    ids[0, np.flatnonzero(ids[0] == hf.config.image_token_id)[0]] = 0
    with pytest.raises(ValueError, match="image tokens .* need"):
        model.forward(ids, batch["pixel_values"], batch["image_sizes"], batch["attention_mask"])
    with pytest.raises(ValueError, match="no images were given"):
        model.forward(batch["input_ids"], attention_mask=batch["attention_mask"])
    with pytest.raises(ValueError, match="image_sizes must be"):
        model.forward(batch["input_ids"], batch["pixel_values"], None)
    V = hf.config.text_config.vocab_size
    for bad, value in ((V, V), (-1, -1)):   # an id past the embedding table: HF fails too; no silent clamp
        ids = batch["input_ids"].copy()
        ids[0, 2] = bad
        with pytest.raises(ValueError, match=rf"token ids in \[0, {V}\); got {value} at row 0, position 2 \(1 such"):
            model.forward(ids, batch["pixel_values"], batch["image_sizes"], batch["attention_mask"])
        with pytest.raises(ValueError, match=rf"got {value} at row 0, position 2"):
            model.generate(ids, batch["pixel_values"], batch["image_sizes"], batch["attention_mask"], max_new_tokens=2)
    with pytest.raises(ValueError, match="integer token ids; got dtype float"):
        model.forward(batch["input_ids"].astype(np.float32), batch["pixel_values"], batch["image_sizes"])
    args = (batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"])
    few_tiles = (args[0], args[1][:, :2], *args[2:])   # a 480x640 image needs 5 (generation pads to 5)
    for call in (model.forward, lambda *a: model.generate(*a, max_new_tokens=2),
                 lambda *a: model.generate(*a, max_new_tokens=2, num_beams=2)):
        with pytest.raises(ValueError, match=r"image 0 of size \(480, 640\) needs 5 tiles but pixel_values has only 2"):
            call(*few_tiles)
    for labels, match in ((V, rf"labels \(or -100\) must be token ids in \[0, {V}\); got {V}"), (-5, "got -5"),
                          (0.5, "integer token ids; got dtype float")):
        with pytest.raises(ValueError, match=match):
            model.loss(*args, labels=np.where(batch["attention_mask"] == 1, labels, -100))
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16', 'float16'\).*got 'int8'"):
        LlavaNext.from_pretrained(str(tmp_path / "hf"), dtype="int8")
    with pytest.raises(ValueError, match="at least one row and one token; got shape \\(0, 5\\)"):
        model.generate(np.zeros((0, 5), np.int64), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must hold 0 \\(padding\\) and 1"):
        model.forward(args[0], *args[1:3], args[3] * 2)
    holed = args[3].copy()
    holed[0, -3] = 0                                   # a hole in a row's tokens
    with pytest.raises(ValueError, match="one block of ones"):
        model.generate(*args[:3], holed.astype(bool), max_new_tokens=2)
    for setting, match in (({"max_new_tokens": 2.5}, "max_new_tokens must be an int; got 2.5"),
                           ({"temperature": float("nan"), "do_sample": True}, "need temperature >= 0"),
                           ({"seed": -1}, r"seed must be an int in \[0, 2\*\*32\)"),
                           ({"eos_token_id": V}, rf"eos_token_id must be token ids in \[0, {V}\); got {V}"),
                           ({"pad_token_id": -1}, "pad_token_id must be token ids")):
        with pytest.raises(ValueError, match=match):
            model.generate(*args, **{"max_new_tokens": 2, **setting})
    for setting, match in (({"num_beams": 2}, "num_beams=2"),
                           ({"length_penalty": 2.0}, "beam search's length_penalty")):
        with pytest.raises(ValueError, match=f"streaming decodes one sequence per row; {match} needs generate"):
            next(model.generate_stream(*args, max_new_tokens=2, **setting))


@pytest.mark.parametrize("implementation", ["blocks", "xla", "native"])
@pytest.mark.parametrize("batch", [1, 3])
def test_blocked_causal_attention_equals_torch_sdpa(batch, implementation, monkeypatch):
    """The prefill's attention, as query blocks (their size depends on the batch), as one product
    (`LLAVA_NEXT_ATTENTION=xla`) and on the CPU kernel, against one PyTorch SDPA call, with left padding and
    GQA, on every query that may see a key. (cuDNN's path needs a GPU: benchmarks/prefill_attention.py.)"""
    import jax.numpy as jnp
    from llava_next_jax.modeling import decoder
    monkeypatch.setenv("LLAVA_NEXT_ATTENTION", implementation)
    T, N, K, H = 300, 8, 2, 16
    rng = np.random.default_rng(batch)
    q, (k, v) = rng.standard_normal((batch, T, N, H)), rng.standard_normal((2, batch, K, T, H))
    pads = rng.integers(0, 40, batch)
    valid = np.arange(T)[None, :] >= pads[:, None]
    mask = decoder.attention_mask(jnp.broadcast_to(jnp.arange(T), (batch, T)), jnp.arange(T), jnp.asarray(valid))
    ours = decoder.attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), mask, H ** -0.5, causal_prefix=True,
                             fused=True)
    t = lambda a: torch.from_numpy(a).float()
    ref = torch.nn.functional.scaled_dot_product_attention(
        t(q).transpose(1, 2), t(k).repeat_interleave(N // K, 1), t(v).repeat_interleave(N // K, 1),
        attn_mask=torch.from_numpy(np.array(mask))[:, None]).transpose(1, 2).numpy()
    rows = np.broadcast_to(valid[:, :, None, None], ref.shape)
    assert_close(ours, ref, rows, 1e-5)


def test_attention_implementation_choice(monkeypatch):
    """cuDNN only for half precision on an NVIDIA GPU that has its flash attention (compute capability
    8.0 on); the native kernel on this CPU, query blocks on other GPUs or where the kernels are off; the
    override is checked and names the bad value."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax.modeling import decoder
    monkeypatch.delenv("LLAVA_NEXT_ATTENTION", raising=False)
    assert decoder.attention_implementation(jnp.bfloat16, 128) == "native"   # this machine: a CPU
    monkeypatch.setenv("LLAVA_NEXT_CPU_KERNELS", "0")
    assert decoder.attention_implementation(jnp.float32, 64) == "blocks"
    monkeypatch.setenv("LLAVA_NEXT_ATTENTION", "native")
    with pytest.raises(ValueError, match="LLAVA_NEXT_ATTENTION=native needs a single-device CPU"):
        decoder.attention_implementation(jnp.float32, 64)
    monkeypatch.delenv("LLAVA_NEXT_ATTENTION")
    monkeypatch.delenv("LLAVA_NEXT_CPU_KERNELS")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    for capability, dtype, head_dim, expected in [("9.0", jnp.bfloat16, 128, "cudnn"), ("8.0", jnp.float16, 64, "cudnn"),
                                                  ("9.0", jnp.float32, 128, "blocks"), ("9.0", jnp.bfloat16, 256, "blocks"),
                                                  ("7.5", jnp.bfloat16, 128, "blocks"), ("gfx90a", jnp.bfloat16, 128, "blocks")]:
        monkeypatch.setattr(jax, "devices", lambda c=capability: [type("Device", (), {"compute_capability": c})()])
        assert decoder.attention_implementation(dtype, head_dim) == expected, (capability, dtype, head_dim)
    monkeypatch.undo()
    monkeypatch.setenv("LLAVA_NEXT_ATTENTION", "flash")
    with pytest.raises(ValueError, match="LLAVA_NEXT_ATTENTION='flash'"):
        decoder.attention_implementation(jnp.float32, 128)


@pytest.mark.parametrize("backend,dtype,expected", [("cpu", "float32", "DEFAULT"), ("gpu", "float32", "HIGHEST"),
                                                     ("tpu", "float32", "HIGHEST"), ("gpu", "bfloat16", "DEFAULT")])
def test_float32_matmuls_are_full_float32_on_accelerators(backend, dtype, expected, monkeypatch):
    """With float32 compute every matmul of a forward pass with an image (the vision tower from its
    patch embedding on, projector, decoder, lm_head), of a prefill and of a decode step is lowered
    with HIGHEST precision where JAX would otherwise let a GPU use TF32 or a TPU bf16 passes (HF's
    PyTorch computes them in float32); bf16 compute and the CPU's lowering are left as they were."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax import generate
    from llava_next_jax.config import LlavaNextConfig
    from llava_next_jax.modeling import decoder, llava_next
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    hf_config = tm.hf_config("mistral")
    config = LlavaNextConfig.from_dict(hf_config.to_dict())
    params = jax.eval_shape(lambda: llava_next.init_params(config, jax.random.key(0), jnp.dtype(dtype)))
    batch = tm.make_batch(hf_config, [(3, [(100, 60)], 2)])
    ids, pixels, sources, mask = LlavaNext(config, params)._inputs(
        batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"])
    # A new function, so that nothing comes from the trace cache of another parametrization.
    forward = jax.jit(lambda p, *a: llava_next.forward.__wrapped__(p, config, *a, dtype=jnp.dtype(dtype)))
    text = forward.lower(params, ids, pixels.astype(dtype), sources, mask).as_text()
    B, T = ids.shape   # and the two halves of generation, over a cache of T + 8 slots
    cache = jax.eval_shape(lambda: decoder.init_cache(config.text, B, T + 8, jnp.dtype(dtype)))
    prefill = jax.jit(lambda p, c, *a: generate.prefill(p, config, *a, c, jnp.dtype(dtype)))
    text += prefill.lower(params, cache, ids, pixels.astype(dtype), sources, mask).as_text()
    step = jax.jit(lambda p, c, valid: generate.decode_step(p, config, jnp.zeros(B, jnp.int32), jnp.full(B, T), T,
                                                             valid, c, jnp.dtype(dtype)))
    text += step.lower(params, cache, jnp.ones((B, T + 8), bool)).as_text()
    products = [line for line in text.splitlines() if "dot_general" in line or "convolution" in line]
    patches = [line for line in products if "14x14x3x32x" in line]   # the patch embedding's [p, p, C, Dv]
    assert len(products) > 30 and patches
    assert all(f"precision = [{expected}, {expected}]" in line for line in products), products[0]


@pytest.mark.parametrize("shape", [(1, 1, 1024), (1, 2, 1024), (3, 1, 1024)])
def test_dense_row_blocks_equal_torch_linear(shape):
    """The decoder's Dense, split into row blocks of its kernel for a one-row input on the CPU, against
    torch's Linear on the same weights (the kernel is `[in, out]`, torch's weight its transpose)."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax import xla_cpu
    from llava_next_jax.modeling import decoder
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel, bias = rng.standard_normal((1024, 2048)).astype(np.float32), rng.standard_normal(2048).astype(np.float32)
    rows = int(np.prod(shape[:-1]))
    split = rows == 1 and jax.default_backend() == "cpu"
    assert xla_cpu.matvec_blocks(rows, jnp.asarray(kernel)) == (8 if split else 1)
    ours = decoder.Dense(2048, True).apply({"params": {"kernel": kernel, "bias": bias}}, jnp.asarray(x))
    linear = torch.nn.Linear(1024, 2048)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
        linear.bias.copy_(torch.from_numpy(bias))
        ref = linear(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 2, 64), (3, 1, 64)])
def test_gpu_one_row_products_are_padded(shape, monkeypatch):
    """On a GPU (the backend faked: the lowering is what is checked), a one-row product is padded to
    `decoder.GPU_MIN_ROWS` rows and sliced back, so that XLA keeps it a matmul; two or more rows are
    left alone. The padded product equals torch's on the same values."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax.modeling import decoder
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    rng = np.random.default_rng(1)
    x, kernel = rng.standard_normal(shape).astype(np.float32), rng.standard_normal((64, 96)).astype(np.float32)
    fn = jax.jit(lambda a, b: decoder.matmul(a, b))
    dots = [line for line in fn.lower(x, kernel).as_text().splitlines() if "dot_general" in line]
    rows = int(np.prod(shape[:-1]))
    operand = f"{decoder.GPU_MIN_ROWS}x64" if rows == 1 else "x".join(map(str, shape))
    assert len(dots) == 1 and f"(tensor<{operand}xf32>, tensor<64x96xf32>)" in dots[0], dots
    ours = fn(x, kernel)
    assert ours.shape == (*shape[:-1], 96)
    ref = (torch.from_numpy(x).double() @ torch.from_numpy(kernel).double()).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_cpu_product_gradients_equal_torch_and_take_the_kernel_gradient_as_a_plain_product():
    """On the CPU a product's kernel gradient is `x.T @ g` with `x.T` written out (an optimization barrier
    between them), where XLA would contract both operands' rows; both gradients equal torch's."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax.modeling import decoder
    rng = np.random.default_rng(2)
    x, kernel = rng.standard_normal((2, 40, 64)).astype(np.float32), rng.standard_normal((64, 96)).astype(np.float32)
    weights = rng.standard_normal((2, 40, 96)).astype(np.float32)
    loss = lambda a, b: jnp.sum(decoder.matmul(a, b) * weights)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    text = grad.lower(x, kernel).as_text()
    barriers = [line for line in text.splitlines() if "optimization_barrier" in line]
    assert len(barriers) == 1 and "tensor<64x80xf32>" in barriers[0], barriers      # x.T, [in, rows]
    dx, dk = grad(x, kernel)
    tx, tk = (torch.from_numpy(a).double().requires_grad_() for a in (x, kernel))
    ((tx @ tk) * torch.from_numpy(weights).double()).sum().backward()
    np.testing.assert_allclose(np.asarray(dx), tx.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dk), tk.grad.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernels", ["native", "xla"])
@pytest.mark.parametrize("group,T", [(1, 1), (4, 1), (8, 1), (4, 3), (1, 5)])
def test_decode_attention_equals_torch_sdpa(group, T, kernels, monkeypatch):
    """A decode step's attention (T new tokens) over a cache with masked slots plus its own keys, causal
    among themselves, against PyTorch SDPA: with the native kernels on the CPU, the decode-attention
    kernel; without them (`LLAVA_NEXT_CPU_KERNELS=0`), XLA's operations: groups of 1 and 4 one
    matrix-vector product per query head, 8 one matmul."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax import cpu_kernels
    from llava_next_jax.modeling import decoder
    if kernels == "xla":
        monkeypatch.setenv("LLAVA_NEXT_CPU_KERNELS", "0")
    assert cpu_kernels.decode_applies(jnp.float32) == (kernels == "native" and jax.default_backend() == "cpu")
    B, K, H, S = 2, 2, 16, 50
    N = K * group
    rng = np.random.default_rng(group + 10 * T)
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k_cache, v_cache = rng.standard_normal((2, B, K, H, S)).astype(np.float32)
    k_new, v_new = rng.standard_normal((2, B, K, T, H)).astype(np.float32)
    mask = rng.random((B, T, S)) < 0.7
    own = np.broadcast_to(np.tril(np.ones((T, T), bool)), (B, T, T))
    ours = decoder._attend_new(*(jnp.asarray(a) for a in (q, k_cache, v_cache, k_new, v_new, mask, own)),
                               H ** -0.5)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    keys = torch.cat([t(k_cache).transpose(2, 3), t(k_new)], 2).repeat_interleave(group, 1)   # [B, N, S+T, H]
    values = torch.cat([t(v_cache).transpose(2, 3), t(v_new)], 2).repeat_interleave(group, 1)
    allowed = t(np.concatenate([mask, own], 2))[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(t(q).transpose(1, 2), keys, values, attn_mask=allowed)
    np.testing.assert_allclose(np.asarray(ours), ref.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
