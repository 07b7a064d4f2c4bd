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
--repeats, after one warm-up call; ours and HF take turns within each repeat, so that load from
other work on a shared machine falls on both.
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


def ours(model, inputs, new_tokens):
    """(first call s, prefill timer, decode timer): the prefill and decode programs timed apart.

    The prefill timer returns seconds; the decode timer runs a fresh prefill (untimed, its cache is
    donated to the decode loop) and returns decode tokens/s."""
    import jax
    from llava_next_jax import generate
    args = model.generation_inputs(**inputs, max_new_tokens=new_tokens, eos_token_id=[])
    new_bucket, options = args.pop("new_bucket"), args.pop("options")
    rows = inputs["input_ids"].shape[0]

    def prefill():
        return jax.block_until_ready(generate.prefill_program(model.params, model.config, **args,
                                                              cache_length=args["input_ids"].shape[1] + new_bucket))

    def decode(state):
        logits, cache, kv_valid = state
        return jax.block_until_ready(generate.decode_program(model.params, model.config, logits, cache, kv_valid,
                                                             options, args["dtype"], new_bucket)[0])

    def decode_rate():
        state = prefill()
        return new_tokens * rows / seconds(lambda: decode(state))
    first = seconds(lambda: decode(prefill()))
    return first, lambda: seconds(prefill), decode_rate


class _TokenTimes:
    """A generate streamer that notes when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def hf(model, inputs, new_tokens, dtype):
    """(first call s, prefill timer, decode timer): prefill = `generate` of one token; decode
    tokens/s from the spacing of token arrivals through a streamer in a full `generate`."""
    import torch
    args = {k: torch.from_numpy(v) for k, v in inputs.items()}
    args["pixel_values"] = args["pixel_values"].to(getattr(torch, dtype))
    rows = inputs["input_ids"].shape[0]

    def run(n, streamer=None):
        with torch.no_grad():
            return model.generate(**args, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  streamer=streamer)

    def decode_rate():
        times = _TokenTimes()
        run(new_tokens, times)
        new = times.times[1:]  # arrival of new tokens 1..n; token 1 comes from the prefill
        return (len(new) - 1) / (new[-1] - new[0]) * rows
    first = seconds(lambda: run(new_tokens))
    return first, lambda: seconds(lambda: run(1)), decode_rate


def interleaved(runners, repeats):
    """Medians of (prefill s, decode tok/s) per runner, the runners taking turns in each repeat so that
    a change in the machine's load falls on both sides alike."""
    samples = [([], []) for _ in runners]
    for _ in range(repeats):
        for (_, prefill, decode), (p, d) in zip(runners, samples):
            p.append(prefill())
            d.append(decode())
    return [(statistics.median(p), statistics.median(d)) for p, d in samples]


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
    hf_model = build_checkpoint(args.shape, args.dtype, os.path.join(work, "hf"))
    convert_checkpoint(os.path.join(work, "hf"), os.path.join(work, "out"), log=lambda *_: None)
    ours_model = LlavaNext.from_pretrained(os.path.join(work, "out"))
    if args.skip_hf:
        del hf_model
    print(f"# {args.shape}, {args.dtype}, {jax.devices()[0].device_kind}, new tokens {args.new_tokens}")
    print("| batch | prompt tokens | | prefill s | decode tok/s | first call s |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        inputs = make_inputs(hf_model.config if not args.skip_hf else _config(work), batch)
        T = inputs["input_ids"].shape[1]
        runners = [ours(ours_model, inputs, args.new_tokens)]
        if not args.skip_hf:
            runners.append(hf(hf_model, inputs, args.new_tokens, args.dtype))
        results = interleaved(runners, args.repeats)
        for name, (first, _, _), (prefill_s, rate) in zip(["ours", "HF"], runners, results):
            print(f"| {batch} | {T} | {name} | {prefill_s:.2f} | {rate:.1f} | {first:.1f} |", flush=True)
        if not args.skip_hf:
            (o_prefill, o_rate), (h_prefill, h_rate) = results
            print(f"| {batch} | {T} | ours/HF speed | {h_prefill / o_prefill:.2f}x | {o_rate / h_rate:.2f}x | |",
                  flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          f"({'ours only' if args.skip_hf else 'both frameworks in one process'})")


def _config(work):
    from transformers import LlavaNextConfig
    return LlavaNextConfig.from_pretrained(os.path.join(work, "hf"))


if __name__ == "__main__":
    main()
