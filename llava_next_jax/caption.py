"""Batch captioning: image files -> one JSON row per image, crash-safe and resumable.

    python scripts/caption.py --images DIR_OR_FILES... --output captions.jsonl [--model DIR]
                              [--prompt TEXT] [--batch-size 8] [--max-new-tokens 64]
                              [--do-sample --temperature T --top-k K --top-p P] [--min-p P] [--typical-p P]
                              [--epsilon-cutoff E] [--eta-cutoff E] [--top-h H] [--seed N] [--scores]
                              [--repetition-penalty R] [--no-repeat-ngram-size N]
                              [--num-beams K [--length-penalty L]] [--prompt-lookup N]
                              [--process-index I --process-count N]
    python scripts/caption.py merge --output captions.jsonl [--process-count N]
    (also installed as `llava-next-caption`)

Inputs: image files, directories (searched recursively for IMAGE_EXTENSIONS, through symlinks, each
real directory once; one that cannot be read is named on stderr and makes the exit status 1) and list
files (.txt: one path a line, '#' comments; .jsonl: rows with an "image" key, e.g. an earlier output;
relative paths are relative to the list file, except in a caption output's rows, see below). Without
--model the built-in random-weight demo model is used (meaningless captions; see llava_next_jax/demo.py).

Paths: an image is its path as given, normalised (`./a//b.jpg` is `a/b.jpg`), and rows hold it so:
relative to the directory the run was started in. An image's identity (resume, merge, duplicates) is
that path made absolute against the working directory, so resume from the same directory, spelled
relatively or absolutely; for the same reason a caption output given as a .jsonl list (rows with
"caption" or "error") has its relative paths read against the working directory, not the list's.

Output rows, `{"image": path, "caption": text}` or `{"image": path, "error": message}`, are appended
and fsync'd batch by batch (with --scores a caption row also holds "logprob", the sum of its generated
tokens' log-probabilities, the stop token included, and "tokens", how many: for ranking or filtering
captions by the model's confidence, e.g. by logprob / tokens; with --num-beams, "logprob" is the
beam's score times tokens**L, its summed log-probabilities as beam search counts them): a kill loses
at most the batch in flight. Re-running with the same --output resumes: a trailing partial line
(killed mid-write) is cut off (a whole last row missing only its newline is kept), inputs already
recorded (caption or error) are skipped. A run holds an exclusive lock (flock) on its output: a
second run on it exits 2. An existing --output that holds no caption row (say, an image) is refused
untouched. The settings that change captions (CAPTION_SETTINGS: model, prompt, generation flags,
seed, dtype) are recorded in OUT.settings.json beside OUT.jsonl when it is started; resuming with
others exits 2 naming each (outputs from before this record resume unchecked).

Many processes (hosts): `--process-index I --process-count N` (default: this process's place in an
already initialised jax.distributed system, else 0 of 1) gives process I the inputs at positions
I, I + N, I + 2N, ... of the input list (in collect_inputs order; every process must see the same
list, so give them the same --images, reachable under the same paths). Each process captions its
part on its own devices, waits for no other, and writes its own shard beside --output, with the
resume guarantees above. For --output OUT.jsonl, I 0-based, I and N as 5 digits (process 1 of 4:
OUT.part-00001-of-00004.jsonl):

    OUT.part-IIIII-of-NNNNN.jsonl          its rows, in the order they finished
    OUT.part-IIIII-of-NNNNN.inputs.json    its inputs, a digest of the whole list and its caption
                                           settings (written first)

When every process has finished,

    python scripts/caption.py merge --output OUT.jsonl [--process-count N]

checks that each shard holds one row for each of its inputs, and that all shards come from the same
input list and caption settings, then writes OUT.jsonl with every row in input order (temp file + rename: a reader never
sees half of it). The shards are only read; merging again rewrites the same file. It refuses to
replace an existing OUT.jsonl holding captions the merge would drop or change (move that file away).

Exit status: 0 every input has a caption, 1 some inputs failed (unreadable, empty, truncated, not an
image; listed on stderr; or a directory could not be read), 2 usage or configuration errors (bad
flags or list files, a missing or damaged model, no images, an output that cannot be written, is
locked by another run, is not a caption file or holds captions of other settings; merge: shards of
different input lists or settings, an OUT.jsonl it would overwrite), 3 the run crashed (e.g.
device out of memory; the rows written so far stay valid: re-run to resume), 4 merge only: a shard is
missing or incomplete (each named on stderr with its missing rows; run that process, then merge
again), 130 interrupted.

Throughput: images are grouped by tile count and prompt length (read from the file header, not
decoded) so a batch pads little; the next batch is decoded and preprocessed on a thread while the
device generates. A batch short of --batch-size images (the last one, or one with images that failed
to decode) runs at the full size, its last image repeated and those results dropped: it reuses the
full batches' compiled programs instead of compiling its own (tens of seconds for a 7B model on a
GPU; on a CPU its extra rows can cost more than that compile). Greedy captions do not depend on the
batch an image lands in; with --do-sample each image gets its own seed from (--seed, its path), so
sampled captions do not either.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import re
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


class IncompleteShards(Exception):
    """merge: a shard is missing or lacks rows for some of its inputs: exit status 4."""


# --- inputs --------------------------------------------------------------------------------------

def image_key(path: str) -> str:
    """An image's identity for resuming, merging and dropping duplicates: its absolute, normalised path
    (relative paths, in --images and in rows alike, are relative to the working directory)."""
    return os.path.abspath(path)


def collect_inputs(paths: Iterable[str], unreadable: list[str] | None = None) -> list[str]:
    """Image paths from files, directories (recursive, sorted) and .txt/.jsonl lists, normalised
    (os.path.normpath); duplicates (the same `image_key`) dropped, the first spelling kept.

    A path named on the command line must exist (else UsageError); paths inside list files need not
    (a missing one becomes an error row, like any unreadable image). Directories are searched through
    symlinks, each real directory once (no loops); those that cannot be read are appended to
    `unreadable` (their images are not inputs).
    """
    unreadable = [] if unreadable is None else unreadable
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found += _walk_images(path, unreadable)
        elif os.path.isfile(path) and path.lower().endswith(LIST_EXTENSIONS):
            found += _read_list(path)
        elif os.path.isfile(path):
            found.append(path)
        else:
            raise UsageError(f"--images {path}: no such file or directory")
    unique: dict[str, str] = {}
    for path in map(os.path.normpath, found):
        unique.setdefault(image_key(path), path)
    if not unique:
        unread = f"; cannot read {', '.join(unreadable)}" if unreadable else ""
        raise UsageError(f"no images found in {' '.join(paths)} (looked for {', '.join(IMAGE_EXTENSIONS)} files "
                         f"and .txt/.jsonl lists of paths{unread})")
    return list(unique.values())


def _walk_images(directory: str, unreadable: list[str]) -> list[str]:
    """The image files under `directory`, sorted, through symlinked directories, each real directory once."""
    found, visited = [], set()
    on_error = lambda e: unreadable.append(f"{e.filename} ({e.strerror})")  # noqa: E731
    for root, dirs, files in os.walk(directory, onerror=on_error, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:   # a symlink back up the tree, or to a directory already searched
            dirs.clear()
            continue
        visited.add(real)
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return found


def _read_list(path: str) -> list[str]:
    """The paths in a list file; relative ones are relative to the list's directory, except in rows of a
    caption output (see `_list_row`). UsageError naming file:line for a line that is not a path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"--images {path}: cannot read this list file ({e.strerror})") from None
    out = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise UsageError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                             f"a list holds one image path a line") from None
        if not line or line.startswith("#"):
            continue
        relative_to_list = True
        if path.lower().endswith(".jsonl"):
            line, relative_to_list = _list_row(line, f"{path}:{lineno}")
        out.append(os.path.join(os.path.dirname(path), line) if relative_to_list else line)
    return out


