"""Batch captioning: image files -> one JSON row per image, crash-safe and resumable.

    python scripts/caption.py --images DIR_OR_FILES... --output captions.jsonl [--model DIR]
                              [--prompt TEXT] [--batch-size 8] [--max-new-tokens 64]
                              [--do-sample --temperature T --top-k K --top-p P] [--seed N]
    (also installed as `llava-next-caption`)

Inputs: image files, directories (searched recursively for IMAGE_EXTENSIONS) and list files (.txt:
one path a line, '#' comments; .jsonl: rows with an "image" key, e.g. an earlier output; relative
paths are relative to the list file). Without --model the built-in random-weight demo model is used
(meaningless captions; see llava_next_jax/demo.py).

Output rows, `{"image": path, "caption": text}` or `{"image": path, "error": message}`, are appended
and fsync'd batch by batch: a kill loses at most the batch in flight. Re-running with the same
--output resumes: a trailing partial line (killed mid-write) is cut off, inputs already recorded
(caption or error) are skipped.

Exit status: 0 every input has a caption, 1 some inputs failed (unreadable, empty, truncated, not an
image; listed on stderr), 2 usage or configuration errors (bad flags, missing model, no images),
3 the run crashed (e.g. device out of memory; the rows written so far stay valid: re-run to resume),
130 interrupted.

Throughput: images are grouped by tile count and prompt length (read from the file header, not
decoded) so a batch pads little; the next batch is decoded and preprocessed on a thread while the
device generates. Greedy captions do not depend on the batch an image lands in; with --do-sample
each image gets its own seed from (--seed, its path), so sampled captions do not either.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

from .prompting import DEFAULT_CAPTION_PROMPT, chat_prompt, decode_new_tokens

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".jsonl")
DEFAULT_PROMPT = DEFAULT_CAPTION_PROMPT
_EXIF_ORIENTATION = 0x0112


class UsageError(Exception):
    """Bad flags, a missing model or no inputs: exit status 2."""


# --- inputs --------------------------------------------------------------------------------------

def collect_inputs(paths: Iterable[str]) -> list[str]:
    """Image paths from files, directories (recursive, sorted) and .txt/.jsonl lists; duplicates dropped.

    A path named on the command line must exist (else UsageError); paths inside list files need not
    (a missing one becomes an error row, like any unreadable image).
    """
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(path) and path.lower().endswith(LIST_EXTENSIONS):
            found += _read_list(path)
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UsageError(f"--images {path}: no such file or directory")
    unique = list(dict.fromkeys(found))
    if not unique:
        raise UsageError(f"no images found in {' '.join(paths)} (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                         f"and .txt/.jsonl lists of paths)")
    return unique


def _read_list(path: str) -> list[str]:
    base = os.path.dirname(path)
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if path.lower().endswith(".jsonl"):
                try:
                    row = json.loads(line)
                    line = row if isinstance(row, str) else row["image"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UsageError(f"{path}:{lineno}: expected a JSON string or an object with an \"image\" "
                                     f"key; got {line[:80]!r}") from None
            out.append(os.path.join(base, line))
    return out


# --- the output file -----------------------------------------------------------------------------

def repair_output(path: str, log=None) -> None:
    """Cuts a trailing partial line (a run killed mid-write) so appended rows start on a line of their own."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
            if log:
                log(f"{path}: removed a partial last line ({len(data) - keep} bytes) left by an interrupted run")


def read_rows(path: str, log=None) -> list[dict]:
    """The complete, valid rows of a caption JSONL (a partial last line and non-row lines are skipped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for lineno, line in enumerate(lines[:-1], 1):  # the last piece is "" or a partial line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if isinstance(row, dict) and isinstance(row.get("image"), str):
                rows.append(row)
                continue
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        if log:
            log(f"{path}:{lineno}: not a caption row, ignored: {line[:80]!r}")
    return rows


class RowWriter:
    """Appends JSON rows; each `write` is one flushed, fsync'd write of whole lines."""

    def __init__(self, path: str):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in rows)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


# --- batching ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Item:
    path: str
    size: tuple[int, int]   # (height, width) after EXIF orientation
    tiles: int
    tokens: int             # image tokens in the prompt


def header_size(path: str) -> tuple[int, int]:
    """(height, width) as the processor will see it (EXIF rotation applied), from the header only."""
    from PIL import Image
    with Image.open(path) as image:
        width, height = image.size
        if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
    return height, width


