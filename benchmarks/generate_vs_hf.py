"""Generation speed: ours (JAX, XLA) beside HF transformers (PyTorch eager), same weights, same inputs.

    .venv/bin/python benchmarks/generate_vs_hf.py [--shape mid|7b] [--dtype float32|bfloat16]
        [--batch 1 4] [--image-size 480 640] [--new-tokens 64] [--repeats 3] [--skip-hf]
        [--prompt-lookup N] [--sample] [--max-time S] [--guidance-scale G]

`mid`: 336px tiles, CLIP 4 x 256, decoder 8 x 1024 (GQA 16/4, ffn 4096), vocab 32064, one 480x640
image per row (~2.4k prompt tokens). `7b`: full CLIP-L and Mistral-7B sizes (for a GPU; bf16).
Random weights: drawn by transformers, carried into our params by the converter's name and layout
rules, so both run the same numbers. On a machine where PyTorch sees CUDA and JAX a GPU, both run there.

Prints, per batch size: prefill seconds (prompt + image through to the first token's logits: the
time to the first token), decode tokens/s (new tokens x rows / decode seconds), first-call seconds
(compile included), the ratios ours/HF; then the decode roofline (on a GPU: the bytes a step reads over
the bandwidth of an elementwise pass measured there) with our share of it, whether the greedy tokens
agree, and peak memory (RSS of this process, both frameworks; see --skip-hf for ours alone; on a GPU
each framework's peak device memory).
Ours: the prefill and decode programs are timed apart. HF: prefill = `generate` of one token;
decode = the spacing of token arrivals through a streamer in a full `generate`. Medians over
--repeats, after one warm-up call; ours and HF take turns within each repeat, so that load from
other work on a shared machine falls on both.
--prompt-lookup N: both decode with prompt lookup (`generate(prompt_lookup_num_tokens=N)`, HF's
option of that name; HF's takes batch 1 only, so at other batch sizes ours runs alone), and the
tokens a pass of our model keeps on average are printed.
--sample: both sample (temperature 1, top_k 50, top_p 0.9) instead of decoding greedily; the tokens
then differ (each framework draws its own random numbers) and are not compared.
--max-time S: both generate with HF's max_time=S (choose S past the runs' length, so that it stops
nothing): what checking the clock after every token costs (ours: a call from the compiled loop to
the host, in a program compiled for it).
--guidance-scale G: both generate with HF's classifier-free guidance (guidance_scale=G): a second,
unconditional sequence decoded beside each row (ours: a second row of the prompt's cache, stepped in
the same pass of the decoder; its one-token prefill, and placing it beside the prompt's cache, timed
with the decode).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {
    "mid": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
                text=dict(model_type="mistral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                          num_attention_heads=16, num_key_value_heads=4, vocab_size=32064, sliding_window=None)),
    "7b": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
               text=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, sliding_window=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def hf_config(shape: str):
    """HF's `LlavaNextConfig` of `shape`."""
    from transformers import LlavaNextConfig
    spec = SHAPES[shape]
    return LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=336, patch_size=14, **spec["vision"]),
        text_config=spec["text"], image_token_index=32000, image_grid_pinpoints=PINPOINTS)


def hf_model(shape: str, dtype: str, device: str):
    """HF's model of `shape` with random weights drawn by transformers (seed 0), in `dtype` on `device`."""
    import torch
    from transformers import LlavaNextForConditionalGeneration
    config = hf_config(shape)
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            return LlavaNextForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(torch.float32)


def build_models(shape: str, dtype: str, device: str):
    """(HF model on `device`, our LlavaNext): random weights drawn by transformers (in `dtype`, on the
    device), carried into our params tree by the converter's own name and layout rules
    (`convert.target_of`), tensor by tensor and device to device (a 7B checkpoint is not written
    to disk and read back)."""
    import jax
    import torch
    from llava_next_jax import LlavaNext, checkpoint, convert
    from llava_next_jax.config import LlavaNextConfig as OurConfig
    model = hf_model(shape, dtype, device)
    ours_config = OurConfig.from_dict(model.config.to_dict())
    shapes = convert.expected_shapes(ours_config)
    params = {}
    for key, tensor in model.state_dict().items():
        target = convert.target_of(key)
        if target is None or target.path not in shapes:
            continue  # a recomputed buffer, or a tied head
        probe = np.empty(tuple(range(1, tensor.ndim + 1)), np.int8)   # the layout change as a permutation
        order = [probe.shape.index(n) for n in target.layout(probe).shape]
        moved = tensor.detach().permute(*order).contiguous()
        if moved.is_cuda:
            params[target.path] = jax.numpy.array(jax.dlpack.from_dlpack(moved), copy=True)
        else:
            params[target.path] = jax.numpy.asarray(moved.view(torch.int16).numpy().view(convert.DTYPES[dtype])
                                                    if moved.dtype == torch.bfloat16 else moved.numpy())
        assert params[target.path].shape == shapes[target.path], key
    missing = sorted("/".join(p) for p in set(shapes) - set(params))
    assert not missing, missing
    return model, LlavaNext(ours_config, checkpoint.nest(params))