def _list_row(line: str, where: str) -> tuple[str, bool]:
    """(image path, whether a relative one is relative to the list's directory) of a .jsonl list line:
    a JSON string, or an object with an "image" key. A caption output's row (one with "caption" or
    "error") holds the path its run was given, relative to the directory that run was started in, so
    it is read as relative to the working directory: run from there to reuse an output as a list."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON ({e.msg}): {line[:80]!r}") from None
    image = row.get("image") if isinstance(row, dict) else row
    if not isinstance(image, str) or not image.strip():
        raise UsageError(f"{where}: expected a JSON string or an object with an \"image\" key, holding a path; "
                         f"got {line[:80]!r}")
    return image, not (isinstance(row, dict) and ("caption" in row or "error" in row))


# --- the output file -----------------------------------------------------------------------------

def _parse_row(line: bytes) -> dict | None:
    """The caption row on `line` (a JSON object with an "image" path), else None."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("image"), str) else None


def is_caption_file(data: bytes) -> bool:
    """Whether `data` may be a caption JSONL: empty, or holding a row, or torn in its first row."""
    return (not data.strip() or data.startswith(b'{"image": ')
            or any(_parse_row(line) is not None for line in data.split(b"\n")))


def repair_output(path: str, log=None) -> None:
    """Readies `path` for appending rows: a trailing partial line (a run killed mid-write) is cut off; a
    complete last row without its newline gets one. UsageError, the file untouched, if it exists and
    holds something other than caption rows (a mistyped --output, e.g. an image)."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not is_caption_file(data):
            raise UsageError(f"--output {path} is not a caption file: it holds {len(data)} bytes and no caption "
                             f"row (it starts {data[:24]!r}); it was left as it is: give another --output")
        if data.endswith(b"\n") or not data:
            return
        keep = data.rfind(b"\n") + 1
        if _parse_row(data[keep:]) is not None:   # a whole row: e.g. the file edited and saved without one
            f.write(b"\n")
            done = "added the newline missing after its last row"
        else:
            f.truncate(keep)
            done = f"removed a partial last line ({len(data) - keep} bytes) left by an interrupted run"
        f.flush()
        os.fsync(f.fileno())
    if log:
        log(f"{path}: {done}")


def read_rows(path: str, log=None) -> list[dict]:
    """The valid rows of a caption JSONL (a torn last line and non-row lines are skipped)."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _parse_row(line)
        if row is not None:
            rows.append(row)
        elif log and lineno < len(lines):   # the last piece: a torn line, not a stray one
            log(f"{path}:{lineno}: not a caption row, ignored: {line[:80]!r}")
    return rows


