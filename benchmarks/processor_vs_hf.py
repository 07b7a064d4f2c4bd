"""Our LlavaNextProcessor vs HF's (LlavaNextProcessor + LlavaNextImageProcessorPil), same process, same images.

    .venv/bin/python benchmarks/processor_vs_hf.py [--repeats 5] [--write-docs]

Builds a tiny-tokenizer processor directory with the released 336px geometry (tests/tiny_tokenizers.py),
writes 24 deterministic photo-like JPEGs (smooth gradients + noise) of mixed photo sizes, decodes them
once, then times a full processor call (one prompt with `<image>` per image -> ids + pixel values) on
the decoded images for both, best of `--repeats`. Prints a markdown table; --write-docs also puts it in
docs/benchmarks.md under "## Processor".
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

SIZES = [(640, 480), (1920, 1080), (1024, 768), (3000, 2000), (500, 1500), (800, 600), (1280, 720), (480, 640)]
COMMAND = ".venv/bin/python benchmarks/processor_vs_hf.py --write-docs"


def photo(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients and blobs plus sensor-like noise: compresses and resizes like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height, x / width
    channels = []
    for _ in range(3):
        a, b, c, d = rng.uniform(0.5, 4, 4)
        channels.append(0.5 + 0.25 * np.sin(a * x * 6.28 + b) * np.cos(c * y * 6.28 + d) + 0.2 * (x - y))
    image = np.stack(channels, -1) * 255 + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def write_images(directory: Path, count: int = 24) -> list[Path]:
    paths = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        path = directory / f"photo_{i:02d}_{w}x{h}.jpg"
        if not path.exists():
            photo(w, h, seed=i).save(path, quality=90)
        paths.append(path)
    return paths


def best_times(fns: dict, repeats: int) -> dict:
    """Best wall time of each function; the functions take turns, so load from elsewhere hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-dir", type=Path, default=None, help="where the JPEGs go (default: a temp dir)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    import transformers
    from tiny_tokenizers import write_processor_files
    from llava_next_jax.processor import LlavaNextProcessor

    with tempfile.TemporaryDirectory() as tmp:
        image_dir = args.image_dir or Path(tmp) / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        paths = write_images(image_dir)
        proc_dir = write_processor_files(Path(tmp) / "proc", "mistral")
        ours = LlavaNextProcessor.from_pretrained(proc_dir)
        ours_serial = LlavaNextProcessor.from_pretrained(proc_dir, num_threads=1)
        hf = transformers.LlavaNextProcessor.from_pretrained(
            proc_dir, image_processor=transformers.LlavaNextImageProcessorPil.from_pretrained(proc_dir))
        images = [Image.open(p).convert("RGB") for p in paths]
        texts = [f"[INST] <image>\nDescribe photo {i}. [/INST]" for i in range(len(images))]

        # one image per call (the generation use case) and the whole folder as one batch
        cases = {
            "one image per call": (lambda p: [p(images=[im], text=t) for im, t in zip(images, texts)]),
            f"batch of {len(images)}": (lambda p: p(images=images, text=texts)),
        }
        run_ours = ours
        run_hf = lambda **kw: hf(**kw, return_tensors="np", padding=True)  # noqa: E731
        check_a, check_b = run_ours(images=images[:2], text=texts[:2]), run_hf(images=images[:2], text=texts[:2])
        assert np.array_equal(check_a["input_ids"], check_b["input_ids"])
        worst = float(np.abs(check_a["pixel_values"] - check_b["pixel_values"]).max())
        rows = []
        for name, case in cases.items():
            t = best_times({"serial": lambda: case(ours_serial), "ours": lambda: case(run_ours),
                            "hf": lambda: case(run_hf)}, args.repeats)
            t_serial, t_ours, t_hf = t["serial"], t["ours"], t["hf"]
            rows.append((name, len(images) / t_serial, len(images) / t_ours, len(images) / t_hf,
                         t_hf / t_serial, t_hf / t_ours))

    sizes = ", ".join(f"{w}x{h}" for w, h in SIZES)
    table = "\n".join([
        f"{len(images)} JPEG photos ({sizes}, cycled), decoded once; full processor call (ids + pixel "
        f"values, released 336px geometry). Best of {args.repeats}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, transformers {transformers.__version__}. Max |pixel diff| vs HF: {worst:.3g}. "
        "The threaded column needs idle cores: our resize jobs (grid and base of each image) run on a thread "
        "pool; on a busy machine it falls back to the 1-thread numbers.",
        "",
        f"| case | ours, 1 thread (images/s) | ours, {ours.num_threads} threads (images/s) | HF PIL (images/s) "
        "| speed-up 1 thread | speed-up threaded |",
        "|---|---|---|---|---|---|",
        *(f"| {name} | {a:.1f} | {b:.1f} | {c:.1f} | {r1:.2f}x | {r2:.2f}x |" for name, a, b, c, r1, r2 in rows),
    ])
    print(table)
    if args.write_docs:
        write_docs(table)


def write_docs(table: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## Processor\n\n`{COMMAND}`\n\n{table}\n"
    if "## Processor\n" in text:  # replace our section, keep everyone else's
        head, rest = text.split("## Processor\n", 1)
        tail = rest[rest.find("\n## "):] if "\n## " in rest else ""
        text = head + section + ("\n" + tail.lstrip("\n") if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
