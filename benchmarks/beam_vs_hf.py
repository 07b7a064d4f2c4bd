"""Beam search speed: `generate(num_beams=K)` (JAX, one compiled loop) beside HF's (PyTorch eager).

    .venv/bin/python benchmarks/beam_vs_hf.py [--shape mid|7b] [--dtype float32|bfloat16]
        [--batch 1 2] [--beams 3] [--image-size 480 640] [--new-tokens 32] [--repeats 3]

Same random weights and inputs as generate_vs_hf.py (one image per row, ~2.4k prompt tokens at
mid-size). No stop ids, so every hypothesis runs to --new-tokens on both sides. Prints per batch
size the whole call's seconds (prefill of the prompt + the search; median of --repeats after a
warm-up, the two taking turns), the search's part of it (the call less a call for one new token,
which is the prefill and one step), our first call (compile included), the ratios, the beam tokens a
second of search makes (rows x beams x (new tokens - 1) / search s), and whether the best beams'
tokens and scores agree. HF prefills each prompt once per beam; ours once.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import SHAPES, build_models, make_inputs, seconds  # noqa: E402

PAD = 1   # HF's beam search fills with pad_token_id only when it is not 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import torch
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    hf_model, ours_model = build_models(args.shape, args.dtype, device)
    setting = dict(max_new_tokens=args.new_tokens, num_beams=args.beams, eos_token_id=[], pad_token_id=PAD)
    print(f"# {args.shape}, {args.dtype}, {jax.devices()[0].device_kind}, image {args.image_size[0]}x"
          f"{args.image_size[1]}, {args.beams} beams, {args.new_tokens} new tokens")
    print("| batch | prompt tokens | | call s | search s | beam tokens/s | first call s |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch:
        inputs = make_inputs(ours_model.config, batch, tuple(args.image_size))
        T = inputs["input_ids"].shape[1]
        torch_inputs = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
        torch_inputs["pixel_values"] = torch_inputs["pixel_values"].to(getattr(torch, args.dtype))

        def run_ours(new=args.new_tokens):
            return ours_model.generate(**inputs, **{**setting, "max_new_tokens": new}, return_logprobs=True)

        def run_hf(new=args.new_tokens):
            with torch.no_grad():
                out = hf_model.generate(**torch_inputs, **{**setting, "max_new_tokens": new}, do_sample=False,
                                        output_scores=True, return_dict_in_generate=True)
            return out.sequences[:, T:].cpu().numpy(), out.sequences_scores.float().cpu().numpy()

        first = seconds(run_ours)
        seconds(lambda: run_ours(1))
        seconds(lambda: run_hf(1))
        times = {(name, new): [] for name in ("ours", "HF") for new in (args.new_tokens, 1)}
        for _ in range(args.repeats):
            for (name, new), samples in times.items():
                samples.append(seconds(lambda: (run_ours if name == "ours" else run_hf)(new)))
        call = {name: statistics.median(times[name, args.new_tokens]) for name in ("ours", "HF")}
        search = {name: call[name] - statistics.median(times[name, 1]) for name in ("ours", "HF")}
        made = batch * args.beams * (args.new_tokens - 1)
        for name in ("ours", "HF"):
            print(f"| {batch} | {T} | {name} | {call[name]:.2f} | {search[name]:.2f} | {made / search[name]:.1f} | "
                  f"{first if name == 'ours' else float('nan'):.1f} |")
        print(f"| {batch} | {T} | ours/HF speed | {call['HF'] / call['ours']:.2f}x | "
              f"{search['HF'] / search['ours']:.2f}x | | |", flush=True)
        (tokens, scores), (hf_tokens, hf_scores) = run_ours(), run_hf()
        same = (tokens == hf_tokens).all(axis=1)
        print(f"batch {batch}: best beams equal {int(same.sum())}/{batch}; largest score difference "
              f"{np.abs(scores - hf_scores).max():.2e}", flush=True)


if __name__ == "__main__":
    main()
