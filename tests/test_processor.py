"""Our LlavaNextProcessor against HF's (transformers `LlavaNextProcessor` with `LlavaNextImageProcessorPil`),
both loaded from the same locally written processor directories (tests/tiny_tokenizers.py)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_next_jax import anyres
from llava_next_jax.processor import BUILTIN_TEMPLATES, LlavaNextProcessor
from tiny_tokenizers import FAMILIES, hf_processor, processor_pairs, write_processor_files

import transformers  # noqa: E402  (test dependency: the reference implementation)

CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ONE_LEVEL = 1 / 255 / min(CLIP_STD)        # one 8-bit level in normalised units
TINY = dict(image_size=28, patch_size=14, pinpoints=[[28, 56], [56, 28], [56, 56]])
WORST = {}                                 # worst pixel diff seen per test (printed with -s)


@pytest.fixture(scope="module", autouse=True)
def report_worst_pixel_diff():
    """After the module: the worst pixel difference over every comparison (shown with -s)."""
    yield
    if WORST:
        print(f"\nWORST pixel diff over all comparisons: {max(WORST.values()):.3g} (bound {ONE_LEVEL:.4f})")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """family -> directory with the tiny geometry; "released" -> mistral with the 336px geometry."""
    root = tmp_path_factory.mktemp("proc")
    out = {f: write_processor_files(root / f, f, **TINY) for f in FAMILIES}
    out["released"] = write_processor_files(root / "released", "mistral")
    return out


@pytest.fixture(scope="module")
def pair(dirs):
    return processor_pairs(dirs)


# --- images of every mode users meet ----------------------------------------------------------------

def make_image(rng, height, width, kind):
    """A random image of `kind`: a PIL mode, or "array3"/"array4" (uint8 HWC numpy)."""
    u8 = lambda *c: rng.integers(0, 256, (height, width, *c), dtype=np.uint8)  # noqa: E731
    if kind == "array3":
        return u8(3)
    if kind == "array4":
        return u8(4)
    if kind in ("RGB", "RGBA", "CMYK"):
        return Image.frombytes(kind, (width, height), u8(len(kind)).tobytes())
    if kind == "L":
        return Image.fromarray(u8())
    if kind == "LA":
        return Image.merge("LA", [Image.fromarray(u8()), Image.fromarray(u8())])
    if kind in ("P", "P+transparency"):
        image = Image.frombytes("P", (width, height), u8().tobytes())
        image.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if kind == "P+transparency":
            image.info["transparency"] = 7
        return image
    if kind == "I;16":
        data = rng.integers(0, 65536, (height, width), dtype=np.uint16).tobytes()
        return Image.frombytes("I;16", (width, height), data)
    if kind == "I":
        return Image.fromarray(rng.integers(-1000, 70000, (height, width), dtype=np.int32))
    if kind == "F":
        return Image.fromarray(rng.uniform(-10, 300, (height, width)).astype(np.float32))
    if kind == "1":
        return Image.fromarray(rng.integers(0, 2, (height, width)).astype(bool))
    raise ValueError(kind)


KINDS = ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "I;16", "I", "F", "1", "array3", "array4"]
EXTREMES = [(1, 2000), (2000, 1), (1, 1), (55, 176), (88, 55), (1, 7), (7, 1), (2000, 2000), (2, 1999)]


def random_sizes(rng, n):
    """Log-uniform sizes in [1, 2000]; numpy arrays need H not in {1, 3, 4} (read as CHW, as HF reads them)."""
    return [tuple(int(v) for v in np.exp(rng.uniform(0, np.log(2000), 2)).round()) for _ in range(n)]


def assert_same(ours, theirs, name):
    """ids/mask/sizes identical; pixel values within one 8-bit level (records the worst diff)."""
    for key in ("input_ids", "attention_mask", "image_sizes"):
        if key in theirs:
            np.testing.assert_array_equal(ours[key], np.asarray(theirs[key]), err_msg=key)
    if "pixel_values" in theirs:
        assert ours["pixel_values"].dtype == np.float32 and ours["image_sizes"].dtype == np.int64
        assert ours["pixel_values"].shape == theirs["pixel_values"].shape
        worst = float(np.abs(ours["pixel_values"] - theirs["pixel_values"]).max())
        WORST[name] = max(worst, WORST.get(name, 0.0))
        print(f"\nworst pixel diff {name}: {worst:.3g} (one level = {ONE_LEVEL:.4f})")
        assert worst <= ONE_LEVEL


def run_both(pair_, images, texts, **kw):
    ours, hf = pair_
    theirs = hf(images=images, text=texts, return_tensors="np", padding=True, **kw)
    return ours(images=images, text=texts, **kw), theirs


def test_random_images_all_modes_tiny_geometry(pair):
    rng = np.random.default_rng(0)
    sizes = random_sizes(rng, 45) + EXTREMES
    images = []
    for i, (h, w) in enumerate(sizes):
        kind = KINDS[i % len(KINDS)]
        if kind.startswith("array") and h in (1, 3, 4):
            h += 4
        images.append(make_image(rng, h, w, kind))
    texts = [f"USER: <image>\nimage {i}? ASSISTANT:" for i in range(len(images))]
    ours, theirs = run_both(pair("vicuna"), images, texts)
    assert_same(ours, theirs, "tiny geometry, 54 images, all modes")


def test_released_geometry_token_counts(pair):
    expected = {(480, 640): 2340, (1080, 1920): 1948, (300, 200): 984, (2000, 300): 1368, (899, 1024): 2634,
                (100, 1000): 1160}
    rng = np.random.default_rng(1)
    images = [make_image(rng, h, w, "RGB") for h, w in expected]
    texts = [f"[INST] <image>\nsize {i} [/INST]" for i in range(len(images))]
    ours, theirs = run_both(pair("released"), images, texts)
    assert_same(ours, theirs, "released geometry, token-count images")
    ours_proc = pair("released")[0]
    for row, size in enumerate(expected):
        hf_count = int((theirs["input_ids"][row] == ours_proc.image_token_id).sum())
        assert hf_count == expected[size] == anyres.num_image_tokens(size, ours_proc.geometry)


def test_released_geometry_random_and_extreme_images(pair):
    rng = np.random.default_rng(2)
    sizes = [(1, 2000), (2000, 1), (1, 1), (55, 176), (88, 55)] + random_sizes(rng, 15)
    images = [make_image(rng, h, w, KINDS[i % 11]) for i, (h, w) in enumerate(sizes)]
    texts = ["[INST] " + "<image>" * 10 + "\nfirst ten [/INST]", "[INST] " + "<image>" * 10 + " rest [/INST]"]
    ours, theirs = run_both(pair("released"), images, texts)
    assert_same(ours, theirs, "released geometry, random + extreme sizes")
    # the same images as one list per text
    nested = pair("released")[0](images=[images[:10], images[10:]], text=texts)
    np.testing.assert_array_equal(nested["input_ids"], ours["input_ids"])


def test_file_paths_exif_and_alpha(pair, tmp_path):
    """Paths: HF loads with EXIF transpose + convert("RGB"); PIL objects: no EXIF, alpha on white."""
    rng = np.random.default_rng(3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    jpeg, png = tmp_path / "photo.jpg", tmp_path / "alpha.png"
    make_image(rng, 40, 90, "RGB").save(jpeg, exif=exif)
    make_image(rng, 33, 61, "RGBA").save(png)
    images = [str(jpeg), str(png), Image.open(jpeg), Image.open(png)]
    texts = ["USER: <image><image> ASSISTANT:", "USER: <image>\n<image> ASSISTANT:"]
    ours, theirs = run_both(pair("vicuna"), images, texts)
    assert_same(ours, theirs, "file paths / EXIF / alpha")
    assert ours["image_sizes"].tolist() == [[90, 40], [33, 61], [40, 90], [33, 61]]
    # opt-in EXIF for PIL objects equals HF given the transposed image
    from PIL import ImageOps
    proc, hf = pair("vicuna")
    rotated = proc(images=[Image.open(jpeg)], text="<image>", apply_exif_orientation=True)
    expected = hf(images=[ImageOps.exif_transpose(Image.open(jpeg))], text="<image>", return_tensors="np")
    assert_same(rotated, expected, "EXIF opt-in")
    # Path objects work like str paths
    np.testing.assert_array_equal(proc(images=[jpeg], text="<image>")["pixel_values"],
                                  proc(images=[str(jpeg)], text="<image>")["pixel_values"])


# --- tokenizer, padding, decoding, chat templates per family ----------------------------------------

TEXTS = ["hello <image>\nWhat is the cat?  café 東京 🙂", " leading space and trailing ", "",
         "two <image> images <image>!", "can't won't it's 42, 2024.\n\n\tend", "<s> literal special </s> tokens"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenizer_encode_decode(pair, family, side):
    ours, hf = pair(family)
    tok = hf.tokenizer
    theirs = tok(TEXTS, padding=True, padding_side=side, return_tensors="np")
    ids, mask = ours.encode(TEXTS, padding_side=side)
    np.testing.assert_array_equal(ids, theirs["input_ids"])
    np.testing.assert_array_equal(mask, theirs["attention_mask"])
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == tok.batch_decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids[0], skip_special_tokens=skip) == tok.decode(ids[0], skip_special_tokens=skip)
    no_specials = ours.encode(TEXTS[:1], add_special_tokens=False)[0][0].tolist()
    assert no_specials == tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert ours.pad_token_id == tok.pad_token_id and ours.image_token_id == hf.image_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_default_padding_side_and_ids(pair, family):
    ours, hf = pair(family)
    expected = hf.tokenizer.padding_side if family in ("mistral", "vicuna", "chatml-34b") else "left"
    assert ours.padding_side == expected  # HF's Llama tokenizers default left; we default left everywhere


def conversations():
    img, txt = {"type": "image"}, lambda t: {"type": "text", "text": t}  # noqa: E731
    return [
        [{"role": "user", "content": [img, txt("What is shown in this image?")]}],
        [{"role": "user", "content": [txt("Compare"), img, img]},
         {"role": "assistant", "content": [txt("The left one is red.")]},
         {"role": "user", "content": [txt("And the right one?")]}],
        [{"role": "system", "content": [txt("Answer briefly.")]},
         {"role": "user", "content": [img, txt("Describe the picture.")]}],
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_and_full_call(pair, family):
    ours, hf = pair(family)
    rng = np.random.default_rng(4)
    for generation_prompt in (True, False):
        for conv in conversations():
            if family == "mistral" and conv[0]["role"] == "system" and not generation_prompt:
                continue
            assert ours.apply_chat_template(conv, add_generation_prompt=generation_prompt) == \
                hf.apply_chat_template(conv, add_generation_prompt=generation_prompt, tokenize=False)
    assert ours.apply_chat_template(conversations()[:2]) == [hf.apply_chat_template(c) for c in conversations()[:2]]
    prompts = ours.apply_chat_template(conversations()[:2], add_generation_prompt=True)
    assert prompts == [hf.apply_chat_template(c, add_generation_prompt=True) for c in conversations()[:2]]
    images = [make_image(rng, h, w, "RGB") for h, w in [(30, 70), (64, 20), (5, 5)]]
    for side in ("left", "right"):
        got, theirs = run_both((ours, hf), images, prompts, padding_side=side)
        assert_same(got, theirs, f"chat {family}")


@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_templates(tmp_path, family):
    """Without a shipped template the documented built-in format is used, rendered as HF would render it."""
    directory = write_processor_files(tmp_path, family, chat_template=False, **TINY)
    if family in ("mistral", "chatml-qwen2"):  # only config.json tells mistral from vicuna, qwen2 from Yi
        text_type = "mistral" if family == "mistral" else "qwen2"
        (directory / "config.json").write_text(json.dumps({"text_config": {"model_type": text_type}}))
    ours = LlavaNextProcessor.from_pretrained(directory)
    assert ours.chat_template == BUILTIN_TEMPLATES[family]
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    expected = {
        "mistral": "[INST] <image>\nQ? [/INST]",
        "vicuna": "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the human's questions. USER: <image>\nQ? ASSISTANT:",
        "chatml-34b": "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\n<image>\nQ?<|im_end|>\n"
                      "<|im_start|>assistant\n",
        "chatml-qwen2": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nQ?"
                        "<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ?<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
    }[family]
    assert ours.apply_chat_template(conv, add_generation_prompt=True) == expected
    string_conv = [{"role": "user", "content": "<image>\nQ?"}]
    assert ours.apply_chat_template(string_conv, add_generation_prompt=True) == expected
    hf = hf_processor(directory)
    for c in (conv, string_conv, conversations()[1]):
        assert ours.apply_chat_template(c, add_generation_prompt=True) == hf.apply_chat_template(
            c, chat_template=ours.chat_template, add_generation_prompt=True)


def test_hub_file_layout(tmp_path, pair):
    """preprocessor_config.json at top level (as on the hub), patch_size only in config.json."""
    src = pair("vicuna")[0]
    directory = write_processor_files(tmp_path, "vicuna", hub_layout=True, **TINY)
    proc_cfg = json.loads((directory / "processor_config.json").read_text())
    assert "image_processor" not in proc_cfg and (directory / "preprocessor_config.json").is_file()
    proc_cfg.pop("patch_size")
    (directory / "processor_config.json").write_text(json.dumps(proc_cfg))
    (directory / "config.json").write_text(json.dumps({"vision_config": {"patch_size": 14}}))
    loaded = LlavaNextProcessor.from_pretrained(directory)
    assert loaded.geometry == src.geometry
    image = make_image(np.random.default_rng(5), 50, 17, "RGB")
    pil = transformers.LlavaNextImageProcessorPil.from_pretrained(directory)
    np.testing.assert_array_equal(loaded.preprocess_images([image])[0], pil(image, return_tensors="np")["pixel_values"])


# --- errors name the culprit ------------------------------------------------------------------------

def test_bad_image_files(pair, tmp_path, monkeypatch):
    proc = pair("vicuna")[0]
    buf = io.BytesIO()
    make_image(np.random.default_rng(6), 64, 64, "RGB").save(buf, format="JPEG")
    jpeg = buf.getvalue()
    files = {"empty.jpg": b"", "garbage.png": b"not an image at all", "truncated.jpg": jpeg[:len(jpeg) * 6 // 10]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name):
            proc(images=[tmp_path / name], text="<image>")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        proc(images=[str(tmp_path / "missing.jpg")], text="<image>")
    with pytest.raises(IsADirectoryError, match=f"image file {tmp_path} is a directory"):
        proc(images=[str(tmp_path)], text="<image>")
    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ValueError, match=r"bomb\.png.*decompression-bomb.*MAX_IMAGE_PIXELS"):
        proc(images=[tmp_path / "bomb.png"], text="<image>")


def test_placeholder_count_and_zero_area(pair):
    proc = pair("vicuna")[0]
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"2 <image> placeholders.*1 images"):
        proc(images=[image], text="<image> and <image>")
    with pytest.raises(ValueError, match=r"text 1 \('b <image> <image>'\) has 2 <image> placeholders but 1 images"):
        proc(images=[[image], [image]], text=["a <image>", "b <image> <image>"])
    with pytest.raises(ValueError, match="0 images"):
        proc(text="<image>")
    for empty in (np.zeros((0, 5, 3), np.uint8), Image.new("RGB", (5, 0))):
        with pytest.raises(ValueError, match=r"image 1 has zero area"):
            proc(images=[image, empty], text="<image><image>")
    with pytest.raises(TypeError, match="float32"):
        proc(images=[image.astype(np.float32)], text="<image>")


def test_missing_and_corrupt_configs(tmp_path, dirs):
    def copy(name):
        target = tmp_path / name
        shutil.copytree(dirs["vicuna"], target)
        return target

    d = copy("no_tokenizer")
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_tokenizer/tokenizer\.json"):
        LlavaNextProcessor.from_pretrained(d)
    d = copy("corrupt")
    (d / "processor_config.json").write_text('{"image_processor": {')
    with pytest.raises(ValueError, match=r"corrupt/processor_config\.json is not valid JSON"):
        LlavaNextProcessor.from_pretrained(d)
    d = copy("no_pinpoints")
    cfg = json.loads((d / "processor_config.json").read_text())
    del cfg["image_processor"]["image_grid_pinpoints"]
    (d / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KeyError, match=r"no_pinpoints/processor_config\.json.*image_grid_pinpoints"):
        LlavaNextProcessor.from_pretrained(d)
    d = copy("bad_tokenizer")
    (d / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad_tokenizer/tokenizer\.json"):
        LlavaNextProcessor.from_pretrained(d)


@pytest.mark.parametrize("legacy", [True, False])
def test_old_llama_tokenizer_json(tmp_path, dirs, legacy):
    """Hub-era Llama tokenizer.json (Prepend/Replace normalizer, no pre-tokenizer): transformers 5 rebuilds
    the pipeline from tokenizer_config (legacy, add_prefix_space), and so must we."""
    from tokenizers import Tokenizer
    d = tmp_path / "old"
    shutil.copytree(dirs["mistral"], d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                               {"type": "Replace", "pattern": {"String": " "},
                                                                "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "legacy": legacy, "add_bos_token": True}))
    raw = [e.ids for e in Tokenizer.from_file(str(d / "tokenizer.json")).encode_batch(TEXTS)]
    ours, tok = LlavaNextProcessor.from_pretrained(d), hf_processor(d).tokenizer
    ids, _ = ours.encode(TEXTS, padding_side="right")
    theirs = tok(TEXTS, padding=True, padding_side="right", return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, theirs)
    assert [r for r in raw] != [t[t != ours.pad_token_id].tolist() for t in theirs]  # the rebuild mattered
    assert ours.batch_decode(ids, skip_special_tokens=True) == tok.batch_decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", ["released", "vicuna"])
def test_token_counts_and_best_resolution_many_sizes(pair, name):
    """anyres (our single source of counts) against HF's own count and best-resolution code, no pixels."""
    from transformers.image_processing_utils import select_best_resolution
    ours, hf = pair(name)
    rng = np.random.default_rng(7)
    sizes = [tuple(s) for s in rng.integers(1, 2001, (3000, 2))] + random_sizes(rng, 1000) + EXTREMES
    sizes += [(h, w) for h in range(1, 60) for w in range(1, 60)]
    theirs = hf._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [anyres.num_image_tokens(s, ours.geometry) for s in sizes] == theirs
    pinpoints = [list(p) for p in ours.geometry.pinpoints]
    assert all(anyres.select_best_resolution(s, pinpoints) == tuple(select_best_resolution(s, pinpoints))
               for s in sizes)


