"""Packed bfloat16 weights (`packed_weights`, `cpu_packed.h`): lossless, products equal torch's, and a
packed model generates as the unpacked one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from llava_next_jax import cpu_kernels, packed_weights
from llava_next_jax.modeling import decoder

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the native CPU kernels are not built here")

# bf16 bits a kernel must carry through packing: infinities, a NaN, zeros of both signs, subnormals,
# the largest finite values, 1.0
SPECIAL = np.array([0x7F80, 0xFF80, 0x7FC1, 0x0000, 0x8000, 0x0001, 0x807F, 0x7F7F, 0xFF7F, 0x3F80], np.uint16)


def random_kernel(K: int, N: int, seed: int, special: bool = True) -> np.ndarray:
    """A bf16 kernel of normal weights (std 0.02, as a checkpoint's), with `SPECIAL` values and a few
    large outliers scattered in it."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((K, N)) * 0.02).astype(jnp.bfloat16)
    if special:
        bits = w.view(np.uint16).reshape(-1)
        spots = rng.choice(bits.size, len(SPECIAL) + 5, replace=False)
        bits[spots[:len(SPECIAL)]] = SPECIAL
        bits[spots[len(SPECIAL):]] = (rng.standard_normal(5) * 300).astype(jnp.bfloat16).view(np.uint16)
    return w


@pytest.mark.parametrize("K,N", [(5, 3), (7, 5), (130, 67), (64, 96), (1030, 2051)])
def test_unpacked_bits_equal_the_kernels(K, N):
    """Packing then unpacking (`cpu_packed.h`'s UnpackRows) gives the kernel's bits back, escapes and
    special values included; the packed arrays take ~3/4 of the kernel's bytes where it is large."""
    w = random_kernel(K, N, seed=K * N)
    packed = packed_weights.pack(w, max_escapes=1.0)
    assert packed.shape == (K, N) and (len(packed.escape_rows) > 0) == (K * N > 15)   # 15 codes cover up to 15
    out = np.asarray(jax.jit(packed_weights.unpack)(packed))
    assert out.dtype == jnp.bfloat16 and out.shape == (K, N)
    np.testing.assert_array_equal(out.view(np.uint16), w.view(np.uint16))
    if K * N > 10 ** 6:
        assert packed.nbytes < 0.77 * w.nbytes   # 3/4, the columns padded to 32 and the escapes


def test_many_distinct_exponents_stay_unpacked():
    """A kernel whose high bytes are spread evenly over all 256 values would be mostly escapes: `pack`
    returns None, and `pack_params` keeps its `kernel` (and packs the other)."""
    rng = np.random.default_rng(0)
    spread = rng.integers(0, 2 ** 16, (64, 64), dtype=np.uint16).view(jnp.bfloat16)
    assert packed_weights.pack(spread) is None
    params = {"language_model": {"a": {"kernel": jnp.asarray(spread)},
                                 "b": {"kernel": jnp.asarray(random_kernel(64, 64, 1)), "bias": jnp.zeros(64)}},
              "vision_tower": {"c": {"kernel": jnp.asarray(random_kernel(64, 64, 2))}}}
    out = packed_weights.pack_params(params)
    assert set(out["language_model"]["a"]) == {"kernel"}
    assert set(out["language_model"]["b"]) == {"packed_kernel", "bias"}
    assert out["vision_tower"] is params["vision_tower"]
    assert packed_weights.is_packed(out) and not packed_weights.is_packed(params)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 40])
@pytest.mark.parametrize("K,N", [(7, 5), (130, 67), (1030, 2051), (96, 100)])
def test_packed_products_equal_torch(rows, K, N):
    """`decoder.matmul` of `[rows, 1, K]` by the packed kernel against torch in float64 on the same bf16
    values, within the bf16 kernel's bound (float32 sums rounded once to bf16; the test of
    `test_cpu_kernels` for the unpacked kernel); 1 to 8 rows read it packed, more go to AMX tiles from
    it where the CPU has them and K is a multiple of 32, else unpack it first."""
    rng = np.random.default_rng(rows * K)
    w = random_kernel(K, N, seed=K, special=False)
    w.view(np.uint16)[0, : min(N, 3)] = [0x0001, 0x8000, 0x4600][: min(N, 3)]   # escapes: subnormal, -0, 8192
    packed = packed_weights.pack(w, max_escapes=1.0)
    x = jnp.asarray(rng.standard_normal((rows, 1, K)), jnp.bfloat16)
    fn = jax.jit(decoder.matmul)
    ours = fn(x, packed)
    assert ours.dtype == jnp.bfloat16 and ours.shape == (rows, 1, N)
    as64 = lambda a: torch.from_numpy(np.asarray(a, np.float64))
    ref = (as64(x) @ as64(w)).numpy()
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=2 ** -8, atol=1e-5 * np.sqrt(K))
    text = fn.lower(x, packed).as_text()
    tiles = rows > 8 and K % 32 == 0 and cpu_kernels.amx_applies()
    assert (cpu_kernels.PACKED_TARGET in text) == (rows <= 8)
    assert (cpu_kernels.GEMM_PACKED_TARGET in text) == tiles
    assert (cpu_kernels.UNPACK_TARGET in text) == (rows > 8 and not tiles)


