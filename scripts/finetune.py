#!/usr/bin/env python
"""Fine-tune LLaVA-NeXT on a JSONL of LLaVA conversations (resumable; see llava_next_jax/finetune.py).

    python scripts/finetune.py --model DIR --data train.jsonl --output RUN_DIR [--steps N] [--trainable ...]

Re-running the same command resumes from the newest checkpoint in RUN_DIR; the final params are
exported to RUN_DIR/export for LlavaNext.from_pretrained (and to --export-hf DIR as HF safetensors).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llava_next_jax.finetune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
