#!/usr/bin/env python
"""Convert an HF LLaVA-NeXT checkpoint directory into an Orbax checkpoint that llava_next_jax loads.

    python scripts/convert_torch_weights.py SRC_DIR OUT_DIR [--dtype bfloat16|float16|float32]

SRC_DIR: safetensors (single or sharded with an index) or pytorch_model*.bin (needs torch), in any of
the key layouts transformers has written. OUT_DIR gets `params/` plus the config, tokenizer, processor
and generation files, so it is all `LlavaNext.from_pretrained` and `LlavaNextProcessor` need.
Tensors are read one at a time and written in groups of ~64 MiB: peak memory follows the largest
tensor, not the model (docs/benchmarks.md has the measurement).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llava_next_jax.convert_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
