"""The loss and its gradients against HF transformers' loss and PyTorch autograd."""

import numpy as np
import torch

import tiny_models as tm
from llava_next_jax import LlavaNext


def test_loss_and_gradients_equal_pytorch(tmp_path):
    hf = tm.build_model("mistral", seed=8)
    tm.save_checkpoint(hf, str(tmp_path))
    model = LlavaNext.from_pretrained(str(tmp_path))
    # Right padding, as for training; labels mask the pads, the image tokens and the first prompt tokens.
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 6), (5, [(88, 55)], 20)], seed=8)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    right = np.stack([np.roll(row, -int((m == 0).sum())) for row, m in zip(ids, mask)])
    right_mask = np.stack([np.roll(m, -int((m == 0).sum())) for m in mask])
    assert (right_mask[:, 0] == 1).all() and (right_mask[:, -1] == 0).any()
    labels = np.where((right_mask == 1) & (right != hf.config.image_token_id), right, -100)
    labels[:, :2] = -100
    batch = dict(batch, input_ids=right, attention_mask=right_mask)

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


def test_overfit_two_captions_then_generate_them(tmp_path):
    """projector+decoder training drives the loss below 0.1; greedy decoding then says the captions."""
    from llava_next_jax import train
    hf = tm.build_model("vicuna", seed=9)
    tm.save_checkpoint(hf, str(tmp_path))
    model = LlavaNext.from_pretrained(str(tmp_path))
    prompt = tm.make_batch(hf.config, [(3, [(480, 640)], 2), (4, [(200, 90)], 2)], seed=9)
    captions = np.random.default_rng(9).integers(0, 150, (2, 6))
    ids = np.concatenate([prompt["input_ids"], captions], axis=1)
    mask = np.concatenate([prompt["attention_mask"], np.ones_like(captions)], axis=1)
    labels = np.full_like(ids, train.IGNORE)
    labels[:, -captions.shape[1]:] = captions
    _, pixels, sources, mask = model._inputs(ids, prompt["pixel_values"], prompt["image_sizes"], mask)
    batch = dict(input_ids=ids, pixel_values=pixels, sources=sources, attention_mask=mask, labels=labels)

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
