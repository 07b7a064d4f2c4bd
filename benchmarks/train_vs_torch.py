"""Fine-tuning step speed: ours (jitted `train.train_step`) beside the same step in PyTorch, same weights,
same batch, same process.

    .venv/bin/python benchmarks/train_vs_torch.py [--shape mid] [--batch 1] [--steps 3] [--remat]
        [--trainable projector+decoder|projector|all]

The step: forward with labels, backward, global-norm clipping at 1.0 and AdamW (lr 1e-5) on the
trainable params (default projector + decoder; the vision tower frozen, as in LLaVA's stage 2), fp32.
PyTorch: HF transformers' `LlavaNextForConditionalGeneration(..., labels=...)`, `loss.backward()`,
`clip_grad_norm_`, `torch.optim.AdamW` over the params with requires_grad. Ours: `train.train_step`.
Inputs: the generation benchmark's (one 480x640 image per row, ~2.4k tokens), every text token labelled.

Prints the median step seconds, tokens/s (rows x length / step seconds), the ratio, our first-call
seconds (compile included), and each framework's peak RSS measured in a child process of its own
(`--only ours|torch`), since a process's peak cannot be split between two frameworks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import ROOT, hf_model, make_inputs, median_seconds  # noqa: E402

sys.path.insert(0, ROOT)


def labels_for(inputs, image_token_id):
    ids = inputs["input_ids"]
    return np.where(ids == image_token_id, -100, ids)


def ours_step(path, inputs, labels, trainable, remat):
    """(first call s, step fn) for our train step on `path`."""
    import jax
    from llava_next_jax import LlavaNext, train
    model = LlavaNext.from_pretrained(path, dtype="float32")
    ids, pixels, sources, mask = model._inputs(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                               inputs["attention_mask"])
    batch = dict(input_ids=ids, pixel_values=pixels, sources=sources, attention_mask=mask, labels=labels)
    optimizer = train.make_optimizer(model.params, learning_rate=1e-5, total_steps=1000, trainable=trainable)
    state = {"s": train.init_state(model.params, optimizer)}

    def step():
        state["s"], metrics = train.train_step(state["s"], batch, model.config, optimizer, remat=remat)
        return float(jax.block_until_ready(metrics["loss"]))
    start = time.perf_counter()
    step()
    return time.perf_counter() - start, step


def torch_step(model, inputs, labels, trainable):
    import torch
    for name, p in model.named_parameters():
        p.requires_grad_(trainable == "all" or ("multi_modal_projector" in name if trainable == "projector"
                                                else "vision_tower" not in name))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    args = {k: torch.from_numpy(v) for k, v in inputs.items()}
    target = torch.from_numpy(labels)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(**args, labels=target).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return float(loss.detach())
    return step


def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the forking parent)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib / 2**20


def child_peak_rss(which, args, path) -> float:
    """Peak RSS (GiB) of a fresh process running two steps of one framework."""
    out = subprocess.run([sys.executable, __file__, "--only", which, "--checkpoint", path, "--batch", str(args.batch),
                          "--trainable", args.trainable] + (["--remat"] if args.remat else []),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_gib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", choices=["mid"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per framework (after one warm-up)")
    parser.add_argument("--trainable", default="projector+decoder", choices=["projector", "projector+decoder", "all"])
    parser.add_argument("--remat", action="store_true")
    parser.add_argument("--only", choices=["ours", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch
    from transformers import LlavaNextForConditionalGeneration
    from llava_next_jax.config import LlavaNextConfig as OurConfig
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or tmp
        if args.checkpoint:
            hf = LlavaNextForConditionalGeneration.from_pretrained(path)
        else:
            hf = hf_model(args.shape, "float32", "cpu")
            hf.save_pretrained(path)
        inputs = make_inputs(OurConfig.from_dict(hf.config.to_dict()), args.batch, (480, 640))
        labels = labels_for(inputs, hf.config.image_token_id)
        tokens = inputs["input_ids"].size
        if args.only:
            if args.only == "ours":
                del hf
                _, step = ours_step(path, inputs, labels, args.trainable, args.remat)
            else:
                step = torch_step(hf, inputs, labels, args.trainable)
            step(), step()
            print(json.dumps({"peak_rss_gib": peak_rss_gib()}))
            return
        first, ours = ours_step(path, inputs, labels, args.trainable, args.remat)
        theirs = torch_step(hf, inputs, labels, args.trainable)
        theirs()                                              # warm-up
        ours_s, torch_s = median_seconds(ours, args.steps), median_seconds(theirs, args.steps)
        rss = {w: child_peak_rss(w, args, path) for w in ("ours", "torch")}
    print(f"shape {args.shape}, batch {args.batch} x {tokens // args.batch} tokens, trainable {args.trainable}"
          f"{', remat' if args.remat else ''}")
    print(f"  ours : {ours_s:.2f} s/step  {tokens / ours_s:7.1f} tok/s  first call {first:.1f} s  "
          f"peak RSS {rss['ours']:.2f} GiB")
    print(f"  torch: {torch_s:.2f} s/step  {tokens / torch_s:7.1f} tok/s  peak RSS {rss['torch']:.2f} GiB")
    print(f"  ratio (ours / torch tok/s): {torch_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
