"""Images + prompts -> model inputs, equal to HF's `LlavaNextProcessor` (PIL image backend).

Needs numpy, Pillow, `tokenizers` and jinja2 only (no transformers / torch at run time).

Images, per HF's `LlavaNextImageProcessorPil` (reference.md, "Image preprocessing"):
  to RGB -> best resolution (anyres.select_best_resolution) -> aspect-keeping bicubic resize
  (`get_patch_output_size` rounding) -> centred zero padding -> S x S tiles, row-major; the base tile is
  the image resized straight to S x S. Rescale (uint8 * factor in float64, cast to float32) then
  normalise ((x - mean) / std in float32) -- a per-channel 256-entry lookup table computed with exactly
  those operations, so the result is bit-identical to HF's and costs one gather per pixel.
Prompts: each `<image>` becomes anyres.num_image_tokens(...) image tokens *in the text*, before
tokenizing (as HF does), so the ids match HF's exactly.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import anyres
from .checks import is_positive_int

# --- built-in prompt formats (jinja, rendered like a checkpoint's own template) --------------------
# Used only when the checkpoint ships no chat template. Picked by `_prompt_family`: llama3 header
# tokens in the vocab -> "llama3"; `<|im_start|>` -> "chatml-qwen2" for Qwen2 tokenizers/configs else
# "chatml-34b"; otherwise config.json's text model_type "mistral" -> "mistral", else "vicuna".
_CONTENT = ("{%- macro content(m) -%}{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
            "{%- for c in m['content'] if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- endfor -%}"
            "{%- for c in m['content'] if c['type'] == 'text' -%}{{ c['text'] }}{%- endfor -%}"
            "{%- endif -%}{%- endmacro -%}")


def _chatml(default_system: str) -> str:
    return (_CONTENT + "{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\n" + default_system +
            "<|im_end|>\\n' }}{%- endif -%}{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}"
            "{{ content(m) }}{{ '<|im_end|>\\n' }}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


BUILTIN_TEMPLATES = {
    "mistral": _CONTENT + (
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ content(m) + '\\n\\n' }}"
        "{%- elif m['role'] == 'user' -%}{{ '[INST] ' + content(m) + ' [/INST]' }}"
        "{%- else -%}{{ ' ' + content(m) + eos_token }}{%- endif -%}{%- endfor -%}"),
    "vicuna": _CONTENT + (
        "{%- if messages[0]['role'] == 'system' -%}{{ content(messages[0]) }}{%- else -%}"
        "{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human\\'s questions.' }}{%- endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}{%- if m['role'] == 'user' -%}"
        "{{ ' USER: ' + content(m) }}{%- else -%}{{ ' ASSISTANT: ' + content(m) + eos_token }}{%- endif -%}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"),
    "chatml-34b": _chatml("Answer the questions."),
    "chatml-qwen2": _chatml("You are a helpful assistant."),
    "llama3": _CONTENT + (
        "{%- for m in messages -%}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{ content(m) + '<|eot_id|>' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
}
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# --- config files ---------------------------------------------------------------------------------

def _read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} is missing: a LLaVA-NeXT processor directory needs it")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _require(cfg: dict, key: str, path: Path):
    if key not in cfg:
        raise KeyError(f"{path}: missing key {key!r}")
    return cfg[key]


def _token_str(token) -> str | None:
    """tokenizer_config values are strings or serialized AddedTokens ({"content": ...})."""
    return token.get("content") if isinstance(token, dict) else token


@dataclasses.dataclass(frozen=True)
class ImageSettings:
    """preprocessor_config.json values that shape pixel values (HF's PIL backend semantics)."""
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def lookup_table(self) -> np.ndarray:
        """float32 `[3, 256]`: the normalised value of each uint8 level per channel, computed as HF does:
        `float32(v * factor)` (product in float64), then `(x - mean) / std` in float32."""
        x = np.arange(256, dtype=np.uint8)[None, :].repeat(3, axis=0)
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32) if self.do_rescale else x.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            x = (x - mean) / std
        return np.ascontiguousarray(x, dtype=np.float32)


def _per_channel(value) -> tuple[float, ...]:
    """image_mean / image_std: one number (as HF accepts) or one per channel."""
    return (float(value),) * 3 if isinstance(value, (int, float)) else tuple(value)


