"""What each call of a session compiles: the XLA compiles (count and seconds) of a sequence of calls.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/compile_counts.py \
        [--shape mid|7b] [--mesh DATA,MODEL] [--batch 1] [--steps 2]

The generation benchmark's config (`generate_vs_hf.SHAPES`, random params from `init_params`),
one 480x640 image a row. The calls: greedy `generate`; `generate` again with a 640x480 image (another
tile grid, the same prompt bucket) and max_new_tokens in the same bucket (nothing new to compile); beam search (its own loop, generate's
prefill); `generate_stream`; then `--steps` AdamW steps of `train.train_step` from
`train.init_state`. Each line: the call, the XLA compiles it made, their seconds. A call's first
use compiles its programs; a repeat of a kind (a second training step) should compile nothing.
--mesh: params laid out over a (data, model) mesh (`sharding.param_shardings`); without it, one
device, which may be one of several (the forced host devices above, or a GPU host's).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import ROOT, hf_config, make_inputs  # noqa: E402

sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["mid", "7b"], default="mid")
    parser.add_argument("--mesh", default=None, metavar="DATA,MODEL")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    import jax
    import numpy as np
    from llava_next_jax import LlavaNext, sharding, train
    from llava_next_jax.config import LlavaNextConfig
    from llava_next_jax.modeling.llava_next import init_params

    compiles = []   # (seconds) of every XLA compile
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append(seconds)
        if event == "/jax/core/compile/backend_compile_duration" else None)

    config = LlavaNextConfig.from_dict(hf_config(args.shape).to_dict())
    params = init_params(config, jax.random.key(0))
    mesh = None
    if args.mesh:
        data, model_axis = (int(n) for n in args.mesh.split(","))
        mesh = sharding.make_mesh(data=data, model=model_axis)
        params = jax.device_put(params, sharding.param_shardings(params, mesh))
    model = LlavaNext(config, params, mesh=mesh)
    inputs = make_inputs(config, args.batch, (480, 640))
    other = make_inputs(config, args.batch, (640, 480), seed=1)   # another grid, the same prompt bucket
    print(f"# {args.shape}, {len(jax.devices())} devices ({jax.devices()[0].device_kind}), "
          f"mesh {args.mesh or 'none'}, batch {args.batch}")
    print("| call | XLA compiles | compile s | call s |")
    print("|---|---|---|---|")

    def call(name, fn):
        before, start = len(compiles), time.perf_counter()
        jax.block_until_ready(fn())
        made = compiles[before:]
        print(f"| {name} | {len(made)} | {sum(made):.1f} | {time.perf_counter() - start:.1f} |", flush=True)

    call("generate, greedy, 16 new tokens", lambda: model.generate(**inputs, max_new_tokens=16, eos_token_id=[]))
    call("generate, a 640x480 image, 12 new tokens",
         lambda: model.generate(**other, max_new_tokens=12, eos_token_id=[]))
    call("generate, beam search (num_beams 2)",
         lambda: model.generate(**inputs, max_new_tokens=16, eos_token_id=[], num_beams=2))
    call("generate_stream (chunks of 8)", lambda: np.concatenate(list(model.generate_stream(
        **inputs, max_new_tokens=16, eos_token_id=[], chunk=8)), axis=1))
    labels = np.where(inputs["input_ids"] == config.image_token_id, -100, inputs["input_ids"])
    batch = model.train_batch(**inputs, labels=labels)
    optimizer = train.make_optimizer(model.params, learning_rate=1e-5, total_steps=args.steps)
    state = {"s": train.init_state(model.params, optimizer)}
    model.params = None   # the first step consumes them (donated)
    for step in range(args.steps):
        def one_step():
            state["s"], out = train.train_step(state["s"], batch, config, optimizer)
            return out["loss"]
        call(f"train_step {step + 1}", one_step)
    print(f"total: {len(compiles)} XLA compiles, {sum(compiles):.1f} s")


if __name__ == "__main__":
    main()