def make_inputs(ours, batch: int, image_size, prompt_text: int = 40, seed=0):
    from llava_next_jax import anyres
    rng = np.random.default_rng(seed)
    n_image = anyres.num_image_tokens(image_size, ours.geometry)
    row = list(rng.integers(3, 32000, 10)) + [32000] * n_image + list(rng.integers(3, 32000, prompt_text))
    tiles = anyres.num_tiles(image_size, ours.geometry)
    return dict(input_ids=np.array([row] * batch, np.int64), attention_mask=np.ones((batch, len(row)), np.int64),
                pixel_values=rng.standard_normal((batch, tiles, 3, 336, 336)).astype(np.float32),
                image_sizes=np.array([image_size] * batch, np.int64))


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn, repeats: int) -> float:
    """The median of `repeats` timed calls of fn."""
    return statistics.median(seconds(fn) for _ in range(repeats))


def decode_step_bytes(params, config, rows: int, cache_length: int, dtype) -> int:
    """Bytes a decode step reads: the decoder's weights and the lm_head (not the embedding table, of
    which it reads one row), and the whole cache of `rows` x `cache_length` slots (from shapes alone:
    building one here would run a prefill outside the first call's time)."""
    import jax
    from llava_next_jax.modeling import decoder
    cache = jax.eval_shape(lambda: decoder.init_cache(config.text, rows, cache_length, dtype))
    weights = {k: v for k, v in params["language_model"].items() if k != "embed_tokens"}
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache)) + sum(
        a.nbytes for a in jax.tree.leaves([weights, params.get("lm_head", {})]))


SAMPLING = dict(do_sample=True, temperature=1.0, top_k=50, top_p=0.9)


def ours(model, inputs, new_tokens, lookup: int = 0, sample: bool = False, max_time: float | None = None,
         guidance_scale: float | None = None):
    """(first call s, prefill timer, decode timer, tokens, bytes a decode step reads): the prefill and
    decode programs timed apart.

    The prefill timer returns seconds; the decode timer runs a fresh prefill (untimed, its cache is
    donated to the decode loop) and returns decode tokens/s. `tokens()`: the greedy new tokens `[B, n]`."""
    import jax
    from llava_next_jax import generate
    args = model.generation_inputs(**inputs, max_new_tokens=new_tokens, eos_token_id=[],
                                   prompt_lookup_num_tokens=lookup, max_time=max_time, guidance_scale=guidance_scale,
                                   **(SAMPLING if sample else {}))
    new_bucket, options, lookup = args.pop("new_bucket"), args.pop("options"), args.pop("lookup")
    timed, guided, negative = args.pop("timed"), args.pop("guided"), args.pop("negative")

    def deadline():   # each decode call's own max_time from its start (the options' from generation_inputs)
        return {**options, "deadline": generate.deadline(max_time)} if timed else options
    rows = inputs["input_ids"].shape[0]
    cache_length = args["input_ids"].shape[1] + new_bucket + lookup

    def prefill():
        return jax.block_until_ready(generate.prefill_program(model.params, model.config, **args,
                                                              cache_length=cache_length))

    def decode(state):
        logits, cache, kv_valid = state
        guide = None
        if guided:
            guide, cache, kv_valid = generate.unconditional_prefill(model.params, model.config, args["input_ids"],
                                                                    cache, kv_valid, args["dtype"], negative)
        return jax.block_until_ready(generate.decode_program(model.params, model.config, logits, cache, kv_valid,
                                                             deadline(), args["dtype"], new_bucket, lookup,
                                                             timed, guide)[0])

    def decode_rate():
        state = prefill()
        return new_tokens * rows / seconds(lambda: decode(state))

    def tokens():
        state = decode(prefill())
        print(f"ours: {new_tokens} tokens in {int(state['passes'])} passes of the model"
              + (f", {int(state['checked'])} of them checking drafts" if lookup else ""), flush=True)
        return np.asarray(state["tokens"])[:, :new_tokens]
    step_bytes = decode_step_bytes(model.params, model.config, rows, cache_length, args["dtype"])
    first = seconds(lambda: decode(prefill()))
    return first, lambda: seconds(prefill), decode_rate, tokens, step_bytes


