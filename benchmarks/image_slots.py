"""What empty image slots cost a fine-tuning step: the loss's gradient on one batch of B rows with one
image each, with B image slots and with B x 4 (what max_images=4 gave every batch before a batch's
slots followed its images), ours alone on the CPU.

    .venv/bin/python benchmarks/image_slots.py [--shape mid] [--batch 4] [--slots 4 16] [--repeats 3]

The mid-size model of generate_vs_hf.py (random weights), one 480x640 image a row (5 tiles a slot);
prints each slot count's median seconds a step (compile excluded) and its ratio to the first.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import SHAPES, build_models, make_inputs, median_seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--slots", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import jax
    from llava_next_jax import anyres, train
    _, model = build_models(args.shape, "float32", "cpu")
    inputs = make_inputs(model.config, args.batch, (480, 640))
    P, ids = model.config.geometry.max_tiles, inputs["input_ids"].astype(np.int32)
    step = lambda *batch: train.loss_and_grad(model.params, model.config, *batch, model.dtype)   # noqa: E731
    print(f"| image slots ({args.shape}, {args.batch} rows of {ids.shape[1]} tokens, one image each) | s a step "
          f"| against {args.slots[0]} |")
    print("|---|---|---|")
    base = None
    for slots in args.slots:
        pixels = np.zeros((slots, P) + inputs["pixel_values"].shape[2:], np.float32)
        pixels[:args.batch, :inputs["pixel_values"].shape[1]] = inputs["pixel_values"]
        sources = anyres.token_sources(ids, model.config.image_token_id, inputs["image_sizes"], model.config.geometry,
                                       P, image_slots=slots)
        batch = [jax.numpy.asarray(a) for a in (ids, pixels, sources, inputs["attention_mask"].astype(np.int32), ids)]
        jax.block_until_ready(step(*batch))
        t = median_seconds(lambda: jax.block_until_ready(step(*batch)), args.repeats)
        base = base or t
        print(f"| {slots} | {t:.2f} | {t / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
