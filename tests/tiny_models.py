"""Tiny random-weight LLaVA-NeXT checkpoints built with HF transformers (the reference), for tests.

`make_checkpoint(dir, family, ...)` builds `LlavaNextForConditionalGeneration` with a small config of
one text family, saves it the way a chosen layout names its tensors, and returns the HF model so a
test can compare against it. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch

TINY_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]   # the release's, scaled 1/6
RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=160,
             initializer_range=0.15)  # larger than the default 0.02, so logits span several units

FAMILIES = {
    # mistral-7b-like: GQA 4 q heads / 2 kv heads, sliding window short enough to matter.
    "mistral": dict(text=dict(_TEXT, model_type="mistral", num_key_value_heads=2, sliding_window=48,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    # llama3-8b-like: llama3 rope scaling (4.x spelling), GQA, several vision feature layers.
    "llama3": dict(text=dict(_TEXT, model_type="llama", num_key_value_heads=2, rope_theta=5e5,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
                   vision_feature_layer=[-2, 1]),
    # 72b-like: qwen2 with q/k/v bias, tied embeddings.
    "qwen2": dict(text=dict(_TEXT, model_type="qwen2", num_key_value_heads=4, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
                  tie_word_embeddings=True),
    # vicuna-7b-like: llama, multi-head attention (kv heads = heads).
    "vicuna": dict(text=dict(_TEXT, model_type="llama", num_key_value_heads=4)),
}

LAYOUTS = ("tf5-file", "hub2024", "tf5-live", "bin")


def hf_config(family: str, image_size: int = 56, pinpoints=None, vision_layers: int = 3):
    from transformers import LlavaNextConfig
    spec = FAMILIES[family]
    return LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48,
                           num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                           patch_size=14),
        text_config=spec["text"],
        image_token_index=spec["text"]["vocab_size"] - 1,
        image_grid_pinpoints=pinpoints or (TINY_PINPOINTS if image_size == 56 else RELEASED_PINPOINTS),
        vision_feature_layer=spec.get("vision_feature_layer", -2),
        tie_word_embeddings=spec.get("tie_word_embeddings", False),
    )


def build_model(family: str, seed: int = 0, **config_kw):
    return build_model_from_config(hf_config(family, **config_kw), seed)


def build_model_from_config(config, seed: int = 0):
    """`LlavaNextForConditionalGeneration` with random weights for an HF `LlavaNextConfig` (or its dict)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    if isinstance(config, dict):
        config = LlavaNextConfig.from_dict(copy.deepcopy(config))
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: randomise so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _rename(state: dict, layout: str) -> dict:
    if layout == "tf5-live":
        return state
    out = {}
    for k, v in state.items():
        k = k.replace("model.language_model.", "language_model.model.").replace("model.vision_tower.", "vision_tower.")
        k = k.replace("model.multi_modal_projector.", "multi_modal_projector.").replace("model.image_newline",
                                                                                       "image_newline")
        k = k.replace("lm_head.", "language_model.lm_head.")
        if layout == "hub2024":
            k = k.replace("vision_tower.", "vision_tower.vision_model.")
        out[k] = v
    return out


def save_checkpoint(model, out_dir: str, layout: str = "tf5-file", shards: int = 1) -> None:
    """Writes `model` to out_dir with the tensor names of `layout`, in `shards` files (with an index)."""
    os.makedirs(out_dir, exist_ok=True)
    if layout == "tf5-file" and shards == 1:
        model.save_pretrained(out_dir)
        return
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
    state = _rename(state, layout)
    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    if layout == "bin":
        names = ["pytorch_model.bin"] if shards == 1 else [
            f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin" for i in range(shards)]
        for name, group in zip(names, groups):
            torch.save({k: state[k] for k in group}, os.path.join(out_dir, name))
        index_name = "pytorch_model.bin.index.json"
    else:
        from safetensors.torch import save_file
        names = ["model.safetensors"] if shards == 1 else [
            f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        for name, group in zip(names, groups):
            save_file({k: state[k] for k in group}, os.path.join(out_dir, name), metadata={"format": "pt"})
        index_name = "model.safetensors.index.json"
    if shards > 1:
        weight_map = {k: name for name, group in zip(names, groups) for k in group}
        with open(os.path.join(out_dir, index_name), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def image_token_ids(config, image_sizes) -> list[int]:
    """input ids for one `<image>` per size, expanded to the feature count HF's model produces."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches, unpad_image
    ids = []
    n = config.vision_config.image_size // config.vision_config.patch_size
    for h, w in image_sizes:
        tiles = image_size_to_num_patches((h, w), config.image_grid_pinpoints, config.vision_config.image_size)
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
        gh, gw = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints, config.vision_config.image_size)
        assert 1 + gh * gw == tiles
        rows, cols = unpad_image(torch.zeros(1, gh * n, gw * n), (h, w)).shape[1:]
        ids += [config.image_token_id] * (n * n + rows * (cols + 1))
    return ids


def make_batch(config, rows, seed=0):
    """rows: list of (text_len_before, [image sizes], text_len_after). Left-padded batch in HF layout.

    Returns dict(input_ids, attention_mask, pixel_values, image_sizes) as numpy arrays.
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    rng = np.random.default_rng(seed)
    image_id = config.image_token_id

    def text(n):   # ids other than the image token's (the same ids as [0, V-1) when that is the last one)
        ids = rng.integers(0, config.text_config.vocab_size - 1, n)
        return list(ids + (ids >= image_id))
    seqs, sizes = [], []
    for before, images, after in rows:
        seq = text(before)
        for size in images:
            seq += image_token_ids(config, [size]) + text(2)
        seqs.append(seq + text(after))
        sizes += list(images)
    T = max(map(len, seqs))
    input_ids = np.full((len(seqs), T), int(image_id == 0), np.int64)   # pads: 0, unless that is the image token
    mask = np.zeros((len(seqs), T), np.int64)
    for i, s in enumerate(seqs):
        input_ids[i, T - len(s):] = s
        mask[i, T - len(s):] = 1
    batch = dict(input_ids=input_ids, attention_mask=mask)
    if sizes:
        S = config.vision_config.image_size
        P = max(image_size_to_num_patches(s, config.image_grid_pinpoints, S) for s in sizes)
        batch["pixel_values"] = rng.standard_normal((len(sizes), P, 3, S, S)).astype(np.float32)
        batch["image_sizes"] = np.asarray(sizes, np.int64)
    return batch


def hf_logits(model, batch, dtype=torch.float32) -> np.ndarray:
    """The reference logits, with the generate-style positions `cumsum(mask) - 1`."""
    mask = torch.from_numpy(batch["attention_mask"])
    kwargs = dict(input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=mask,
                  position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    if "pixel_values" in batch:
        kwargs.update(pixel_values=torch.from_numpy(batch["pixel_values"]).to(dtype),
                      image_sizes=torch.from_numpy(batch["image_sizes"]))
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def hf_generate(model, batch, max_new_tokens: int, pad_token_id: int = 0, **settings) -> np.ndarray:
    """HF's greedy `generate` on `batch`: the new tokens `[B, max_new_tokens]`, padded with pad_token_id
    where HF stopped early (once every row is done)."""
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        out = model.generate(**args, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id,
                             **settings)
    new = out[:, batch["input_ids"].shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=pad_token_id)
