"""Tiny, locally built stand-ins for the released LLaVA-NeXT tokenizers and processor directories.

No hub access: each family's tokenizer is a small BPE trained here on a fixed corpus, wrapped in the
same transformers class the release uses (so transformers writes the same kinds of files: the
class's own normalizer / pre-tokenizer / decoder, its post-processor, special tokens, padding side)
and saved with `save_pretrained`.

    tokenizer_dir = write_tokenizer(tmp_path, "mistral")
    processor_dir = write_processor_files(tmp_path, "mistral", image_size=28, patch_size=14,
                                          pinpoints=[[28, 56], [56, 28], [56, 56]])

Families (`FAMILIES`): mistral (llava-v1.6-mistral-7b), vicuna (vicuna-7b/13b), chatml-34b (Yi),
chatml-qwen2 (72b/110b), llama3 (llama3-llava-next-8b). transformers is needed to *write* these
files; reading them back (our processor) needs only `tokenizers`.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

FAMILIES = ("mistral", "vicuna", "chatml-34b", "chatml-qwen2", "llama3")
RELEASED_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

_WORDS = ("the a an is are was of in on at to and or with what where who how many describe picture image "
          "photo cat dog sits mat red blue green car tree sky cloud person people street city water boat "
          "hello world answer question assistant user system please tell me about this that these there "
          "left right top bottom small large big little one two three four five 1 2 3 42 2024 , . ? ! : ; "
          "' \" ( ) - café naïve 東京 🙂 can't won't it's").split()


def _corpus() -> list[str]:
    """A few hundred deterministic sentences (a simple LCG, no global RNG state)."""
    state, lines = 12345, []
    for _ in range(400):
        words = []
        for _ in range(12):
            state = (1103515245 * state + 12345) % 2 ** 31
            words.append(_WORDS[state % len(_WORDS)])
        lines.append(" ".join(words))
    return lines


def _train_bpe(byte_level: bool, vocab_size: int = 600):
    """(vocab dict, merges list) of a BPE trained on `_corpus()`: byte-level, or SentencePiece-style '▁'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    if byte_level:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    spec = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return spec["vocab"], merges


def _sentencepiece_vocab() -> tuple[dict, list]:
    """Llama-style vocab: <unk> <s> </s>, the 256 byte-fallback tokens, then the trained pieces."""
    vocab, merges = _train_bpe(byte_level=False)
    full = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        full[f"<0x{b:02X}>"] = len(full)
    for piece in sorted(vocab, key=vocab.get):
        full.setdefault(piece, len(full))
    return full, merges


# --- chat templates as the llava-hf releases ship them (list content: images first, then text) ---

_IMAGES_THEN_TEXT = ("{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
                     "{{ '<image>\\n' }}{% endfor %}"
                     "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
                     "{{ content['text'] }}{% endfor %}")

CHECKPOINT_TEMPLATES = {
    "mistral": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ '<<SYS>>\\n' + message['content'][0]['text'] + '\\n<</SYS>>\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' }}" + _IMAGES_THEN_TEXT + "{{' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"),
    "vicuna": (
        "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
        "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '<image>\\n' }}{% endfor %}{% if message['role'] != 'assistant' %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
        "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"),
    "chatml-34b": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}" + _IMAGES_THEN_TEXT +
        "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "chatml-qwen2": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}" + _IMAGES_THEN_TEXT +
        "{{'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{% for message in messages %}{{'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'}}"
        + _IMAGES_THEN_TEXT + "{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
}


def _llama_family(family: str):
    from transformers import AddedToken, LlamaTokenizer
    vocab, merges = _sentencepiece_vocab()
    if family == "chatml-34b":  # Yi: its own BOS/EOS, ChatML control tokens, no BOS added
        extra = ["<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        for t in extra:
            vocab[t] = len(vocab)
        tok = LlamaTokenizer(vocab=vocab, merges=merges, bos_token="<|startoftext|>", eos_token="<|im_end|>",
                             unk_token="<unk>", add_bos_token=False, legacy=False)
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    else:
        tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, legacy=False)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def _qwen2_family():
    from transformers import AddedToken, Qwen2Tokenizer
    vocab, merges = _train_bpe(byte_level=True)
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_start|>", "<|im_end|>", "<image>")])
    return tok