def _image_config(directory: Path) -> tuple[dict, Path]:
    """The image processor dict: preprocessor_config.json (hub layout) or processor_config.json's
    "image_processor" entry (what transformers 5 `save_pretrained` writes)."""
    path = directory / "preprocessor_config.json"
    if path.is_file():
        return _read_json(path), path
    path = directory / "processor_config.json"
    cfg = _read_json(path, required=False).get("image_processor")
    if cfg is None:
        raise FileNotFoundError(f"no image processor settings in {directory}: expected preprocessor_config.json "
                                f"or an 'image_processor' entry in processor_config.json")
    return cfg, path


def _tile_size(cfg: dict, path: Path) -> int:
    """S: crop_size.height, which must equal the size HF resizes the base tile to (else unsupported)."""
    size, crop = _require(cfg, "size", path), _require(cfg, "crop_size", path)
    base = size.get("shortest_edge") or min(size.get("height", 0), size.get("width", 0))
    tile = crop.get("height")
    if not base or tile != base or crop.get("width") != tile:
        raise ValueError(f"{path}: size {size} and crop_size {crop} must both be S x S (one tile size)")
    return int(tile)


# --- images -----------------------------------------------------------------------------------------

def open_image(path: str | os.PathLike, apply_exif_orientation: bool = True) -> Image.Image:
    """Reads an image file as HF's `load_image` does: EXIF transpose, then `.convert("RGB")` (alpha dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    return _decode_image(path, f"image file {path}", apply_exif_orientation)


def _decode_image(source, name: str, apply_exif_orientation: bool) -> Image.Image:
    """`source` (a path or a binary file) decoded as HF's `load_image` does; errors name `name`."""
    try:
        with Image.open(source) as image:
            image.load()
            if apply_exif_orientation:
                image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name} is over Pillow's decompression-bomb limit ({e}); if you trust it, "
                         f"raise PIL.Image.MAX_IMAGE_PIXELS (currently {Image.MAX_IMAGE_PIXELS}) or set it to None")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{name} cannot be read (empty, truncated or not an image): {e}") from None


URL_TIMEOUT = 30.0   # seconds to fetch an http(s) image


def load_image(source: str | os.PathLike, apply_exif_orientation: bool = True) -> Image.Image:
    """An image named as HF's `load_image` takes one: a file path, an http(s) URL, a `data:image/...;base64,`
    URI or a bare base64 string; EXIF transposed, RGB."""
    text = os.fspath(source)
    if not isinstance(text, str) or os.path.isfile(text):
        return open_image(text, apply_exif_orientation)
    if os.path.isdir(text):
        raise IsADirectoryError(f"image file {text} is a directory")
    if text.startswith(("http://", "https://")):
        import urllib.request
        try:
            with urllib.request.urlopen(text, timeout=URL_TIMEOUT) as response:
                data = response.read()
        except (OSError, ValueError) as e:
            raise ValueError(f"image URL {text} cannot be fetched: {e}") from None
        return _decode_image(io.BytesIO(data), f"image URL {text}", apply_exif_orientation)
    if text.startswith("data:"):
        return _decode_image(io.BytesIO(_base64(text.partition(",")[2]) or b""), f"image data URI {_short(text)}",
                             apply_exif_orientation)
    data = _base64(text)
    if data:
        try:
            return _decode_image(io.BytesIO(data), "base64 image", apply_exif_orientation)
        except ValueError:
            pass
    raise FileNotFoundError(f"image file {_short(text)} does not exist (nor is it an http(s) URL or base64 image data)")


