"""The fine-tuning data pipeline (llava_next_jax/data.py) against HF transformers.

References: the training texts are written out by hand per prompt family; HF's LlavaNextProcessor
(built from the same tiny checkpoint directory) turns them into ids and pixels; HF's tokenizer decodes
the labelled tokens; HF's LlavaNextForConditionalGeneration computes the loss of a loader batch.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import tiny_models as tm
from llava_next_jax import anyres, data, train
from tiny_tokenizers import processor_pairs, tokenizer_info, write_processor_files

GEOMETRY = dict(image_size=56, patch_size=14, pinpoints=tm.TINY_PINPOINTS)   # the tiny models' geometry
IGNORE = train.IGNORE


def hf_checkpoint(directory, family: str = "mistral", seed: int = 0):
    """A tiny HF model whose vocab and image token fit `family`'s tiny tokenizer, saved with the processor
    files in `directory`; returns the HF model."""
    config = tm.hf_config(family)
    info = tokenizer_info(family)
    config.text_config.vocab_size = info["vocab_size"]
    config.image_token_id = info["image_token_id"]
    torch.manual_seed(seed)
    model = transformers.LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():  # as tm.build_model: non-trivial biases and norms
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    write_processor_files(directory, family, **GEOMETRY)
    tm.save_checkpoint(model, str(directory))
    return model


def rgb_image(rng, height, width):
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = {f: write_processor_files(root / f, f, **GEOMETRY) for f in ("vicuna", "chatml-qwen2", "llama3")}
    out["mistral"] = root / "mistral"
    hf_checkpoint(out["mistral"], "mistral", seed=3)
    builtin = write_processor_files(root / "mistral-builtin", "mistral", chat_template=False, **GEOMETRY)
    (builtin / "config.json").write_text(json.dumps({"text_config": {"model_type": "mistral"}}))
    out["mistral-builtin"] = builtin
    return out


@pytest.fixture(scope="module")
def pair(dirs):
    return processor_pairs(dirs)


# --- one conversation ------------------------------------------------------------------------------

CONVERSATION = [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A red car."},
    {"from": "human", "value": "And the sky?"},
    {"from": "gpt", "value": "Blue, with one cloud 東京 🙂."},
]
ANSWERS = ["A red car.", "Blue, with one cloud 東京 🙂."]

MESSAGES = [  # HF's format, written by hand: the image block first (LLaVA moves <image> to the front)
    {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red car."}]},
    {"role": "user", "content": [{"type": "text", "text": "And the sky?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Blue, with one cloud 東京 🙂."}]},
]

# family: (the training text, written out by hand; the end token each answer is trained to emit).
TEXTS = {
    "mistral": ("<<SYS>>\nAnswer briefly.\n<</SYS>>\n\n[INST] <image>\nWhat is in the picture? [/INST] A red car.</s> "
                "[INST] And the sky? [/INST] Blue, with one cloud 東京 🙂.</s> ", "</s>"),
    "mistral-builtin": ("Answer briefly.\n\n[INST] <image>\nWhat is in the picture? [/INST] A red car.</s>"
                        "[INST] And the sky? [/INST] Blue, with one cloud 東京 🙂.</s>", "</s>"),
    # llava-hf's vicuna template writes no end token after an answer: the eos is inserted.
    "vicuna": ("Answer briefly. USER: <image>\nWhat is in the picture? ASSISTANT: A red car.</s> USER: And the sky? "
               "ASSISTANT: Blue, with one cloud 東京 🙂.</s> ", "</s>"),
    "chatml-qwen2": ("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n<image>\nWhat is in the "
                     "picture?<|im_end|>\n<|im_start|>assistant\nA red car.<|im_end|>\n<|im_start|>user\nAnd the sky?"
                     "<|im_end|>\n<|im_start|>assistant\nBlue, with one cloud 東京 🙂.<|im_end|>\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\n<image>\nWhat is in the picture?<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nA red car.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nAnd the sky?"
               "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBlue, with one cloud 東京 🙂.<|eot_id|>",
               "<|eot_id|>"),
}


def labelled_runs(labels):
    """Each maximal run of labelled positions as a list of token ids."""
    runs, current = [], []
    for t in labels.tolist() + [IGNORE]:
        if t != IGNORE:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs


@pytest.mark.parametrize("family", list(TEXTS))
def test_example_equals_hf_processor_and_labels_are_the_answers(pair, family):
    ours, hf = pair(family)
    text, end = TEXTS[family]
    assert data.conversation_messages(CONVERSATION) == MESSAGES
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, chat_template=ours.chat_template)
    assert rendered == (text.replace("</s>", "") if family == "vicuna" else text)
    assert data.training_text(ours, MESSAGES)[0] == text

    image = rgb_image(np.random.default_rng(0), 30, 70)
    example = data.build_example(ours, CONVERSATION, image)
    theirs = hf(images=[image], text=[text], return_tensors="np")
    np.testing.assert_array_equal(example["input_ids"], theirs["input_ids"][0])
    assert example["input_ids"].dtype == np.int32 and example["labels"].dtype == np.int32
    assert example["image_sizes"] == [(30, 70)] and len(example["pixel_values"]) == 1
    tiles = int(theirs["pixel_values"].shape[1])
    np.testing.assert_allclose(example["pixel_values"][0], theirs["pixel_values"][0], atol=1e-5)
    assert example["pixel_values"][0].shape[0] == tiles

    labels = example["labels"]
    learned = labels != IGNORE
    np.testing.assert_array_equal(labels[learned], example["input_ids"][learned])
    assert not (learned & (example["input_ids"] == hf.image_token_id)).any()
    runs = [hf.tokenizer.decode(run) for run in labelled_runs(labels)]
    assert runs == [a + end for a in ANSWERS], runs


@pytest.mark.parametrize("family", ["mistral", "chatml-qwen2"])
def test_text_only_example(pair, family):
    ours, hf = pair(family)
    conv = [{"from": "human", "value": "Tell me about the city."}, {"from": "gpt", "value": "  It is big.  "}]
    text = {"mistral": "[INST] Tell me about the city. [/INST]   It is big.  </s> ",
            "chatml-qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nTell me "
                            "about the city.<|im_end|>\n<|im_start|>assistant\n  It is big.  <|im_end|>\n"}[family]
    example = data.build_example(ours, conv)
    np.testing.assert_array_equal(example["input_ids"], hf(text=[text], return_tensors="np")["input_ids"][0])
    assert example["image_sizes"] == [] and example["pixel_values"] == []
    end = {"mistral": "</s>", "chatml-qwen2": "<|im_end|>"}[family]
    assert [hf.tokenizer.decode(r) for r in labelled_runs(example["labels"])] == [conv[1]["value"] + end]  # verbatim


def test_too_long_says_how_long(pair):
    ours, hf = pair("mistral")
    image = rgb_image(np.random.default_rng(1), 100, 40)
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A tall thin picture."}]
    length = hf(images=[image], text=["[INST] <image>\nDescribe. [/INST] A tall thin picture.</s> "],
                return_tensors="np")["input_ids"].shape[1]
    assert length > anyres.num_image_tokens((100, 40), ours.geometry) > 20
    with pytest.raises(data.TooLong, match=f"^{length} tokens after image expansion > max_length {length - 1}$"):
        data.build_example(ours, conv, image, max_length=length - 1)
    assert len(data.build_example(ours, conv, image, max_length=length)["input_ids"]) == length


@pytest.mark.parametrize("conv, message", [
    ([{"from": "bot", "value": "hi"}], r"turn 0: unknown role 'bot'"),
    ([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], r"turn 1: a 'human' turn after user"),
    ([{"from": "gpt", "value": "a"}], r"turn 0: a 'gpt' turn after the start"),
    ([{"from": "human", "value": "a"}, {"from": "system", "value": "b"}], r"turn 1: a 'system' turn"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
     r"turn 2: the conversation ends with a 'human' turn"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": "<image> b"}], r"turn 1 \(gpt\): <image> may only"),
    ([{"from": "human", "value": "a"}, {"from": "gpt", "value": " "}], r"turn 1 \(gpt\): empty answer"),
    ([{"from": "human", "text": "a"}], r"turn 0: expected an object with 'from' and 'value'"),
    ([{"from": "human", "value": 3}], r"turn 0 \(human\): 'value' must be a string, got int"),
    ([], r"'conversations' is empty"),
])
def test_bad_conversations(conv, message):
    with pytest.raises(ValueError, match=message):
        data.conversation_messages(conv)


def test_placeholder_must_match_the_image(pair):
    ours, _ = pair("mistral")
    conv = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A."}]
    image = np.zeros((9, 9, 3), np.uint8)
    with pytest.raises(ValueError, match="^the row has 1 image but 0 <image> placeholders in its human turns; "
                                         "each image needs one, in order$"):
        data.build_example(ours, conv, image)
    with pytest.raises(ValueError, match="^the row has 0 images but 1 <image> placeholder in"):
        data.build_example(ours, [{"from": "human", "value": "<image>What?"}, conv[1]])
    two = [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A."},
           {"from": "human", "value": "And <image>?"}, {"from": "gpt", "value": "B."}]
    with pytest.raises(ValueError, match="^the row has 3 images but 2 <image> placeholders in"):
        data.build_example(ours, two, [image] * 3)
    with pytest.raises(ValueError, match="^the row has 1 image but 2 <image> placeholders in"):
        data.encode_conversation(ours, two, (9, 9))


# Three images: two placeholders in the first human turn (mid-text), one at the end of the second.
MULTI_CONVERSATION = [
    {"from": "human", "value": "Image 1: <image> Image 2: <image> Which is wider?"},
    {"from": "gpt", "value": "The first."},
    {"from": "human", "value": "And this one? <image>"},
    {"from": "gpt", "value": "Wider still."},
]
MULTI_ANSWERS = ["The first.", "Wider still."]
MULTI_MESSAGES = [  # written by hand: each turn's image blocks first, in placeholder order
    {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                 {"type": "text", "text": "Image 1:  Image 2:  Which is wider?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "The first."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Wider still."}]},
]
MULTI_TEXTS = {
    "mistral": ("[INST] <image>\n<image>\nImage 1:  Image 2:  Which is wider? [/INST] The first.</s> "
                "[INST] <image>\nAnd this one? [/INST] Wider still.</s> ", "</s>"),
    "chatml-qwen2": ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n<image>\n"
                     "Image 1:  Image 2:  Which is wider?<|im_end|>\n<|im_start|>assistant\nThe first.<|im_end|>\n"
                     "<|im_start|>user\n<image>\nAnd this one?<|im_end|>\n<|im_start|>assistant\nWider still."
                     "<|im_end|>\n", "<|im_end|>"),
}


@pytest.mark.parametrize("family", list(MULTI_TEXTS))
def test_multi_image_example_equals_hf_processor(pair, family):
    """Images of three sizes with three token counts (52, 56, 42) and tile counts (3, 3, 4): our ids equal
    HF's processor expanding each <image> of the text for the image in that position, so each image's
    tokens are where HF puts them; each image's tiles equal HF's; labels are the answers."""
    ours, hf = pair(family)
    text, end = MULTI_TEXTS[family]
    assert data.conversation_messages(MULTI_CONVERSATION) == MULTI_MESSAGES
    assert hf.apply_chat_template(MULTI_MESSAGES, tokenize=False, chat_template=ours.chat_template) == text
    assert data.training_text(ours, MULTI_MESSAGES)[0] == text

    rng = np.random.default_rng(4)
    sizes = [(30, 70), (90, 40), (20, 160)]
    images = [rgb_image(rng, h, w) for h, w in sizes]
    assert len({anyres.num_image_tokens(s, ours.geometry) for s in sizes}) == 3
    example = data.build_example(ours, MULTI_CONVERSATION, images)
    theirs = hf(images=images, text=[text], return_tensors="np")
    np.testing.assert_array_equal(example["input_ids"], theirs["input_ids"][0])
    swapped = data.build_example(ours, MULTI_CONVERSATION, [images[1], images[0], images[2]])["input_ids"]
    assert not np.array_equal(swapped, example["input_ids"])   # the order is visible in the ids
    assert example["image_sizes"] == sizes
    np.testing.assert_array_equal(theirs["image_sizes"], sizes)
    assert len(example["pixel_values"]) == 3
    for i, tiles in enumerate(example["pixel_values"]):   # HF pads every image to the most tiles (4)
        assert tiles.dtype == np.float32 and tiles.shape[0] == anyres.num_tiles(sizes[i], ours.geometry)
        np.testing.assert_allclose(tiles, theirs["pixel_values"][i, :len(tiles)], atol=1e-5)
        assert not theirs["pixel_values"][i, len(tiles):].any()

    labels = example["labels"]
    learned = labels != IGNORE
    np.testing.assert_array_equal(labels[learned], example["input_ids"][learned])
    assert [hf.tokenizer.decode(run) for run in labelled_runs(labels)] == [a + end for a in MULTI_ANSWERS]
    ids, _ = data.encode_conversation(ours, MULTI_CONVERSATION, sizes)   # sizes alone give the same ids
    np.testing.assert_array_equal(ids, example["input_ids"])


# --- the loader ------------------------------------------------------------------------------------

def turns(*pairs, image=False):
    out = []
    for i, (q, a) in enumerate(pairs):
        out += [{"from": "human", "value": ("<image>\n" if image and i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return out


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    """A JSONL file with good rows of several lengths, every kind of bad row, and their expected reasons."""
    root = tmp_path_factory.mktemp("rows")
    rng = np.random.default_rng(2)
    for name, (h, w) in {"a.png": (30, 70), "b.png": (100, 40), "c.png": (56, 56), "d.png": (20, 160)}.items():
        rgb_image(rng, h, w).save(root / name)
    (root / "garbage.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    rgb_image(rng, 64, 64).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) * 6 // 10])  # header fine, data cut
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: the processor sees 90 x 40
    rgb_image(rng, 40, 90).save(root / "rotated.jpg", exif=exif)
    long_answer = " ".join(["the red car is on the street"] * 30)
    rows = [
        {"image": "a.png", "conversations": turns(("What is it?", "A car."), ("Color?", "Red."), image=True)},  # 1
        {"conversations": turns(("Say hello.", "hello world"))},                                                # 2
        {"image": "nope/missing.png", "conversations": turns(("What?", "x"), image=True)},                      # 3
        '{"image": "a.png", "conversations": [',                                                                 # 4
        {"image": "a.png", "conversation": turns(("What?", "x"), image=True)},                                  # 5
        {"image": "b.png", "conversations": turns(("Describe.", long_answer), image=True)},                    # 6
        {"image": "c.png", "conversations": []},                                                                # 7
        "",                                                                                                     # 8
        {"conversations": [{"from": "bot", "value": "hi"}]},                                                    # 9
        {"image": "garbage.png", "conversations": turns(("What?", "x"), image=True)},                          # 10
        {"image": "truncated.jpg", "conversations": turns(("What?", "a jpeg"), image=True)},                   # 11
        {"image": "rotated.jpg", "conversations": turns(("Which way?", "Up."), image=True)},                    # 12
        {"image": "b.png", "conversations": turns(("Tall?", "Yes, tall and thin."), image=True)},              # 13
        {"conversations": turns(("Count.", "one two three four five"), ("More.", "1 2 3"))},                   # 14
        {"image": "c.png", "conversations": turns(("Square?", "Yes."), image=True)},                           # 15
        {"image": "d.png", "conversations": turns(("Wide?", "Very wide."), image=True)},                       # 16
        {"conversations": [{"from": "system", "value": "Be kind."}] + turns(("Hi.", "Hello there."))},         # 17
        {"image": "a.png", "conversations": turns(("Again?", "The same car, again."), image=True)},            # 18
        {"conversations": turns(("Short.", "ok"))},                                                             # 19
        {"image": str(root / "d.png"), "conversations": turns(("Absolute path?", "Fine."), image=True)},       # 20
    ]
    path = root / "train.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    expected = [
        (3, f"image 'nope/missing.png' not found under {root}"),
        (4, f"not valid JSON ({_json_error(rows[3])})"),
        (5, "no 'conversations' key (keys: ['conversation', 'image'])"),
        (6, "{long} tokens after image expansion > max_length 200"),
        (7, "'conversations' is empty"),
        (9, "turn 0: unknown role 'bot'; expected one of ['assistant', 'gpt', 'human', 'system', 'user']"),
        (10, "image 'garbage.png' cannot be read: cannot identify image file ..."),   # then Pillow's path
    ]
    return {"path": path, "root": root, "rows": rows, "skipped": expected, "good": [1, 2, 11, 12] + list(range(13, 21)),
            "long_answer": long_answer}


def _json_error(text):
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"{e.msg} at column {e.colno}"


@pytest.fixture(scope="module")
def config(dirs):
    from llava_next_jax.config import LlavaNextConfig
    return LlavaNextConfig.from_file(str(dirs["mistral"]))


@pytest.fixture(scope="module")
def models(dirs):
    """(HF model, our LlavaNext) of the tiny mistral checkpoint."""
    from llava_next_jax import LlavaNext
    hf = transformers.LlavaNextForConditionalGeneration.from_pretrained(dirs["mistral"]).eval()
    return hf, LlavaNext.from_pretrained(str(dirs["mistral"]))


def hf_loss(hf, batch) -> float:
    """HF's loss on a loader batch: its real rows, its real images (the slots with a size)."""
    real, n_images = batch["lines"] >= 0, int(batch["image_sizes"].any(1).sum())
    kwargs = {k: torch.from_numpy(batch[k][real].astype(np.int64)) for k in ("input_ids", "attention_mask", "labels")}
    if n_images:
        kwargs.update(pixel_values=torch.from_numpy(batch["pixel_values"][:n_images]),
                      image_sizes=torch.from_numpy(batch["image_sizes"][:n_images].astype(np.int64)))
    with torch.no_grad():
        return hf(**kwargs).loss.item()