@pytest.mark.parametrize("family", ["mistral", "llama3"])
def test_chat_template_tokenize_with_images(pair, tmp_path, family):
    ours, hf = pair(family)
    rng = np.random.default_rng(8)
    path = tmp_path / "a.png"
    make_image(rng, 31, 77, "RGB").save(path)
    img, txt = {"type": "image", "image": make_image(rng, 60, 20, "RGBA")}, {"type": "text", "text": "Which?"}
    convs = [[{"role": "user", "content": [img, {"type": "image", "path": str(path)}, txt]}],
             [{"role": "user", "content": [img, txt]}]]
    got = ours.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   padding_side="left")
    theirs = hf.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    processor_kwargs=dict(return_tensors="np", padding=True, padding_side="left"))
    assert_same(got, dict(theirs), f"chat tokenize {family}")
    # a template that writes BOS itself: no second BOS (HF's rule)
    with_bos = "{{ bos_token }}" + ours.chat_template
    got = ours.apply_chat_template(convs[1], add_generation_prompt=True, tokenize=True, return_dict=True,
                                   chat_template=with_bos)
    theirs = hf.apply_chat_template(convs[1], add_generation_prompt=True, tokenize=True, return_dict=True,
                                    processor_kwargs=dict(return_tensors="np"), chat_template=with_bos)
    assert_same(got, dict(theirs), f"chat tokenize bos {family}")


