"""Converter peak memory against checkpoint size, on a random checkpoint written in HF's layout.

    .venv/bin/python benchmarks/convert_memory.py [--shape mid|7b] [--dtype bfloat16] [--workdir DIR]

Writes an HF-layout safetensors checkpoint (sharded, ~1 GiB a shard, with index) with numpy alone,
then runs `scripts/convert_torch_weights.py` in a fresh process and reports its peak RSS beside the
checkpoint size and the largest tensor. The claim under test: peak memory follows the largest
tensor, not the model.
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

SHAPES = {
    # decoder 8 x 2048, CLIP-L: about 2.3 GB in bf16
    "mid": dict(text=dict(model_type="mistral", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, vocab_size=32064, sliding_window=None)),
    # llava-v1.6-mistral-7b: 15 GB in bf16
    "7b": dict(text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, sliding_window=None,
                         rope_theta=1e6)),
}
CLIP_L = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=336, patch_size=14)


def hf_tensors(config):
    """(HF name, torch shape) for every tensor of an HF 2024-layout checkpoint of `config`."""
    from llava_next_jax.convert import expected_shapes, hf_tensor
    for path, shape in expected_shapes(config).items():
        yield hf_tensor(path, shape)


def write_checkpoint(out_dir, shape, dtype, shard_bytes=1 << 30):
    from llava_next_jax.config import LlavaNextConfig
    raw = {"model_type": "llava_next", "vision_config": CLIP_L, "text_config": SHAPES[shape]["text"],
           "image_token_index": 32000, "torch_dtype": dtype}
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
        shard[name] = (0.02 * rng.standard_normal(torch_shape, np.float32)).astype(np_dtype)
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
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="llava_convert_bench_")
    try:
        t = time.time()
        ckpt_bytes = write_checkpoint(os.path.join(work, "hf"), args.shape, args.dtype)
        print(f"wrote {ckpt_bytes / 2**30:.2f} GiB random {args.shape} checkpoint in {time.time() - t:.0f} s",
              flush=True)
        code = ("import json, sys; from llava_next_jax.convert_cli import convert_checkpoint; "
                "s = convert_checkpoint(sys.argv[1], sys.argv[2], log=lambda *_: None); print(json.dumps(s))")
        out = subprocess.run([sys.executable, "-c", code, os.path.join(work, "hf"), os.path.join(work, "out")],
                             capture_output=True, text=True, cwd=ROOT, check=True).stdout
        stats = json.loads(out.strip().splitlines()[-1])
        gib = lambda b: b / 2**30
        print(f"| {args.shape} ({args.dtype}) | {gib(ckpt_bytes):.2f} GiB | {gib(stats['largest_tensor_bytes']):.2f} GiB "
              f"| {gib(stats['peak_rss_bytes']):.2f} GiB | {stats['seconds']:.0f} s |")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
