"""The config fields transformers' `LlavaNextConfig` and its CLIP vision and Llama / Mistral / Qwen2 text
configs read: for each value a config.json may hold, our logits equal those of transformers loading the
same checkpoint (float32, 1e-4), or loading refuses the config with an error naming the field and value.

Each case builds a tiny random HF model from a config, saves it, optionally edits its config.json,
then compares `LlavaNext.from_pretrained` (through the converter) with `from_pretrained` in transformers.
"""

import json
import os

import numpy as np
import pytest

import tiny_models as tm
from llava_next_jax import LlavaNext

VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, image_size=56, patch_size=14)
TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=160, initializer_range=0.15)
# Several images a row (incl. unpadding's rounding cases and a 1-pixel-high one), left padding, text only.
ROWS = [(3, [(480, 640), (55, 176)], 4), (5, [(88, 55)], 2), (7, [(1, 300)], 3), (20, [], 3)]
# Rows longer than a 16-token sliding window, with text far behind the images.
LONG = [(3, [(480, 640), (55, 176)], 40), (5, [(88, 55)], 2), (60, [], 3)]
# Images whose anyres grid gives very few or very many feature rows.
EXTREME = [(3, [(1, 1), (5, 3000)], 4), (5, [(3000, 5), (2, 2)], 2), (2, [(1, 2), (2, 1), (7, 1)], 1)]


def raw_config(vision=None, text=None, **fields):
    """A LlavaNextConfig dict: the tiny sizes above, `vision` / `text` merged into the sub-configs."""
    return {"vision_config": {**VISION, **(vision or {})}, "text_config": {**TEXT, **(text or {})},
            "image_token_index": TEXT["vocab_size"] - 1, "image_grid_pinpoints": tm.TINY_PINPOINTS, **fields}