def test_runtime_needs_no_transformers_or_torch(dirs):
    import subprocess
    import sys
    code = ("import sys, numpy as np; from llava_next_jax.processor import LlavaNextProcessor; "
            f"p = LlavaNextProcessor.from_pretrained({str(dirs['vicuna'])!r}); "
            "out = p(images=[np.zeros((9, 20, 3), np.uint8)], text='USER: <image> hi'); "
            "p.apply_chat_template([{'role': 'user', 'content': 'hi'}]); p.batch_decode(out['input_ids']); "
            "bad = [m for m in ('transformers', 'torch', 'jax') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parents[1]))


def test_template_globals_and_filters(pair):
    """tojson (HF's options: no HTML escaping, indent), strftime_now, raise_exception, loop controls."""
    import jinja2
    ours, hf = pair("mistral")
    template = ("{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ strftime_now('%Y') }}|"
                "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['role'] }}{% endfor %}")
    conv = [{"role": "user", "content": "<b>é & \"q\"</b>"}, {"role": "assistant", "content": "x"}]
    assert ours.apply_chat_template(conv, chat_template=template) == \
        hf.apply_chat_template(conv, chat_template=template, add_generation_prompt=True)
    with pytest.raises(jinja2.exceptions.TemplateError, match="Only user and assistant roles"):
        ours.apply_chat_template([{"role": "tool", "content": [{"type": "text", "text": "x"}]}])


# --- inputs in HF's other forms ---------------------------------------------------------------------

def test_arrays_channels_first_ambiguous_batched_and_tensors(pair):
    """Arrays as HF reads them: `[C, H, W]`, shapes that could be either way (read channels-first, as HF
    does), a 4-D batch, torch tensors."""
    import torch
    rng = np.random.default_rng(11)
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    images = [u8(3, 37, 61), u8(3, 61, 3), u8(4, 61, 4), torch.from_numpy(u8(37, 61, 3)), u8(40, 9, 3)]
    ours, theirs = run_both(pair("vicuna"), images, ["<image>" * len(images)])
    assert_same(ours, theirs, "array layouts")
    assert ours["image_sizes"].tolist() == [[37, 61], [61, 3], [61, 4], [37, 61], [40, 9]]
    ours, theirs = run_both(pair("vicuna"), u8(2, 37, 61, 3), ["<image><image>"])
    assert_same(ours, theirs, "4-D batch")


def test_chat_image_blocks_name_their_image_as_hf(pair, tmp_path):
    """Image blocks naming their image by "url" (a path), "path" or "base64", and OpenAI's "image_url" blocks
    (a data URI): the same prompt, ids and pixels as HF's; an http URL is fetched (HF's needs httpx, not
    installed here: checked against the same file by path)."""
    import base64
    import functools
    import http.server
    import threading
    ours, hf = pair("llama3")
    rng = np.random.default_rng(12)
    files = []
    for i, (h, w) in enumerate([(30, 50), (41, 17), (20, 20), (25, 60), (64, 33)]):
        make_image(rng, h, w, "RGB").save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    content = [{"type": "image", "url": str(files[0])}, {"type": "image", "path": str(files[1])},
               {"type": "image", "base64": encoded[2]},
               {"type": "image_url", "image_url": {"url": "data:image/png;base64," + encoded[3]}},
               {"type": "text", "text": "Which?"}]
    conv = [{"role": "user", "content": content}]
    assert ours.apply_chat_template(conv, add_generation_prompt=True) == \
        hf.apply_chat_template(conv, add_generation_prompt=True)
    got = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    theirs = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    processor_kwargs=dict(return_tensors="np"))
    assert_same(got, dict(theirs), "chat image blocks")
    assert got["image_sizes"].tolist() == [[30, 50], [41, 17], [20, 20], [25, 60]]
    np.testing.assert_array_equal(ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True),
                                  got["input_ids"])                        # without return_dict: the ids

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ask = lambda block: ours.apply_chat_template([{"role": "user", "content": [block, {"type": "text", "text": "?"}]}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=True)
    try:
        fetched = ask({"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{server.server_address[1]}/4.png"}})
    finally:
        server.shutdown()
    by_path = ask({"type": "image", "path": str(files[4])})
    for key in by_path:
        np.testing.assert_array_equal(fetched[key], by_path[key], err_msg=key)
    with pytest.raises(ValueError, match=r"image 0: image URL http://127\.0\.0\.1:9/x\.png cannot be fetched"):
        ours(images=["http://127.0.0.1:9/x.png"], text="<image>")
    with pytest.raises(ValueError, match=r"image 0: image data URI data:image/png;base64,\?\? cannot be read"):
        ours(images=["data:image/png;base64,??"], text="<image>")
    with pytest.raises(FileNotFoundError, match="image file abcd does not exist"):   # base64 of no image
        ours(images=["abcd"], text="<image>")


