"""The built-in demo model: a tiny RANDOM-WEIGHT LLaVA-NeXT, so everything runs with nothing downloaded.

    python -m llava_next_jax.demo [OUT.jsonl]     # captions examples/images/ into demo_captions.jsonl

The demo's captions are meaningless: its weights are seeded random numbers. It exists to exercise the
real pipeline end to end (HF-layout files -> our converter -> processor -> generate -> caption
script), not to describe images. For real captions, convert a released checkpoint
(`scripts/convert_torch_weights.py`) and pass it with `--model`.

`demo_model_dir()` returns the converted demo checkpoint, building it on first use under
`$LLAVA_NEXT_JAX_DEMO_DIR` (default `~/.cache/llava_next_jax/demo-v1`):
  1. an HF-layout directory (what `save_pretrained` of llava-hf/llava-v1.6-mistral-7b-hf writes, at
     toy size: a 2-layer Mistral (hidden 64) and a 3-layer CLIP with 56 px tiles of 14 px patches,
     the released pinpoints scaled by 1/6), with weights from a seeded numpy generator under HF's
     tensor names, and a small BPE tokenizer built with the `tokenizers` library;
  2. `convert_cli.convert_checkpoint` of that directory into the cache (the real converter path).
Needs no torch or transformers.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEMO_VERSION = "demo-v1"
ENV_DIR = "LLAVA_NEXT_JAX_DEMO_DIR"
RANDOM_WEIGHTS_NOTE = ("NOTE: the demo model has RANDOM weights; its captions are meaningless text. "
                       "Pass --model with a converted released checkpoint for real captions.")

TILE, PATCH = 56, 14
PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]   # the release's, scaled 1/6
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]                     # ids 0..3
IMAGE_TOKEN = "<image>"                                                 # the last id
# The chat template of llava-hf/llava-v1.6-mistral-7b-hf: "[INST] <image>\n{question} [/INST]".
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

_WORDS = ("a an the of in on at with and near under over beside behind photo picture image of "
          "cat dog bird horse person people man woman child car bus bicycle boat train tree trees grass "
          "flower sky cloud clouds sun water river lake sea beach mountain road street city building house "
          "window door table chair plate food red blue green yellow white black orange small large old "
          "young sitting standing walking running flying parked empty busy bright dark sunny cloudy "
          "describe this what is there two three group close view top left right field snow wall").split()


def default_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else Path.home() / ".cache" / "llava_next_jax" / DEMO_VERSION


def demo_model_dir(log=None) -> str:
    """The converted demo checkpoint's directory, built on first use (a few seconds); see the module doc.

    log: callable for progress lines (default: stderr). The build goes to a temporary sibling directory
    that is renamed into place at the end, so an interrupted build never leaves a half-written model.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    target = default_dir()
    from .checkpoint import is_converted
    if is_converted(str(target)):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    log(f"building the random-weight demo model in {target} (first use only)")
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_hf_checkpoint(work / "hf")
        from .convert_cli import convert_checkpoint
        convert_checkpoint(str(work / "hf"), str(work / "converted"), log=lambda *_: None)
        try:
            os.rename(work / "converted", target)
        except OSError:  # another process finished first, or a stale non-checkpoint dir is in the way
            if not is_converted(str(target)):
                shutil.rmtree(target, ignore_errors=True)
                os.rename(work / "converted", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"demo model ready in {time.time() - start:.1f} s")
    return str(target)


# --- the HF-layout checkpoint --------------------------------------------------------------------

