"""What streaming costs: `generate` against `generate_stream` (chunk 1 and 8), ours alone, same inputs.

    .venv/bin/python benchmarks/stream_overhead.py [--shape mid] [--dtype float32] [--new-tokens 64]
        [--repeats 3] [--image-size 480 640]

A model of generate_vs_hf.py (random weights; on a GPU where JAX and PyTorch both see one), batch 1,
one image; each call is the prefill plus the new tokens. A chunk returns to Python between decode steps (one dispatch and a
fetch of the step and the done flags), so the difference is that overhead. The streamed tokens are
checked to equal generate's first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import SHAPES, build_models, make_inputs, seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch
    import jax
    import torch
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    hf_model, model = build_models(args.shape, args.dtype, device)
    del hf_model
    inputs = make_inputs(model.config, 1, tuple(args.image_size))
    N = args.new_tokens
    calls = {"generate": lambda: model.generate(**inputs, max_new_tokens=N, eos_token_id=[])}
    for chunk in (1, 8):
        calls[f"generate_stream, chunk {chunk}"] = lambda chunk=chunk: np.concatenate(
            list(model.generate_stream(**inputs, max_new_tokens=N, eos_token_id=[], chunk=chunk)), axis=1)
    reference = calls["generate"]()
    for name, call in calls.items():
        assert (call() == reference).all(), name
    times = {name: [] for name in calls}
    for _ in range(args.repeats):   # take turns, so that load from other work falls on all
        for name, call in calls.items():
            times[name].append(seconds(call))
    base = statistics.median(times["generate"])
    print(f"# {args.shape}, {args.dtype}, {jax.devices()[0].device_kind}, image {args.image_size[0]}x{args.image_size[1]}")
    print(f"| call ({args.shape}, batch 1, prefill + {N} tokens) | seconds | against generate |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.3f}x |")


if __name__ == "__main__":
    main()
