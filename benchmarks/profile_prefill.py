"""Where our prefill's time goes: one compiled prefill of the generation benchmark's model and inputs,
traced with `jax.profiler`, its operations summed by the JAX operation they came from. With --train,
one step of the fine-tuning benchmark (`train_vs_torch.py`: projector + decoder, float32) instead;
with --decode N, the greedy decode loop of N new tokens after that prefill, in ms a step.

    .venv/bin/python benchmarks/profile_prefill.py [--shape mid] [--dtype float32] [--batch 1] [--top 30]
        [--train | --decode N] [--keep]

XLA's optimised program is dumped (XLA_FLAGS, set here before JAX starts) to map each traced fusion
or custom call to the `op_name` JAX gave it; layer numbers are folded (`layer_*/...`), so a line is
that operation summed over every layer. Operations that XLA:CPU runs side by side (the MLP's gate and
up products) overlap in time, so the column can add up to more than the prefill's wall time. The
trace and the dumped programs are deleted at the end unless --keep. An operation that XLA's passes
left without an `op_name` (the decode step's row-blocked products) is named by its opcode and result
shape. --decode also prints the step's wall time and the part of it in which no traced operation ran.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its JAX op_name, program prefix dropped and layer numbers folded; without
    an op_name, its opcode and result shape (`dot f32[1,4096]`)."""
    names = {}
    for match in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = (\w+\[[\d,]*\])\S* ([\w\-]+)\(", hlo_text, re.M):
        names[match.group(1)] = f"{match.group(3)} {match.group(2)}"
    for match in re.finditer(r"^\s+(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        name = re.sub(r"^jit\([\w]+\)/", "", match.group(2).split(";")[0])
        names[match.group(1)] = re.sub(r"(vision_)?layer_\d+", r"\1layer_*", name)
    return names


def busy_ms(events) -> float:
    """The time in which at least one of `events` (trace events with ts and dur, in us) ran, in ms."""
    busy, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return busy / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mid", choices=["mid", "7b"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--train", action="store_true", help="a fine-tuning step instead of a prefill")
    parser.add_argument("--decode", type=int, default=0, metavar="N",
                        help="the greedy decode loop of N new tokens instead of a prefill (ms a step)")
    parser.add_argument("--keep", action="store_true", help="keep the trace and the dumped programs")
    args = parser.parse_args()
    if args.train and args.decode:
        parser.error("--train and --decode: one or the other")
    work = tempfile.mkdtemp(prefix="profile_prefill_")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={work}/hlo --xla_dump_hlo_as_text"
    import jax
    import generate_vs_hf as bench
    hf, model = bench.build_models(args.shape, args.dtype, "cpu")
    inputs = bench.make_inputs(model.config, args.batch, tuple(args.image_size))
    steps = args.decode or 1
    if args.train:
        import train_vs_torch
        hf.save_pretrained(f"{work}/checkpoint")
        labels = train_vs_torch.labels_for(inputs, hf.config.image_token_id)
        del hf, model
        _, step = train_vs_torch.ours_step(f"{work}/checkpoint", inputs, labels, "projector+decoder", False)
        program, run, what = "train_step", lambda: bench.seconds(step), "fine-tuning step"
    elif args.decode:
        del hf
        _, _, decode_rate, *_ = bench.ours(model, inputs, args.decode)   # an untimed prefill, then the loop
        program, run, what = "decode_program", lambda: steps * args.batch / decode_rate(), f"decode of {steps} tokens"
    else:
        del hf
        _, prefill, *_ = bench.ours(model, inputs, 16)
        program, run, what = "prefill_program", prefill, "prefill"
    seconds = [run() for _ in range(2)]
    with jax.profiler.trace(f"{work}/trace", create_perfetto_trace=True):
        seconds.append(run())
    trace = json.load(gzip.open(glob.glob(f"{work}/trace/**/perfetto_trace.json.gz", recursive=True)[0], "rt"))
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X" and "dur" in e]
    # the program's own run: from its dispatch on (a decode's prefill runs before it, in the trace too)
    start = min(e["ts"] for e in events if e["name"] == f"PjitFunction({program})")
    hlo = glob.glob(f"{work}/hlo/*jit_{program}.cpu_after_optimizations.txt")
    names = op_names(open(hlo[0]).read())
    ran = [e for e in events if e["ts"] >= start and e["name"] in names]
    total = defaultdict(float)
    for e in ran:
        total[names[e["name"]]] += e["dur"] / 1e3 / steps
    print(f"# {args.shape}, {args.dtype}, batch {args.batch}: {what} {', '.join(f'{s:.2f}' for s in seconds)} s "
          f"(the last traced)" + (f"; files in {work}" if args.keep else ""))
    if args.decode:
        wall = seconds[-1] * 1e3 / steps
        print(f"a step: {wall:.2f} ms; no traced operation running in {wall - busy_ms(ran) / steps:.2f} ms of it")
    print(f"| operation (summed over layers) | ms{' a step' if args.decode else ''} |")
    print("|---|---|")
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {ms:.{2 if args.decode else 1}f} |")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
