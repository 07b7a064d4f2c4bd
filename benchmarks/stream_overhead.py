"""What streaming costs: `generate` against `generate_stream` (chunk 1 and 8), ours alone, same inputs.

    .venv/bin/python benchmarks/stream_overhead.py [--shape mid] [--dtype float32] [--new-tokens 64]
        [--repeats 3] [--image-size 480 640]

A model of generate_vs_hf.py (random weights; on a GPU where JAX and PyTorch both see one), batch 1,
one image; each call is the prefill plus the new tokens. A chunk returns to Python between decode
steps (one dispatch and a fetch of the step and the done flags), so the difference is that overhead. The streamed tokens are
checked to equal generate's first.

--parts: where a chunk's time goes instead: the decode loop's time a step (`generate.decode_program`,
one call) beside one-step calls of `generate.decode_chunk_program` (options as numpy, as
`stream_tokens` passes them, and placed on the device once; the chunk program compiled as it is and,
with --no-command-buffers, with XLA's GPU command buffers off for it alone), and the fetch of a
chunk's four arrays one by one and together.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import SHAPES, build_models, make_inputs, median_seconds, seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--no-command-buffers", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch
    import jax
    import torch
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    hf_model, model = build_models(args.shape, args.dtype, device)
    del hf_model
    inputs = make_inputs(model.config, 1, tuple(args.image_size))
    N = args.new_tokens
    print(f"# {args.shape}, {args.dtype}, {jax.devices()[0].device_kind}, image {args.image_size[0]}x{args.image_size[1]}")
    if args.parts:
        return parts(model, inputs, N, args.no_command_buffers)
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


def parts(model, inputs, N: int, no_command_buffers: bool):
    import jax
    from llava_next_jax import generate
    args = model.generation_inputs(**inputs, max_new_tokens=N, eos_token_id=[])
    options, dtype, new_bucket = args.pop("options"), args.pop("dtype"), args.pop("new_bucket")
    args.pop("lookup"), args.pop("samples"), args.pop("timed"), args.pop("guided"), args.pop("negative")   # all off
    params, config = model.params, model.config

    def prefill():
        return generate.prefill_program(params, config, *args.values(), dtype, args["input_ids"].shape[1] + new_bucket)

    def whole_loop():
        logits, cache, kv_valid = prefill()
        jax.block_until_ready(logits)
        return seconds(lambda: jax.block_until_ready(generate.decode_program(params, config, logits, cache, kv_valid,
                                                                             options, dtype, new_bucket)))
    whole_loop()
    rows = {"decode_program, a step of one call": statistics.median(whole_loop() for _ in range(3)) / N}
    programs = {"decode_chunk_program": generate.decode_chunk_program}
    if no_command_buffers:
        programs["decode_chunk_program, no command buffers"] = jax.jit(
            generate.decode_loop, static_argnames=("config", "dtype", "new_bucket"), donate_argnames=("state", "cache"),
            compiler_options={"xla_gpu_enable_command_buffer": ""})
    placed = jax.device_put(options)
    for (name, program), (where, opts) in itertools.product(programs.items(), (("numpy", options),
                                                                               ("on the device", placed))):
        logits, cache, kv_valid = prefill()
        state, _ = generate.start_program(logits, opts, new_bucket)
        times = []
        for stop_at in range(1, N + 1):
            start = time.perf_counter()
            state, cache = program(params, config, state, cache, kv_valid, opts, dtype, new_bucket, np.int32(stop_at))
            jax.block_until_ready(state["step"])
            times.append(time.perf_counter() - start)
        rows[f"{name}, one step a call, options {where}"] = statistics.median(times[1:])
    keys = ("step", "tokens", "logprobs", "done")
    rows["fetch a chunk's 4 arrays one by one"] = median_seconds(lambda: [np.asarray(state[k]) for k in keys], 20)
    rows["fetch them together (jax.device_get)"] = median_seconds(lambda: jax.device_get([state[k] for k in keys]), 20)
    print("| part | ms |")
    print("|---|---|")
    for name, t in rows.items():
        print(f"| {name} | {t * 1e3:.3f} |")


if __name__ == "__main__":
    main()
