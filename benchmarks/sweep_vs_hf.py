"""Random batches and generation settings against HF transformers, on the test suite's tiny checkpoints.

    .venv/bin/python benchmarks/sweep_vs_hf.py --seed 1 --cases 40

Each case draws one of tests/tiny_models' four families, 1-3 left-padded rows with 0-2 images of
random or extreme sizes (1x1, 3x2000, ...), and a decoding mode: greedy, beam search (num_beams,
length_penalty, early_stopping, num_return_sequences) or prompt lookup (one row: HF's takes no
batch), with or without repetition_penalty, no_repeat_ngram_size, min_new_tokens and stop ids taken
from the row's free output. It prints the largest |logit difference| from HF's forward pass and
whether `generate`'s tokens equal HF's `generate`; exits 1 if any case differs. Not a test: the
suite checks fixed cases of each; this looks for the case nobody wrote down.
"""

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

import tiny_models as tm  # noqa: E402
from llava_next_jax import LlavaNext  # noqa: E402

FAMILIES = ("mistral", "llama3", "qwen2", "vicuna")
EXTREME = [(1, 1), (3, 2000), (2000, 3), (56, 56), (57, 113), (500, 500), (480, 640), (1, 300), (300, 1),
           (1080, 1920), (111, 112), (113, 111)]
PAD = 7   # not 0: HF's beam search fills with the stop id where pad_token_id is 0


def draw_case(rng):
    mode = str(rng.choice(["greedy", "beam", "lookup"]))
    size = lambda: EXTREME[rng.integers(len(EXTREME))] if rng.random() < 0.5 else tuple(
        int(x) for x in rng.integers(1, 900, 2))
    rows = [(int(rng.integers(0, 12)), [size() for _ in range(rng.integers(0, 3))], int(rng.integers(1, 6)))
            for _ in range(1 if mode == "lookup" else rng.integers(1, 4))]
    if not any(images for _, images, _ in rows):
        rows[0] = (rows[0][0], [size()], rows[0][2])
    settings = {}
    if rng.random() < 0.4:
        settings["repetition_penalty"] = float(rng.choice([0.7, 1.3, 2.0]))
    if rng.random() < 0.4:
        settings["no_repeat_ngram_size"] = int(rng.integers(1, 4))
    if mode == "beam":
        beams = int(rng.integers(2, 5))
        settings.update(num_beams=beams, length_penalty=float(rng.choice([1.0, 0.0, 2.0, -1.0])),
                        early_stopping=[False, True, "never"][rng.integers(3)],
                        num_return_sequences=int(rng.integers(1, beams + 1)))
    elif mode == "lookup":
        settings.update(prompt_lookup_num_tokens=int(rng.integers(1, 6)), max_matching_ngram_size=int(rng.integers(1, 4)))
    return str(rng.choice(FAMILIES)), rows, int(rng.choice([6, 12, 20])), settings


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", type=int, default=40)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    models, differing, worst = {}, 0, 0.0
    with tempfile.TemporaryDirectory() as work:
        for case in range(args.cases):
            family, rows, new, settings = draw_case(rng)
            if family not in models:
                hf = tm.build_model(family, seed=7)
                tm.save_checkpoint(hf, os.path.join(work, family))
                models[family] = hf, LlavaNext.from_pretrained(os.path.join(work, family))
            hf, ours = models[family]
            batch = tm.make_batch(hf.config, rows, seed=case)
            real = batch["attention_mask"] == 1
            diff = float(np.abs(np.asarray(ours.forward(**batch)) - tm.hf_logits(hf, batch))[real].max())
            worst = max(worst, diff)
            if rng.random() < 0.3:
                settings["min_new_tokens"] = int(rng.integers(0, new))
            free = tm.hf_generate(hf, batch, new, PAD, eos_token_id=[])
            stops = sorted({int(free[0, min(3, new - 1)]), int(free[-1, new // 2])}) if rng.random() < 0.6 else []
            theirs = tm.hf_generate(hf, batch, new, PAD, eos_token_id=stops or None, **settings)
            mine = ours.generate(**batch, max_new_tokens=new, eos_token_id=stops, pad_token_id=PAD, **settings)
            same = mine.shape == theirs.shape and bool((mine == theirs).all())
            differing += not same
            print(f"{case} {family} rows={rows} new={new} stops={stops} {settings}: logits {diff:.1e}, tokens "
                  + ("equal" if same else f"DIFFER\nours\n{mine}\nHF\n{theirs}"), flush=True)
    print(f"{args.cases} cases: largest |logit difference| {worst:.1e}; tokens differ in {differing}")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