def our_loss(model, batch) -> float:
    return float(train.loss_fn(model.params, model.config, batch["input_ids"], batch["pixel_values"],
                               batch["sources"], batch["attention_mask"], batch["labels"]))


def make_loader(pair, config, path, **kw):
    return data.ConversationData(path, pair("mistral")[0], config, **{"max_length": 200, "batch_size": 3,
                                                                      "sort_window": 2, **kw})


def test_loader_reports_every_bad_row(pair, config, jsonl):
    ours, hf = pair("mistral")
    long_text = f"[INST] <image>\nDescribe. [/INST] {jsonl['long_answer']}</s> "
    long = hf(images=[Image.open(jsonl["root"] / "b.png")], text=[long_text], return_tensors="np")["input_ids"].shape[1]
    loaded = make_loader(pair, config, jsonl["path"])
    got = [(s.line, s.reason) for s in loaded.skipped]
    want = [(line, reason.format(long=long)) for line, reason in jsonl["skipped"]]
    assert [g[0] for g in got] == [w[0] for w in want]
    for (line, reason), (_, expected) in zip(got, want):
        if expected.endswith(" ..."):
            assert reason.startswith(expected[:-3]), (line, reason, expected)
        else:
            assert reason == expected, line
    assert str(loaded.skipped[0]) == f"line 3: image 'nope/missing.png' not found under {jsonl['root']}"
    assert loaded.lines.tolist() == jsonl["good"]
    assert len(loaded) == math.ceil(len(jsonl["good"]) / 3) == 4
    assert loaded.length_buckets == (128, 200)