def outcome(fn, *args, **kwargs):
    """fn's result, or the name of the exception it raised."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - compared by type
        return type(e).__name__


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_defaults_and_continue_final_message_as_hf(pair, family):
    ours, hf = pair(family)
    txt = lambda t: {"type": "text", "text": t}  # noqa: E731
    blocks = [{"role": "user", "content": [{"type": "image"}, txt("Describe it.")]},
              {"role": "assistant", "content": [txt("It is a "), txt("red ")]}]
    strings = [{"role": "user", "content": "<image>\nDescribe it."}, {"role": "assistant", "content": "It is"}]
    for conv in (blocks, strings):     # the same text, or the same error (mistral's template reads a text
        for kw in ({}, {"continue_final_message": True}):   # block of each answer, and only its first)
            assert outcome(ours.apply_chat_template, conv, **kw) == outcome(hf.apply_chat_template, conv, **kw)
    with pytest.raises(ValueError, match="do not go together"):
        ours.apply_chat_template(strings, continue_final_message=True, add_generation_prompt=True)


def test_add_bos_eos_flags_are_ignored_as_in_transformers(tmp_path, dirs):
    """transformers 5 ignores tokenizer_config.json's add_bos_token / add_eos_token where there is a
    tokenizer.json: its post-processor, or none, decides."""
    for family in ("mistral", "llama3"):
        for drop in (False, True):
            d = tmp_path / f"{family}-{drop}"
            shutil.copytree(dirs[family], d)
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False, "add_eos_token": True}))
            if drop:
                spec = json.loads((d / "tokenizer.json").read_text())
                (d / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
            ours, tok = LlavaNextProcessor.from_pretrained(d), hf_processor(d).tokenizer
            ids, _ = ours.encode(TEXTS, padding_side="right")
            np.testing.assert_array_equal(ids, tok(TEXTS, padding=True, padding_side="right",
                                                   return_tensors="np")["input_ids"], err_msg=f"{family} {drop}")


def test_decode_one_id_or_a_batch_as_hf(pair):
    ours, hf = pair("llama3")
    ids = ours.encode(TEXTS[:3], padding_side="right")[0]
    assert ours.decode(int(ids[0, 1])) == hf.decode(int(ids[0, 1]))
    assert ours.decode(ids[0]) == hf.decode(ids[0])
    assert ours.decode(ids) == hf.decode(ids)                                  # 2-D: one text a row
    ragged = [ids[0, :3].tolist(), ids[1, :2].tolist()]
    assert ours.decode(ragged, skip_special_tokens=True) == hf.decode(ragged, skip_special_tokens=True)


def test_scalar_mean_and_std(tmp_path, dirs):
    d = tmp_path / "scalar"
    shutil.copytree(dirs["vicuna"], d)
    cfg = json.loads((d / "processor_config.json").read_text())
    cfg["image_processor"].update(image_mean=0.5, image_std=0.25)
    (d / "processor_config.json").write_text(json.dumps(cfg))
    image = make_image(np.random.default_rng(13), 30, 45, "RGB")
    ours, theirs = run_both((LlavaNextProcessor.from_pretrained(d), hf_processor(d)), [image], ["<image>"])
    assert_same(ours, theirs, "scalar mean and std")


def test_errors_name_the_text_or_image(pair):
    proc = pair("vicuna")[0]
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match="text 1 is a int: text must be a string or a list of strings"):
        proc(text=["a", 3])
    with pytest.raises(TypeError, match="image 2: unsupported image type NoneType"):
        proc(images=[image, image, None], text="<image>" * 3)
    with pytest.raises(TypeError, match=r"image 1: image array must be uint8.*float32 \(8, 8, 3\)"):
        proc(images=[image, image.astype(np.float32)], text="<image>" * 2)


def test_hf_text_options_and_return_tensors(pair):
    """HF's processor options as HF's model cards pass them (`return_tensors="pt"`, `padding=True`, ...),
    side by side with HF's on a batch of a short text with an image and a long text without."""
    import torch
    ours, hf = pair("mistral")
    rng = np.random.default_rng(11)
    images = [make_image(rng, 40, 60, "RGB")]
    texts = ["hello <image> world", "a much longer text without any image in it, and then a few words more"]
    for options in (dict(padding=True), dict(padding="longest"), dict(padding="max_length", max_length=80),
                    dict(padding=True, pad_to_multiple_of=16), dict(padding=True, truncation=True, max_length=20),
                    dict(padding=True, return_attention_mask=False), dict(padding="max_length", max_length=40,
                                                                         truncation=True, padding_side="right")):
        got = ours(images=images, text=texts, **options)
        theirs = hf(images=images, text=texts, return_tensors="np", **options)
        assert_same(got, theirs, f"options {options}")
        assert set(got) == set(theirs), options
    # one text needs no padding: padding=False as HF's
    assert_same(ours(images=images, text=texts[:1], padding=False),
                hf(images=images, text=texts[:1], return_tensors="np", padding=False), "padding=False")
    # truncation through image tokens: an error in both
    with pytest.raises(ValueError, match="image"):
        hf(images=images, text=texts, return_tensors="np", padding=True, truncation=True, max_length=12)
    with pytest.raises(ValueError, match="text 0: truncation to max_length=12 would cut its image tokens"):
        ours(images=images, text=texts, truncation=True, max_length=12)
    # where HF returns ragged lists, ours says why it cannot make one array
    with pytest.raises(ValueError, match=r"padding=False, but the texts have different lengths \[\d+, \d+\]"):
        ours(images=images, text=texts, padding=False)
    with pytest.raises(ValueError, match=r"text 0 has \d+ tokens, more than max_length=10"):
        ours(images=images, text=texts, padding="max_length", max_length=10)
    with pytest.raises(ValueError, match=r"max_length=None; padding='max_length' and truncation need a positive int"):
        ours(text=texts[1:], padding="max_length")   # the tiny tokenizer_config.json names no usable model_max_length
    with pytest.raises(ValueError, match="max_length=0; "):
        ours(text=texts[1:], truncation=True, max_length=0)
    with pytest.raises(ValueError, match="padding='sideways'"):
        ours(text=texts[1:], padding="sideways")
    with pytest.raises(ValueError, match="return_tensors='tf'"):
        ours(text=texts[1:], return_tensors="tf")
    # torch and jax arrays of the same values
    pt, theirs = ours(images=images, text=texts, return_tensors="pt"), hf(images=images, text=texts, return_tensors="pt",
                                                                          padding=True)
    assert set(pt) == set(theirs)
    for key in pt:
        assert isinstance(pt[key], torch.Tensor) and pt[key].dtype == theirs[key].dtype, key
        np.testing.assert_allclose(pt[key].numpy(), theirs[key].numpy(), atol=ONE_LEVEL)
    got = ours(images=images, text=texts, return_tensors="jax")
    for key, value in ours(images=images, text=texts).items():   # int32 without jax's x64 mode
        assert type(got[key]).__module__.startswith("jax"), key
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)
    # apply_chat_template passes them on, as kwargs or in processor_kwargs (HF 5's place for them)
    conv = [[{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "Which?"}]}],
            [{"role": "user", "content": [{"type": "text", "text": texts[1]}]}]]
    theirs = hf.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                    processor_kwargs=dict(return_tensors="pt", padding="max_length", max_length=90))
    for extra in (dict(return_tensors="pt", padding="max_length", max_length=90),
                  dict(processor_kwargs=dict(return_tensors="pt", padding="max_length", max_length=90))):
        got = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, **extra)
        assert set(got) == set(theirs)
        for key in got:
            np.testing.assert_allclose(got[key].numpy(), theirs[key].numpy(), atol=ONE_LEVEL, err_msg=key)