@pytest.mark.parametrize("tasks", [0, 1, 2, 3, 5, 16])
@pytest.mark.parametrize("K,N", [(9, 40), (1030, 2051), (4096, 96)])
def test_packed_sums_equal_the_bfloat16_kernels_bit_for_bit(tasks, K, N):
    """The packed product's float32 sums equal those of the few-row kernel on the bf16 kernel
    (`cpu_kernels.TARGET`) bit for bit, for 1 to 8 rows, split into `tasks` pieces as a many-core
    machine splits it (the kernel's rows in halves, its columns in ranges of whole 32-column blocks),
    escapes and special values included (infinities and NaN give NaN and infinities in the same places)."""
    rng = np.random.default_rng(tasks + K)
    w = random_kernel(K, N, seed=tasks)
    packed = packed_weights.pack(w, max_escapes=1.0)
    assert len(packed.escape_rows) > 0
    for rows in (1, 3, 4, 5, 8):
        x = jnp.asarray(rng.standard_normal((rows, K)), jnp.bfloat16).astype(jnp.float32)
        ours = cpu_kernels.packed_matmul(x, packed.arrays(), N, tasks)
        theirs = jax.ffi.ffi_call(cpu_kernels.TARGET, jax.ShapeDtypeStruct((rows, N), jnp.float32))(
            x, jnp.asarray(w), tasks=np.int64(tasks))
        np.testing.assert_array_equal(np.asarray(ours).view(np.uint32), np.asarray(theirs).view(np.uint32))


@pytest.mark.skipif(not cpu_kernels.amx_applies(), reason="needs a CPU with AMX tiles (the README says why)")
@pytest.mark.parametrize("M,K,N", [(9, 64, 100), (300, 1024, 4096), (77, 4096, 1024), (40, 96, 4099)])
def test_packed_product_on_tiles_equals_the_bfloat16_kernels_bit_for_bit(M, K, N):
    """A product of many rows by a packed kernel on AMX tiles (panels packed from the packed kernel, its
    escapes put in place) equals `gemm` on the bf16 kernel (`cpu_amx.cc`'s GemmBf16) bit for bit,
    special values included, for panels of every width (N not a multiple of 32) and slabs of depth."""
    rng = np.random.default_rng(M)
    w = random_kernel(K, N, seed=M)
    packed = packed_weights.pack(w, max_escapes=1.0)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    ours = jax.jit(packed_weights.gemm)(x, packed)
    np.testing.assert_array_equal(np.asarray(ours).view(np.uint16),
                                  np.asarray(cpu_kernels._gemm(x, jnp.asarray(w))).view(np.uint16))


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    import tiny_models as tm
    from llava_next_jax import LlavaNext
    from llava_next_jax.convert_cli import main as convert
    path = tmp_path_factory.mktemp("packed")
    hf = tm.build_model("llama3", seed=4)
    tm.save_checkpoint(hf, str(path / "hf"))
    convert([str(path / "hf"), str(path / "out"), "--dtype", "bfloat16"])
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 4), (5, [(88, 55)], 2), (9, [], 3)], seed=2)
    return LlavaNext.from_pretrained(str(path / "out")), batch


def test_packed_model_generates_as_unpacked(tiny_bf16):
    """A bf16 model packed (`LlavaNext.pack_weights`): every decoder and lm_head kernel packed, the
    forward pass (its products unpack the kernels: the same bf16 values) equal to the unpacked
    model's bit for bit, the decode loop on the packed kernel, and greedy tokens of a mixed batch equal
    the unpacked model's, the logits of a decode step too, bit for bit."""
    from llava_next_jax import generate
    model, batch = tiny_bf16
    packed = model.pack_weights()
    kernels = lambda tree: [path for path, _ in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda a: isinstance(a, packed_weights.PackedKernel))[0]]
    names = [jax.tree_util.keystr(p) for p in kernels({k: packed.params[k] for k in ("language_model", "lm_head")})]
    assert not any(name.endswith("['kernel']") for name in names)
    assert sum(name.endswith("['packed_kernel']") for name in names) == 7 * model.config.text.num_hidden_layers + 1
    np.testing.assert_array_equal(np.asarray(packed.forward(**batch)), np.asarray(model.forward(**batch)))
    np.testing.assert_array_equal(packed.generate(**batch, max_new_tokens=16, eos_token_id=[]),
                                  model.generate(**batch, max_new_tokens=16, eos_token_id=[]))
    ids, pixels, sources, mask = packed._inputs(batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                                batch["attention_mask"])
    B, T = ids.shape
    _, cache, valid = generate.prefill_program(packed.params, packed.config, ids, jnp.asarray(pixels, jnp.bfloat16),
                                               sources, mask, jnp.bfloat16, T + 1)
    step = jax.jit(lambda p, c, v, t, pos: generate.decode_step(p, packed.config, t, pos, T, v, c, jnp.bfloat16))
    args = (cache, valid, np.arange(B, dtype=np.int32) + 5, mask.sum(1).astype(np.int32))
    text = step.lower(packed.params, *args).as_text()
    assert cpu_kernels.PACKED_TARGET in text and cpu_kernels.TARGET not in text
    np.testing.assert_array_equal(np.asarray(step(packed.params, *args)[0]), np.asarray(step(model.params, *args)[0]))


def test_packing_names_what_it_cannot_do(tiny_bf16, tmp_path):
    """float32 weights, and gradients of a packed model, are refused with errors that say why."""
    from llava_next_jax import LlavaNext
    model, batch = tiny_bf16
    as_float32 = LlavaNext(model.config, jax.tree.map(lambda a: a.astype(jnp.float32), model.params))
    with pytest.raises(ValueError, match="bfloat16 weights; this model's are float32"):
        as_float32.pack_weights()
    with pytest.raises(ValueError, match="packed"):
        model.pack_weights().grad(batch["input_ids"], batch["pixel_values"], batch["image_sizes"],
                                  batch["attention_mask"])
    with pytest.raises(ValueError, match=r"bfloat16 \[K, N\] kernel, got float32 \[3, 4\]"):
        packed_weights.pack(np.zeros((3, 4), np.float32))