def test_batches_right_padded_bucketed_every_row_once(pair, config, jsonl):
    ours, _ = pair("mistral")
    loaded = make_loader(pair, config, jsonl["path"])
    P, per_tile = config.geometry.max_tiles, config.geometry.patches_per_side ** 2
    pad = ours.pad_token_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(2):
            seen = []
            for index in range(epoch * len(loaded), (epoch + 1) * len(loaded)):
                batch = loaded.batch(index)
                ids, mask, labels, sources = (batch[k] for k in ("input_ids", "attention_mask", "labels", "sources"))
                B, L = ids.shape
                assert B == 3 and L in loaded.length_buckets
                assert batch["pixel_values"].shape == (3, P, 3, 56, 56) and batch["image_sizes"].shape == (3, 2)
                lengths = mask.sum(1)
                assert (mask == (np.arange(L)[None] < lengths[:, None])).all()          # right padding
                assert (ids[mask == 0] == pad).all() and (labels[mask == 0] == IGNORE).all()
                assert L == min(b for b in loaded.length_buckets if b >= lengths.max())
                images = []
                for row, line in enumerate(batch["lines"]):
                    if line < 0 or line == 11:   # a filler row, or the truncated jpeg: all padding
                        assert lengths[row] == 0
                        continue
                    seen.append(int(line))
                    spec = jsonl["rows"][line - 1]
                    image = None if "image" not in spec else jsonl["root"] / spec["image"]
                    example = data.build_example(ours, spec["conversations"], image)
                    T = len(example["input_ids"])
                    np.testing.assert_array_equal(ids[row, :T], example["input_ids"])
                    np.testing.assert_array_equal(labels[row, :T], example["labels"])
                    assert len(example["image_sizes"]) == (image is not None)
                    images += zip(example["pixel_values"], example["image_sizes"])
                # images fill the first slots in row order; sources as anyres gives them, newline after B*P tiles
                for slot, (tiles, size) in enumerate(images):
                    np.testing.assert_array_equal(batch["pixel_values"][slot, :len(tiles)], tiles)
                    assert tuple(batch["image_sizes"][slot]) == size
                assert not batch["pixel_values"][len(images):].any() and not batch["image_sizes"][len(images):].any()
                sizes = [size for _, size in images]
                expected = anyres.token_sources(ids, config.image_token_id, sizes or None, config.geometry, P)
                expected[expected == len(images) * P * per_tile] = 3 * P * per_tile
                np.testing.assert_array_equal(sources, expected)
                if images:
                    assert (sources == 3 * P * per_tile).any()
            assert sorted(seen) == [g for g in jsonl["good"] if g != 11]
    assert any("line 11: image file" in str(w.message) and "truncated.jpg" in str(w.message) for w in caught)
    assert [f.line for f in loaded.failed] == [11]


