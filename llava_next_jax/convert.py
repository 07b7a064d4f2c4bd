"""HF LLaVA-NeXT weights -> our params tree, one tensor at a time.

Three key layouts are in the wild (reference.md); each name is first brought to one canonical form:

  2024 hub:            language_model.model.layers.0...   vision_tower.vision_model.encoder...
  transformers 5 file: language_model.model.layers.0...   vision_tower.encoder...
  transformers 5 live: model.language_model.layers.0...   model.vision_tower.encoder...  lm_head.weight
  canonical:           language_model.layers.0...          vision_tower.encoder...        lm_head.weight

then mapped by `_RULES` to a params path (`language_model/layers/3/self_attn/q_proj/kernel`) and a
layout change (torch Linear `[out, in]` -> `[in, out]`; conv `[out, in, p, p]` -> `[p, p, in, out]`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import jax
import ml_dtypes
import numpy as np

from .checkpoint import check_out_dir, copy_side_files, flatten
from .config import LlavaNextConfig

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

_CANONICAL = [  # (pattern, replacement), applied in order
    (re.compile(r"^model\.(language_model|vision_tower|multi_modal_projector|image_newline)"), r"\1"),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
]

_linear = lambda w: np.ascontiguousarray(w.T)                          # [out, in] -> [in, out]
_conv = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))        # [out, in, p, p] -> [p, p, in, out]
_same = lambda w: w

# (canonical-name pattern, params path template, layout change). `{1}`, `{2}` are regex groups.
_RULES: list[tuple[re.Pattern, str, Callable]] = [(re.compile(p), t, f) for p, t, f in [
    (r"language_model\.embed_tokens\.weight", "language_model/embed_tokens/embedding", _same),
    (r"language_model\.norm\.weight", "language_model/norm/scale", _same),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj)\.weight",
     "language_model/layers/{1}/{2}/kernel", _linear),
    (r"language_model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.\w+_proj)\.bias",
     "language_model/layers/{1}/{2}/bias", _same),
    (r"language_model\.layers\.(\d+)\.(\w+_layernorm)\.weight", "language_model/layers/{1}/{2}/scale", _same),
    (r"lm_head\.weight", "lm_head/kernel", _linear),
    (r"vision_tower\.embeddings\.patch_embedding\.weight", "vision_tower/embeddings/patch_embedding/kernel", _conv),
    (r"vision_tower\.embeddings\.class_embedding", "vision_tower/embeddings/class_embedding", _same),
    (r"vision_tower\.embeddings\.position_embedding\.weight",
     "vision_tower/embeddings/position_embedding/embedding", _same),
    (r"vision_tower\.(pre_layrnorm|post_layernorm)\.weight", "vision_tower/{1}/scale", _same),
    (r"vision_tower\.(pre_layrnorm|post_layernorm)\.bias", "vision_tower/{1}/bias", _same),
    (r"vision_tower\.encoder\.layers\.(\d+)\.(self_attn\.\w+_proj|mlp\.fc[12])\.weight",
     "vision_tower/layers/{1}/{2}/kernel", _linear),
    (r"vision_tower\.encoder\.layers\.(\d+)\.(self_attn\.\w+_proj|mlp\.fc[12])\.bias",
     "vision_tower/layers/{1}/{2}/bias", _same),
    (r"vision_tower\.encoder\.layers\.(\d+)\.(layer_norm[12])\.weight", "vision_tower/layers/{1}/{2}/scale", _same),
    (r"vision_tower\.encoder\.layers\.(\d+)\.(layer_norm[12])\.bias", "vision_tower/layers/{1}/{2}/bias", _same),
    (r"multi_modal_projector\.(linear_[12])\.weight", "multi_modal_projector/{1}/kernel", _linear),
    (r"multi_modal_projector\.(linear_[12])\.bias", "multi_modal_projector/{1}/bias", _same),
    (r"image_newline", "image_newline", _same),
]]
# Buffers some exports carry that are recomputed, not learned.
_IGNORED = [re.compile(p) for p in (r"vision_tower\.embeddings\.position_ids", r".*\.rotary_emb\.inv_freq")]


def hf_tensor(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The inverse of `target_of`: (2024 hub name, torch shape) of our parameter `path` of `shape`.

    ("language_model", "layers", "0", "self_attn", "q_proj", "kernel"), (D, N*H)
        -> ("language_model.model.layers.0.self_attn.q_proj.weight", (N*H, D))
    """
    *module, leaf = path
    if leaf in ("class_embedding", "image_newline"):
        module, suffix = module + [leaf], None
    else:
        suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    prefix = {"language_model": "language_model.model", "lm_head": "language_model.lm_head",
              "vision_tower": "vision_tower.vision_model"}.get(module[0], module[0])
    rest = list(module[1:])
    if rest[:1] == ["layers"] and module[0] == "vision_tower":
        rest = ["encoder"] + rest
    name = ".".join([prefix, *rest] + ([suffix] if suffix else []))
    if len(shape) == 4:                       # conv [p, p, in, out] -> [out, in, p, p]
        shape = (shape[3], shape[2], shape[0], shape[1])
    elif leaf == "kernel":                    # Linear [in, out] -> [out, in]
        shape = tuple(shape[::-1])
    return name, tuple(shape)


