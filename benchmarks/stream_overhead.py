"""What streaming costs: `generate` against `generate_stream` (chunk 1 and 8), ours alone, same inputs.

    .venv/bin/python benchmarks/stream_overhead.py [--shape mid] [--new-tokens 64] [--repeats 3]

The mid-size model of generate_vs_hf.py (random weights), batch 1, one 480x640 image; each call is
the prefill plus the new tokens. A chunk returns to Python between decode steps (one dispatch and a
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
from generate_vs_hf import build_models, make_inputs, seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, model = build_models(args.shape, "float32", "cpu")
    inputs = make_inputs(model.config, 1, (480, 640))
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
    print(f"| call ({args.shape}, batch 1, prefill + {N} tokens) | seconds | against generate |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / base:.3f}x |")


if __name__ == "__main__":
    main()