def test_batches_are_deterministic_and_resumable(pair, config, jsonl):
    a, b = make_loader(pair, config, jsonl["path"]), make_loader(pair, config, jsonl["path"])
    other = make_loader(pair, config, jsonl["path"], seed=1)
    order = lambda d, e: [d.batch(i)["lines"].tolist() for i in range(e * len(d), (e + 1) * len(d))]  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the truncated jpeg row
        for index in (5, 0, 9, 5):   # out of order, as a resumed run asks
            first, again, fresh = a.batch(index), a.batch(index), b.batch(index)
            for key in first:
                if first[key] is not None:
                    np.testing.assert_array_equal(first[key], again[key])
                    np.testing.assert_array_equal(first[key], fresh[key])
        assert order(a, 0) != order(a, 1) and order(a, 0) != order(other, 0)
        stream = a.iterate(start=6, prefetch=2)   # what a training loop reads: batches built ahead, same arrays
        for index, batch in itertools.islice(stream, 3):
            np.testing.assert_array_equal(batch["input_ids"], b.batch(index)["input_ids"])
            np.testing.assert_array_equal(batch["pixel_values"], b.batch(index)["pixel_values"])
        assert index == 8
        stream.close()
        assert order(make_loader(pair, config, jsonl["path"], shuffle=False), 0) == \
            order(make_loader(pair, config, jsonl["path"], shuffle=False), 3)