def canonical_name(key: str) -> str:
    for pattern, replacement in _CANONICAL:
        key = pattern.sub(replacement, key)
    return key


@dataclass(frozen=True)
class Target:
    path: tuple[str, ...]   # params path
    layout: Callable[[np.ndarray], np.ndarray]


def target_of(key: str) -> Target | None:
    """Where source tensor `key` goes, or None for a known buffer; KeyError for an unknown name."""
    name = canonical_name(key)
    for pattern, template, layout in _RULES:
        m = pattern.fullmatch(name)
        if m:
            path = template.format(None, *(g.replace(".", "/") for g in m.groups()))
            return Target(tuple(path.split("/")), layout)
    if any(p.fullmatch(name) for p in _IGNORED):
        return None
    raise KeyError(key)


class TensorFiles:
    """Lazy access to the tensors of an HF checkpoint dir: safetensors (single or sharded) or `.bin`."""

    def __init__(self, src_dir: str):
        self.src_dir = src_dir
        self.files: dict[str, str] = {}  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}  # tensor name -> shape as stored, from the headers
        st = sorted(glob.glob(os.path.join(src_dir, "*.safetensors")))
        bins = sorted(glob.glob(os.path.join(src_dir, "pytorch_model*.bin")))
        if st:
            from safetensors import safe_open
            for path in st:
                try:
                    with safe_open(path, framework="numpy") as f:
                        for key in f.keys():
                            self.files[key], self.shapes[key] = path, tuple(f.get_slice(key).get_shape())
                except Exception as e:
                    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
            self._load = self._load_safetensors
        elif bins:
            self._torch = {}
            for path in bins:
                for key, tensor in self._torch_file(path).items():
                    self.files[key], self.shapes[key] = path, tuple(tensor.shape)
            self._load = self._load_torch
        else:
            raise FileNotFoundError(f"{src_dir}: no *.safetensors or pytorch_model*.bin weight files")
        self._check_index()

    def _check_index(self):
        for index in glob.glob(os.path.join(self.src_dir, "*.index.json")):
            try:
                with open(index) as f:
                    weight_map = dict(json.load(f).get("weight_map", {}))
            except (ValueError, AttributeError, TypeError) as e:   # not JSON (a ValueError), or not a dict
                raise ValueError(f"{index}: not a valid index file ({type(e).__name__}: {e})") from e
            missing = sorted(set(weight_map) - set(self.files))
            if missing:
                raise FileNotFoundError(f"{index} lists tensors no weight file holds, e.g. {missing[:3]} "
                                        f"(files: {sorted(set(weight_map.values()))})")

    def _torch_file(self, path):
        if path not in self._torch:
            try:
                import torch
            except ImportError as e:
                raise ImportError(f"{path}: reading .bin weights needs torch (pip install 'llava_next_jax[convert]')"
                                  ) from e
            try:   # mmap: read lazily; a legacy (pre-zip) torch.save file can only be read whole
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
                if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
                    raise TypeError(f"holds a {type(state).__name__}, not a dict of tensors")
            except Exception as e:
                message = (str(e).splitlines() or [""])[0]
                raise ValueError(f"{path}: not a readable PyTorch weights file ({type(e).__name__}: {message})"
                                 ) from e
            self._torch[path] = state
        return self._torch[path]

    def _load_safetensors(self, key):
        from safetensors import safe_open
        with safe_open(self.files[key], framework="numpy") as f:
            return f.get_tensor(key)

    def _load_torch(self, key):
        import torch
        t = self._torch_file(self.files[key])[key]
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    def keys(self):
        return self.files.keys()

    def load(self, key: str) -> np.ndarray:
        try:
            return self._load(key)
        except Exception as e:
            raise ValueError(f"{self.files[key]}: reading tensor {key} failed ({type(e).__name__}: {e})") from e

    def where(self, key: str) -> str:
        """`key (in file)`, the file relative to the checkpoint dir."""
        return f"{key} (in {os.path.relpath(self.files[key], self.src_dir)})"