def save(tmp_path, raw, edit=None, edit_tensors=None, seed=0) -> str:
    """A checkpoint directory of a tiny random HF model built from `raw`, its config.json dict passed
    through `edit` and its tensors dict through `edit_tensors`, if given."""
    from safetensors.numpy import load_file, save_file
    path = str(tmp_path / "hf")
    tm.build_model_from_config(raw, seed).save_pretrained(path)
    if edit:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        edit(config)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    if edit_tensors:
        tensors = load_file(os.path.join(path, "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path


def compare(tmp_path, raw, rows=ROWS, edit=None, edit_tensors=None, seed=0):
    """Our logits against transformers', both loading the checkpoint `save` writes."""
    from transformers import LlavaNextForConditionalGeneration
    path = save(tmp_path, raw, edit, edit_tensors, seed)
    hf = LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    batch = tm.make_batch(hf.config, rows, seed=seed)
    ref = tm.hf_logits(hf, batch)
    ours = np.asarray(LlavaNext.from_pretrained(path).forward(**batch))
    mask = batch["attention_mask"].astype(bool)
    assert np.isfinite(ours).all()
    diff = np.abs(ours - ref)[mask].max()
    assert diff <= 1e-4, f"max |delta logits| {diff} (logits span {np.abs(ref).max():.2f})"


def refused(tmp_path, raw, match, edit=None, edit_tensors=None):
    """Loading (and converting) the checkpoint `save` writes is a ValueError matching `match`."""
    from llava_next_jax.convert_cli import convert_checkpoint
    path = save(tmp_path, raw, edit, edit_tensors)
    with pytest.raises(ValueError, match=match):
        LlavaNext.from_pretrained(path)
    with pytest.raises(ValueError, match=match):
        convert_checkpoint(path, str(tmp_path / "out"), log=lambda *_: None)


SAME_AS_HF = {
    "vision_feature_layer=-1": (raw_config(vision_feature_layer=-1), ROWS),
    "vision_feature_layer=[0,-1,2]": (raw_config(vision_feature_layer=[0, -1, 2]), ROWS),
    "vision_feature_layer=[-1,-1]": (raw_config(vision_feature_layer=[-1, -1]), ROWS),
    "multimodal_projector_bias=false": (raw_config(multimodal_projector_bias=False), ROWS),
    "vision layer_norm_eps": (raw_config(vision=dict(layer_norm_eps=1e-2)), ROWS),
    "vision 28px, 7px patches": (raw_config(vision=dict(image_size=28, patch_size=7),
                                            image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]]), ROWS),
    "vision 42px, odd pinpoints": (raw_config(vision=dict(image_size=42),
                                              image_grid_pinpoints=[[42, 126], [84, 42], [126, 168]]), ROWS),
    "vision 60px, 14px patches (CLIP's conv drops the last 4 pixels)": (raw_config(
        vision=dict(image_size=60), image_grid_pinpoints=[[60, 120], [120, 60], [120, 120]]), ROWS),
    "one pinpoint": (raw_config(image_grid_pinpoints=[[56, 56]]), ROWS),
    "extreme images": (raw_config(), EXTREME),
    "extreme images, 336px": (raw_config(vision=dict(image_size=336), image_grid_pinpoints=tm.RELEASED_PINPOINTS),
                              EXTREME),
    "extreme images, long pinpoints": (raw_config(image_grid_pinpoints=[[56, 56], [56, 336], [336, 56], [112, 224]]),
                                       EXTREME + [(1, [(100, 130), (480, 640)], 1)]),
    "image_token_index=0": (raw_config(image_token_index=0), ROWS),
    "image_token_index=5, tied": (raw_config(image_token_index=5, tie_word_embeddings=True), ROWS),
    "llama head_dim=32": (raw_config(text=dict(head_dim=32)), ROWS),
    "llama head_dim=8": (raw_config(text=dict(head_dim=8)), ROWS),
    "mistral head_dim=32": (raw_config(text=dict(model_type="mistral", head_dim=32, sliding_window=None)), ROWS),
    "qwen2 head_dim=32": (raw_config(text=dict(model_type="qwen2", head_dim=32)), ROWS),
    "llama attention_bias": (raw_config(text=dict(attention_bias=True)), ROWS),
    "llama mlp_bias": (raw_config(text=dict(mlp_bias=True)), ROWS),
    "mistral attention_bias (not read)": (raw_config(text=dict(model_type="mistral", attention_bias=True)), ROWS),
    "mistral mlp_bias (not read)": (raw_config(text=dict(model_type="mistral", mlp_bias=True)), ROWS),
    "qwen2 attention_bias=false (not read)": (raw_config(text=dict(model_type="qwen2", attention_bias=False)), ROWS),
    "qwen2 mlp_bias (not read)": (raw_config(text=dict(model_type="qwen2", mlp_bias=True)), ROWS),
    "llama pretraining_tp=2 (not read)": (raw_config(text=dict(pretraining_tp=2)), ROWS),
    "rope linear": (raw_config(text=dict(rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=1e4))), ROWS),
    "rope_scaling linear (4.x)": (raw_config(text=dict(rope_scaling=dict(type="linear", factor=3.0), rope_theta=500.0)),
                                  ROWS),
    "rope llama3, mistral": (raw_config(text=dict(model_type="mistral", sliding_window=None, rope_parameters=dict(
        rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))), LONG),
    "rope yarn, qwen2": (raw_config(text=dict(model_type="qwen2", max_position_embeddings=128, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=32))), LONG),
    "rope_scaling yarn (4.x), llama": (raw_config(text=dict(
        max_position_embeddings=128, rope_theta=1e4,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32))), LONG),
    "rope yarn, mscale and mscale_all_dim, betas": (raw_config(text=dict(
        max_position_embeddings=128, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                          original_max_position_embeddings=32, mscale=0.8,
                                                          mscale_all_dim=0.5, beta_fast=16, beta_slow=2))), LONG),
    "rope yarn, attention_factor, no truncation": (raw_config(text=dict(
        max_position_embeddings=128, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                                          original_max_position_embeddings=32, attention_factor=1.3,
                                                          truncate=False))), LONG),
    "rope default, partial_rotary_factor (not read)": (raw_config(text=dict(rope_parameters=dict(
        rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5))), ROWS),
    "mistral sliding_window=16": (raw_config(text=dict(model_type="mistral", sliding_window=16)), LONG),
    "mistral sliding_window, layer_types (not read)": (raw_config(text=dict(
        model_type="mistral", sliding_window=16, layer_types=["full_attention", "sliding_attention"])), LONG),
    "mistral sliding_window=1": (raw_config(text=dict(model_type="mistral", sliding_window=1)), LONG),
    "llama sliding_window (not read)": (raw_config(text=dict(sliding_window=16)), LONG),
    "qwen2 use_sliding_window, max_window_layers=1": (raw_config(text=dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)), LONG),
    "qwen2 use_sliding_window, max_window_layers=0": (raw_config(text=dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)), LONG),
    "qwen2 use_sliding_window, layer_types": (raw_config(text=dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"])), LONG),
    "qwen2 sliding_window without use_sliding_window": (raw_config(text=dict(
        model_type="qwen2", sliding_window=16, max_window_layers=0)), LONG),
    "tie_word_embeddings": (raw_config(tie_word_embeddings=True), ROWS),
}


@pytest.mark.parametrize("case", SAME_AS_HF)
def test_logits_equal_hf(tmp_path, case):
    raw, rows = SAME_AS_HF[case]
    compare(tmp_path, raw, rows)


def head_as_embeddings(tensors):
    """A tied checkpoint that stores its lm_head anyway, as a copy of the embeddings (.bin files do)."""
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"].copy()


def drop_top_level_tie(config):
    """The 4.x spelling: tie_word_embeddings only in text_config (transformers 5 reads the top level's)."""
    del config["tie_word_embeddings"]
    config["text_config"]["tie_word_embeddings"] = True


def test_tied_checkpoint_with_its_lm_head_saved_as_a_copy(tmp_path):
    compare(tmp_path, raw_config(tie_word_embeddings=True), edit_tensors=head_as_embeddings)


def test_tie_word_embeddings_with_a_different_lm_head_is_refused(tmp_path):
    """transformers 5 unties a checkpoint whose lm_head differs from its embeddings (a warning) and ties
    by the top-level key alone; the logits would then be those of lm_head.weight, which we do not tie."""
    for case, edit in (("top", lambda c: c.update(tie_word_embeddings=True)), ("text", drop_top_level_tie)):
        refused(tmp_path / case, raw_config(), r"tie_word_embeddings=true.*lm_head.weight \(in model.safetensors\) "
                                               r"differs", edit)


def test_tie_word_embeddings_in_text_config_alone_ties_a_checkpoint_without_lm_head(tmp_path):
    """As transformers 4 did (5 would leave lm_head random): the same logits as the top-level key gives."""
    tied = raw_config(tie_word_embeddings=True)
    compare(tmp_path, tied)
    path = save(tmp_path / "text", tied, edit=drop_top_level_tie)
    batch = tm.make_batch(tm.build_model_from_config(tied).config, ROWS)
    np.testing.assert_array_equal(np.asarray(LlavaNext.from_pretrained(path).forward(**batch)),
                                  np.asarray(LlavaNext.from_pretrained(str(tmp_path / "hf")).forward(**batch)))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_null_num_key_value_heads_is_multi_head_attention(tmp_path, family):
    """transformers' Llama and Qwen2 configs turn an explicit null into num_attention_heads (MistralConfig
    refuses a null; its default for a missing key is 8, which we keep)."""
    compare(tmp_path, raw_config(text=dict(model_type=family, num_key_value_heads=None)),
            edit=lambda c: c["text_config"].update(num_key_value_heads=None))


def test_llama3_rope_without_original_max_position_embeddings(tmp_path):
    """transformers takes max_position_embeddings for a llama3 (or yarn) rope's missing original length."""
    rope = dict(rope_type="llama3", rope_theta=1e4, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=64)
    compare(tmp_path, raw_config(text=dict(max_position_embeddings=64, rope_parameters=rope)), LONG,
            edit=lambda c: c["text_config"]["rope_parameters"].pop("original_max_position_embeddings"))


def test_rope_scaling_takes_precedence_over_rope_parameters(tmp_path):
    """A config.json with both keys (a 5.x config edited by hand): transformers reads rope_scaling."""
    compare(tmp_path, raw_config(text=dict(rope_parameters=dict(rope_type="linear", factor=3.0, rope_theta=1e4))),
            edit=lambda c: c["text_config"].update(rope_parameters=dict(rope_type="default", rope_theta=1e4),
                                                   rope_scaling=dict(type="linear", factor=3.0)))


@pytest.mark.parametrize("text,match", [
    (dict(rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=1e4)), "rope_parameters.rope_type='dynamic'"),
    (dict(rope_scaling=dict(type="longrope", short_factor=[1.0] * 8, long_factor=[2.0] * 8,
                            original_max_position_embeddings=32)), "rope_scaling.rope_type='longrope'"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4, partial_rotary_factor=0.5)),
     "rope_parameters.partial_rotary_factor=0.5"),
    (dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e4)}),
     "rope_parameters=.*one set of parameters for all layers"),
])
def test_refused_rope(text, match):
    """Rope settings transformers recomputes as the sequence grows (dynamic, longrope) or fails on."""
    from llava_next_jax.config import LlavaNextConfig
    with pytest.raises(ValueError, match=f"config.json: text_config.{match}"):
        LlavaNextConfig.from_dict(raw_config(text=text))