def test_bucketing_groups_similar_lengths(pair, config, jsonl):
    """One sort window over the whole epoch: batches hold consecutive lengths of the sorted rows."""
    loaded = make_loader(pair, config, jsonl["path"], sort_window=100, batch_size=2, length_buckets=[64, 96, 300])
    assert loaded.length_buckets == (64, 96, 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        batches = [loaded.batch(i) for i in range(len(loaded))]
    good = dict(zip(loaded.lines.tolist(), loaded.lengths.tolist()))
    ranges = sorted((min(good[l] for l in b["lines"] if l > 0), max(good[l] for l in b["lines"] if l > 0))
                    for b in batches)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:])), ranges
    assert {b["input_ids"].shape[1] for b in batches} <= {64, 96, 300}
    with pytest.raises(ValueError, match="length_buckets top out at 150 < max_length 200"):
        make_loader(pair, config, jsonl["path"], length_buckets=[100, 150])


def test_loader_batch_loss_equals_hf(pair, config, models, tmp_path):
    """Mixed image / text-only rows, an all-text batch in an image dataset, a short last batch: our loss on
    the loader's arrays (what train_step passes to loss_fn) equals HF's on the same ids, labels and pixels."""
    hf, model = models
    rng = np.random.default_rng(5)
    for name, (h, w) in {"x.png": (50, 120), "y.png": (90, 30)}.items():
        rgb_image(rng, h, w).save(tmp_path / name)
    rows = [{"image": "x.png", "conversations": turns(("What is it?", "A car."), ("Color?", "Red."), image=True)},
            {"conversations": turns(("Say hello.", "hello world"))},
            {"conversations": turns(("Count.", "one two three"))},
            {"conversations": [{"from": "system", "value": "Be kind."}] + turns(("Hi.", "Hello there."))},
            {"image": "y.png", "conversations": turns(("Tall?", "Yes, tall and thin."), image=True)}]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = data.ConversationData(path, pair("mistral")[0], config, max_length=256, batch_size=2, shuffle=False,
                                   sort_window=1, length_buckets=[256])
    batches = [loaded.batch(i) for i in range(len(loaded))]
    assert [b["lines"].tolist() for b in batches] == [[2, 1], [3, 4], [5, -1]]
    for index, batch in enumerate(batches):
        ours, theirs = our_loss(model, batch), hf_loss(hf, batch)
        assert abs(ours - theirs) <= 1e-5 * abs(theirs), (index, ours, theirs)


def test_text_only_file_has_no_pixels(pair, config, models, tmp_path):
    hf, model = models
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"conversations": turns(("Say hello.", "hello world"), ("Again.", "hello"))}) + "\n")
    batch = make_loader(pair, config, path).batch(0)
    assert batch["pixel_values"] is None and (batch["sources"] == anyres.TEXT).all()
    assert not batch["image_sizes"].any() and batch["lines"].tolist() == [1, -1, -1]
    ours, theirs = our_loss(model, batch), hf_loss(hf, batch)
    assert abs(ours - theirs) <= 1e-5 * abs(theirs)


def multi_image_rows(directory):
    """Rows with 0, 1 and 2 images (a list of one, the same file twice, placeholders in one turn and in
    two), a 3-image row, and bad image lists, their images saved in `directory`; and the bad rows'
    expected reasons with max_images=2."""
    rng = np.random.default_rng(9)
    for name, (h, w) in {"a.png": (30, 70), "b.png": (90, 40), "c.png": (56, 56), "d.png": (20, 160)}.items():
        rgb_image(rng, h, w).save(directory / name)
    one_turn = [{"from": "human", "value": "<image>\n<image>\nWhich is wider?"}, {"from": "gpt", "value": "The first."}]
    two_turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A tall one."},
                 {"from": "human", "value": "And this? <image>"}, {"from": "gpt", "value": "A wide one."}]
    three = [{"from": "human", "value": "<image><image><image>Three?"}, {"from": "gpt", "value": "Yes."}]
    rows = [
        {"image": ["a.png", "b.png"], "conversations": one_turn},                                # 1
        {"conversations": turns(("Say hello.", "hello world"))},                                 # 2
        {"image": ["c.png"], "conversations": turns(("Square?", "Yes."), image=True)},           # 3
        {"image": ["a.png", "b.png", "c.png"], "conversations": three},                          # 4
        {"image": "d.png", "conversations": turns(("Wide?", "Very wide."), image=True)},         # 5
        {"image": ["b.png", "d.png"], "conversations": two_turns},                               # 6
        {"image": ["a.png", "b.png"], "conversations": turns(("Both?", "No."), image=True)},    # 7
        {"image": [], "conversations": turns(("None?", "No."))},                                 # 8
        {"image": ["a.png", "gone.png"], "conversations": one_turn},                             # 9
        {"conversations": turns(("Count.", "one two three four five"), ("More.", "1 2 3"))},     # 10
        {"image": ["d.png", "d.png"], "conversations": one_turn},                                # 11
    ]
    skipped = [(4, "3 images > max_images 2"),
               (7, "the row has 2 images but 1 <image> placeholder in its human turns; each image needs one, in order"),
               (8, "'image' must be a file path string or a non-empty list of them, got []"),
               (9, f"image 'gone.png' not found under {directory}")]
    return rows, skipped


