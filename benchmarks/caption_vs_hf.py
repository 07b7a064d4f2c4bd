"""Captioning throughput: `LlavaNext.caption` beside HF transformers doing the same job, same process.

    .venv/bin/python benchmarks/caption_vs_hf.py [--images 8] [--batch 4] [--new-tokens 32] [--repeats 2]

The job: N photo-like images of mixed sizes (deterministic), the question "Describe this image in
one sentence." through the checkpoint's chat template, greedy, --new-tokens new tokens per image
(min_new_tokens = max_new_tokens on both sides, so both do the same amount of work whatever the
random weights emit), batches of --batch.
  ours: `model.caption(images, batch_size=B, max_new_tokens=T, min_new_tokens=T)` (processor, batching,
        generate, decode all inside).
  HF:   a plain loop over chunks of B: `LlavaNextProcessor(images=chunk, text=[prompt] * B, padding=True)`
        (left padding), `generate(do_sample=False, max_new_tokens=T, min_new_tokens=T)`, `batch_decode`
        of the new tokens.
Model: benchmarks/generate_vs_hf.py's `mid` shape (336px tiles, CLIP 4 x 256, decoder 8 x 1024, vocab
32064), float32, random weights built by transformers and converted by our converter. Processor files:
tests/tiny_tokenizers.py's `mistral` family at 336px with the released pinpoints; its tokenizer has 523
ids, so the config's image_token_index is set to that tokenizer's `<image>` id and lm_head rows past
the tokenizer are zeroed (both frameworks then emit ids the tokenizer can decode; same weights both sides).

Prints images/s for ours and HF (median over --repeats full passes, after the first pass), the first
pass (ours: compilation included; HF: warm-up) separately, and how many captions are equal.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

PROMPT = "Describe this image in one sentence."
SIZES = [(480, 640), (768, 1024), (1080, 1920), (1500, 500), (600, 800), (640, 480), (720, 1280), (2000, 3000)]


def photo_like(n: int, seed: int = 0):
    """n deterministic RGB PIL images (h, w from SIZES, cycled): sky/ground gradients, blobs, texture."""
    from PIL import Image, ImageFilter
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        y = np.linspace(0, 1, h)[:, None, None]
        x = np.linspace(0, 1, w)[None, :, None]
        sky, ground = rng.uniform(60, 230, 3), rng.uniform(20, 160, 3)
        horizon = rng.uniform(0.35, 0.7) + 0.05 * np.sin(x * rng.uniform(3, 12))
        pixels = np.where(y < horizon, sky * (1 - 0.4 * y), ground * (0.6 + 0.4 * y)) + 0 * x
        for _ in range(6):   # soft blobs ("objects")
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
            blob = np.exp(-(((y - cy) * h) ** 2 + ((x - cx) * w) ** 2) / (2 * (r * min(h, w)) ** 2))
            pixels = pixels * (1 - blob) + rng.uniform(0, 255, 3) * blob
        pixels = pixels + rng.normal(0, 8, (h, w, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1))
        images.append(image)
    return images


def build(work: str):
    """(our model, HF model, HF processor) on the mid shape with the tiny mistral processor files."""
    import torch
    from generate_vs_hf import hf_model
    from tiny_tokenizers import tokenizer_info, write_processor_files
    from transformers import LlavaNextForConditionalGeneration
    from transformers import LlavaNextProcessor as HFProcessor
    from llava_next_jax import LlavaNext
    from llava_next_jax.convert_cli import convert_checkpoint
    hf_dir, out_dir = os.path.join(work, "hf"), os.path.join(work, "out")
    info = tokenizer_info("mistral")
    hf = hf_model("mid", "float32", "cpu")
    assert hf.config.text_config.vocab_size >= info["vocab_size"]
    with torch.no_grad():
        hf.lm_head.weight[info["vocab_size"]:] = 0
    hf.config.image_token_id = info["image_token_id"]
    hf.save_pretrained(hf_dir)
    write_processor_files(hf_dir, "mistral", image_size=336, patch_size=14)
    del hf
    convert_checkpoint(hf_dir, out_dir, log=lambda *_: None)
    hf = LlavaNextForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert hf.config.image_token_id == info["image_token_id"], hf.config
    processor = HFProcessor.from_pretrained(hf_dir)
    processor.tokenizer.padding_side = "left"
    return LlavaNext.from_pretrained(out_dir, dtype="float32"), hf, processor


def hf_caption(model, processor, images, batch, new_tokens):
    import torch
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        inputs = processor(images=chunk, text=[prompt] * len(chunk), padding=True, return_tensors="pt",
                           add_special_tokens=not (bos and prompt.startswith(bos)))
        with torch.no_grad():
            tokens = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    pad_token_id=processor.tokenizer.pad_token_id)
        new = tokens[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in processor.batch_decode(new, skip_special_tokens=True)]
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import jax
    import torch
    import transformers
    work = tempfile.mkdtemp(prefix="llava_caption_bench_")
    ours, hf, processor = build(work)
    images = photo_like(args.images)
    n, B, T = len(images), args.batch, args.new_tokens
    run_ours = lambda: ours.caption(images, PROMPT, batch_size=B, max_new_tokens=T, min_new_tokens=T)  # noqa: E731
    run_hf = lambda: hf_caption(hf, processor, images, B, T)  # noqa: E731

    first_ours, caps_ours = timed(run_ours)
    first_hf, caps_hf = timed(run_hf)
    ours_s, hf_s = [], []
    for _ in range(args.repeats):   # interleaved, so load on the shared machine hits both alike
        ours_s.append(timed(run_ours)[0])
        hf_s.append(timed(run_hf)[0])
    o, h = n / statistics.median(ours_s), n / statistics.median(hf_s)
    equal = sum(a == b for a, b in zip(caps_ours, caps_hf))
    print(f"# mid shape, float32, {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, transformers "
          f"{transformers.__version__}, torch {torch.__version__}; {n} images "
          f"({', '.join(f'{w}x{h_}' for h_, w in SIZES[:n])}), batch {B}, {T} new tokens, "
          f"median of {args.repeats} passes")
    print("| | images/s | first pass s (ours: compile included) |")
    print("|---|---|---|")
    print(f"| ours (`LlavaNext.caption`) | {o:.3f} | {first_ours:.1f} |")
    print(f"| HF (processor + generate loop) | {h:.3f} | {first_hf:.1f} |")
    print(f"| ours/HF | **{o / h:.2f}x** | |")
    print(f"captions equal: {equal}/{n}; e.g. ours {caps_ours[0]!r} / HF {caps_hf[0]!r}")
    print(f"passes, s: ours {[round(s, 1) for s in ours_s]}, HF {[round(s, 1) for s in hf_s]}")


if __name__ == "__main__":
    main()
