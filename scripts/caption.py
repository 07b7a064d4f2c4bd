#!/usr/bin/env python
"""Caption images with LLaVA-NeXT into a JSONL file (resumable; see llava_next_jax/caption.py).

    python scripts/caption.py --model DIR --images PATH... --output OUT.jsonl [--prompt TEXT]
                              [--batch-size N] [--max-new-tokens N] [--do-sample ...] [--seed N]
                              [--process-index I --process-count N]
    python scripts/caption.py merge --output OUT.jsonl [--process-count N]

Without --model, the built-in random-weight demo model is used (meaningless captions). With
--process-count N > 1 each process writes its own shard (OUT.part-IIIII-of-NNNNN.jsonl); `merge`
joins them into OUT.jsonl in input order once all are complete.
Exit status: 0 all captioned, 1 some inputs failed, 2 usage or configuration error, 3 crashed
(re-run the same command to resume), 4 merge: a shard is missing or incomplete.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from llava_next_jax.caption import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
