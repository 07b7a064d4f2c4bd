"""Frozen configs parsed from an HF LLaVA-NeXT `config.json`.

Released configs leave most sizes out and rely on the defaults of transformers' config classes
(e.g. llava-v1.6-mistral-7b-hf omits `hidden_size`), so those defaults are tabled here per
`model_type`. Both key spellings transformers has written are read: `rope_theta` / `rope_scaling`
(4.x) and `rope_parameters` (5.x). Anything we cannot compute exactly is a ValueError naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from . import anyres

TEXT_MODEL_TYPES = ("llama", "mistral", "qwen2")

# transformers' class defaults for keys a config.json may omit.
_TEXT_DEFAULTS = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, rms_norm_eps=1e-6,
                  max_position_embeddings=2048, sliding_window=None, bos_token_id=1, eos_token_id=2),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-6,
                    max_position_embeddings=131072, sliding_window=4096, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-6,
                  max_position_embeddings=32768, sliding_window=4096, bos_token_id=None, eos_token_id=None),
}
_CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu", num_channels=3)
# LlavaNextConfig() with no vision_config at all builds CLIP ViT-L/14-336.
_LLAVA_VISION_DEFAULTS = dict(_CLIP_DEFAULTS, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
# transformers' ACT2FN names we compute (`modeling.activations`); the tanh GELUs are one formula.
ACTIVATIONS = ("gelu", "gelu_python", "gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_fast", "quick_gelu",
               "relu", "silu", "swish")
_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    num_channels: int = 3
    hidden_act: str = "quick_gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies as transformers computes them: `default`, `linear` (factor), `llama3` (factor,
    low/high_freq_factor, original_max_position_embeddings) or `yarn` (factor, original_max_position_embeddings,
    beta_fast/slow, truncate; cos and sin scaled by attention_factor)."""
    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Per layer: attend to keys with index > query index - window; 0 means no window.
    sliding_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_id: int
    image_grid_pinpoints: tuple[tuple[int, int], ...]
    vision_feature_layers: tuple[int, ...]  # indices into hidden_states (0 = embeddings), >= 0
    vision_feature_select_strategy: str
    multimodal_projector_bias: bool
    tie_word_embeddings: bool
    projector_hidden_act: str = "gelu"

    @property
    def geometry(self) -> anyres.Geometry:
        n = self.vision.image_size // self.vision.patch_size
        return anyres.Geometry(self.vision.image_size, self.vision.patch_size, self.image_grid_pinpoints,
                               anyres.base_tokens(n, 1, self.vision_feature_select_strategy))

    @property
    def vision_layers_needed(self) -> int:
        """Encoder layers that must run: the deepest selected hidden state."""
        return max(self.vision_feature_layers)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LlavaNextConfig":
        return _parse_llava(raw, source)

    @classmethod
    def from_file(cls, path: str) -> "LlavaNextConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (expected an HF LLaVA-NeXT or converted checkpoint)")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return _parse_llava(raw, path)


def _fail(source: str, key: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"{source}: {key}={value!r} is not supported; supported: {supported}")


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _parse_rope(raw: dict[str, Any], source: str, max_position_embeddings: int) -> RopeConfig:
    """transformers' `RotaryEmbeddingConfigMixin` reading: a 4.x `rope_scaling` dict first, else 5.x's
    `rope_parameters`, with `rope_theta` (default 10000) beside them and `type` for `rope_type`."""
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = dict(raw.get(key) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise _fail(source, f"text_config.{key}", raw[key], "one set of parameters for all layers")
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    if rope_type not in ROPE_TYPES:
        raise _fail(source, f"text_config.{key}.rope_type", rope_type,
                    ", ".join(ROPE_TYPES) + " (dynamic and longrope change with the sequence length)")
    if rope_type == "default":   # the families' own default ignores partial_rotary_factor: all of head_dim turns
        return RopeConfig(theta=theta)
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):   # transformers' scaled types then make fewer frequencies than it applies
        raise _fail(source, f"text_config.{key}.partial_rotary_factor", partial, f"1.0 with rope_type={rope_type!r}")

    def need(name):
        if params.get(name) is None:
            raise ValueError(f"{source}: text_config.{key} of rope_type {rope_type!r} is missing {name!r} "
                             f"(has {sorted(params)})")
        return float(params[name])
    # a text_config-level original_max_position_embeddings wins, as in transformers (Phi-3 writes it there)
    original = int(raw.get("original_max_position_embeddings") or params.get("original_max_position_embeddings")
                   or max_position_embeddings)
    if rope_type == "linear":
        return RopeConfig(theta=theta, type="linear", factor=need("factor"))
    if rope_type == "llama3":
        return RopeConfig(theta=theta, type="llama3", factor=need("factor"), low_freq_factor=need("low_freq_factor"),
                          high_freq_factor=need("high_freq_factor"), original_max_position_embeddings=original)
    factor = need("factor")   # yarn
    mscale = lambda m=1.0: 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        m, m_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = mscale(m) / mscale(m_all) if m and m_all else mscale()
    return RopeConfig(theta=theta, type="yarn", factor=factor, original_max_position_embeddings=original,
                      beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                      truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor))


def _activation(name: Any, key: str, source: str) -> str:
    if name not in ACTIVATIONS:
        raise _fail(source, key, name, ", ".join(ACTIVATIONS))
    return name