def _base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def to_rgb_image(image, apply_exif_orientation: bool | None = None) -> Image.Image:
    """An RGB PIL image from a path, URL or base64 string (`load_image`), a PIL image, or a uint8 array
    `[H, W]`, `[H, W, C]` or `[C, H, W]` (C = 1, 3, 4; anything with `__array__`, e.g. a torch tensor).

    As HF: strings are loaded with `load_image`; PIL images with transparency are composited on white,
    others `.convert("RGB")`; RGBA arrays are blended on white with rounding; a 3-D array whose first
    axis could be channels is read channels-first. `apply_exif_orientation` None does what HF does:
    rotate files by their EXIF tag, leave PIL objects as given.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, apply_exif_orientation is not False)
    if isinstance(image, Image.Image):
        if apply_exif_orientation:
            image = ImageOps.exif_transpose(image)
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image.load()  # decode once here, not lazily in two resize threads at a time
        return image if image.mode == "RGB" else image.convert("RGB")
    if hasattr(image, "__array__"):
        return Image.fromarray(_array_to_rgb(np.asarray(image)))
    raise TypeError(f"unsupported image type {type(image).__name__}: pass a path, a PIL image or a uint8 array")


def image_list(images) -> list:
    """`images` as a list of images: a list or tuple as it is, a 4-D array (numpy, jax or torch; `[N, H, W,
    C]` or `[N, C, H, W]`) as its N images, anything else as one image."""
    if hasattr(images, "__array__") and np.ndim(images) == 4:
        return list(np.asarray(images))
    return list(images) if isinstance(images, (list, tuple)) else [images]


CHANNELS = (1, 3, 4)


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in CHANNELS:   # channels first, as HF reads such a shape
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in CHANNELS):
        raise TypeError(f"image array must be uint8 [H, W], [H, W, 1|3|4] or [1|3|4, H, W]; got {array.dtype} "
                        f"{array.shape}")
    if array.ndim == 2 or array.shape[2] == 1:
        return np.repeat(array.reshape(array.shape[0], array.shape[1], 1), 3, axis=2)
    if array.shape[2] == 4:
        alpha = array[..., 3:4] / 255
        return np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return array


def patch_output_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the aspect-keeping resize into `target`, rounded as HF's `get_patch_output_size`."""
    (height, width), (th, tw) = size, target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)



# --- tokenizer and chat template files --------------------------------------------------------------

def load_tokenizer(directory: Path):
    """`tokenizers.Tokenizer` + merged tokenizer config, set up as transformers 5 sets up its backend:
    tokenizer.json's post-processor as it is (transformers 5 ignores add_bos_token / add_eos_token where
    there is a tokenizer.json)."""
    from tokenizers import AddedToken, Tokenizer
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the processor reads the fast-tokenizer file only")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} cannot be loaded by the tokenizers library: {e}") from None
    cfg = {**_read_json(directory / "special_tokens_map.json", required=False),
           **_read_json(directory / "tokenizer_config.json", required=False)}
    if tokenizer.padding:  # transformers takes padding defaults from tokenizer.json, then drops them here
        cfg.setdefault("padding_side", tokenizer.padding["direction"])
        cfg.setdefault("pad_token", tokenizer.padding["pad_token"])
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if cfg.get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast"):
        _use_llama_pipeline(tokenizer, cfg)
    missing = [t for k in _SPECIAL_TOKEN_KEYS if (t := _token_str(cfg.get(k))) and tokenizer.token_to_id(t) is None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return tokenizer, cfg


def _use_llama_pipeline(tokenizer, cfg: dict) -> None:
    """transformers 5's `LlamaTokenizer` keeps tokenizer.json's vocab/merges/post-processor but rebuilds the
    rest: no normalizer, Metaspace pre-tokenizer (prepend "first", or "always" with legacy=True), and its
    own decoder. Old checkpoints' files (Prepend/Replace normalizer) would otherwise tokenize differently."""
    from tokenizers import decoders, pre_tokenizers
    prefix = cfg.get("add_prefix_space")
    prefix = True if prefix is None else prefix
    scheme = ("always" if cfg.get("legacy", False) else "first") if prefix else "never"
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))


def load_chat_template(directory: Path, tok_cfg: dict) -> str | None:
    """The checkpoint's template in transformers' order: processor_config.json's "chat_template", the
    legacy chat_template.json, chat_template.jinja, then tokenizer_config.json's "chat_template"."""
    template = _read_json(directory / "processor_config.json", required=False).get("chat_template")
    legacy = directory / "chat_template.json"
    if template is None and legacy.is_file():
        template = _require(_read_json(legacy), "chat_template", legacy)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    template = template if template is not None else tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}
    return template.get("default") if isinstance(template, dict) else template


