"""Where a decode step's time goes on a GPU, ours alone, 7B-shaped bf16 random weights (no HF, no prefill).

    python3 benchmarks/gpu_decode.py [--shape 7b] [--dtype bfloat16] [--prompt 3072] [--new-tokens 128]
        [--repeats 3] [--variants rows2 rows1 rows4] [--micro] [--profile OUT_DIR] [--label NAME]

Builds the decoder's params (language model and lm_head; the vision tower plays no part in a decode
step) and a KV cache of prompt + new-tokens slots filled with random numbers, then times the compiled
decode loop (`generate.decode_program`, greedy) at batch 1: tokens/s, and the share of the memory
roofline (bytes a step reads over the bandwidth of a jitted elementwise pass measured here).

--variants: decode with the `decoder` / `generate` module names of `VARIANTS` (read when the program
is traced), one after another in this process; rows1 is XLA's one-row products, rows2 the default;
greedy the loop without its sampling branch, nologprobs without the tokens' log-probabilities,
nongram without the no-repeat n-gram check (`generate.banned_ngrams`, run at every step, n = 0 too).
--micro: the step's parts alone: one-row to eight-row products of each weight shape (GB/s of
weights, each call's dispatch included: compare rows with rows, not with the loop), and one layer's
decode attention over the cache. --profile: a trace (Perfetto JSON) of 16 decode steps, copied to
OUT_DIR/NAME.trace.json.gz, with the GPU's busy time and its largest kernels printed.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from generate_vs_hf import copy_bandwidth, decode_step_bytes, hf_config, seconds  # noqa: E402

def greedy_only(logits, keys, options):
    """`generate.select_tokens` without the sampling branch (its `lax.cond`): what a greedy-only program
    would run."""
    import jax
    import jax.numpy as jnp
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tokens, jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]


def without_logprobs(logits, keys, options):
    """`generate.select_tokens` without the chosen tokens' log-probabilities (zeros instead): what
    keeping them costs."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax import generate

    def sample(logits):
        logits = generate.warp(logits, options)
        return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    tokens = jax.lax.cond(options["do_sample"] & (options["temperature"] > 0), sample,
                          lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32), logits)
    return tokens, jnp.zeros(tokens.shape, jnp.float32)


def no_ngram_bans(history, length, n, vocab_size):
    """`generate.banned_ngrams` banning nothing, without looking: what the no-repeat n-gram check costs."""
    import jax.numpy as jnp
    return jnp.zeros((history.shape[0], vocab_size), bool)


VARIANTS = {  # overrides of `decoder` / `generate` module names, read when the decode program is traced
    "rows1": {"decoder.GPU_MIN_ROWS": 1},
    "rows2": {"decoder.GPU_MIN_ROWS": 2},
    "rows4": {"decoder.GPU_MIN_ROWS": 4},
    "greedy": {"generate.select_tokens": greedy_only},
    "nologprobs": {"generate.select_tokens": without_logprobs},
    "nongram": {"generate.banned_ngrams": no_ngram_bans},
}


def read_bandwidth(gib: float) -> float:
    """Bytes/s of a jitted sum over a `gib` GiB bf16 array (bytes read): reads alone, as a decode step's."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (int(gib * 2**30) // 2,), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    jax.block_until_ready(total(x))
    t = statistics.median(seconds(lambda: jax.block_until_ready(total(x))) for _ in range(10))
    return x.nbytes / t


def random_params(config, dtype, seed=0):
    """Random language-model and lm_head params (normal, std 0.02; norms near 1) on the default device."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax import checkpoint, convert
    shapes = {p: s for p, s in convert.expected_shapes(config).items() if p[0] in ("language_model", "lm_head")}
    draw = jax.jit(lambda key, shape, mean: (mean + 0.02 * jax.random.normal(key, shape)).astype(dtype),
                   static_argnums=(1, 2))
    key = jax.random.key(seed)
    return checkpoint.nest({p: draw(jax.random.fold_in(key, i), s, 1.0 if "norm" in p[-2] else 0.0)
                            for i, (p, s) in enumerate(sorted(shapes.items()))})