class _TokenTimes:
    """A generate streamer that notes when new tokens arrive, and how many (the first `put` is the
    prompt; with prompt lookup a `put` may bring several)."""

    def __init__(self):
        self.times, self.counts = [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.counts.append(value.shape[-1] if value.ndim > 1 else 1)

    def end(self):
        pass


def hf(model, inputs, new_tokens, dtype, lookup: int = 0, sample: bool = False, max_time: float | None = None,
       guidance_scale: float | None = None):
    """(first call s, prefill timer, decode timer, tokens): prefill = `generate` of one token; decode
    tokens/s from the spacing of token arrivals through a streamer in a full `generate` (each
    arrival is a token copied to the host, so device work is finished by then)."""
    import torch
    device = model.device
    args = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    args["pixel_values"] = args["pixel_values"].to(getattr(torch, dtype))
    rows, T = inputs["input_ids"].shape

    def run(n, streamer=None):
        with torch.no_grad():
            out = model.generate(**args, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, streamer=streamer,
                                 prompt_lookup_num_tokens=lookup or None, max_time=max_time,
                                 guidance_scale=guidance_scale,
                                 **(SAMPLING if sample else dict(do_sample=False)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def decode_rate():
        times = _TokenTimes()
        run(new_tokens, times)
        # times[1]: the first arrival of new tokens (from the prefill); the rate of the rest after it
        return sum(times.counts[2:]) / (times.times[-1] - times.times[1]) * rows
    first = seconds(lambda: run(new_tokens))
    return first, lambda: seconds(lambda: run(1)), decode_rate, lambda: run(new_tokens)[:, T:].cpu().numpy()


def interleaved(runners, repeats):
    """Medians of (prefill s, decode tok/s) per runner, the runners taking turns in each repeat so that
    a change in the machine's load falls on both sides alike."""
    samples = [([], []) for _ in runners]
    for _ in range(repeats):
        for (_, prefill, decode, *_), (p, d) in zip(runners, samples):
            p.append(prefill())
            d.append(decode())
    return [(statistics.median(p), statistics.median(d)) for p, d in samples]


def copy_bandwidth(gib: float) -> float:
    """Bytes/s of a jitted elementwise pass over a `gib` GiB float32 array (bytes read + written):
    the memory-bandwidth ceiling a decode step is held to."""
    import jax
    import jax.numpy as jnp
    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    double = jax.jit(lambda a: a * 2)
    jax.block_until_ready(double(x))
    times = [seconds(lambda: jax.block_until_ready(double(x))) for _ in range(10)]
    nbytes = x.nbytes
    del x
    return 2 * nbytes / statistics.median(times)


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """How far two greedy token arrays `[B, n]` agree: rows equal, and the first differing step."""
    differ = [int(np.argmax(x != y)) for x, y in zip(a, b) if (x != y).any()]
    return f"{len(a) - len(differ)}/{len(a)} rows equal" + (f", first difference at step {min(differ)}"
                                                            if differ else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--image-size", type=int, nargs=2, default=[480, 640], metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="N")
    parser.add_argument("--sample", action="store_true")
    parser.add_argument("--max-time", type=float, default=None, metavar="S")
    parser.add_argument("--guidance-scale", type=float, default=None, metavar="G")
    args = parser.parse_args()

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # share the GPU with PyTorch
    import jax
    import torch
    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    # Measured before the models exist, so that the probe's arrays (freed after it) stay under the
    # peak device memory the models reach.
    bandwidth = copy_bandwidth(2) if device == "cuda" else None
    start = time.perf_counter()
    hf_model, ours_model = build_models(args.shape, args.dtype, device)
    print(f"# {args.shape}, {args.dtype}, {jax.devices()[0].device_kind}, image {args.image_size[0]}x"
          f"{args.image_size[1]}, new tokens {args.new_tokens} (models built in {time.perf_counter() - start:.0f} s)")
    if args.skip_hf:
        del hf_model
    print("| batch | prompt tokens | | prefill s | decode tok/s | first call s |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        inputs = make_inputs(ours_model.config, batch, tuple(args.image_size))
        T = inputs["input_ids"].shape[1]
        runners = [ours(ours_model, inputs, args.new_tokens, args.prompt_lookup, args.sample, args.max_time,
                        args.guidance_scale)]
        with_hf = not args.skip_hf and (batch == 1 or not args.prompt_lookup)
        if with_hf:
            runners.append(hf(hf_model, inputs, args.new_tokens, args.dtype, args.prompt_lookup, args.sample,
                              args.max_time, args.guidance_scale))
        results = interleaved(runners, args.repeats)
        for name, (first, *_), (prefill_s, rate) in zip(["ours", "HF"], runners, results):
            print(f"| {batch} | {T} | {name} | {prefill_s:.3f} | {rate:.1f} | {first:.1f} |", flush=True)
        if with_hf:
            (o_prefill, o_rate), (h_prefill, h_rate) = results
            print(f"| {batch} | {T} | ours/HF speed | {h_prefill / o_prefill:.2f}x | {o_rate / h_rate:.2f}x | |",
                  flush=True)
        if with_hf and not args.sample:
            print(f"batch {batch}: greedy tokens ours vs HF: {agreement(runners[0][3](), runners[1][3]())}")
        else:
            runners[0][3]()
        if device == "cuda":  # on a CPU an elementwise pass is far from the memory's bandwidth
            step_bytes = runners[0][4]
            roofline = bandwidth / step_bytes * batch
            print(f"batch {batch}: a decode step reads {step_bytes / 1e9:.2f} GB (decoder weights, lm_head, the "
                  f"whole cache); at the measured {bandwidth / 1e9:.0f} GB/s the roofline is {roofline:.1f} tok/s: "
                  f"ours {results[0][1] / roofline:.0%} of it", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
          f"({'ours only' if args.skip_hf else 'both frameworks in one process'})")
    if device == "cuda":
        stats = jax.devices()[0].memory_stats() or {}
        print(f"peak GPU memory: ours {stats.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB, "
              f"HF {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