def _as_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _sliding_windows(raw: dict[str, Any], model_type: str, num_layers: int, source: str) -> tuple[int, ...]:
    window = raw.get("sliding_window", _TEXT_DEFAULTS[model_type]["sliding_window"])
    if model_type == "llama" or (model_type == "qwen2" and not raw.get("use_sliding_window", False)):
        window = None  # Llama has no sliding window; Qwen2 only with use_sliding_window
    if not window:
        return (0,) * num_layers
    if model_type == "mistral":   # transformers' MistralModel windows every layer; it never reads layer_types
        return (int(window),) * num_layers
    layer_types = raw.get("layer_types")   # Qwen2's, else sliding from layer max_window_layers on
    if layer_types is None:
        first = raw.get("max_window_layers", 28)
        return tuple(int(window) if i >= first else 0 for i in range(num_layers))
    if len(layer_types) != num_layers:
        raise ValueError(f"{source}: text_config.layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise _fail(source, "text_config.layer_types", sorted(unknown), "full_attention, sliding_attention")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


def _parse_text(raw: dict[str, Any], source: str) -> TextConfig:
    model_type = raw.get("model_type", "llama")
    if model_type not in TEXT_MODEL_TYPES:
        raise _fail(source, "text_config.model_type", model_type, ", ".join(TEXT_MODEL_TYPES))
    get = lambda key: raw.get(key) if raw.get(key) is not None else _TEXT_DEFAULTS[model_type][key]
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    act = _activation(raw.get("hidden_act", "silu"), "text_config.hidden_act", source)
    layers = int(get("num_hidden_layers"))
    # Llama's q/k/v/o biases; Qwen2 always has q/k/v biases and no o bias; Mistral none (neither reads the key)
    attention_bias = model_type == "llama" and bool(raw.get("attention_bias") or False)
    # an explicit null is num_attention_heads (Llama, Qwen2; MistralConfig refuses it), a missing key the default
    kv_heads = raw.get("num_key_value_heads", _TEXT_DEFAULTS[model_type]["num_key_value_heads"]) or heads
    return TextConfig(
        model_type=model_type,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(get("intermediate_size")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope=_parse_rope(raw, source, int(get("max_position_embeddings"))),
        max_position_embeddings=int(get("max_position_embeddings")),
        hidden_act=act,
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias") or False),
        sliding_windows=_sliding_windows(raw, model_type, layers, source),
        bos_token_id=get("bos_token_id"),
        eos_token_id=_as_tuple(get("eos_token_id")),
        pad_token_id=raw.get("pad_token_id"),
    )


def _parse_vision(raw: dict[str, Any] | None, source: str) -> VisionConfig:
    defaults = _LLAVA_VISION_DEFAULTS if raw is None else _CLIP_DEFAULTS
    raw = raw or {}
    model_type = raw.get("model_type", "clip_vision_model")
    if model_type != "clip_vision_model":
        raise _fail(source, "vision_config.model_type", model_type, "clip_vision_model")
    get = lambda key: raw.get(key) if raw.get(key) is not None else defaults[key]
    _activation(get("hidden_act"), "vision_config.hidden_act", source)
    return VisionConfig(**{f.name: type(defaults[f.name])(get(f.name)) for f in dataclasses.fields(VisionConfig)})


def _parse_llava(raw: dict[str, Any], source: str) -> LlavaNextConfig:
    if raw.get("model_type", "llava_next") != "llava_next":
        raise _fail(source, "model_type", raw.get("model_type"), "llava_next")
    vision = _parse_vision(raw.get("vision_config"), source)
    text = _parse_text(raw.get("text_config") or {}, source)

    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise _fail(source, "vision_feature_select_strategy", strategy,
                    "'default' with a CLIP tower and anyres ('full' keeps the CLS token, which the anyres "
                    "tile grid cannot be reshaped around)")
    num_hidden_states = vision.num_hidden_layers + 1
    layers = []
    for layer in _as_tuple(raw.get("vision_feature_layer", -2)):
        if not -num_hidden_states <= layer < num_hidden_states:
            raise ValueError(f"{source}: vision_feature_layer {layer} is out of range for a vision tower "
                             f"with {vision.num_hidden_layers} layers ({num_hidden_states} hidden states)")
        layers.append(layer % num_hidden_states)
    if not layers:
        raise ValueError(f"{source}: vision_feature_layer is empty")

    act = _activation(raw.get("projector_hidden_act", "gelu"), "projector_hidden_act", source)
    if raw.get("image_token_index", raw.get("image_token_id")) is None and "image_token_index" in raw:
        raise ValueError(f"{source}: image_token_index is null")
    # transformers 5 reads the top-level key alone (default false); 4.x configs may have it in text_config
    # only, where 5 leaves a checkpoint without lm_head.weight with a random one: we tie as 4.x did. A
    # stored lm_head.weight that differs from the embeddings is refused by the converter (5 would use it).
    tie = raw.get("tie_word_embeddings")
    if tie is None:
        tie = (raw.get("text_config") or {}).get("tie_word_embeddings", False)
    pinpoints = raw.get("image_grid_pinpoints")
    if pinpoints is None:   # as transformers: only a missing (or null) list is the default one
        pinpoints = _DEFAULT_PINPOINTS
    try:
        pinpoints = tuple((int(h), int(w)) for h, w in pinpoints)
    except (TypeError, ValueError) as e:
        raise _fail(source, "image_grid_pinpoints", pinpoints, "a list of [height, width] pairs") from e
    config = LlavaNextConfig(
        vision=vision,
        text=text,
        image_token_id=int(raw.get("image_token_index", raw.get("image_token_id", 32000))),
        image_grid_pinpoints=pinpoints,
        vision_feature_layers=tuple(layers),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=bool(raw.get("multimodal_projector_bias", True)),
        tie_word_embeddings=bool(tie),
        projector_hidden_act=act,
    )
    try:
        config.geometry   # the tile and pinpoint sizes checked now, not at the first image
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return config