def _llama3_family():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast
    vocab, merges = _train_bpe(byte_level=True)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  add_bos_token=True, clean_up_tokenization_spaces=True)
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


@functools.lru_cache(maxsize=None)
def build_tokenizer(family: str):
    """A transformers tokenizer object for `family` (cached; treat as read-only)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if family == "chatml-qwen2":
        tok = _qwen2_family()
    elif family == "llama3":
        tok = _llama3_family()
    else:
        tok = _llama_family(family)
    tok.padding_side = "left"
    return tok


def write_tokenizer(directory: str | os.PathLike, family: str, chat_template: bool = True) -> Path:
    """Writes `family`'s tokenizer files (tokenizer.json, tokenizer_config.json, ...) into `directory`."""
    directory = Path(directory)
    tok = build_tokenizer(family)
    tok.chat_template = CHECKPOINT_TEMPLATES[family] if chat_template else None
    tok.save_pretrained(directory)
    tok.chat_template = None
    return directory


def tokenizer_info(family: str) -> dict:
    """vocab_size (ids are < this), image_token_id, pad/bos/eos ids of `family`'s tiny tokenizer:
    a tiny model used with these files needs a text vocab of at least `vocab_size`."""
    tok = build_tokenizer(family)
    return {"vocab_size": len(tok), "image_token_id": tok.convert_tokens_to_ids("<image>"),
            "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def write_processor_files(directory: str | os.PathLike, family: str = "mistral", image_size: int = 336,
                          patch_size: int = 14, pinpoints=None, chat_template: bool = True,
                          hub_layout: bool = False) -> Path:
    """Writes a complete HF LlavaNextProcessor directory (as `LlavaNextProcessor.save_pretrained` does).

    directory:   created if missing; existing model files in it are left alone.
    family:      one of `FAMILIES` (tokenizer and chat template of that release).
    image_size:  S, the tile size (vision tower input); `size.shortest_edge` and `crop_size` both S.
    patch_size:  p, the vision patch size (written to processor_config.json).
    pinpoints:   anyres candidates [[h, w], ...], multiples of S; default the released set scaled to S.
    chat_template: False writes no template (the processor then falls back to its built-ins).
    hub_layout: False writes what transformers 5 `save_pretrained` writes (the image processor settings
                 inside processor_config.json); True moves them to preprocessor_config.json, the layout
                 of the llava-hf checkpoints on the hub.

    Files written: tokenizer.json, tokenizer_config.json, processor_config.json, chat_template.jinja
    (when chat_template), preprocessor_config.json (hub_layout). Returns the directory.
    """
    from transformers import LlavaNextImageProcessorPil
    from transformers import LlavaNextProcessor as HFProcessor
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if pinpoints is None:
        pinpoints = [[h * image_size // 336, w * image_size // 336] for h, w in RELEASED_PINPOINTS]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in pinpoints])
    processor = HFProcessor(image_processor=image_processor, tokenizer=build_tokenizer(family),
                            patch_size=patch_size, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1,
                            chat_template=CHECKPOINT_TEMPLATES[family] if chat_template else None)
    processor.save_pretrained(directory)
    if hub_layout:
        config = json.loads((directory / "processor_config.json").read_text())
        (directory / "preprocessor_config.json").write_text(json.dumps(config.pop("image_processor"), indent=2))
        (directory / "processor_config.json").write_text(json.dumps(config, indent=2))
    return directory


def hf_processor(directory):
    """HF's processor for `directory`, with the PIL image processor (the one our pixels match)."""
    import transformers
    pil = transformers.LlavaNextImageProcessorPil.from_pretrained(directory)
    return transformers.LlavaNextProcessor.from_pretrained(directory, image_processor=pil)


def processor_pairs(dirs: dict):
    """`get(name)` -> (our processor, HF's) for the directory `dirs[name]`, each loaded once."""
    from llava_next_jax.processor import LlavaNextProcessor

    @functools.cache
    def get(name):
        return LlavaNextProcessor.from_pretrained(dirs[name]), hf_processor(dirs[name])
    return get