def _row_bytes(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n"


class RowWriter:
    """Appends JSON rows; each `write` is one flushed, fsync'd write of whole lines.

    It holds an exclusive lock on the file (flock) from its creation to `close`: UsageError if another
    run holds it, or if the file cannot be opened for writing."""

    def __init__(self, path: str):
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise UsageError(f"--output {path}: cannot open it for writing ({e.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UsageError(f"--output {path}: another run is writing that output (it holds the file's lock); "
                             f"let it finish, or give this run another --output") from None
        except OSError as e:   # a file system without locks (some network and FUSE mounts): write unlocked
            print(f"warning: --output {path}: cannot lock it ({e.strerror}); make sure no other run writes it",
                  file=sys.stderr)

    def write(self, rows: list[dict]) -> None:
        if not rows:
            return
        data = b"".join(map(_row_bytes, rows))
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def write_atomic(path: str, chunks: Iterable[bytes]) -> None:
    """Writes `path` as a whole or not at all: a temp file beside it, fsync'd, renamed over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


# --- the settings the captions were made with ----------------------------------------------------
#
# Rows made with other settings must not land in one file unnoticed: an output records the settings of
# its rows (beside it, OUT.settings.json; a shard in its .inputs.json), a resume with others is refused,
# and so is a merge of shards made with different ones. An output from before the record resumes unchecked.

CAPTION_SETTINGS = ("model", "prompt", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
                    "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h", "seed", "repetition_penalty",
                    "no_repeat_ngram_size", "num_beams", "length_penalty", "stop_string", "dtype")
DEMO_MODEL = "built-in demo model"


def caption_settings(args: argparse.Namespace) -> dict:
    """The flags that change captions (not --batch-size, --prompt-lookup, --scores, the process flags...)."""
    settings = {name: getattr(args, name) for name in CAPTION_SETTINGS}
    settings["model"] = os.path.abspath(args.model) if args.model else DEMO_MODEL
    return settings


def settings_changes(old: dict, new: dict) -> list[str]:
    """The settings that differ, as "--flag OLD -> NEW"."""
    names = [*new, *(name for name in old if name not in new)]
    return [f"--{name.replace('_', '-')} {old.get(name)!r} -> {new.get(name)!r}" for name in names
            if old.get(name) != new.get(name)]


def settings_path(output: str) -> str:
    """The settings record of a single-process output: OUT.settings.json beside OUT.jsonl."""
    return f"{_shard_base(output)}.settings.json"


# --- shards: one per process ---------------------------------------------------------------------
#
# Worked example, 5 inputs [a, b, c, d, e] over 2 processes, --output OUT.jsonl:
#   process 0: positions 0, 2, 4 -> a, c, e   rows in OUT.part-00000-of-00002.jsonl
#   process 1: positions 1, 3    -> b, d      rows in OUT.part-00001-of-00002.jsonl
# and each writes its inputs beside its rows (OUT.part-0000I-of-00002.inputs.json). The merge
# interleaves the shards' inputs back into [a, b, c, d, e], checks that this list has the digest
# every shard recorded, and writes OUT.jsonl with one row per input in that order.

def shard_positions(total: int, index: int, count: int) -> range:
    """Positions in the input list of process `index`'s inputs: every `count`-th one from `index`
    (interleaved rather than contiguous, so a directory's run of big images is spread over all)."""
    return range(index, total, count)


def shard_path(output: str, index: int, count: int) -> str:
    """Process `index`'s rows: OUT.part-00001-of-00004.jsonl for --output OUT.jsonl (index 0-based)."""
    return f"{_shard_base(output)}.part-{index:05d}-of-{count:05d}.jsonl"


def _shard_base(output: str) -> str:
    return output[:-len(".jsonl")] if output.endswith(".jsonl") else output


def shard_inputs_path(shard: str) -> str:
    """The shard's inputs record: OUT.part-00001-of-00004.inputs.json beside OUT.part-00001-of-00004.jsonl."""
    return shard[:-len(".jsonl")] + ".inputs.json"


def inputs_digest(inputs: list[str]) -> str:
    """sha256 of the whole input list, in order: shards agree on it iff they split the same list."""
    return hashlib.sha256(json.dumps(inputs, ensure_ascii=False).encode("utf-8")).hexdigest()


def start_shard(output: str, inputs: list[str], index: int, count: int, settings: dict | None, log) -> None:
    """Records process `index`'s inputs, and the settings of its shard's rows where known, beside the
    shard (before any row is written)."""
    mine = [inputs[k] for k in shard_positions(len(inputs), index, count)]
    record = {"process_index": index, "process_count": count, "total_inputs": len(inputs),
              "inputs_sha256": inputs_digest(inputs), "inputs": mine}
    if settings is not None:
        record["settings"] = settings
    path = shard_inputs_path(shard_path(output, index, count))
    try:
        earlier = _read_record(path)
    except ValueError as e:
        log(f"{e}; rewriting it")
        earlier = None
    if earlier != record:
        if earlier is not None and earlier.get("inputs_sha256") != record["inputs_sha256"]:
            log(f"{path}: the input list differs from the one this shard was started with "
                f"({earlier.get('total_inputs')} inputs then, {len(inputs)} now); recording the new one")
        write_atomic(path, [json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"])


def settings_to_record(output: str, record: str, has_rows: bool, pending: bool, settings: dict, log) -> dict | None:
    """The settings to record for `output` (in the JSON object at `record`): this run's if it holds no
    rows yet, else those recorded for its rows (None for an output from before the record). UsageError
    if this run would add captions made with other settings to rows made with the recorded ones."""
    if not has_rows:
        return settings
    try:
        recorded = (_read_record(record) or {}).get("settings")
    except ValueError as e:
        log(f"{e}: the settings {output}'s rows were made with are unknown")
        return None
    changes = settings_changes(recorded, settings) if isinstance(recorded, dict) else []
    if changes and pending:
        raise UsageError(f"{output} holds captions made with other settings (recorded in {record} -> this run: "
                         f"{', '.join(changes)}); resuming would mix both kinds in one file: give this run "
                         f"another --output, or finish that output with its recorded settings")
    if changes:
        log(f"note: this run's settings differ from {output}'s ({', '.join(changes)}), but it holds a row for "
            f"every input: nothing to caption")
    return recorded


def _read_record(path: str) -> dict | None:
    """A shard's inputs record; None if there is none, ValueError if it is not a JSON object."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    try:
        record = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} holds a JSON {type(record).__name__}, not the object a shard records")
    return record


def shard_counts(output: str) -> list[int]:
    """The process counts in the names of the shards found beside `output`."""
    base = re.escape(os.path.basename(_shard_base(output)))
    pattern = re.compile(base + r"\.part-\d{5}-of-(\d{5})\.(?:jsonl|inputs\.json)")
    names = os.listdir(os.path.dirname(os.path.abspath(output)))
    return sorted({int(m.group(1)) for m in map(pattern.fullmatch, names) if m})


def merge_shards(output: str, count: int, log) -> list[dict]:
    """The rows of the `count` shards of `output`, one per input, in input order.

    IncompleteShards (naming every shard that is missing or lacks rows, and how many) unless each
    shard's inputs record is there and its rows cover every one of its inputs exactly once (a row
    repeated verbatim counts once); UsageError if the shards were split from different input lists.
    """
    shards = [shard_path(output, i, count) for i in range(count)]
    again = [f"run process {i} (--process-index {i} --process-count {count}) again with the same flags; it "
             f"resumes" for i in range(count)]
    records, problems = [], []
    for i, shard in enumerate(shards):
        try:
            records.append(_read_record(shard_inputs_path(shard)))
        except ValueError as e:
            records.append(None)
            problems.append(f"{shard}: {e}: {again[i]}")
            continue
        if records[-1] is None:
            state = "has rows but no" if os.path.isfile(shard) else "is missing, and so is"
            problems.append(f"{shard} {state} {shard_inputs_path(shard)}: {again[i]}")
    present = [(i, s, r) for i, (s, r) in enumerate(zip(shards, records)) if r is not None]
    lists = {(r.get("total_inputs"), r.get("inputs_sha256")) for _, _, r in present}
    bad = [s for i, s, r in present if r.get("process_index") != i or r.get("process_count") != count
           or not isinstance(r.get("total_inputs"), int) or not isinstance(r.get("inputs"), list)
           or len(r["inputs"]) != len(shard_positions(r["total_inputs"], i, count))]
    if len(lists) > 1 or bad:
        described = "; ".join(f"{s}: process {r.get('process_index')} of {r.get('process_count')}, "
                              f"{len(r.get('inputs') or [])} of {r.get('total_inputs')} inputs, list sha256 "
                              f"{str(r.get('inputs_sha256'))[:12]}" for _, s, r in present)
        raise UsageError(f"the shards of {output} were not split from one input list by {count} processes "
                         f"({described}); re-run the odd ones with the same --images and --process-count {count}")
    known = [(s, r["settings"]) for _, s, r in present if isinstance(r.get("settings"), dict)]
    odd = [f"{s}: {', '.join(settings_changes(known[0][1], settings))}" for s, settings in known
           if settings != known[0][1]]
    if odd:
        raise UsageError(f"the shards of {output} were captioned with different settings (against {known[0][0]}: "
                         f"{'; '.join(odd)}); merging would mix their captions: move the odd shards and their "
                         f".inputs.json away and run those processes again with the same flags as the others")

    merged = {}
    for i, shard, record in present:
        wanted = set(map(image_key, record["inputs"]))
        rows, ignored, conflicts = {}, 0, set()
        for row in read_rows(shard, log):
            image = image_key(row["image"])
            if image not in wanted:
                ignored += 1
            elif rows.setdefault(image, row) != row:
                conflicts.add(row["image"])
        missing = len(wanted) - len(rows)
        if ignored:
            log(f"{shard}: {ignored} rows for images that are not among its inputs (an earlier input list), "
                f"left out")
        if missing:
            problems.append(f"{shard}: {missing} of its {len(wanted)} inputs have no row yet: {again[i]}")
        if conflicts:
            problems.append(f"{shard}: {len(conflicts)} inputs have several different rows (first: "
                            f"{sorted(conflicts)[0]}); were two processes run with the same --process-index? "
                            f"Keep one row for each and merge again")
        merged.update(rows)
    if problems:
        raise IncompleteShards("\n".join(problems))

    total = records[0]["total_inputs"]
    inputs = [None] * total
    for i, record in enumerate(records):
        for k, path in zip(shard_positions(total, i, count), record["inputs"]):
            inputs[k] = path
    if inputs_digest(inputs) != records[0]["inputs_sha256"]:
        raise UsageError(f"the inputs recorded in {shard_inputs_path(shards[0])} .. {shard_inputs_path(shards[-1])} "
                         f"do not interleave into the list whose digest they record; re-run every process")
    return [merged[image_key(p)] for p in inputs]


def check_replaceable(output: str, rows: list[dict]) -> None:
    """UsageError if `output` holds captions that writing `rows` over it would drop or change."""
    new = {image_key(r["image"]): r for r in rows}
    lost = [r["image"] for r in read_rows(output) if "caption" in r and new.get(image_key(r["image"])) != r]
    if lost:
        raise UsageError(f"{output} already holds {len(lost)} captions that the merged shards drop or change "
                         f"(first: {lost[0]}); move it away and merge again")


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

    def __init__(self, model, processor, prompt: str, max_new_tokens: int, do_sample=None, temperature=None,
                 top_k=None, top_p=None, seed=0, scores=False, repetition_penalty=None, no_repeat_ngram_size=None,
                 num_beams=None, length_penalty=None, prompt_lookup=None, min_p=None, typical_p=None,
                 epsilon_cutoff=None, eta_cutoff=None, top_h=None, stop_strings=None):
        """Generation settings left out (None) are the model's `generation_defaults` (the checkpoint's
        generation config, else HF's defaults), as in `LlavaNext.generate`; so are the processors no
        flag sets (suppress_tokens, bad_words_ids, ...: `model.PROCESSOR_SETTINGS`), which the
        checkpoint, recorded by its path, fixes. The length is always max_new_tokens (the flag's,
        default 64), never the generation config's."""
        self.model, self.processor = model, processor
        try:
            self.prompt, self.add_special_tokens = chat_prompt(processor, prompt)
        except ValueError as e:
            raise UsageError(str(e).replace("in the prompt", "in --prompt")) from None
        # one caption per image: num_return_sequences 1 over the generation config's (whose extra rows
        # would shift later images' captions)
        self.gen = dict(max_new_tokens=max_new_tokens, num_return_sequences=1, **model.generation_settings(
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_h=top_h,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams,
            length_penalty=length_penalty, prompt_lookup_num_tokens=prompt_lookup, stop_strings=stop_strings))
        if self.gen["stop_strings"] is not None:   # checked here, not in the first batch
            from .stop_strings import tables
            try:
                tables(processor, self.gen["stop_strings"], model.config.text.vocab_size)
            except ValueError as e:
                raise UsageError(f"--stop-string (or the model's generation config's stop_strings): {e}") from None
        if self.gen["num_beams"] > 1 and self.gen["prompt_lookup_num_tokens"]:
            raise UsageError(f"num_beams {self.gen['num_beams']} (the model's generation config or --num-beams) "
                             f"takes no --prompt-lookup")
        guidance = model.generation_defaults["guidance_scale"]
        if guidance not in (None, 1) and (self.gen["num_beams"] > 1 or self.gen["prompt_lookup_num_tokens"]):
            raise UsageError(f"the model's generation config sets guidance_scale={guidance!r}, which takes neither "
                             f"beams (--num-beams or the config's num_beams) nor --prompt-lookup")
        self.seed, self.scores = seed, scores

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

    def caption(self, prepared: Prepared, width: int = 0) -> list[dict]:
        """Generates for a prepared batch; rows in batch order, error rows included. A batch of fewer than
        `width` images (the last, or one whose images failed to decode) runs as `width` rows (its last image
        repeated, those results dropped): the programs compiled for full batches, none of its own."""
        rows = list(prepared.errors)
        if prepared.inputs is None:
            return rows
        from .model import repeat_last_row
        n = len(prepared.items)
        seeds = np.array([image_seed(self.seed, it.path) for it in prepared.items], np.uint32)
        tokens, logprobs = self.model.generate(**repeat_last_row(prepared.inputs, width), **self.gen,
                                               seed=repeat_last_row(seeds, width), return_logprobs=True,
                                               tokenizer=self.processor)
        tokens, logprobs = tokens[:n], logprobs[:n]
        texts = decode_new_tokens(self.processor, tokens)
        found = [{"image": it.path, "caption": text} for it, text in zip(prepared.items, texts)]
        if self.scores:   # the steps up to each row's first stop id, that one included
            stop = np.isin(tokens, self.model.eos_token_ids)
            generated = np.cumsum(stop, axis=1) - stop == 0
            if self.gen["stop_strings"] is not None:   # or to the token completing a stop string: the pads after
                after = (tokens == self.model.pad_id()) & ((logprobs == 0) if logprobs.ndim == 2 else True)
                generated &= np.cumsum(~after[:, ::-1], axis=1)[:, ::-1] > 0     # it (log-probability 0) are not
            lengths = generated.sum(1)
            if self.gen["num_beams"] > 1:   # a beam's score is its log-probability / length**length_penalty
                sums = logprobs * lengths.astype(np.float64) ** self.gen["length_penalty"]
            else:
                sums = np.where(generated, logprobs, 0).sum(1)
            for row, total, n in zip(found, sums, lengths):
                row.update(logprob=round(float(total), 4), tokens=int(n))
        return rows + found


def run(captioner: Captioner, batches: list[list[Item]], writer: RowWriter, progress) -> list[dict]:
    """Captions `batches`, writing each batch's rows as it finishes; preprocessing runs one batch ahead."""
    written = []
    if not batches:
        return written
    width = max(map(len, batches))   # every batch runs at this size (`Captioner.caption`)
    with ThreadPoolExecutor(1, thread_name_prefix="caption-prepare") as pool:
        upcoming = pool.submit(captioner.prepare, batches[0])
        for i in range(len(batches)):
            prepared = upcoming.result()
            if i + 1 < len(batches):
                upcoming = pool.submit(captioner.prepare, batches[i + 1])
            rows = captioner.caption(prepared, width=width)
            writer.write(rows)
            written += rows
            progress.update(len(rows))
    return written


# --- command line --------------------------------------------------------------------------------

def default_compilation_cache() -> str:
    """~/.cache/llava_next_jax/xla/cpu-HASH of this machine's CPU model and instruction sets: JAX's cache
    key names no CPU model, and programs compiled for one CPU must not load on another sharing a home."""
    from .cpu_kernels import cpu_name
    return os.path.join(os.path.expanduser("~"), ".cache", "llava_next_jax", "xla",
                        "cpu-" + hashlib.sha256(cpu_name().encode()).hexdigest()[:12])


def command_name() -> str:
    """How the user ran us, for help and hints: `llava-next-caption` (the installed command), else caption.py."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name.startswith("llava-next") else "caption.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_name(), description="Caption images with LLaVA-NeXT into a JSONL file. "
                                "With --process-count N > 1, each process writes its own shard; `%(prog)s merge "
                                "--output OUT` then joins them (see `%(prog)s merge --help`).",
                                epilog="Exit status: 0 all captioned, 1 some inputs failed, 2 usage/config error, "
                                       "3 crashed (re-run resumes).")
    p.add_argument("--model", default=None,
                   help="converted (or HF) LLaVA-NeXT checkpoint dir; default: the built-in RANDOM-WEIGHT demo model")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH",
                   help="image files, directories (recursive) or .txt/.jsonl lists of paths")
    p.add_argument("--output", required=True, metavar="OUT.jsonl", help="rows are appended; re-running resumes (with the same caption settings; one run at a time)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"question asked of each image, through the chat template (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    # Generation settings left out (None) are the checkpoint's generation config's, else HF's defaults.
    p.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None, help="default 1.0")
    p.add_argument("--top-k", type=int, default=None, help="0: off; default 50, as HF's")
    p.add_argument("--top-p", type=float, default=None, help="1.0 (the default): off")
    p.add_argument("--min-p", type=float, default=None, help="HF's min_p, in [0, 1] (default: off)")
    p.add_argument("--typical-p", type=float, default=None, help="HF's typical_p, in (0, 1]; 1.0 (the default): off")
    p.add_argument("--epsilon-cutoff", type=float, default=None, help="HF's, in [0, 1); 0.0 (the default): off")
    p.add_argument("--eta-cutoff", type=float, default=None, help="HF's, in [0, 1); 0.0 (the default): off")
    p.add_argument("--top-h", type=float, default=None, help="HF's top_h, in (0, 1] (default: off)")
    p.add_argument("--seed", type=int, default=0,
                   help="with --do-sample: each image's seed derives from this and its path")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="HF's repetition penalty (e.g. 1.2 against looping captions; 1.0: off)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="HF's no_repeat_ngram_size: no N tokens in a row twice, prompt included (0: off)")
    p.add_argument("--num-beams", type=int, default=None, metavar="K",
                   help="beam search over K beams, each image's caption its best (HF's num_beams; 1: off)")
    p.add_argument("--length-penalty", type=float, default=None, metavar="L",
                   help="beam search: a finished beam scores log-probability / length**L (HF's; > 0 favours "
                        "longer captions)")
    p.add_argument("--stop-string", action="append", default=None, metavar="TEXT",
                   help="end a caption after the token that completes TEXT, that token kept (HF's stop_strings; "
                        "repeat for several, up to 8)")
    p.add_argument("--prompt-lookup", type=int, default=None, metavar="N",
                   help="prompt lookup decoding: check up to N tokens drafted from the text so far in each pass "
                        "of the model (HF's prompt_lookup_num_tokens; the same captions, faster where they "
                        "repeat themselves; 0: off)")
    p.add_argument("--scores", action="store_true",
                   help="add each caption's summed token log-probability ('logprob') and token count ('tokens')")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: as stored)")
    p.add_argument("--process-index", type=int, default=None, metavar="I",
                   help="this process's 0-based index; it captions inputs I, I+N, I+2N, ... into "
                        "OUT.part-IIIII-of-NNNNN.jsonl (default: jax.process_index() if jax.distributed is "
                        "initialised, else 0)")
    p.add_argument("--process-count", type=int, default=None, metavar="N",
                   help="how many processes share the inputs; N > 1 writes shards for `merge` (default: "
                        "jax.process_count() if jax.distributed is initialised, else 1: --output itself)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="keep XLA's compiled programs in DIR, so that a later run with the same shapes compiles "
                        "nothing; 'none': off (default: JAX's own setting, $JAX_COMPILATION_CACHE_DIR, if any, "
                        "else ~/.cache/llava_next_jax/xla/cpu-HASH, a folder per CPU model)")
    return p


def use_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache in `path` for the programs compiled from now on; 'none': off;
    None: JAX's own setting if there is one, else `default_compilation_cache()`.

    JAX keys an entry by the program, its compile options, the JAX version and the device, so a change
    to any of them compiles afresh. Every program is kept, however fast its compile (JAX's default
    keeps those of a second or more; `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` still decides where
    set): the demo spends a quarter of its run compiling programs of less than a second."""
    import jax
    if path is None:
        path = jax.config.jax_compilation_cache_dir or default_compilation_cache()
    jax.config.update("jax_compilation_cache_dir", None if path == "none" else os.path.abspath(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{command_name()} merge",
                                description="Join the per-process shards of --output (OUT.part-IIIII-of-NNNNN.jsonl) "
                                            "into OUT.jsonl, one row per input in input order, written atomically.",
                                epilog="Exit status: 0 merged, all captioned; 1 merged, some inputs failed; 2 usage "
                                       "error, shards of different input lists or caption settings, or OUT.jsonl "
                                       "holds captions the merge would drop; 4 a shard is missing or incomplete "
                                       "(run that process again, then merge again).")
    p.add_argument("--output", required=True, metavar="OUT.jsonl",
                   help="the --output the processes were given; the merged file is written there")
    p.add_argument("--process-count", type=int, default=None, metavar="N",
                   help="how many processes wrote shards (default: the N in the shard names beside OUT.jsonl)")
    return p


def process_slot(index: int | None, count: int | None) -> tuple[int, int]:
    """(process index, process count): the flags, else jax.distributed's if some code initialised it, else (0, 1).

    JAX is not imported (nor started) here: a process that has not imported it has not initialised it.
    """
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        default = jax.process_index(), jax.process_count()
    else:
        default = 0, 1
    return (default[0] if index is None else index), (default[1] if count is None else count)


def _check_flags(parser: argparse.ArgumentParser, args) -> None:
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    bad = lambda value, ok: value is not None and not ok(value)   # a flag given with a value outside ok
    if bad(args.temperature, lambda t: t >= 0) or bad(args.top_k, lambda k: k >= 0) or bad(
            args.top_p, lambda p: 0 < p <= 1):
        parser.error(f"need --temperature >= 0, --top-k >= 0, 0 < --top-p <= 1; got {args.temperature}, "
                     f"{args.top_k}, {args.top_p}")
    from .generate import MAX_LOOKUP, MAX_NGRAM, WARPER_RANGES
    for name, (ok, interval) in WARPER_RANGES.items():
        if bad(getattr(args, name), ok):
            parser.error(f"--{name.replace('_', '-')} must be in {interval}; got {getattr(args, name)}")
    if bad(args.repetition_penalty, lambda r: r > 0):
        parser.error(f"--repetition-penalty must be > 0 (1.0: off); got {args.repetition_penalty}")
    if bad(args.no_repeat_ngram_size, lambda n: 0 <= n <= MAX_NGRAM):
        parser.error(f"--no-repeat-ngram-size must be in [0, {MAX_NGRAM}] (0: off); got {args.no_repeat_ngram_size}")
    if bad(args.num_beams, lambda k: k >= 1):
        parser.error(f"--num-beams must be >= 1 (with --do-sample: beam sampling); got {args.num_beams}")
    if bad(args.length_penalty, np.isfinite):
        parser.error(f"--length-penalty must be a finite number; got {args.length_penalty}")
    if bad(args.prompt_lookup, lambda n: 0 <= n <= MAX_LOOKUP and not (n and (args.num_beams or 1) > 1)):
        parser.error(f"--prompt-lookup must be in [0, {MAX_LOOKUP}] (0: off), and 0 with --num-beams > 1; "
                     f"got {args.prompt_lookup}")
    if not 0 <= args.seed < 2 ** 63:
        parser.error(f"--seed must be a non-negative integer; got {args.seed}")
    if not 0 <= args.process_index < args.process_count:
        parser.error(f"need 0 <= --process-index < --process-count; got {args.process_index} and "
                     f"{args.process_count}")
    _check_output(parser, args.output)


def _check_output(parser: argparse.ArgumentParser, output: str) -> None:
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        parser.error(f"--output {output}: directory {out_dir} does not exist")
    if os.path.isdir(output):
        parser.error(f"--output {output} is a directory; give a .jsonl file path")


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
    except Exception as e:  # noqa: BLE001 -- a damaged checkpoint fails in many ways (Orbax: bare Exceptions)
        if not isinstance(e, (ValueError, OSError, KeyError)) and type(e) is not Exception:
            raise   # not the files: e.g. the device out of memory
        from .checkpoint import first_line
        raise UsageError(f"--model {model_dir} cannot be loaded: {first_line(e)}") from None
    return model, processor, model_dir


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _report_failures(rows: list[dict], output: str, log) -> int:
    """Lists the inputs without a caption; the exit status: 1 if there are any, else 0."""
    failed = [r for r in rows if "caption" not in r]
    if not failed:
        return 0
    log(f"{len(failed)} failed:")
    for row in failed[:20]:
        log(f"  {row.get('error') or row['image'] + ': no row'}")
    if len(failed) > 20:
        log(f"  ... and {len(failed) - 20} more (rows with an \"error\" key in {output})")
    return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    args.process_index, args.process_count = process_slot(args.process_index, args.process_count)
    _check_flags(parser, args)
    use_compilation_cache(args.compilation_cache)
    unreadable: list[str] = []
    try:
        inputs = collect_inputs(args.images, unreadable)
        output = args.output
        if args.process_count > 1:
            output = shard_path(args.output, args.process_index, args.process_count)
        writer = RowWriter(output)   # holds the output's lock until closed: one run at a time writes it
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for directory in unreadable:
        _log(f"warning: cannot read directory {directory}: its images are left out")
    try:
        status = _caption_locked(args, inputs, output, writer, _log)
    finally:
        writer.close()
    if unreadable and status in (0, 1):
        _log(f"{len(unreadable)} directories could not be read (named above): their images were not captioned")
        return 1
    return status


def _caption_locked(args, inputs: list[str], output: str, writer: RowWriter, log) -> int:
    """main, once it holds `output`'s lock: resumes or starts it, captions what is pending; the exit status."""
    start = time.time()
    sharded = args.process_count > 1
    try:
        if sharded:
            all_inputs, inputs = inputs, [inputs[k] for k in shard_positions(len(inputs), args.process_index,
                                                                             args.process_count)]
            log(f"process {args.process_index} of {args.process_count}: {len(inputs)} inputs -> {output}")
        repair_output(output, log)
        earlier = {image_key(row["image"]): row for row in read_rows(output, log)}
        pending = [p for p in inputs if image_key(p) not in earlier]
        record = shard_inputs_path(output) if sharded else settings_path(output)
        settings = settings_to_record(output, record, bool(earlier), bool(pending), caption_settings(args), log)
        if sharded:
            start_shard(args.output, all_inputs, args.process_index, args.process_count, settings, log)
        elif not earlier:
            write_atomic(record, [json.dumps({"settings": settings}, ensure_ascii=False).encode("utf-8") + b"\n"])
        if pending:
            model, processor, _ = _load(args.model, args.dtype, log)
            captioner = Captioner(model, processor, args.prompt, args.max_new_tokens, args.do_sample,
                                  args.temperature, args.top_k, args.top_p, args.seed, args.scores,
                                  args.repetition_penalty, args.no_repeat_ngram_size, args.num_beams,
                                  args.length_penalty, args.prompt_lookup, min_p=args.min_p,
                                  typical_p=args.typical_p, epsilon_cutoff=args.epsilon_cutoff,
                                  eta_cutoff=args.eta_cutoff, top_h=args.top_h, stop_strings=args.stop_string)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(pending) < len(inputs):
        log(f"resuming {output}: {len(inputs) - len(pending)} of {len(inputs)} inputs already recorded")

    from tqdm import tqdm
    progress = tqdm(total=len(pending), unit="img", desc="captioning", disable=args.no_progress or not pending,
                    file=sys.stderr, dynamic_ncols=True)
    rows, elapsed = [], 0.0
    try:
        if pending:
            batches, header_errors = plan_batches(pending, processor.geometry, args.batch_size)
            writer.write(header_errors)
            progress.update(len(header_errors))
            started = time.time()
            rows = header_errors + run(captioner, batches, writer, progress)
            elapsed = time.time() - started
    except KeyboardInterrupt:
        print(f"\ninterrupted; the rows written so far are in {output}; re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 -- a crash is not "some images failed" (exit 1)
        import traceback
        traceback.print_exc()
        print(f"error: the run crashed; the rows written so far are in {output}; re-run the same command to "
              f"resume", file=sys.stderr)
        return 3
    finally:
        progress.close()

    final = {**earlier, **{image_key(r["image"]): r for r in rows}}
    captioned = sum("caption" in final.get(image_key(p), {}) for p in inputs)
    this_run = sum("caption" in r for r in rows)
    rate = f", {this_run / elapsed:.2f} images/s" if this_run and elapsed > 0 else ""
    log(f"{captioned}/{len(inputs)} images captioned ({this_run} this run{rate}, "
        f"{len(inputs) - len(pending)} recorded earlier) -> {output} [{time.time() - start:.1f} s]")
    if sharded:
        log(f"this shard is complete; once all {args.process_count} are, join them with: "
            f"{command_name()} merge --output {args.output} --process-count {args.process_count}")
    return _report_failures([final.get(image_key(p), {"image": p}) for p in inputs], output, log)


def merge_main(argv) -> int:
    """`caption.py merge`: the shards of --output joined into --output (see the module docstring)."""
    parser = build_merge_parser()
    args = parser.parse_args(argv)
    _check_output(parser, args.output)
    log = _log
    try:
        count = args.process_count
        if count is None:
            counts = shard_counts(args.output)
            if not counts:
                raise IncompleteShards(f"no shards of {args.output} found (looked for "
                                       f"{_shard_base(args.output)}.part-IIIII-of-NNNNN.jsonl); run the "
                                       f"processes first, each with --output {args.output}")
            if len(counts) > 1:
                raise UsageError(f"shards of {args.output} from {len(counts)} process counts "
                                 f"({', '.join(map(str, counts))}) are there; pick one with --process-count")
            count = counts[0]
        if count < 2:
            raise UsageError(f"--process-count must be >= 2 to merge; got {count} (a single process writes "
                             f"{args.output} itself)")
        rows = merge_shards(args.output, count, log)
        lock = RowWriter(args.output)   # no run, and no other merge, is writing it meanwhile
        try:
            repair_output(args.output, log)   # refuses a file that is not a caption file, untouched
            check_replaceable(args.output, rows)
            write_atomic(args.output, map(_row_bytes, rows))
        finally:
            lock.close()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except IncompleteShards as e:
        print(f"error: cannot merge {args.output} yet:\n{e}", file=sys.stderr)
        return 4
    captioned = sum("caption" in r for r in rows)
    log(f"merged {count} shards: {captioned}/{len(rows)} images captioned -> {args.output}")
    return _report_failures(rows, args.output, log)


if __name__ == "__main__":
    sys.exit(main())