def test_multi_image_rows_fill_image_slots_in_order(pair, config, tmp_path):
    """max_images=2: B*2 image slots a batch; every batch's arrays equal its rows built one by one with
    build_example (the HF-checked path), images in row order then placeholder order, zeros after, and
    sources as anyres gives them for those images (newline after all B*2*P tiles)."""
    ours, _ = pair("mistral")
    rows, skipped = multi_image_rows(tmp_path)
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = data.ConversationData(path, ours, config, max_length=200, batch_size=3, sort_window=2, max_images=2)
    assert [(s.line, s.reason) for s in loaded.skipped] == skipped
    assert loaded.lines.tolist() == [1, 2, 3, 5, 6, 10, 11] and len(loaded) == 3
    P, per_tile = config.geometry.max_tiles, config.geometry.patches_per_side ** 2
    counts, slot_counts = set(), set()
    for epoch in range(2):
        seen = []
        for index in range(epoch * len(loaded), (epoch + 1) * len(loaded)):
            batch = loaded.batch(index)
            ids, labels = batch["input_ids"], batch["labels"]
            slots = len(batch["image_sizes"])
            assert batch["pixel_values"].shape == (slots, P, 3, 56, 56) and batch["image_sizes"].shape == (slots, 2)
            slot_counts.add(slots)
            images = []
            for row, line in enumerate(batch["lines"]):
                if line < 0:
                    assert not batch["attention_mask"][row].any()
                    continue
                seen.append(int(line))
                names = rows[line - 1].get("image", [])
                names = [names] if isinstance(names, str) else names
                example = data.build_example(ours, rows[line - 1]["conversations"], [tmp_path / n for n in names])
                T = len(example["input_ids"])
                assert batch["attention_mask"][row].sum() == T
                np.testing.assert_array_equal(ids[row, :T], example["input_ids"])
                np.testing.assert_array_equal(labels[row, :T], example["labels"])
                assert len(example["image_sizes"]) == len(names)
                images += zip(example["pixel_values"], example["image_sizes"])
            counts.add(len(images))
            # the fewest whole batch sizes (3) of slots that hold the images, one slot per row at least
            assert slots % 3 == 0 and 3 <= slots <= 3 * 2 and len(images) <= slots and slots - 3 < max(1, len(images))
            for slot, (tiles, size) in enumerate(images):
                np.testing.assert_array_equal(batch["pixel_values"][slot, :len(tiles)], tiles)
                assert not batch["pixel_values"][slot, len(tiles):].any()
                assert tuple(batch["image_sizes"][slot]) == size
            assert not batch["pixel_values"][len(images):].any() and not batch["image_sizes"][len(images):].any()
            expected = anyres.token_sources(ids, config.image_token_id, [s for _, s in images] or None,
                                            config.geometry, P)
            expected[expected == len(images) * P * per_tile] = slots * P * per_tile
            np.testing.assert_array_equal(batch["sources"], expected)
        assert sorted(seen) == loaded.lines.tolist()
    assert max(counts) > 3 and slot_counts == {3, 6}   # some batch holds more images than rows, some not

    three = data.ConversationData(path, ours, config, max_length=200, batch_size=3, max_images=3)
    assert [s.line for s in three.skipped] == [7, 8, 9]   # the 3-image row fits max_images=3
    assert {len(three.batch(i)["pixel_values"]) for i in range(len(three))} <= {3, 6, 9}
    with pytest.raises(ValueError, match="max_images must be an int >= 1; got 0"):
        data.ConversationData(path, ours, config, max_images=0)


def test_multi_image_batch_loss_equals_hf(pair, config, models, tmp_path):
    """A 2-image row: HF's processor gives the ids and pixels our loader gives, and HF's loss on its own
    inputs (with our labels, checked above to be the answers) equals ours on the loader's batch; then a
    batch of 2-, 1- and 0-image rows and a filler row (3 of 4 slots real) equals HF's loss on the same
    arrays."""
    hf, model = models
    ours, hf_processor = pair("mistral")
    rng = np.random.default_rng(6)
    images = {"w.png": rgb_image(rng, 30, 70), "t.png": rgb_image(rng, 90, 40), "s.png": rgb_image(rng, 20, 160)}
    for name, image in images.items():
        image.save(tmp_path / name)
    rows = [{"image": ["w.png", "t.png"], "conversations": [{"from": "human", "value": "<image>\n<image>\nWhich is "
                                                                                        "wider?"},
                                                             {"from": "gpt", "value": "The first one."}]},
            {"image": "s.png", "conversations": turns(("Wide?", "Very wide."), image=True)},
            {"conversations": turns(("Say hello.", "hello world"))}]
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = dict(max_length=256, max_images=2, shuffle=False, sort_window=1, length_buckets=[256])

    batch = data.ConversationData(path, ours, config, batch_size=1, **settings).batch(0)
    assert batch["lines"].tolist() == [1]
    text = "[INST] <image>\n<image>\nWhich is wider? [/INST] The first one.</s> "
    theirs = hf_processor(images=[images["w.png"], images["t.png"]], text=[text], return_tensors="np")
    T = theirs["input_ids"].shape[1]
    np.testing.assert_array_equal(batch["input_ids"][0, :T], theirs["input_ids"][0])
    assert batch["attention_mask"].sum() == T and batch["image_sizes"].tolist() == [[30, 70], [90, 40]]
    for i in range(2):
        tiles = anyres.num_tiles(tuple(batch["image_sizes"][i]), config.geometry)
        np.testing.assert_allclose(batch["pixel_values"][i, :tiles], theirs["pixel_values"][i, :tiles], atol=1e-5)
    labels = batch["labels"][:, :T]
    assert [hf_processor.tokenizer.decode(r) for r in labelled_runs(labels[0])] == ["The first one.</s>"]
    with torch.no_grad():
        reference = hf(input_ids=torch.from_numpy(theirs["input_ids"].astype(np.int64)),
                       attention_mask=torch.from_numpy(theirs["attention_mask"].astype(np.int64)),
                       pixel_values=torch.from_numpy(theirs["pixel_values"]),
                       image_sizes=torch.from_numpy(theirs["image_sizes"].astype(np.int64)),
                       labels=torch.from_numpy(labels.astype(np.int64))).loss.item()
    ours_loss = our_loss(model, batch)
    assert abs(ours_loss - reference) <= 1e-5 * abs(reference), (ours_loss, reference)

    mixed = data.ConversationData(path, ours, config, batch_size=4, **settings).batch(0)
    assert mixed["lines"].tolist() == [3, 2, 1, -1] and mixed["pixel_values"].shape[0] == 4   # sorted by length
    assert mixed["image_sizes"].tolist() == [[20, 160], [30, 70], [90, 40], [0, 0]]
    ours_loss, reference = our_loss(model, mixed), hf_loss(hf, mixed)
    assert abs(ours_loss - reference) <= 1e-5 * abs(reference), (ours_loss, reference)


