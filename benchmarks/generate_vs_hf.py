"""Generation speed: ours (JAX, XLA) beside HF transformers (PyTorch eager), same weights, same inputs.

    .venv/bin/python benchmarks/generate_vs_hf.py [--shape mid|7b] [--dtype float32|bfloat16]
        [--batch 1 4] [--new-tokens 64] [--repeats 3] [--skip-hf]

`mid`: 336px tiles, CLIP 4 x 256, decoder 8 x 1024 (GQA 16/4, ffn 4096), vocab 32064, one 480x640
image per row (~2.4k prompt tokens). `7b`: full CLIP-L and Mistral-7B sizes (for a GPU; bf16).
Random weights: built by transformers, saved, converted by our converter, so both run the same numbers.

Prints, per batch size: prefill seconds (prompt + image through to the first token's logits),
decode tokens/s (new tokens x rows / decode seconds), first-call seconds (compile included), the
ratios ours/HF, and peak RSS of this process (both frameworks; see --skip-hf for ours alone).
Ours: the prefill and decode programs are timed apart. HF: prefill = `generate` of one token;
decode = the spacing of token arrivals through a streamer in a full `generate`. Medians over
--repeats, after one warm-up call.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "mid": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
                text=dict(model_type="mistral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, vocab_size=32064, sliding_window=None)),
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
               text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_checkpoint(shape: str, dtype: str, path: str):
    import torch
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    spec = SHAPES[shape]
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=336, patch_size=14, **spec["vision"]),
        text_config=spec["text"], image_token_index=32000, image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    torch_dtype = getattr(torch, dtype)
    with torch.device("cpu"):
        model = LlavaNextForConditionalGeneration(config).to(torch_dtype).eval()
    model.save_pretrained(path)
    return model


def make_inputs(config, batch: int, prompt_text: int = 40, image_size=(480, 640), seed=0):
    from llava_next_jax.config import LlavaNextConfig
    ours = LlavaNextConfig.from_dict(config.to_dict())
    from llava_next_jax import anyres
    rng = np.random.default_rng(seed)
    n_image = anyres.num_image_tokens(image_size, ours.geometry)
    row = list(rng.integers(3, 32000, 10)) + [32000] * n_image + list(rng.integers(3, 32000, prompt_text))
    tiles = anyres.num_tiles(image_size, ours.geometry)
    return dict(input_ids=np.array([row] * batch, np.int64), attention_mask=np.ones((batch, len(row)), np.int64),
                pixel_values=rng.standard_normal((batch, tiles, 3, 336, 336)).astype(np.float32),
                image_sizes=np.array([image_size] * batch, np.int64))


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn, repeats):
    return statistics.median(seconds(fn) for _ in range(repeats))


def bench_ours(model, inputs, new_tokens, repeats):
    """(first call s, prefill s, decode tok/s), timing the prefill and decode programs apart."""
    import jax
    from llava_next_jax import generate
    args = model.generation_inputs(**inputs, max_new_tokens=new_tokens, eos_token_id=[])
    new_bucket, options = args.pop("new_bucket"), args.pop("options")

    def prefill():
        return jax.block_until_ready(generate.prefill_program(model.params, model.config, **args,
                                                              cache_length=args["input_ids"].shape[1] + new_bucket))

    def decode(state):
        logits, cache, kv_valid = state
        return jax.block_until_ready(generate.decode_program(model.params, model.config, logits, cache, kv_valid,
                                                             options, args["dtype"], new_bucket)[0])
    first = seconds(lambda: decode(prefill()))
    prefill_s = median_seconds(prefill, repeats)
    decode_s = []
    for _ in range(repeats):
        state = prefill()
        decode_s.append(seconds(lambda: decode(state)))
    rows = inputs["input_ids"].shape[0]
    return first, prefill_s, new_tokens * rows / statistics.median(decode_s)


class _TokenTimes:
    """A generate streamer that notes when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def bench_hf(model, inputs, new_tokens, repeats, dtype):
    """(first call s, prefill s, decode tok/s): prefill = generate of one token; decode from token times."""
    import torch
    args = {k: torch.from_numpy(v) for k, v in inputs.items()}
    args["pixel_values"] = args["pixel_values"].to(getattr(torch, dtype))

    def run(n, streamer=None):
        with torch.no_grad():
            return model.generate(**args, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  streamer=streamer)
    first = seconds(lambda: run(new_tokens))
    prefill_s = median_seconds(lambda: run(1), repeats)
    rates = []
    for _ in range(repeats):
        times = _TokenTimes()
        run(new_tokens, times)
        new = times.times[1:]  # arrival of new tokens 1..n; token 1 comes from the prefill
        rates.append((len(new) - 1) / (new[-1] - new[0]))
    rows = inputs["input_ids"].shape[0]
    return first, prefill_s, statistics.median(rates) * rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    import jax
    from llava_next_jax import LlavaNext
    from llava_next_jax.convert_cli import convert_checkpoint
    work = tempfile.mkdtemp(prefix="llava_gen_bench_")
    hf = build_checkpoint(args.shape, args.dtype, os.path.join(work, "hf"))
    convert_checkpoint(os.path.join(work, "hf"), os.path.join(work, "out"), log=lambda *_: None)
    ours = LlavaNext.from_pretrained(os.path.join(work, "out"))
    if args.skip_hf:
        del hf
    print(f"# {args.shape}, {args.dtype}, {jax.devices()[0].device_kind}, new tokens {args.new_tokens}")
    print("| batch | prompt tokens | | prefill s | decode tok/s | first call s |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        inputs = make_inputs(hf.config if not args.skip_hf else _config(work), batch)
        T = inputs["input_ids"].shape[1]
        o = bench_ours(ours, inputs, args.new_tokens, args.repeats)
        print(f"| {batch} | {T} | ours | {o[1]:.2f} | {o[2]:.1f} | {o[0]:.1f} |", flush=True)
        if not args.skip_hf:
            h = bench_hf(hf, inputs, args.new_tokens, args.repeats, args.dtype)
            print(f"| {batch} | {T} | HF | {h[1]:.2f} | {h[2]:.1f} | {h[0]:.1f} |")
            print(f"| {batch} | {T} | ours/HF speed | {h[1] / o[1]:.2f}x | {o[2] / h[2]:.2f}x | |", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          f"({'ours only' if args.skip_hf else 'both frameworks in one process'})")


def _config(work):
    from transformers import LlavaNextConfig
    return LlavaNextConfig.from_pretrained(os.path.join(work, "hf"))


if __name__ == "__main__":
    main()