def write_hf_checkpoint(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Writes the demo model as an HF LLaVA-NeXT checkpoint directory (config, weights, tokenizer, processor)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + [IMAGE_TOKEN]}
    config = hf_config(vocab_size=vocab, image_token_index=ids[IMAGE_TOKEN], bos=ids["<s>"], eos=ids["</s>"],
                       pad=ids["<pad>"])
    _write_json(directory / "config.json", config)
    _write_json(directory / "generation_config.json",
                {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]})
    write_weights(directory / "model.safetensors", config, seed)
    tokenizer.save(str(directory / "tokenizer.json"))
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    _write_json(directory / "special_tokens_map.json", specials)
    _write_json(directory / "tokenizer_config.json", {
        **specials, "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "padding_side": "left", "clean_up_tokenization_spaces": False, "model_max_length": 4096,
        "extra_special_tokens": {"image_token": IMAGE_TOKEN}})
    _write_json(directory / "preprocessor_config.json", {
        "image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": TILE},
        "crop_size": {"height": TILE, "width": TILE}, "image_grid_pinpoints": PINPOINTS, "resample": 3,
        "do_resize": True, "do_center_crop": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True, "do_pad": True})
    _write_json(directory / "processor_config.json", {
        "processor_class": "LlavaNextProcessor", "patch_size": PATCH, "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1, "image_token": IMAGE_TOKEN})
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return directory


def hf_config(vocab_size: int, image_token_index: int, bos: int, eos: int, pad: int) -> dict:
    """config.json of the demo: llava-v1.6-mistral-7b's structure at toy size."""
    text = dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab_size,
                max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu", sliding_window=None,
                rope_theta=1e6, tie_word_embeddings=False, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, image_size=TILE, patch_size=PATCH, num_channels=3, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, projection_dim=64)
    return dict(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"], text_config=text,
                vision_config=vision, image_token_index=image_token_index, image_grid_pinpoints=PINPOINTS,
                vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                multimodal_projector_bias=True, tie_word_embeddings=False, torch_dtype="float32")


def write_weights(path: Path, config: dict, seed: int = 0) -> int:
    """model.safetensors with seeded random float32 weights under HF names and torch shapes; returns bytes.

    Scales: N(0, 0.15) matrices (logits span several units, so greedy text varies with the image),
    norms 1 + N(0, 0.1), biases N(0, 0.1).
    """
    from safetensors.numpy import save_file

    from .config import LlavaNextConfig
    from .convert import expected_shapes, hf_tensor
    rng = np.random.default_rng(seed)
    tensors = {}
    for p, shape in sorted(expected_shapes(LlavaNextConfig.from_dict(config)).items()):
        name, shape = hf_tensor(p, shape)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if p[-1] == "scale":                                   # RMSNorm / LayerNorm weights
            tensors[name] = 1 + 0.1 * noise
        elif p[-1] == "bias":
            tensors[name] = 0.1 * noise
        else:
            tensors[name] = 0.15 * noise
    save_file(tensors, str(path))
    return path.stat().st_size


def build_tokenizer():
    """A small BPE (`tokenizers.Tokenizer`, SentencePiece-style "▁" word starts) trained on a fixed word list.

    Encoding adds <s> in front (tokenizer.json's post-processor). Ids: <unk> <s> </s> <pad> = 0..3,
    printable ASCII + newline + "▁", merges up to 400 tokens, then <image> last. Characters outside
    ASCII encode as <unk>; every id decodes to printable text, so the random model's captions are
    readable nonsense rather than broken bytes.
    """
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c")) + ["\u2581"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet,
                                  limit_alphabet=len(alphabet), show_progress=False)
    state, lines = 12345, []
    for _ in range(300):                 # a deterministic corpus (LCG), no global RNG state
        words = []
        for _ in range(10):
            state = (1103515245 * state + 12345) % 2 ** 31
            words.append(_WORDS[state % len(_WORDS)])
        lines.append(" ".join(words))
    tokenizer.train_from_iterator(lines, trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    bos = ("<s>", tokenizer.token_to_id("<s>"))   # BOS added on encode, as the release's tokenizer.json does
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[bos])
    return tokenizer


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# --- python -m llava_next_jax.demo ------------------------------------------------------------------

def example_images_dir() -> Path:
    """examples/images/ of the source checkout (the demo's inputs)."""
    return Path(__file__).resolve().parent.parent / "examples" / "images"


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m llava_next_jax.demo", description=(
        "Captions the example images with the built-in RANDOM-WEIGHT demo model (meaningless captions; "
        "a smoke test of the whole pipeline)."))
    parser.add_argument("output", nargs="?", default="demo_captions.jsonl",
                        help="JSONL to write (default: ./demo_captions.jsonl; replaced if it exists)")
    parser.add_argument("--images", default=None, help="images to caption (default: the repo's examples/images/)")
    args = parser.parse_args(argv)
    images = Path(args.images) if args.images else example_images_dir()
    if not images.exists():
        print(f"error: {images} does not exist: the example images ship with the source checkout; "
              f"pass --images DIR", file=sys.stderr)
        return 2
    print(RANDOM_WEIGHTS_NOTE, flush=True)
    start = time.time()
    model_dir = demo_model_dir(log=lambda msg: print(msg, flush=True))
    from . import caption
    for stale in (args.output, caption.settings_path(args.output)):   # a demo shows fresh captions; the
        if os.path.exists(stale):                                     # caption script itself resumes instead
            os.remove(stale)
    code = caption.main(["--model", model_dir, "--images", str(images), "--output", args.output,
                         "--max-new-tokens", "16", "--batch-size", "4"])
    rows = caption.read_rows(args.output)
    for row in rows:
        text = row.get("caption")
        print(f"  {os.path.basename(row['image'])}: " + (repr(text) if text is not None else f"ERROR {row['error']}"))
    print(f"wrote {len(rows)} rows to {args.output} in {time.time() - start:.1f} s (model: {model_dir})")
    print(RANDOM_WEIGHTS_NOTE)
    return code


if __name__ == "__main__":
    sys.exit(main())