def plan_batches(paths: list[str], geometry, batch_size: int) -> tuple[list[list[Item]], list[dict]]:
    """Batches of similar images (tile count, then image tokens), and error rows for unreadable headers."""
    from . import anyres
    items, errors = [], []
    for path in paths:
        try:
            size = header_size(path)
            if min(size) <= 0:
                raise ValueError(f"zero area {size}")
        except Exception as e:  # noqa: BLE001 -- any failure to read a header makes an error row
            errors.append({"image": path, "error": _read_error(path, e)})
            continue
        items.append(Item(path, size, anyres.num_tiles(size, geometry), anyres.num_image_tokens(size, geometry)))
    items.sort(key=lambda it: (it.tiles, it.tokens))  # stable: input order within a group
    return [items[i:i + batch_size] for i in range(0, len(items), batch_size)], errors


def _read_error(path: str, e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return f"image file {path} does not exist"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return f"image file {path} is empty (0 bytes)"
    return f"image file {path} cannot be read (empty, truncated or not an image): {e}"


def image_seed(seed: int, path: str) -> int:
    """A 32-bit sampling seed from (--seed, image path): the same whatever batch the image lands in."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{path}".encode("utf-8")).digest()[:4], "little")


# --- the captioner -------------------------------------------------------------------------------

@dataclasses.dataclass
class Prepared:
    items: list[Item]                 # the images that decoded, in batch order
    inputs: dict | None               # processor output for them
    errors: list[dict]                # rows for the ones that did not


class Captioner:
    """Holds the model, processor and generation settings; `prepare` runs on the host, `caption` on the device."""

    def __init__(self, model, processor, prompt: str, max_new_tokens: int, do_sample=False, temperature=1.0,
                 top_k=0, top_p=1.0, seed=0):
        self.model, self.processor = model, processor
        try:
            self.prompt, self.add_special_tokens = chat_prompt(processor, prompt)
        except ValueError as e:
            raise UsageError(str(e).replace("in the prompt", "in --prompt")) from None
        self.gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                        top_p=top_p)
        self.seed = seed

    def prepare(self, batch: list[Item]) -> Prepared:
        """Decodes and preprocesses a batch (thread-safe; runs ahead of the device)."""
        from .processor import open_image
        images, ok, errors = [], [], []
        for item in batch:
            try:
                images.append(open_image(item.path))
                ok.append(item)
            except Exception as e:  # noqa: BLE001 -- a bad file is a row, not the end of the run
                errors.append({"image": item.path, "error": _read_error(item.path, e) if not isinstance(
                    e, ValueError) else str(e)})
        inputs = None
        if images:
            try:
                inputs = self._process(images)
            except ValueError:  # one image the processor rejects: find it, keep the rest
                keep = []
                for item, image in zip(ok, images):
                    try:
                        self._process([image])
                        keep.append((item, image))
                    except ValueError as e:
                        errors.append({"image": item.path, "error": f"image file {item.path}: {e}"})
                ok, images = [k[0] for k in keep], [k[1] for k in keep]
                inputs = self._process(images) if images else None
        return Prepared(ok, inputs, errors)

    def _process(self, images) -> dict:
        return self.processor(images=images, text=[self.prompt] * len(images),
                              add_special_tokens=self.add_special_tokens)

    def caption(self, prepared: Prepared) -> list[dict]:
        """Generates for a prepared batch; rows in batch order, error rows included."""
        rows = list(prepared.errors)
        if prepared.inputs is None:
            return rows
        seeds = np.array([image_seed(self.seed, it.path) for it in prepared.items], np.uint32)
        tokens = self.model.generate(**prepared.inputs, **self.gen, seed=seeds)
        texts = decode_new_tokens(self.processor, tokens)
        rows += [{"image": it.path, "caption": text} for it, text in zip(prepared.items, texts)]
        return rows


def run(captioner: Captioner, batches: list[list[Item]], writer: RowWriter, progress) -> list[dict]:
    """Captions `batches`, writing each batch's rows as it finishes; preprocessing runs one batch ahead."""
    written = []
    if not batches:
        return written
    with ThreadPoolExecutor(1, thread_name_prefix="caption-prepare") as pool:
        upcoming = pool.submit(captioner.prepare, batches[0])
        for i in range(len(batches)):
            prepared = upcoming.result()
            if i + 1 < len(batches):
                upcoming = pool.submit(captioner.prepare, batches[i + 1])
            rows = captioner.caption(prepared)
            writer.write(rows)
            written += rows
            progress.update(len(rows))
    return written


# --- command line --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="caption.py", description="Caption images with LLaVA-NeXT into a JSONL file.",
                                epilog="Exit status: 0 all captioned, 1 some inputs failed, 2 usage/config error, "
                                       "3 crashed (re-run resumes).")
    p.add_argument("--model", default=None,
                   help="converted (or HF) LLaVA-NeXT checkpoint dir; default: the built-in RANDOM-WEIGHT demo model")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="image files, directories (recursive) or .txt/.jsonl lists of paths")
    p.add_argument("--output", required=True, metavar="OUT.jsonl", help="rows are appended; re-running resumes")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"question asked of each image, through the chat template (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    p.add_argument("--seed", type=int, default=0,
                   help="with --do-sample: each image's seed derives from this and its path")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: as stored)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _check_flags(parser: argparse.ArgumentParser, args) -> None:
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        parser.error(f"need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1; got {args.temperature}, "
                     f"{args.top_k}, {args.top_p}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be a non-negative integer; got {args.seed}")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(out_dir):
        parser.error(f"--output {args.output}: directory {out_dir} does not exist")
    if os.path.isdir(args.output):
        parser.error(f"--output {args.output} is a directory; give a .jsonl file path")