def decode_runner(params, config, batch, prompt, new_tokens, dtype):
    """(run(steps) -> seconds of one decode loop of `steps` steps, bytes a step reads)."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax import generate
    from llava_next_jax.modeling import decoder
    S = prompt + new_tokens
    fill = jax.jit(lambda key: jax.tree.map(lambda a: jax.random.normal(key, a.shape, a.dtype),
                                            decoder.init_cache(config.text, batch, S, dtype)))
    logits = jax.random.normal(jax.random.key(1), (batch, config.text.vocab_size), jnp.float32)
    kv_valid = jnp.ones((batch, S), bool)

    def run(steps):
        options = generate.options(batch, steps, 0, False, 1.0, 0, 1.0, 0, (), 0,
                                   prompt_ids=np.zeros((batch, 1), np.int32), vocab_size=config.text.vocab_size,
                                   prompt_bucket=prompt)
        cache = jax.block_until_ready(fill(jax.random.key(steps)))
        start = time.perf_counter()
        jax.block_until_ready(generate.decode_program(params, config, logits, cache, kv_valid, options, dtype,
                                                      new_tokens))
        return time.perf_counter() - start
    return run, decode_step_bytes(params, config, batch, S, dtype)


WEIGHT_SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (4096, 1024), (4096, 32064)]


def products(dtype, shapes=WEIGHT_SHAPES, total_bytes=512e6, repeats=10):
    """GB/s of weights through `x [M, K] @ w [K, N]` (and `x @ w.T` for w `[N, K]`), distinct weights
    chained so that none sits in L2."""
    import jax
    import jax.numpy as jnp
    print("| weight | layout | M=1 | M=2 | M=4 | M=8 |  (GB/s of weights)")
    print("|---|---|---|---|---|---|")
    for K, N in shapes:
        nbytes = K * N * jnp.dtype(dtype).itemsize
        count = max(2, int(total_bytes // nbytes))
        for layout in ("[K,N]", "[N,K]"):
            shape = (K, N) if layout == "[K,N]" else (N, K)
            ws = [jax.random.normal(jax.random.key(i), shape, dtype) for i in range(count)]
            rates = []
            for M in (1, 2, 4, 8):
                x = jax.random.normal(jax.random.key(99), (M, K), dtype)
                if layout == "[K,N]":
                    fn = jax.jit(lambda x, ws: [x @ w for w in ws])
                else:
                    fn = jax.jit(lambda x, ws: [x @ w.T for w in ws])
                jax.block_until_ready(fn(x, ws))
                t = statistics.median(seconds(lambda: jax.block_until_ready(fn(x, ws))) for _ in range(repeats))
                rates.append(count * nbytes / t / 1e9)
            print(f"| {K}x{N} | {layout} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)
            del ws


def attention_layers(config, dtype, prompt, new_tokens, layers=32, repeats=10):
    """Microseconds per layer of a batch-1 decode step's attention (`decoder._attend_new`) over
    `layers` distinct caches."""
    import jax
    import jax.numpy as jnp
    from llava_next_jax.modeling import decoder
    c = config.text
    S, K, H, N = prompt + new_tokens, c.num_key_value_heads, c.head_dim, c.num_attention_heads
    key = jax.random.key(5)
    caches = [(jax.random.normal(jax.random.fold_in(key, 2 * i), (1, K, H, S), dtype),
               jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (1, K, H, S), dtype)) for i in range(layers)]
    q = jax.random.normal(key, (1, 1, N, H), dtype)
    new = jax.random.normal(key, (1, K, 1, H), dtype)
    mask, own = (jnp.arange(S) < prompt)[None, None], jnp.ones((1, 1, 1), bool)
    fn = jax.jit(lambda q, caches: [decoder._attend_new(q, k, v, new, new, mask, own, H ** -0.5) for k, v in caches])
    jax.block_until_ready(fn(q, caches))
    t = statistics.median(seconds(lambda: jax.block_until_ready(fn(q, caches))) for _ in range(repeats))
    gbs = sum(k.nbytes + v.nbytes for k, v in caches) / t / 1e9
    print(f"decode attention: {t / layers * 1e6:.1f} us a layer ({gbs:.0f} GB/s of cache)", flush=True)


def summarize_trace(path: str, top: int = 25):
    """Prints the GPU's kernels from a Perfetto JSON trace: busy time, span, and the largest by total time."""
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = [e for e in events if e.get("ph") == "X" and "GPU" in names.get(e.get("pid"), "").upper()
           and "dur" in e]
    if not gpu:
        print("trace: no GPU events; processes:", sorted(set(names.values())))
        return
    by_tid = defaultdict(list)
    for e in gpu:
        by_tid[(e["pid"], e["tid"])].append(e)
    stream = max(by_tid.values(), key=lambda es: sum(e["dur"] for e in es))  # the compute stream
    stream.sort(key=lambda e: e["ts"])
    span = stream[-1]["ts"] + stream[-1]["dur"] - stream[0]["ts"]
    busy = sum(e["dur"] for e in stream)
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in zip(stream, stream[1:])]
    print(f"trace: {len(stream)} kernels on the busiest stream over {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms "
          f"({busy / span:.0%}); gaps > 20 us: {sum(g for g in gaps if g > 20) / 1e3:.2f} ms in "
          f"{sum(g > 20 for g in gaps)}; median gap {statistics.median(gaps):.1f} us")
    total = defaultdict(lambda: [0.0, 0])
    for e in stream:
        entry = total[e["name"][:90]]
        entry[0] += e["dur"]
        entry[1] += 1
    print("| kernel | total us | count | mean us |")
    for name, (dur, n) in sorted(total.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"| {name} | {dur:.0f} | {n} | {dur / n:.1f} |")