def test_loader_setting_errors(pair, config, jsonl, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(" [ ]\n")
    with pytest.raises(ValueError, match=r"empty\.json: no usable rows \(0 skipped\)$"):
        make_loader(pair, config, empty)
    for key, value, message in [("batch_size", 0, "batch_size must be an int >= 1; got 0"),
                                ("seed", -1, "seed must be an int >= 0; got -1"),
                                ("max_length", 2.5, "max_length must be an int >= 1; got 2.5")]:
        with pytest.raises(ValueError, match=message):
            make_loader(pair, config, jsonl["path"], **{key: value})
    other = pair("llama3")[0]   # 56px geometry too, but another vocabulary: another image token id
    assert other.image_token_id != config.image_token_id
    with pytest.raises(ValueError, match=f"image token {other.image_token_id}.*image token {config.image_token_id}"):
        data.ConversationData(jsonl["path"], other, config)


# --- LLaVA's JSON-array files ----------------------------------------------------------------------

ARRAY_TEXTS = [   # strings hiding brackets, quotes and backslashes; scalars; nesting; raw UTF-8; odd spacing
    '[]', ' \n[\n]\n', '[1, -2.5e3, true, null, "x", ""]', '[{"a": "]}[{\\"\\\\"}, {"b": [[], {}, [{"c": "\\\\"}]]}]',
    '[\n  {\n    "k": "café ☕ \\u00e9"\n  },\n  [\n    1,\n    "]"\n  ]\n]\n',
    '[{"a":{"b":{"c":[1,{"d":"}"}]}}},"\\\\\\""]',
]


@pytest.mark.parametrize("text", ARRAY_TEXTS)
def test_array_items_are_the_items_json_reads(text):
    raw = text.encode()
    starts, ends = data.array_items(raw)
    assert starts.dtype == ends.dtype == np.int64
    assert [json.loads(raw[a:b]) for a, b in zip(starts, ends)] == json.loads(raw)


def array_rows(directory):
    """Rows for the array tests, their images saved in `directory`: an image row, a text-only row, unicode,
    and answers holding brackets, braces, escaped quotes and backslashes."""
    rng = np.random.default_rng(7)
    for name, (h, w) in {"p.png": (30, 70), "q.png": (80, 50)}.items():
        rgb_image(rng, h, w).save(directory / name)
    return [
        {"image": "p.png", "conversations": turns(("What is it?", "A car [red] {fast}."), image=True)},
        {"conversations": turns(("Say hello.", "hello world"))},
        {"id": "u", "conversations": turns(("Où?", "Au café ☕, 東京 🙂."),
                                           ("Quoted?", 'He said "hi" \\ then ]}'))},
        {"image": "q.png", "conversations": turns(("Code?", 'x = {"a": [1, 2]}; print("\\\\n")'), image=True)},
        {"conversations": [{"from": "system", "value": "Be {kind}."}] + turns(("Hi.", "Hello there."))},
        {"conversations": turns(("Count.", "one two three four five"), ("More.", "1 2 3"))},
        {"image": "p.png", "conversations": turns(("Again?", "The same car, again ]]]."), image=True)},
    ]


def test_json_array_file_batches_equal_jsonl(pair, config, tmp_path):
    """The same rows as JSONL, as a pretty-printed array (raw UTF-8) and as a one-line array (escaped):
    the same lengths and the same arrays in every batch of an epoch, rows named by item number."""
    rows = array_rows(tmp_path)
    files = {"train.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
             "indented.json": json.dumps(rows, indent=2, ensure_ascii=False),
             "one_line.json": json.dumps(rows)}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    reference = make_loader(pair, config, tmp_path / "train.jsonl")
    assert reference.unit == "line" and not reference.skipped and reference.lines.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert reference.has_images
    expected = [reference.batch(i) for i in range(len(reference) + 1)]   # an epoch, and the next one's first
    for name in ("indented.json", "one_line.json"):
        loaded = make_loader(pair, config, tmp_path / name)
        assert loaded.unit == "item" and not loaded.skipped, name
        np.testing.assert_array_equal(loaded.lines, reference.lines)
        np.testing.assert_array_equal(loaded.lengths, reference.lengths)
        for index, want in enumerate(expected):
            got = loaded.batch(index)
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} batch {index} {key}")


