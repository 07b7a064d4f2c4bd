"""Converter peak memory against checkpoint size, on a random checkpoint written in HF's layout.

    .venv/bin/python benchmarks/convert_memory.py [--shape mid|7b|34b|72b|...] [--layers N] [--dtype bfloat16]
        [--workdir DIR]

Writes an HF-layout safetensors checkpoint (sharded, ~1 GiB a shard, with index) with numpy alone,
then runs `scripts/convert_torch_weights.py` in a fresh process and reports its peak RSS beside the
checkpoint size and the largest tensor. The claim under test: peak memory follows the largest
tensor, not the model. Shapes other than `mid` are the released checkpoints (`presets.RELEASES`;
`7b` is mistral-7b); `--layers N` keeps a release's widths (vocabulary, hidden, ffn, heads) with
fewer decoder layers, so the 34B and 72B tensors can be converted on a small disk. Both directories
are deleted afterwards unless --workdir is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llava_next_jax import presets  # noqa: E402

# decoder 8 x 2048, CLIP-L: about 1.5 GiB in bf16
MID_TEXT = dict(model_type="mistral", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=4, vocab_size=32064, sliding_window=None)
ALIASES = {"7b": "mistral-7b"}
SHAPES = ["mid", *ALIASES, *presets.RELEASES]


def raw_config(shape: str, layers: int | None) -> dict:
    """The config.json of `shape`, with `layers` decoder layers if given."""
    override = {} if layers is None else {"num_hidden_layers": layers}
    if shape == "mid":
        raw = presets.raw_config("mistral-7b")
        raw["text_config"] = {**MID_TEXT, **override}
        return raw
    return presets.raw_config(ALIASES.get(shape, shape), **override)


def hf_tensors(config):
    """(HF name, torch shape) for every tensor of an HF 2024-layout checkpoint of `config`."""
    from llava_next_jax.convert import expected_shapes, hf_tensor
    for path, shape in expected_shapes(config).items():
        yield hf_tensor(path, shape)


def random_tensor(rng, shape, dtype, rows_per_block=1024):
    """0.02 * N(0, 1) in `dtype`, drawn a block of rows at a time (no float32 copy of a 2.5 GB embedding)."""
    out = np.empty(shape, dtype)
    flat = out.reshape(shape[0], -1) if len(shape) > 1 else out.reshape(1, -1)
    for start in range(0, flat.shape[0], rows_per_block):
        block = flat[start:start + rows_per_block]
        block[...] = 0.02 * rng.standard_normal(block.shape, np.float32)
    return out


def write_checkpoint(out_dir, raw, dtype, shard_bytes=1 << 30):
    from llava_next_jax.config import LlavaNextConfig
    raw = dict(raw, torch_dtype=dtype)
    config = LlavaNextConfig.from_dict(raw)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(raw, f)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
    rng = np.random.default_rng(0)
    shard, size, weight_map, files = {}, 0, {}, []

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name))
        files.append(name)
        weight_map.update(dict.fromkeys(shard, name))
        shard, size = {}, 0

    for name, torch_shape in hf_tensors(config):
        shard[name] = random_tensor(rng, torch_shape, np_dtype)
        size += shard[name].nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=SHAPES, default="mid")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's own)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="llava_convert_bench_")
    try:
        t = time.time()
        raw = raw_config(args.shape, args.layers)
        label = args.shape + ("" if args.layers is None else f" widths, {args.layers} layer{'s' * (args.layers != 1)}")
        ckpt_bytes = write_checkpoint(os.path.join(work, "hf"), raw, args.dtype)
        print(f"wrote {ckpt_bytes / 2**30:.2f} GiB random {label} checkpoint in {time.time() - t:.0f} s", flush=True)
        code = ("import json, sys; from llava_next_jax.convert_cli import convert_checkpoint; "
                "s = convert_checkpoint(sys.argv[1], sys.argv[2], log=lambda *_: None); print(json.dumps(s))")
        out = subprocess.run([sys.executable, "-c", code, os.path.join(work, "hf"), os.path.join(work, "out")],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        gib = lambda b: b / 2**30
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(work, "out"))
                        for f in files)
        print(f"| {label} ({args.dtype}) | {gib(ckpt_bytes):.2f} GiB | {gib(stats['largest_tensor_bytes']):.2f} GiB "
              f"| {gib(stats['peak_rss_bytes']):.2f} GiB | {stats['seconds']:.0f} s | {gib(out_bytes):.2f} GiB |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