def profile(run, out_dir: str, label: str, steps: int = 16):
    import jax
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            run(steps)
        found = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True) + glob.glob(
            os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)
        if not found:
            print("profile: no trace written; files:", glob.glob(os.path.join(tmp, "**", "*"), recursive=True))
            return
        target = os.path.join(out_dir, f"{label}.trace.json.gz")
        shutil.copy(found[0], target)
    summarize_trace(target)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt", type=int, default=3072)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="*", default=["rows2"], choices=sorted(VARIANTS))
    parser.add_argument("--micro", action="store_true")
    parser.add_argument("--profile", metavar="OUT_DIR")
    parser.add_argument("--label", default="base")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    from llava_next_jax.config import LlavaNextConfig
    dtype = jnp.dtype(args.dtype)
    bandwidth, read = copy_bandwidth(2), read_bandwidth(2)
    print(f"# {args.label}: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.shape} {args.dtype}, "
          f"cache {args.prompt}+{args.new_tokens} slots; copy bandwidth {bandwidth / 1e9:.0f} GB/s, "
          f"read bandwidth {read / 1e9:.0f} GB/s; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    config = LlavaNextConfig.from_dict(hf_config(args.shape).to_dict())
    if args.micro:
        products(dtype)
        attention_layers(config, dtype, args.prompt, args.new_tokens)
    params = random_params(config, dtype)
    run, step_bytes = decode_runner(params, config, 1, args.prompt, args.new_tokens, dtype)
    roofline = bandwidth / step_bytes
    print(f"a step reads {step_bytes / 1e9:.2f} GB: roofline {roofline:.1f} tok/s at the copy bandwidth, "
          f"{read / step_bytes:.1f} at the read bandwidth")
    print("| variant | decode tok/s | of roofline | ms a step | first call s |")
    print("|---|---|---|---|---|")
    from llava_next_jax import generate
    from llava_next_jax.modeling import decoder
    modules = {"decoder": decoder, "generate": generate}
    defaults = {name: getattr(modules[name.split(".")[0]], name.split(".")[1])
                for name in set().union(*VARIANTS.values())}
    for name in args.variants:
        for k, v in {**defaults, **VARIANTS[name]}.items():
            setattr(modules[k.split(".")[0]], k.split(".")[1], v)
        jax.clear_caches()
        first = run(args.new_tokens)
        t = statistics.median(run(args.new_tokens) for _ in range(args.repeats))
        rate = args.new_tokens / t
        print(f"| {args.label}/{name} | {rate:.1f} | {rate / roofline:.0%} | {t / args.new_tokens * 1e3:.3f} "
              f"| {first:.1f} |", flush=True)
        if args.profile and name == args.variants[0]:
            profile(run, args.profile, args.label)


if __name__ == "__main__":
    main()