def expected_shapes(config: LlavaNextConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """params path -> shape, for every leaf the model needs."""
    from .modeling.llava_next import init_params
    tree = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return {path: leaf.shape for path, leaf in flatten(tree).items()}


def plan(files: TensorFiles, config: LlavaNextConfig) -> dict[tuple[str, ...], tuple[str, Target]]:
    """Assigns every source tensor to its parameter; errors name any unknown, missing, duplicated or
    misshaped tensor (shapes from the files' headers, before any tensor is read), and a tied checkpoint's
    stored lm_head that is not a copy of its embeddings (the one case that reads tensors here)."""
    shapes = expected_shapes(config)
    sources: dict[tuple[str, ...], list[tuple[str, Target]]] = {path: [] for path in shapes}
    unknown, tied_heads = [], []
    for key in files.keys():
        try:
            target = target_of(key)
        except KeyError:
            unknown.append(key)
            continue
        if target is not None and target.path == ("lm_head", "kernel") and config.tie_word_embeddings:
            tied_heads.append(key)   # a tied head saved anyway: checked below to be a copy of embed_tokens
            continue
        if target is None:
            continue  # a recomputed buffer
        if target.path not in sources:
            unknown.append(key)
            continue
        sources[target.path].append((key, target))
    if unknown:
        raise ValueError(f"{files.src_dir}: {len(unknown)} tensors match no LLaVA-NeXT parameter for this config, "
                         f"e.g. {', '.join(map(files.where, sorted(unknown)[:5]))}")
    missing = [path for path, found in sources.items() if not found]
    if missing:
        hint = (" (config.json says tie_word_embeddings=false)" if ("lm_head", "kernel") in missing else "")
        raise ValueError(f"{files.src_dir}: no source tensor for {len(missing)} parameters, e.g. "
                         f"{['/'.join(p) for p in missing[:5]]}{hint}")
    twice = {"/".join(path): [files.where(k) for k, _ in found] for path, found in sources.items() if len(found) > 1}
    if twice:
        raise ValueError(f"{files.src_dir}: several tensors map to one parameter: {twice}")
    for path, [(key, _)] in sources.items():
        stored, want = files.shapes[key], hf_tensor(path, shapes[path])[1]
        if stored != want:
            raise ValueError(f"{files.files[key]}: tensor {key} has shape {stored}; parameter {'/'.join(path)} "
                             f"expects {want} as stored by HF (check config.json sizes)")
    embeddings = sources[("language_model", "embed_tokens", "embedding")][0][0]
    for key in tied_heads:
        _check_tied_head(files, key, embeddings)
    return {path: found[0] for path, found in sources.items()}


def _check_tied_head(files: TensorFiles, head: str, embeddings: str) -> None:
    """ValueError unless the lm_head a tied checkpoint stores equals its embeddings: transformers 5 does
    not tie them then (it warns) and computes its logits from that lm_head."""
    if files.shapes[head] == files.shapes[embeddings] and np.array_equal(files.load(head), files.load(embeddings)):
        return
    raise ValueError(
        f"{files.src_dir}: config.json ties the output layer to the embeddings (tie_word_embeddings=true, at its "
        f"top level or, without one there, in text_config), but {files.where(head)} differs from "
        f"{files.where(embeddings)}: transformers 5 then keeps them apart and uses lm_head.weight. Set "
        f"\"tie_word_embeddings\": false at the top level of config.json to load it so")


def iter_tensors(src_dir: str, config: LlavaNextConfig, dtype: str | None = None
                 ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
    """(params path, array) pairs, read one source tensor at a time, in our layout.

    The names and shapes are checked against the config when this is called (`plan`), before any
    tensor is read. dtype: "float32", "bfloat16", "float16", or None to keep each tensor's own dtype.
    """
    files = TensorFiles(src_dir)
    tensors = plan(files, config)

    def read():
        for path, (key, target) in tensors.items():
            tensor = target.layout(files.load(key))
            yield path, tensor.astype(DTYPES[dtype]) if dtype else tensor
    return read()


HF_EXPORT = {"written_by": "llava_next_jax.convert.export_hf"}
"""In the metadata of the model.safetensors `export_hf` writes: how a later export knows the directory is one."""
HF_EXPORT_TEMP = "model.safetensors.partial"   # written, then renamed to model.safetensors


def is_hf_export(path: str) -> bool:
    """Whether `path` holds a model.safetensors written by `export_hf`."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(os.path.join(path, "model.safetensors"), "numpy") as f:
            metadata = f.metadata() or {}
    except (OSError, SafetensorError):
        return False
    return HF_EXPORT.items() <= metadata.items()


def check_hf_out_dir(out_dir: str, src_dir: str | None = None) -> None:
    """`checkpoint.check_out_dir` for `export_hf`: ValueError for a file, SRC_DIR, or a non-empty
    directory that is not an earlier export (an HF checkpoint of the user's is never overwritten)."""
    check_out_dir(out_dir, src_dir, ours=is_hf_export, leftovers=(HF_EXPORT_TEMP,),
                  what="an earlier HF export (no model.safetensors written by export_hf; one exported by a "
                       "llava_next_jax older than this check is not recognised: remove it)")


def export_hf(params: dict, src_dir: str, out_dir: str) -> str:
    """Writes `params` as an HF checkpoint transformers loads: `model.safetensors` (2024 hub names,
    torch layouts) plus the side files (config, tokenizer, processor...) copied from `src_dir`.
    Returns the safetensors path. `out_dir` must be new, empty or an earlier export (`check_hf_out_dir`)."""
    from safetensors.numpy import save_file
    check_hf_out_dir(out_dir, src_dir)
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for path, leaf in flatten(params).items():
        array = np.asarray(leaf)
        name, torch_shape = hf_tensor(path, array.shape)
        if array.ndim == 4:
            array = array.transpose(3, 2, 0, 1)   # [p, p, in, out] -> [out, in, p, p]
        elif path[-1] == "kernel":
            array = array.T                      # [in, out] -> [out, in]
        assert array.shape == torch_shape, (name, array.shape, torch_shape)
        tensors[name] = np.ascontiguousarray(array)
    target = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, os.path.join(out_dir, HF_EXPORT_TEMP), metadata={"format": "pt", **HF_EXPORT})
    os.replace(os.path.join(out_dir, HF_EXPORT_TEMP), target)   # whole or not at all: a kill leaves a leftover
    copy_side_files(src_dir, out_dir)
    return target