def test_activations_equal_transformers():
    """Every activation name a config may hold, against transformers' ACT2FN."""
    import jax.numpy as jnp
    import torch
    from transformers.activations import ACT2FN
    from llava_next_jax.config import ACTIVATIONS
    from llava_next_jax.modeling import activations
    assert set(ACTIVATIONS) == set(activations.FUNCTIONS)
    x = np.linspace(-8, 8, 4001, dtype=np.float32)
    for name in ACTIVATIONS:
        ref = ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(activations.get(name)(jnp.asarray(x))), ref, rtol=1e-6, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("raw", [raw_config(projector_hidden_act="gelu_pytorch_tanh"),
                                 raw_config(vision=dict(hidden_act="gelu")), raw_config(text=dict(hidden_act="relu"))],
                         ids=["projector_hidden_act", "vision_config.hidden_act", "text_config.hidden_act"])
def test_activations_where_a_config_names_them(tmp_path, raw):
    compare(tmp_path, raw)


@pytest.mark.parametrize("raw,match", [
    (raw_config(projector_hidden_act="mish"), "projector_hidden_act='mish'"),
    (raw_config(vision=dict(hidden_act="gelu_10")), "vision_config.hidden_act='gelu_10'"),
    (raw_config(text=dict(hidden_act="relu2")), "text_config.hidden_act='relu2'"),
])
def test_refused_activations(raw, match):
    from llava_next_jax.config import LlavaNextConfig
    with pytest.raises(ValueError, match=f"config.json: {match} is not supported; supported: gelu, "):
        LlavaNextConfig.from_dict(raw)


@pytest.mark.parametrize("raw,match", [
    (raw_config(image_grid_pinpoints=[[84, 112], [112, 56]]),
     r"image_grid_pinpoints entry \[84, 112\] is not a positive multiple of the tile size 56"),
    (raw_config(image_grid_pinpoints=[]), "image_grid_pinpoints is empty"),
])
def test_refused_pinpoints(raw, match):
    """transformers counts ceil(h / tile) tiles but lays out floor(h / tile): its forward pass fails."""
    from llava_next_jax.config import LlavaNextConfig
    with pytest.raises(ValueError, match=f"config.json: {match}"):
        LlavaNextConfig.from_dict(raw)