def _raise_exception(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    """A jinja2 sandbox configured as transformers configures it for chat templates."""
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):  # `{% generation %}` marks assistant text; renders as-is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def _plain(value):
    """What the template may see (as HF): JSON-like data; media and other objects become "<TypeName>"."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat_template(template: str, messages: list, add_generation_prompt: bool, variables: dict,
                         continue_final_message: bool | str = False) -> str:
    """The template rendered over `messages`; with `continue_final_message` (True: the last message's
    "content", or that field's name), cut after the last message's text so that generation continues
    it, as HF's `render_jinja_template` does (it marks the text with a tag and cuts at the tag)."""
    messages = _plain(messages)
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        if not messages or messages[-1].get(field) is None:
            raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
        if field not in template:
            raise ValueError(f"continue_final_message={field!r}: the chat template does not use that field")
        final = messages[-1][field]
        if isinstance(final, (list, tuple)):
            block = next((b for b in reversed(final) if "text" in b), None)
            if block is None:
                raise ValueError("continue_final_message: the final message has no text block to continue")
            final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
        else:
            messages[-1][field] = final + _CONTINUE_TAG
    rendered = _compile_template(template).render(messages=messages, tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **_plain(variables))
    if continue_final_message:
        if final.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ValueError(f"continue_final_message: the chat template drops part of the final message "
                             f"{_short(final.strip())!r}, so it cannot be continued")
        at = rendered.rindex(_CONTINUE_TAG.strip())
        rendered = rendered[:at] if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()
    return rendered


IMAGE_KEYS = ("image", "url", "path", "base64")   # where an image block names its image (HF's keys)


def _image_url_block(block):
    """OpenAI's `{"type": "image_url", "image_url": {"url": U}}` as HF's `{"type": "image", "url": U}`."""
    if isinstance(block, dict) and block.get("type") == "image_url" and "image_url" in block:
        url = block["image_url"]
        return {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
    return block


def _normalize_conversation(conversation: list) -> list:
    """As HF's processor: None-valued message keys dropped, OpenAI `{"type": "image_url", "image_url":
    {"url": ...}}` blocks turned into `{"type": "image", "url": ...}` (the caller's messages untouched)."""
    out = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise TypeError(f"message {i} is a {type(message).__name__}: chat messages are dicts "
                            f"(role, content)")
        message = {k: v for k, v in message.items() if v is not None}
        if isinstance(message.get("content"), list):
            message["content"] = [_image_url_block(block) for block in message["content"]]
        out.append(message)
    return out


class LlavaNextProcessor:
    """Images + prompts -> `input_ids, attention_mask, pixel_values, image_sizes` (numpy), as HF's."""

    def __init__(self, tokenizer, tokenizer_config: dict, image_settings: ImageSettings,
                 geometry: anyres.Geometry, image_token: str = "<image>", chat_template: str | None = None,
                 apply_exif_orientation: bool | None = None, num_threads: int | None = None):
        self.tokenizer, self.image_settings, self.geometry = tokenizer, image_settings, geometry
        self.image_token = image_token
        self.image_token_id = tokenizer.token_to_id(image_token)
        if self.image_token_id is None:
            raise ValueError(f"image token {image_token!r} is not in the tokenizer's vocabulary")
        self.special_tokens = {k: _token_str(tokenizer_config[k]) for k in _SPECIAL_TOKEN_KEYS
                               if tokenizer_config.get(k) is not None}
        pad = self.special_tokens.get("pad_token")
        self.pad_token_id = tokenizer.token_to_id(pad) if pad is not None else None
        self.padding_side = tokenizer_config.get("padding_side", "left")
        self.truncation_side = tokenizer_config.get("truncation_side", "right")
        limit = tokenizer_config.get("model_max_length")     # HF writes ~1e30 for "none"
        self.model_max_length = int(limit) if isinstance(limit, (int, float)) and limit < 2 ** 40 else None
        # HF's decode cleans up spaces where asked (the call, else tokenizer_config.json), never for BPE
        self.clean_up_tokenization_spaces = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))
        self._cleanup_allowed = json.loads(tokenizer.model.__getstate__())["type"] != "BPE" or bool(
            tokenizer_config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        self.chat_template = chat_template
        self.apply_exif_orientation = apply_exif_orientation
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self._lut = image_settings.lookup_table()

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, prompt_family: str | None = None,
                        apply_exif_orientation: bool | None = None,
                        num_threads: int | None = None) -> "LlavaNextProcessor":
        """Loads an HF LLaVA-NeXT checkpoint directory (or our converted copy of its files)."""
        directory = Path(path)
        image_cfg, image_path = _image_config(directory)
        proc_path = directory / "processor_config.json"
        proc_cfg = _read_json(proc_path, required=False)
        model_cfg = _read_json(directory / "config.json", required=False)
        patch_size = proc_cfg.get("patch_size") or model_cfg.get("vision_config", {}).get("patch_size")
        if patch_size is None:
            raise KeyError(f"{proc_path}: missing key 'patch_size' (and no vision_config.patch_size in config.json)")
        strategy = (proc_cfg.get("vision_feature_select_strategy")
                    or model_cfg.get("vision_feature_select_strategy", "default"))
        extra = proc_cfg.get("num_additional_image_tokens", 1)  # CLIP's CLS; HF's class default 0 miscounts
        tile = _tile_size(image_cfg, image_path)
        geometry = anyres.Geometry(
            tile_size=tile, patch_size=int(patch_size),
            pinpoints=tuple(tuple(int(v) for v in p) for p in _require(image_cfg, "image_grid_pinpoints", image_path)),
            base_tokens=anyres.base_tokens(tile // int(patch_size), int(extra), strategy))
        settings = ImageSettings(**{f.name: _per_channel(image_cfg[f.name]) if f.name in ("image_mean", "image_std")
                                    else image_cfg[f.name]
                                    for f in dataclasses.fields(ImageSettings) if f.name in image_cfg})
        tokenizer, tok_cfg = load_tokenizer(directory)
        template = load_chat_template(directory, tok_cfg) or BUILTIN_TEMPLATES[
            prompt_family or _prompt_family(tokenizer, tok_cfg, model_cfg)]
        return cls(tokenizer, tok_cfg, settings, geometry, proc_cfg.get("image_token", "<image>"), template,
                   apply_exif_orientation, num_threads)

    # -- images -----------------------------------------------------------------------------------

    def preprocess_images(self, images: Sequence, apply_exif_orientation: bool | None = None):
        """Images -> (pixel_values float32 `[B, P_max, 3, S, S]`, image_sizes int64 `[B, 2]` (h, w))."""
        exif = self.apply_exif_orientation if apply_exif_orientation is None else apply_exif_orientation
        rgb = [_indexed(i, to_rgb_image, image, exif) for i, image in enumerate(images)]
        for i, image in enumerate(rgb):
            if image.width == 0 or image.height == 0:
                raise ValueError(f"image {i} has zero area: (height, width) = {(image.height, image.width)}")
        sizes = np.array([(image.height, image.width) for image in rgb], dtype=np.int64).reshape(-1, 2)
        tiles = max((anyres.num_tiles(s, self.geometry) for s in sizes), default=1)
        S = self.geometry.tile_size
        pixel_values = np.zeros((len(rgb), tiles, 3, S, S), dtype=np.float32)
        jobs = [(job, image, pixel_values[i]) for i, image in enumerate(rgb)
                for job in (self._write_grid, self._write_base)]
        if self.num_threads > 1 and len(jobs) > 1:  # PIL's resize releases the GIL: the jobs run in parallel
            list(_thread_pool(self.num_threads).map(lambda j: j[0](j[1], j[2]), jobs))
        else:
            for job, image, out in jobs:
                job(image, out)
        return pixel_values, sizes

    def _write_base(self, image: Image.Image, out: np.ndarray) -> None:
        """Tile 0 of `out [P_max, 3, S, S]`: the whole image resized to S x S."""
        S = self.geometry.tile_size
        self._normalise(image.resize((S, S), resample=self.image_settings.resample), out[0])

    def _write_grid(self, image: Image.Image, out: np.ndarray) -> None:
        """Tiles 1.. of `out [P_max, 3, S, S]`: aspect-kept resize, centred zero padding, row-major S x S tiles."""
        S = self.geometry.tile_size
        size = (image.height, image.width)
        rows, cols = anyres.grid_shape(size, self.geometry)
        h, w = patch_output_size(size, (rows * S, cols * S))
        top, left = (rows * S - h) // 2, (cols * S - w) // 2
        canvas = np.empty((3, rows * S, cols * S), dtype=np.float32)
        canvas[:] = self._lut[:, :1, None]                    # padding is uint8 0, normalised
        self._normalise(image.resize((w, h), resample=self.image_settings.resample),
                        canvas[:, top:top + h, left:left + w])
        out[1:1 + rows * cols] = canvas.reshape(3, rows, S, cols, S).transpose(1, 3, 0, 2, 4).reshape(-1, 3, S, S)

    def _normalise(self, image: Image.Image, out: np.ndarray) -> None:
        """Writes the rescaled + normalised `[3, h, w]` of an RGB image into `out` by table lookup."""
        pixels = np.asarray(image)
        for c in range(3):
            out[c] = self._lut[c].take(pixels[..., c])

    # -- text -------------------------------------------------------------------------------------

    def expand_image_tokens(self, text: str, image_sizes: Sequence[Sequence[int]]) -> str:
        """Replaces the i-th `<image>` with num_image_tokens(image_sizes[i]) copies of the token."""
        sizes = iter(image_sizes)
        return re.sub(re.escape(self.image_token),
                      lambda _: self.image_token * anyres.num_image_tokens(next(sizes), self.geometry), text)

    def encode(self, texts: Sequence[str], add_special_tokens: bool = True, padding_side: str | None = None,
               padding: bool | str = True, max_length: int | None = None, truncation: bool | str = False,
               pad_to_multiple_of: int | None = None):
        """Texts -> (input_ids int64 `[B, T]`, attention_mask int64 `[B, T]`), as HF's tokenizer call with
        these options, always one array: `padding` True / "longest" pads to the longest (the default),
        "max_length" to `max_length` (default tokenizer_config.json's model_max_length), False /
        "do_not_pad" none (texts of different lengths are then an error); `pad_to_multiple_of` rounds T up;
        `truncation` cuts each text to `max_length` on tokenizer_config.json's truncation_side (else the
        right). Pads go on `padding_side`: by default tokenizer_config.json's, else "left" (HF's default
        depends on the tokenizer class; generation needs left)."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        mode = {True: "longest", "longest": "longest", False: "do_not_pad", "do_not_pad": "do_not_pad",
                "max_length": "max_length"}.get(padding) if isinstance(padding, (bool, str)) else None
        if mode is None:
            raise ValueError(f"padding={padding!r}; expected True, False, 'longest', 'max_length' or 'do_not_pad'")
        if truncation not in (False, True, "longest_first", "only_first", "do_not_truncate"):
            raise ValueError(f"truncation={truncation!r}; expected True, False, 'longest_first', 'only_first' "
                             "or 'do_not_truncate'")
        truncate = truncation not in (False, "do_not_truncate")
        max_length = self.model_max_length if max_length is None else max_length
        if (mode == "max_length" or truncate and max_length is not None) and not is_positive_int(max_length):
            raise ValueError(f"max_length={max_length!r}; padding='max_length' and truncation need a positive int "
                             "(by default tokenizer_config.json's model_max_length, where it names one)")
        if pad_to_multiple_of is not None and not is_positive_int(pad_to_multiple_of):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}; expected a positive int")
        ids = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]
        if truncate and max_length is not None:
            ids = [self._truncate(i, seq, max_length) for i, seq in enumerate(ids)]
        lengths = [len(seq) for seq in ids]
        length = max(lengths, default=0)
        if mode == "do_not_pad" and len(set(lengths)) > 1:
            raise ValueError(f"padding=False, but the texts have different lengths {lengths}: one array needs "
                             "padding=True")
        if mode == "max_length":
            longer = [(i, n) for i, n in enumerate(lengths) if n > max_length]
            if longer:
                raise ValueError(f"text {longer[0][0]} has {longer[0][1]} tokens, more than max_length={max_length}: "
                                 "pass truncation=True or a larger max_length")
            length = max_length
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        if self.pad_token_id is None and any(n != length for n in lengths):
            raise ValueError("the tokenizer has no pad_token (tokenizer_config.json), so texts cannot be padded "
                             f"(lengths {lengths} to {length})")
        input_ids = np.full((len(ids), length), self.pad_token_id or 0, dtype=np.int64)
        mask = np.zeros((len(ids), length), dtype=np.int64)
        for row, seq in enumerate(ids):
            span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            input_ids[row, span], mask[row, span] = seq, 1
        return input_ids, mask

    def _truncate(self, index: int, ids: list[int], max_length: int) -> list[int]:
        """Text `index`'s ids cut to `max_length` on `truncation_side`; an error where that cuts image tokens
        (the image's features would have nowhere to go), as HF's processor."""
        if len(ids) <= max_length:
            return ids
        kept = ids[:max_length] if self.truncation_side != "left" else ids[len(ids) - max_length:]
        before, after = ids.count(self.image_token_id), kept.count(self.image_token_id)
        if after != before:
            raise ValueError(f"text {index}: truncation to max_length={max_length} would cut its image tokens "
                             f"({before} -> {after}); disable truncation or increase max_length")
        return kept

    def __call__(self, images=None, text: str | Sequence[str] | None = None, padding_side: str | None = None,
                 add_special_tokens: bool = True, apply_exif_orientation: bool | None = None,
                 padding: bool | str = True, max_length: int | None = None, truncation: bool | str = False,
                 pad_to_multiple_of: int | None = None, return_attention_mask: bool = True,
                 return_tensors: str | None = "np") -> dict:
        """`text` (one string or a batch) with one `<image>` per image; `images` flat in placeholder order,
        or one list per text. Returns `input_ids, attention_mask` [B, T] (+ `pixel_values, image_sizes`).

        HF's text options (`padding`, `max_length`, `truncation`, `pad_to_multiple_of`: `encode`;
        `return_attention_mask`) as HF's, except that the ids are always one array (padded to the
        longest unless told otherwise). `return_tensors`: "np" (or None) numpy arrays, "jax" jax arrays,
        "pt" torch tensors (torch installed)."""
        if return_tensors not in (None, "np", "jax", "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}; expected 'np', 'jax', 'pt' or None (numpy)")
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        for i, t in enumerate(texts or []):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is a {type(t).__name__}: text must be a string or a list of strings")
        flat = self._flatten_images(images, texts)
        out = {}
        if flat is not None:
            out["pixel_values"], out["image_sizes"] = self.preprocess_images(flat, apply_exif_orientation)
        if texts is not None:
            sizes = iter(out.get("image_sizes", []))
            texts = [self.expand_image_tokens(t, [next(sizes) for _ in range(t.count(self.image_token))])
                     for t in texts]
            ids, mask = self.encode(texts, add_special_tokens, padding_side, padding, max_length, truncation,
                                    pad_to_multiple_of)
            out = {"input_ids": ids, **({"attention_mask": mask} if return_attention_mask else {}), **out}
        return _as_tensors(out, return_tensors)

    def _flatten_images(self, images, texts: list[str] | None) -> list | None:
        """Images in placeholder order, after checking each text's `<image>` count against them."""
        images = [] if images is None else image_list(images)
        nested = len(images) > 0 and all(isinstance(i, (list, tuple)) for i in images)
        flat = [i for group in images for i in group] if nested else list(images)
        if texts is None:
            return flat or None
        counts = [t.count(self.image_token) for t in texts]
        if nested:
            if len(images) != len(texts):
                raise ValueError(f"got {len(images)} image lists for {len(texts)} texts: pass one list per text")
            for i, (t, group) in enumerate(zip(texts, images)):
                if counts[i] != len(group):
                    raise ValueError(f"text {i} ({t[:60]!r}) has {counts[i]} {self.image_token} placeholders but "
                                     f"{len(group)} images were given for it")
        elif sum(counts) != len(flat):
            raise ValueError(f"the texts hold {sum(counts)} {self.image_token} placeholders in total (per text: "
                             f"{counts}) but {len(flat)} images were given; each image needs one placeholder")
        return flat or None

    def decode(self, ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str | list[str]:
        """One sequence of ids (or one id) -> text; a 2-D array or list of sequences -> texts (as HF)."""
        if isinstance(ids, (list, tuple)) and ids and not np.isscalar(ids[0]) or np.ndim(ids) == 2:
            return self.batch_decode(ids, skip_special_tokens, clean_up_tokenization_spaces)
        return self.batch_decode([np.reshape(ids, -1)], skip_special_tokens, clean_up_tokenization_spaces)[0]

    def batch_decode(self, ids, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """As HF's: `clean_up_tokenization_spaces` (default tokenizer_config.json's) is never applied to
        a BPE model unless tokenizer_config.json forces it."""
        texts = self.tokenizer.decode_batch([[int(t) for t in seq] for seq in ids],
                                            skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return [_clean_up_spaces(t) for t in texts] if clean_up_tokenization_spaces and self._cleanup_allowed else texts

    # -- chat -------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False, tokenize: bool = False,
                            chat_template: str | None = None, padding_side: str | None = None,
                            continue_final_message: bool | str = False, return_dict: bool = False,
                            processor_kwargs: dict | None = None, **kwargs):
        """Renders HF-format messages (content a string or a list of {"type": "image"} / {"type": "text",
        "text": ...} blocks; OpenAI "image_url" blocks too); a list of conversations gives a list of prompts.
        As HF's processor: `add_generation_prompt` ends with the assistant's header (off by default),
        `continue_final_message` leaves the last message open for generation to continue it, other keyword
        arguments are template variables but for `self`'s (`CALL_OPTIONS`: padding, return_tensors, ...; or
        in `processor_kwargs`, as HF's). `tokenize=True` runs `self(images=..., text=prompt)` with the
        images the image blocks name (`IMAGE_KEYS`: a PIL image, array, path, URL or base64 string), without
        a second BOS where the template writes one, and returns its `input_ids`, or all of it with
        `return_dict=True`."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt do not go together: the first "
                             "continues the last message, the second starts a new assistant message")
        batched = bool(messages) and isinstance(messages[0], (list, tuple))
        conversations = [_normalize_conversation(c) for c in (messages if batched else [messages])]
        options = {"padding_side": padding_side, **{k: kwargs.pop(k) for k in CALL_OPTIONS if k in kwargs},
                   **(processor_kwargs or {})}
        prompts = [render_chat_template(chat_template or self.chat_template, conv, add_generation_prompt,
                                        {**self.special_tokens, **kwargs}, continue_final_message)
                   for conv in conversations]
        if not tokenize:
            return prompts if batched else prompts[0]
        images = [[block[key] for m in conv if isinstance(m.get("content"), list) for block in m["content"]
                   if block.get("type") == "image" for key in IMAGE_KEYS if key in block] for conv in conversations]
        bos = self.special_tokens.get("bos_token")
        options.setdefault("add_special_tokens", not (bos and prompts[0].startswith(bos)))
        out = self(images=images if any(i is not None for g in images for i in g) else None, text=prompts, **options)
        return out if return_dict else out["input_ids"]


# The keyword arguments of `LlavaNextProcessor.__call__` that `apply_chat_template(tokenize=True)` takes
# from its own (as HF's, which also takes them in `processor_kwargs`).
CALL_OPTIONS = ("padding", "max_length", "truncation", "pad_to_multiple_of", "return_attention_mask", "return_tensors",
                "apply_exif_orientation")


def _as_tensors(out: dict, kind: str | None) -> dict:
    """The processor's numpy outputs as `kind`'s arrays: "np" or None as they are, "jax", "pt"."""
    if kind == "jax":
        import jax.numpy as jnp
        return {k: jnp.asarray(v) for k, v in out.items()}
    if kind == "pt":
        try:
            import torch
        except ImportError:
            raise ImportError("return_tensors='pt' needs torch installed (pip install torch); 'np' and 'jax' do not") from None
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}
    return out


def _indexed(i: int, fn, *args):
    """fn(*args), its TypeError or ValueError naming image i."""
    try:
        return fn(*args)
    except (TypeError, ValueError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(f"image {i}: {e}") from None


@functools.lru_cache(maxsize=None)
def _thread_pool(num_threads: int):
    from concurrent.futures import ThreadPoolExecutor
    return ThreadPoolExecutor(num_threads, thread_name_prefix="llava-next-images")


def _clean_up_spaces(text: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _prompt_family(tokenizer, tok_cfg: dict, model_cfg: dict) -> str:
    """Which built-in prompt format fits a checkpoint without a chat template (see BUILTIN_TEMPLATES)."""
    text_type = model_cfg.get("text_config", {}).get("model_type", "")
    if tokenizer.token_to_id("<|start_header_id|>") is not None:
        return "llama3"
    if tokenizer.token_to_id("<|im_start|>") is not None:
        return "chatml-qwen2" if "qwen2" in (text_type + tok_cfg.get("tokenizer_class", "")).lower() else "chatml-34b"
    return "mistral" if text_type == "mistral" else "vicuna"