def _load(model_dir: str | None, dtype: str | None, log):
    """(model, processor, model_dir); UsageError for a missing or unloadable checkpoint."""
    if model_dir is None:
        from .demo import RANDOM_WEIGHTS_NOTE, demo_model_dir
        log(RANDOM_WEIGHTS_NOTE)
        model_dir = demo_model_dir(log)
    elif not os.path.isdir(model_dir):
        raise UsageError(f"--model {model_dir}: no such directory (expected a converted or HF LLaVA-NeXT checkpoint)")
    elif not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"--model {model_dir}: no config.json there; is it a LLaVA-NeXT checkpoint directory?")
    from . import LlavaNext, LlavaNextProcessor
    try:
        processor = LlavaNextProcessor.from_pretrained(model_dir)
        model = LlavaNext.from_pretrained(model_dir, dtype=dtype)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(f"--model {model_dir} cannot be loaded: {e}") from None
    return model, processor, model_dir


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_flags(parser, args)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    start = time.time()
    try:
        inputs = collect_inputs(args.images)
        repair_output(args.output, log)
        earlier = {row["image"]: row for row in read_rows(args.output, log)}
        pending = [p for p in inputs if p not in earlier]
        model, processor, model_dir = (None, None, args.model) if not pending else _load(args.model, args.dtype, log)
        if pending:
            captioner = Captioner(model, processor, args.prompt, args.max_new_tokens, args.do_sample,
                                  args.temperature, args.top_k, args.top_p, args.seed)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(pending) < len(inputs):
        log(f"resuming {args.output}: {len(inputs) - len(pending)} of {len(inputs)} inputs already recorded")

    from tqdm import tqdm
    writer = RowWriter(args.output)
    progress = tqdm(total=len(pending), unit="img", desc="captioning", disable=args.no_progress or not pending,
                    file=sys.stderr, dynamic_ncols=True)
    try:
        if pending:
            batches, header_errors = plan_batches(pending, processor.geometry, args.batch_size)
            writer.write(header_errors)
            progress.update(len(header_errors))
            started = time.time()
            rows = header_errors + run(captioner, batches, writer, progress)
            elapsed = time.time() - started
    except KeyboardInterrupt:
        print(f"\ninterrupted; the rows written so far are in {args.output}; re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 -- a crash is not "some images failed" (exit 1)
        import traceback
        traceback.print_exc()
        print(f"error: the run crashed; the rows written so far are in {args.output}; re-run the same command to "
              f"resume", file=sys.stderr)
        return 3
    finally:
        progress.close()
        writer.close()
    if not pending:
        rows, elapsed = [], 0.0

    final = {**earlier, **{r["image"]: r for r in rows}}
    failed = [p for p in inputs if "caption" not in final.get(p, {})]
    captioned = len(inputs) - len(failed)
    this_run = sum("caption" in r for r in rows)
    rate = f", {this_run / elapsed:.2f} images/s" if this_run and elapsed > 0 else ""
    log(f"{captioned}/{len(inputs)} images captioned ({this_run} this run{rate}, "
        f"{len(inputs) - len(pending)} recorded earlier) -> {args.output} [{time.time() - start:.1f} s]")
    if failed:
        log(f"{len(failed)} failed:")
        for p in failed[:20]:
            log(f"  {final.get(p, {}).get('error', 'no row')}")
        if len(failed) > 20:
            log(f"  ... and {len(failed) - 20} more (rows with an \"error\" key in {args.output})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