@pytest.mark.parametrize("force", [False, True])
def test_decode_clean_up_tokenization_spaces_as_hf(dirs, tmp_path, force):
    """`clean_up_tokenization_spaces` as HF's decode takes it (HF's model cards pass it): the call's,
    else tokenizer_config.json's, never applied to a BPE tokenizer unless its config forces it."""
    import warnings
    directory = tmp_path / "proc"
    shutil.copytree(dirs["mistral"], directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.update(clean_up_tokenization_spaces=True,
                  clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=force)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = LlavaNextProcessor.from_pretrained(directory), hf_processor(directory)
    ids = hf.tokenizer(["Hello , world ! it 's a test .", "don 't stop ?"], padding=True)["input_ids"]
    outputs = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # HF's note that it ignores the option for BPE
        for option in ({}, dict(clean_up_tokenization_spaces=True), dict(clean_up_tokenization_spaces=False)):
            theirs = hf.batch_decode(ids, skip_special_tokens=True, **option)
            assert ours.batch_decode(ids, skip_special_tokens=True, **option) == theirs, option
            assert ours.decode(ids[1], skip_special_tokens=True, **option) == theirs[1], option
            outputs.add(tuple(theirs))
    assert len(outputs) == (2 if force else 1)   # the option changed something where it applies
