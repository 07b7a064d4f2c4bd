"""How fast a JSON-array data file is indexed: `data.array_items` over LLaVA-style rows.

    .venv/bin/python benchmarks/data_scan.py [--rows 150000] [--repeats 3]

Writes rows shaped like LLaVA's released training data (an image path, a human turn with <image>, a
gpt answer of a few sentences, some non-ASCII text) as a JSON array, pretty-printed (indent=2, as
LLaVA's files) and on one line, then times the scan that finds every item's byte range (the part of
opening a file that does not depend on the tokenizer) beside `json.load` of the same file, which a
loader holding every row as Python objects would pay, in time and in memory.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import median_seconds  # noqa: E402  (it puts the repository on sys.path)
from llava_next_jax.data import array_items  # noqa: E402


def rows(n: int) -> list[dict]:
    answer = ("The image shows a red car parked near a tree, with a {\"brace\"} and [brackets] in a sign; "
              "café ☕ 東京 🙂. ")
    return [{"id": f"{i:09d}", "image": f"coco/train2017/{i:012d}.jpg",
             "conversations": [{"from": "human", "value": "<image>\nWhat is in the picture?"},
                               {"from": "gpt", "value": answer * (1 + i % 4)}]} for i in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=150000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = rows(args.rows)
    print(f"| file ({args.rows} rows) | MB | array_items s | MB/s | json.load s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, indent in (("indent=2", 2), ("one line", None)):
            path = os.path.join(tmp, "data.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=indent, ensure_ascii=False)
            size = os.path.getsize(path) / 1e6

            def scan():
                with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
                    starts, _ = array_items(text, path)
                assert len(starts) == args.rows
            scan_s = median_seconds(scan, args.repeats)
            load_s = median_seconds(lambda: json.load(open(path, encoding="utf-8")), args.repeats)
            print(f"| {name} | {size:.1f} | {scan_s:.2f} | {size / scan_s:.1f} | {load_s:.2f} |")


if __name__ == "__main__":
    main()
