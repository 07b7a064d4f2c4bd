"""The loss and its gradients against HF transformers' loss and PyTorch autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models as tm
from llava_next_jax import LlavaNext, lora, train


def right_padded(hf, seed):
    """A right-padded batch of two rows (as for training) and labels masking pads, image tokens and
    the first two prompt tokens."""
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 6), (5, [(88, 55)], 20)], seed=seed)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    right = np.stack([np.roll(row, -int((m == 0).sum())) for row, m in zip(ids, mask)])
    right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
    assert (right_mask[:, 0] == 1).all() and (right_mask[:, -1] == 0).any()
    labels = np.where((right_mask == 1) & (right != hf.config.image_token_id), right, -100)
    labels[:, :2] = -100
    return dict(batch, input_ids=right, attention_mask=right_mask), labels


def step_inputs(model, batch, labels):
    """The batch as `train.train_step` takes it."""
    return model.train_batch(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"],
                             labels)


def leaf(tree, *path):
    for key in path:
        tree = tree[key]
    return tree


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mistral"))
    hf = tm.build_model("mistral", seed=8)
    tm.save_checkpoint(hf, path)
    return hf, path


def test_loss_and_gradients_equal_pytorch(mistral):
    hf, path = mistral
    model = LlavaNext.from_pretrained(path)
    batch, labels = right_padded(hf, seed=8)

    hf.zero_grad()
    out = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}, labels=torch.from_numpy(labels))
    out.loss.backward()
    ours = model.loss(**batch, labels=labels)
    assert abs(ours - out.loss.item()) <= 1e-5 * abs(out.loss.item())

    grads = model.grad(**batch, labels=labels)
    named = dict(hf.named_parameters())
    for ours_path, hf_name in [
        (("multi_modal_projector", "linear_1", "kernel"), "model.multi_modal_projector.linear_1.weight"),
        (("language_model", "layers", "1", "self_attn", "q_proj", "kernel"),
         "model.language_model.layers.1.self_attn.q_proj.weight"),
        (("language_model", "layers", "0", "mlp", "down_proj", "kernel"),
         "model.language_model.layers.0.mlp.down_proj.weight"),
        (("vision_tower", "layers", "0", "mlp", "fc1", "kernel"), "model.vision_tower.encoder.layers.0.mlp.fc1.weight"),
    ]:
        g = grads
        for key in ours_path:
            g = g[key]
        ref = named[hf_name].grad.numpy().T
        assert np.linalg.norm(ref) > 0
        assert np.linalg.norm(np.asarray(g) - ref) <= 1e-3 * np.linalg.norm(ref), hf_name


@pytest.mark.parametrize("implementation", ["native", "blocks"])
def test_left_padded_loss_equals_pytorch(mistral, implementation, monkeypatch):
    """Left-padded rows (as `generate` pads): the first real token of a short row is predicted from the
    last pad, whose query sees no key; its attention gives zeros, as HF's, so the loss equals HF's on
    the CPU kernel and on the query blocks (which once averaged there: 8e-5 off)."""
    hf, path = mistral
    monkeypatch.setenv("LLAVA_NEXT_ATTENTION", implementation)
    jax.clear_caches()                 # the implementation is read when a program is traced
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 6), (5, [(88, 55)], 20)], seed=8)
    assert (batch["attention_mask"][:, 0] == 0).any()
    labels = np.where(batch["attention_mask"] == 1, batch["input_ids"], -100)
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(v) for k, v in batch.items()}, labels=torch.from_numpy(labels)).loss.item()
    ours = LlavaNext.from_pretrained(path).loss(**batch)
    jax.clear_caches()
    assert abs(ours - ref) <= 1e-5 * abs(ref)


@pytest.mark.parametrize("warmup, total", [(0, 1), (0, 6), (2, 10), (3, 3)])
def test_learning_rate_schedule_equals_transformers(warmup, total):
    """Update i's learning rate is HF's cosine schedule with warmup (a one-update run too)."""
    from transformers import get_cosine_schedule_with_warmup
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    hf = get_cosine_schedule_with_warmup(optimizer, warmup, total)
    theirs = []
    for _ in range(total):
        theirs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        hf.step()
    ours = [float(train.learning_rate_schedule(2e-3, warmup, total)(i)) for i in range(total)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-12)   # float32


def test_overfit_two_captions_then_generate_them(tmp_path):
    """projector+decoder training drives the loss below 0.1; greedy decoding then says the captions."""
    hf = tm.build_model("vicuna", seed=9)
    tm.save_checkpoint(hf, str(tmp_path))
    model = LlavaNext.from_pretrained(str(tmp_path))
    prompt = tm.make_batch(hf.config, [(3, [(480, 640)], 2), (4, [(200, 90)], 2)], seed=9)
    captions = np.random.default_rng(9).integers(0, 150, (2, 6))
    ids = np.concatenate([prompt["input_ids"], captions], axis=1)
    mask = np.concatenate([prompt["attention_mask"], np.ones_like(captions)], axis=1)
    labels = np.full_like(ids, train.IGNORE)
    labels[:, -captions.shape[1]:] = captions
    batch = model.train_batch(ids, prompt["pixel_values"], prompt["image_sizes"], mask, labels)

    optimizer = train.make_optimizer(model.params, learning_rate=3e-3, warmup_steps=5, total_steps=80)
    frozen = np.asarray(model.params["vision_tower"]["layers"]["0"]["mlp"]["fc1"]["kernel"]).copy()
    state = train.init_state(model.params, optimizer)
    losses = []
    for _ in range(80):
        state, metrics = train.train_step(state, batch, model.config, optimizer, model.dtype)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 < losses[0], losses[::10]
    np.testing.assert_array_equal(np.asarray(state["params"]["vision_tower"]["layers"]["0"]["mlp"]["fc1"]["kernel"]),
                                  frozen)
    trained = LlavaNext(model.config, state["params"])
    out = trained.generate(prompt["input_ids"], prompt["pixel_values"], prompt["image_sizes"],
                           prompt["attention_mask"], max_new_tokens=captions.shape[1], eos_token_id=[])
    np.testing.assert_array_equal(out, captions)


def test_remat_same_gradients_less_memory(mistral):
    hf, path = mistral
    model = LlavaNext.from_pretrained(path)
    inputs = step_inputs(model, *right_padded(hf, seed=3))
    args = [inputs[k] for k in ("input_ids", "pixel_values", "sources", "attention_mask", "labels")]
    compiled = {r: train.loss_and_grad.lower(model.params, model.config, *args, remat=r).compile()
                for r in (False, True)}
    plain, remat = (compiled[r](model.params, *args) for r in (False, True))
    assert abs(float(plain[0]) - float(remat[0])) <= 1e-6 * abs(float(plain[0]))
    for a, b in zip(jax.tree.leaves(plain[1]), jax.tree.leaves(remat[1])):  # recomputation reorders sums
        assert np.linalg.norm(np.asarray(b) - np.asarray(a)) <= 1e-5 * np.linalg.norm(np.asarray(a)) + 1e-7
    temp = {r: c.memory_analysis().temp_size_in_bytes for r, c in compiled.items()}
    assert temp[True] < temp[False], temp


def test_bfloat16_compute_with_float32_master_weights(mistral):
    hf, path = mistral
    model = LlavaNext.from_pretrained(path, dtype="float32")
    inputs = step_inputs(model, *right_padded(hf, seed=4))
    optimizer = train.make_optimizer(model.params, learning_rate=1e-3, total_steps=10)
    reference = float(train.loss_fn(model.params, model.config, *[inputs[k] for k in
                      ("input_ids", "pixel_values", "sources", "attention_mask", "labels")]))
    state = train.init_state(jax.tree.map(jnp.copy, model.params), optimizer)
    losses = []
    for _ in range(3):
        state, metrics = train.train_step(state, inputs, model.config, optimizer, jnp.bfloat16)
        losses.append(float(metrics["loss"]))
    compiled = train.train_step._cache_size()
    again = train.make_optimizer(state["params"], learning_rate=1e-3, total_steps=10)   # same settings:
    state, _ = train.train_step(state, inputs, model.config, again, jnp.bfloat16)       # no new program
    assert train.train_step._cache_size() == compiled
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(losses).all() and abs(losses[0] - reference) <= 0.02 * reference, (losses, reference)
    assert losses[-1] < losses[0]
    moved = leaf(state["params"], "language_model", "layers", "0", "self_attn", "q_proj", "kernel")
    assert np.abs(np.asarray(moved) - np.asarray(leaf(model.params, "language_model", "layers", "0", "self_attn",
                                                     "q_proj", "kernel"))).max() > 1e-4


def test_lora_gradients_follow_the_chain_rule(mistral):
    """dL/dA = s * dL/dW' @ B^T and dL/dB = s * A^T @ dL/dW' (W' the merged kernel), with B made nonzero."""
    hf, path = mistral
    model = LlavaNext.from_pretrained(path)
    inputs = step_inputs(model, *right_padded(hf, seed=5))
    args = [inputs[k] for k in ("input_ids", "pixel_values", "sources", "attention_mask", "labels")]
    config = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"))
    tree = lora.attach(model.params, config, jax.random.key(0))
    tree["lora"] = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape), tree["lora"])
    merged = lora.merge(tree["base"], tree["lora"], config)
    loss, grads = train.loss_and_grad(tree, model.config, *args, lora=config)
    merged_loss, merged_grads = train.loss_and_grad(merged, model.config, *args)
    assert abs(float(loss) - float(merged_loss)) <= 1e-6 * abs(float(merged_loss))
    assert abs(float(loss) - float(train.loss_fn(model.params, model.config, *args))) > 1e-4  # the adapters act
    for block, name in [("self_attn", "q_proj"), ("mlp", "down_proj")]:
        for i in ("0", "1"):
            ab = leaf(tree["lora"], "language_model", "layers", i, block, name)
            g_w = np.asarray(leaf(merged_grads, "language_model", "layers", i, block, name, "kernel"))
            g = leaf(grads["lora"], "language_model", "layers", i, block, name)
            np.testing.assert_allclose(g["a"], config.scale * g_w @ np.asarray(ab["b"]).T, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(g["b"], config.scale * np.asarray(ab["a"]).T @ g_w, rtol=1e-4, atol=1e-7)
    assert "k_proj" not in leaf(tree["lora"], "language_model", "layers", "0", "self_attn")
    with pytest.raises(ValueError, match="unknown \\['qproj'\\]"):
        lora.LoraConfig(targets=("qproj",))


def test_lora_training_moves_only_adapters_and_exports_to_transformers(mistral, tmp_path):
    from transformers import LlavaNextForConditionalGeneration
    from llava_next_jax import convert
    hf, path = mistral
    model = LlavaNext.from_pretrained(path)
    batch, labels = right_padded(hf, seed=6)
    inputs = step_inputs(model, batch, labels)
    config = lora.LoraConfig(rank=4, alpha=8.0)
    tree = lora.attach(jax.tree.map(jnp.copy, model.params), config, jax.random.key(1))
    optimizer = train.make_optimizer(tree, learning_rate=1e-2, total_steps=30, trainable="lora")
    state = train.init_state(tree, optimizer)
    losses = []
    for _ in range(30):
        state, metrics = train.train_step(state, inputs, model.config, optimizer, lora=config)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(state["params"]["base"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    merged = lora.merge(state["params"]["base"], state["params"]["lora"], config)
    convert.export_hf(merged, path, str(tmp_path / "export"))
    back = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    ours = np.asarray(LlavaNext(model.config, merged).forward(**batch))
    ref = tm.hf_logits(back, batch)
    assert np.abs(ours - ref)[batch["attention_mask"] == 1].max() <= 1e-4
    with pytest.raises(ValueError, match="needs a LoRA tree"):
        train.make_optimizer(model.params, trainable="lora")