def test_json_array_bad_items_are_skipped_by_item_number(pair, config, tmp_path):
    """Each bad item is skipped with the reason the same row gets as a JSONL line, named "item N"."""
    good = array_rows(tmp_path)
    items = [json.dumps(good[0]),                                                         # 1
             "3",                                                                         # 2 not an object
             '"x"',                                                                       # 3
             json.dumps({"image": "p.png", "conversation": good[0]["conversations"]}),    # 4 no conversations
             json.dumps({"image": "gone.png", "conversations": good[0]["conversations"]}),  # 5 no image file
             '{"conversations" []}',                                                      # 6 no colon
             json.dumps(good[1])]                                                         # 7
    (tmp_path / "rows.jsonl").write_text("\n".join(items) + "\n")
    (tmp_path / "rows.json").write_text("[\n  " + ",\n  ".join(items) + "\n]\n")
    as_lines, as_items = (make_loader(pair, config, tmp_path / name) for name in ("rows.jsonl", "rows.json"))
    assert [s.line for s in as_items.skipped] == [s.line for s in as_lines.skipped] == [2, 3, 4, 5, 6]
    for line, item in zip(as_lines.skipped, as_items.skipped):   # a JSON error's column is the item's
        assert item.unit == "item" and line.unit == "line"
        bad_json = line.reason.startswith("not valid JSON")
        assert item.reason == (line.reason[:-1] + " of the item)" if bad_json else line.reason)
        assert str(item) == f"item {item.line}: {item.reason}"
    reasons = [s.reason for s in as_items.skipped]
    assert reasons[:2] == ["expected a JSON object, got int", "expected a JSON object, got str"]
    assert reasons[2].startswith("no 'conversations' key") and reasons[3].startswith("image 'gone.png' not found")
    assert reasons[4] == f"not valid JSON ({_json_error(items[5])} of the item)"
    assert as_items.lines.tolist() == [1, 7]
    np.testing.assert_array_equal(as_items.lengths, as_lines.lengths)

    multiline = '{\n    "conversations" []\n  }'   # a pretty-printed item: the line within it too
    (tmp_path / "multiline.json").write_text(f"[\n  {multiline},\n  {items[0]}\n]")
    with pytest.raises(json.JSONDecodeError) as error:
        json.loads(multiline)
    skipped = make_loader(pair, config, tmp_path / "multiline.json").skipped
    e = error.value
    assert [str(s) for s in skipped] == [f"item 1: not valid JSON ({e.msg} at line {e.lineno} column {e.colno} "
                                         f"of the item)"]


def test_broken_json_array_names_the_file_and_byte(pair, config, tmp_path):
    rows = array_rows(tmp_path)
    text = json.dumps(rows, indent=2)
    cut = text.index('"hello world"') + 5
    broken = {"truncated": (text[:cut], None),                   # inside a string: it never ends
              "truncated_item": (text[:text.index('"Say hello."')], None),
              "garbage": (text + "\n]", len(text) + 1),
              "unbalanced": (text[:-1] + "}]", len(text) - 1),
              "no_comma": (text.replace("},\n  {", "}\n  {", 1), None)}
    for name, (content, offset) in broken.items():
        path = tmp_path / f"{name}.json"
        path.write_text(content)
        with pytest.raises(ValueError, match=rf"{name}\.json: not a valid JSON array: .* at byte \d+$") as caught:
            make_loader(pair, config, path)
        if offset is not None:
            assert str(caught.value).endswith(f" at byte {offset}"), (name, caught.value)


# --- rows and files the scan must survive ----------------------------------------------------------

def test_surrogate_and_deeply_nested_rows_are_skipped_and_a_bom_is_read_past(pair, config, tmp_path):
    """A lone surrogate ("\\ud83d": a cut emoji) and a row nested deeper than json can parse are bad rows,
    skipped with a reason; a UTF-8 BOM before a JSON array or a JSONL file is not part of the first row."""
    good = {"conversations": turns(("Say hello.", "hello world"))}
    cut_emoji = {"conversations": turns(("Nice \ud83d", "Thanks."))}   # json.dumps writes "\\ud83d"
    deep = '{"conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join([json.dumps(good), json.dumps(cut_emoji), deep, json.dumps(good)]) + "\n")
    loaded = make_loader(pair, config, path)
    assert loaded.lines.tolist() == [1, 4]
    assert [str(s) for s in loaded.skipped] == [
        "line 2: turn 0 (human): 'value' is not valid Unicode text (surrogates not allowed '\\ud83d' at character 5)",
        "line 3: JSON nested too deeply to parse"]

    reference = make_loader(pair, config, tmp_path / "rows.jsonl")
    for name, text in {"bom.jsonl": json.dumps(good) + "\n" + json.dumps(good) + "\n",
                       "bom.json": json.dumps([good, good], indent=1)}.items():
        (tmp_path / name).write_bytes(data.BOM + text.encode())
        loaded = make_loader(pair, config, tmp_path / name)
        assert loaded.unit == ("item" if name.endswith(".json") else "line") and not loaded.skipped, name
        assert loaded.lines.tolist() == [1, 2]
        np.testing.assert_array_equal(loaded.batch(0)["input_ids"][0], reference.batch(0)["input_ids"][0])


def test_data_file_gone_or_cut_short_is_an_error_not_empty_rows(pair, config, tmp_path):
    path = tmp_path / "rows.jsonl"
    text = "".join(json.dumps({"conversations": turns((f"Say {i}.", f"{i} said"))}) + "\n" for i in range(4))
    path.write_text(text)
    loaded = make_loader(pair, config, path, batch_size=2)
    assert loaded.fingerprint == {"bytes": len(text), "blake2b": hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}
    path.write_text(text[:len(text) // 2])
    with pytest.raises(data.DataFileError, match=r"rows\.jsonl: ends before byte \d+ of line/item \d"):
        [loaded.batch(i) for i in range(2)]
    path.unlink()
    with pytest.raises(data.DataFileError, match=r"rows\.jsonl: cannot be read any more \(.*No such file"):
        loaded.batch(0)
    assert not loaded.failed
