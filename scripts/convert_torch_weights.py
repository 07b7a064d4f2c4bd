#!/usr/bin/env python
"""Convert an HF LLaVA-NeXT checkpoint directory into an Orbax checkpoint that llava_next_jax loads.

    python scripts/convert_torch_weights.py SRC_DIR OUT_DIR [--dtype bfloat16|float16|float32]

SRC_DIR: safetensors (single or sharded with an index) or pytorch_model*.bin (needs torch), in any of
the key layouts transformers has written. OUT_DIR gets `params/` plus the config, tokenizer, processor
and generation files, so it is all `LlavaNext.from_pretrained` and `LlavaNextProcessor` need.
Tensors are read and written one parameter at a time: peak memory is about the largest stacked
parameter (e.g. all layers' MLP weights of one kind), not the model.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llava_next_jax.convert_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
