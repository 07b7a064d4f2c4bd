"""The released llava-hf LLaVA-NeXT checkpoints as configs, for sizing and benchmarks without a download.

Each entry is the part of the checkpoint's `config.json` that fixes the parameter shapes (text
family, widths, depth, heads, vocabulary, RoPE theta, image token), parsed by the same loader as a
real `config.json`. Fields that do not change a shape (norm eps, token ids other than the image
token, context length) are left to that loader's defaults, so load real weights with the
checkpoint's own config, not with these.

    >>> from llava_next_jax import presets
    >>> presets.config("34b").text.num_key_value_heads
    8
    >>> presets.config("72b", num_hidden_layers=2).text.num_hidden_layers  # full width, fewer layers
    2
"""

from __future__ import annotations

from typing import Any

from .config import LlavaNextConfig

# Every release: CLIP ViT-L/14 at 336 px, feature layer -2, the `default` strategy, these pinpoints.
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14)
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _text(model_type, hidden, layers, heads, kv_heads, ffn, vocab, rope_theta, **extra) -> dict[str, Any]:
    return dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab, rope_theta=rope_theta, **extra)


# name -> (hub repository, text_config, image_token_index)
RELEASES: dict[str, tuple[str, dict[str, Any], int]] = {
    "mistral-7b": ("llava-hf/llava-v1.6-mistral-7b-hf",
                   _text("mistral", 4096, 32, 32, 8, 14336, 32064, 1e6, sliding_window=None), 32000),
    "vicuna-7b": ("llava-hf/llava-v1.6-vicuna-7b-hf", _text("llama", 4096, 32, 32, 32, 11008, 32064, 1e4), 32000),
    "vicuna-13b": ("llava-hf/llava-v1.6-vicuna-13b-hf", _text("llama", 5120, 40, 40, 40, 13824, 32064, 1e4), 32000),
    "llama3-8b": ("llava-hf/llama3-llava-next-8b-hf", _text("llama", 4096, 32, 32, 8, 14336, 128320, 5e5), 128256),
    "34b": ("llava-hf/llava-v1.6-34b-hf", _text("llama", 7168, 60, 56, 8, 20480, 64064, 5e6), 64000),
    "72b": ("llava-hf/llava-next-72b-hf", _text("qwen2", 8192, 80, 64, 64, 24576, 152064, 1e6), 151646),
    "110b": ("llava-hf/llava-next-110b-hf", _text("qwen2", 8192, 80, 64, 8, 49152, 152064, 1e6), 151646),
}


def raw_config(name: str, **text_overrides) -> dict[str, Any]:
    """The `config.json` dict of release `name`; text_overrides replace text_config keys (e.g. layers)."""
    if name not in RELEASES:
        raise ValueError(f"unknown release {name!r}; known: {', '.join(RELEASES)}")
    _, text, image_token = RELEASES[name]
    return {"model_type": "llava_next", "vision_config": dict(CLIP_L_336), "text_config": {**text, **text_overrides},
            "image_token_index": image_token, "image_grid_pinpoints": PINPOINTS, "vision_feature_layer": -2,
            "vision_feature_select_strategy": "default", "tie_word_embeddings": False}


def config(name: str, **text_overrides) -> LlavaNextConfig:
    """The parsed `LlavaNextConfig` of release `name` (see `raw_config`)."""
    return LlavaNextConfig.from_dict(raw_config(name, **text_overrides), source=f"presets.{name}")
