"""Fine-tuning data: LLaVA conversation rows -> (input_ids, labels) -> bucketed, right-padded batches.

Rows are LLaVA's format, in a JSONL file (one object a line) or, as LLaVA's released training files
(llava_v1_5_mix665k.json), one JSON array of them, pretty-printed or not:

    {"image": "coco/000001.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                   {"from": "gpt", "value": "A cat."}, ...]}

A row is named by its 1-based line in a JSONL file and by its 1-based item index in an array ("line 9",
"item 9"): in `Skipped` records, in warnings and in a batch's `lines`.

"image" is optional (text-only rows), one file path, or a non-empty list of them (LLaVA's multi-image
rows, e.g. LLaVA-NeXT-Interleave's data): `"image": ["a.jpg", "b.jpg"]`. Roles are human/user,
gpt/assistant and an optional leading system turn; turns alternate human, gpt, ... and end with a gpt
answer. Each image has one `<image>` placeholder in a human turn, in the same order: the i-th
placeholder of the conversation (turn by turn, left to right) is the i-th image. A placeholder becomes
an image content block, first in its turn, which is where the released chat templates write image
blocks (LLaVA's own preprocessing moves a row's single placeholder to the front too). Several
placeholders in one turn become that many blocks, first in the turn and in order; the released
templates write them as "<image>\\n<image>\\n" before the text. So the turn "Image 1: <image> Image 2:
<image> Which is wider?" is trained as "<image>\\n<image>\\nImage 1:  Image 2:  Which is wider?": the
text keeps its words, not where each image stood in it (LLaVA-NeXT's own code leaves several
placeholders in place; HF's templates write every image block before the turn's text).

Labels: only assistant answers are trained. The conversation is rendered with the processor's chat
template (the checkpoint's, or the built-in one for its family), and each answer's span is found by
rendering prefixes: `render(turns before the answer, add_generation_prompt=True)` must be a prefix of
`render(turns up to and including the answer)`, and the text between the two is the answer with the
template's end-of-turn marker. Worked example, llava-hf's mistral template:

    turns before    "[INST] <image>\\nWhat is it? [/INST]"                (+ generation prompt: none)
    turns up to     "[INST] <image>\\nWhat is it? [/INST] A cat.</s> "
    target          " A cat.</s>"     from the whitespace before the answer's text to the last non-space
    tokens          <s> [ INST ] ▁ <image> x N \\n What ... [/INST] ▁A ▁cat . </s>
    labels          -100 ...                                         ▁A ▁cat . </s>

A token is labelled when its characters overlap a target; everything else (system and user turns, the
template's role headers such as chatml's "<|im_start|>assistant\\n", the BOS, every image token) is
IGNORE. Labelled per family: mistral " answer</s>" (after "[/INST]"), chatml "answer<|im_end|>" (not the
"\n" after it), llama3 "answer<|eot_id|>"; the end marker is labelled so the model learns to stop. A template that closes an answer with no marker
at all (llava-hf's vicuna template writes "ASSISTANT: answer ") gets the tokenizer's eos inserted after
the answer ("ASSISTANT: answer</s> "), as LLaVA's own vicuna format does.

Image tokens are expanded in the token ids (the i-th `<image>` token repeated `anyres.num_image_tokens`
times for the i-th image's size), which gives the ids HF's processor gets by expanding the text:
`<image>` is an added token, so the text around it tokenizes the same either way.

Batches (`ConversationData`): see its docstring for the bucketing rule and the batch layout.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import mmap
import os
import re
import warnings
from array import array
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from . import anyres
from .checks import is_int, is_positive_int
from .train import IGNORE

IMAGE_PLACEHOLDER = "<image>"
"""LLaVA's image placeholder in a human turn's "value"."""

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
"""LLaVA "from" values -> chat-template roles."""


class TooLong(ValueError):
    """A conversation longer than max_length once its image tokens are expanded."""

    def __init__(self, length: int, max_length: int):
        self.length, self.max_length = length, max_length
        super().__init__(f"{length} tokens after image expansion > max_length {max_length}")


class NoUsableRows(ValueError):
    """Every row of the file is bad; `skipped` lists them all (`fingerprint`: the file's, as scanned)."""

    def __init__(self, message: str, skipped: list, fingerprint: dict):
        super().__init__(message)
        self.skipped, self.fingerprint = skipped, fingerprint


class DataFileError(Exception):
    """The data file cannot be read (gone, unreadable, or cut short) while batches are built: not one
    bad row but every row, so it is raised rather than recorded in `failed`."""


class Skipped(NamedTuple):
    """A row left out of the data and why. `line` is its 1-based line in a JSONL file, or with
    unit="item" its 1-based item index in a JSON array; str() says which ("item 9: ..."). `batch`: for a
    row that failed when batched (`ConversationData.failed`), the index of the batch it was first left out of."""
    line: int
    reason: str
    unit: str = "line"
    batch: int | None = None

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}"

    def record(self) -> dict:
        """As RUN/skipped.jsonl holds it: {unit: line, "reason"}, with "batch" where there is one."""
        return {self.unit: self.line, "reason": self.reason, **({} if self.batch is None else {"batch": self.batch})}


# --- one conversation ------------------------------------------------------------------------------

def conversation_messages(conversations: list[dict], image_placeholder: str = IMAGE_PLACEHOLDER) -> list[dict]:
    """LLaVA turns `[{"from", "value"}, ...]` -> HF chat messages `[{"role", "content": [blocks]}, ...]`.

    Content is always a list of blocks (what the released templates expect): a human turn holding N
    placeholders gets N `{"type": "image"}` blocks first, then its text with the placeholders removed and
    stripped (LLaVA's own preprocessing, for one); other turns' text is kept verbatim. ValueError, naming
    the turn, for anything else: unknown roles, a system turn after the first, turns that do not
    alternate human/gpt, a conversation that does not end with a gpt answer, empty answers, or a
    placeholder outside a human turn, text that is not valid Unicode (a lone surrogate).
    """
    if not isinstance(conversations, list):
        raise ValueError(f"'conversations' must be a list of turns, got {type(conversations).__name__}")
    if not conversations:
        raise ValueError("'conversations' is empty")
    messages = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not {"from", "value"} <= turn.keys():
            raise ValueError(f"turn {i}: expected an object with 'from' and 'value', got {_short(turn)}")
        who, value = turn["from"], turn["value"]
        role = ROLES.get(who) if isinstance(who, str) else None
        if role is None:
            raise ValueError(f"turn {i}: unknown role {who!r}; expected one of {sorted(ROLES)}")
        if not isinstance(value, str):
            raise ValueError(f"turn {i} ({who}): 'value' must be a string, got {type(value).__name__}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:   # JSON's "\ud83d" alone (a cut emoji) decodes to a lone surrogate
            raise ValueError(f"turn {i} ({who}): 'value' is not valid Unicode text ({e.reason} "
                             f"{value[e.start:e.end]!r} at character {e.start})") from None
        previous = messages[-1]["role"] if messages else None
        expected = "user" if previous in (None, "system", "assistant") else "assistant"
        if role == "system" and i > 0 or role != "system" and role != expected:
            raise ValueError(f"turn {i}: a {who!r} turn after {'the start' if previous is None else previous}; "
                             f"turns must alternate human, gpt, ... after an optional first system turn")
        count = value.count(image_placeholder)
        if count and role != "user":
            raise ValueError(f"turn {i} ({who}): {image_placeholder} may only appear in a human turn")
        if role == "assistant" and not value.strip():
            raise ValueError(f"turn {i} ({who}): empty answer")
        text = value.replace(image_placeholder, "").strip() if count else value
        messages.append({"role": role, "content": [{"type": "image"}] * count + [{"type": "text", "text": text}]})
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"turn {len(messages) - 1}: the conversation ends with a {conversations[-1]['from']!r} "
                         f"turn; it must end with an answer (from gpt)")
    return messages


def training_text(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(text, targets): the conversation as the model is trained on it, and the character ranges
    `[start, end)` of `text` to learn, one per assistant answer (see the module docstring).

    text is the chat template's rendering (no generation prompt), plus the eos after each answer when
    the template closes answers without any end marker. ValueError when the template's renderings are
    not prefixes of each other or do not hold an answer verbatim (its spans cannot be found then).
    """
    render = lambda turns, prompt: processor.apply_chat_template(turns, add_generation_prompt=prompt)  # noqa: E731
    full = render(messages, False)
    pieces, targets, done, length = [], [], 0, 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:k], True), render(messages[:k + 1], False).rstrip()
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise ValueError(f"turn {k}: the chat template's renderings of the turns before this answer "
                             f"({_short(before[-60:])}) and through it ({_short(through[-60:])}) are not prefixes of "
                             f"the whole conversation's; cannot tell which tokens are the answer")
        answer = "".join(c["text"] for c in message["content"] if c["type"] == "text").strip()
        start = full.find(answer, len(before), len(through))
        if start < 0:
            raise ValueError(f"turn {k}: the chat template does not write the answer {_short(answer)} verbatim "
                             f"(it rendered {_short(full[len(before):len(through)])}); cannot label it")
        while start > len(before) and full[start - 1].isspace():
            start -= 1
        end_marker = full[start:len(through)].strip() != answer
        eos = "" if end_marker else processor.special_tokens.get("eos_token")
        if eos is None:
            raise ValueError("the chat template ends answers with no end-of-turn token and the tokenizer has no "
                             "eos_token to add, so a model trained on it could not learn to stop")
        pieces.append(full[done:start])
        length += start - done
        pieces.append(full[start:len(through)] + eos)
        targets.append((length, length + len(through) - start + len(eos)))
        length, done = targets[-1][1], len(through)
    pieces.append(full[done:])
    return "".join(pieces), targets


def encode_conversation(processor, conversations: list[dict], image_sizes: Sequence | None = None,
                        max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), int32 `[T]`, for LLaVA turns and their images' sizes.

    image_sizes: one image's (h, w), a list of (h, w) in placeholder order, or None (or []) for none.
    The i-th image token of the rendered text is repeated `anyres.num_image_tokens(image_sizes[i])`
    times. labels are input_ids on the answer tokens (`training_text`'s targets) and IGNORE elsewhere.
    The BOS is added unless the template writes it (HF's rule). TooLong when T > max_length; ValueError
    when the number of placeholders is not the number of images.
    """
    sizes = np.asarray([] if image_sizes is None else image_sizes, dtype=np.int64)
    if sizes.ndim == 1 and len(sizes) == 2:
        sizes = sizes[None]
    elif sizes.size == 0:
        sizes = sizes.reshape(0, 2)
    elif sizes.ndim != 2 or sizes.shape[1] != 2:
        raise ValueError(f"image_sizes must be one (h, w) or a list of them; got {_short(image_sizes)}")
    messages = conversation_messages(conversations)
    placeholders = sum(c["type"] == "image" for m in messages for c in m["content"])
    if placeholders != len(sizes):
        plural = lambda n: "" if n == 1 else "s"   # noqa: E731
        raise ValueError(f"the row has {len(sizes)} image{plural(len(sizes))} but {placeholders} {IMAGE_PLACEHOLDER} "
                         f"placeholder{plural(placeholders)} in its human turns; each image needs one, in order")
    text, targets = training_text(processor, messages)
    bos = processor.special_tokens.get("bos_token")
    encoding = processor.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
    ids = np.asarray(encoding.ids, dtype=np.int32)
    # char_targets[c] = how many target characters precede c: a token (a, b) overlaps a target iff it grows.
    in_target = np.zeros(len(text), dtype=np.int32)
    for start, end in targets:
        in_target[start:end] = 1
    char_targets = np.concatenate([[0], np.cumsum(in_target)])
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
    is_image = ids == processor.image_token_id
    learn = (char_targets[offsets[:, 1]] > char_targets[offsets[:, 0]]) & ~is_image
    labels = np.where(learn, ids, IGNORE).astype(np.int32)
    if int(is_image.sum()) != placeholders:
        raise ValueError(f"the rendered conversation holds {int(is_image.sum())} image tokens "
                         f"({processor.image_token!r}); expected {placeholders} (is it written in the text?)")
    if len(sizes):   # the image tokens are in placeholder order: the i-th gets the i-th image's count
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[is_image] = [anyres.num_image_tokens(size, processor.geometry) for size in sizes]
        ids, labels = np.repeat(ids, repeats), np.repeat(labels, repeats)
    if max_length is not None and len(ids) > max_length:
        raise TooLong(len(ids), max_length)
    return ids, labels


def build_example(processor, conversations: list[dict], image=None, max_length: int | None = None) -> dict:
    """One training example as numpy arrays.

    image: a path, PIL image or uint8 array (read as the processor reads it, EXIF rules included), a list
    of them in placeholder order, or None. Returns
      input_ids     int32 `[T]`, each image's tokens expanded for its size
      labels        int32 `[T]`, IGNORE except the answers and their end tokens
      image_sizes   [(h, w), ...], one per image ([] without)
      pixel_values  [float32 `[P_i, C, S, S]`, ...], one per image, P_i its own tiles ([] without)
    TooLong (a ValueError) names the length and the limit.
    """
    from .processor import to_rgb_image
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    rgb = [to_rgb_image(item, processor.apply_exif_orientation) for item in images]
    sizes = [(item.height, item.width) for item in rgb]
    input_ids, labels = encode_conversation(processor, conversations, sizes, max_length)
    pixel_values = []
    if rgb:   # padded to the most tiles among them: keep each image's own
        padded = processor.preprocess_images(rgb, apply_exif_orientation=False)[0]
        pixel_values = [tiles[:anyres.num_tiles(size, processor.geometry)] for tiles, size in zip(padded, sizes)]
    return {"input_ids": input_ids, "labels": labels, "image_sizes": sizes, "pixel_values": pixel_values}


# --- a file of conversations ----------------------------------------------------------------------

_JSON_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'   # escapes included: brackets and \" inside it are skipped
_NEXT_BRACKET = re.compile(rb'[^][{}"]*(?:%s[^][{}"]*)*([][{}"]|\Z)' % _JSON_STRING, re.DOTALL)
"""Skips whole strings and anything else up to the next bracket (group 1), a quote that opens no complete
string (an unterminated one), or the end of the text."""
_SCALAR = re.compile(rb'%s|[^,:" \t\n\r]+' % _JSON_STRING, re.DOTALL)
"""A string or bare literal (number, true, null, or garbage) between the array's top-level brackets."""
_WHITESPACE = re.compile(rb"[ \t\n\r]*")


def array_items(text, path: str | os.PathLike = "") -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends), int64 `[N]`: the byte range `[start, end)` of each item of the JSON array `text`
    (bytes or an mmap of a whole file), found in one pass without parsing the items.

    Only the array's own structure is checked (matched brackets, one comma between items, nothing after
    the closing ']'); an item's text is left to `json.loads`, as an item can still be bad JSON inside (a
    missing colon), which makes it one bad row rather than a bad file. ValueError, naming `path` and the
    byte offset, for an array that is truncated, unbalanced or has an unterminated string.
    """
    def broken(what: str, offset: int):
        return ValueError(f"{path}: not a valid JSON array: {what} at byte {offset}")

    def check_gap(upto: int, expected: bytes):   # what lies between items: whitespace, commas, colons
        gap = text[previous:upto].strip(b" \t\n\r")
        if gap != expected:
            found = repr(gap.decode())
            raise broken(f"expected one ',' between items, found {found}" if expected else f"unexpected {found}",
                         _WHITESPACE.match(text, previous).end())

    begin = _WHITESPACE.match(text, len(BOM) if text[:len(BOM)] == BOM else 0).end()
    if text[begin:begin + 1] != b"[":
        raise broken("expected '['", begin)
    starts, ends = array("q"), array("q")
    stack, previous = [ord("[")], begin + 1   # the open brackets; where the last item (or the '[') ended
    for match in _NEXT_BRACKET.finditer(text, begin + 1):
        start = match.start(1)
        if len(stack) == 1:   # what was skipped is at the top level: items that are strings or literals
            for scalar in _SCALAR.finditer(text, previous, start):
                check_gap(scalar.start(), b"," if starts else b"")
                previous = scalar.end()
                starts.append(scalar.start())
                ends.append(previous)
        if start == len(text):
            break
        byte = text[start]
        if byte == ord('"'):
            raise broken("unterminated string", start)
        if byte in b"[{":
            if len(stack) == 1:
                check_gap(start, b"," if starts else b"")
                starts.append(start)
            stack.append(byte)
            continue
        opened = stack.pop()
        if byte != opened + 2:   # ord("[") + 2 == ord("]"), ord("{") + 2 == ord("}")
            raise broken(f"{chr(byte)!r} closes a {chr(opened)!r}", start)
        if len(stack) == 1:   # an item's closing bracket
            previous = start + 1
            ends.append(previous)
        elif not stack:   # the array's own ']'
            check_gap(start, b"")
            rest = _WHITESPACE.match(text, start + 1).end()
            if rest != len(text):
                raise broken("text after the array's closing ']'", rest)
            return np.frombuffer(starts, np.int64), np.frombuffer(ends, np.int64)
    unclosed = f" (item {len(starts)}, from byte {starts[-1]}, is not closed)" if len(starts) > len(ends) else ""
    raise broken(f"the file ends inside the array{unclosed}", len(text))


def length_buckets_for(max_length: int, step: int = 128) -> tuple[int, ...]:
    """The default padded lengths: every multiple of `step` below max_length, then max_length."""
    return tuple(range(step, max_length, step)) + (max_length,)


class ConversationData:
    """A file of LLaVA conversations as an infinite, deterministic sequence of training batches.

    The file is JSONL (one row a line) or, when its first non-space byte is '[', one JSON array of rows
    (LLaVA's released .json files). An array is not loaded whole (a 1 GB file would take many GB as
    Python objects): `array_items` finds each item's byte range and an item is parsed when it is
    checked and again when it is batched. `unit` is "line" (JSONL: rows are named by their 1-based
    line) or "item" (an array: by their 1-based item index); `lines` holds those numbers.

    Every row is checked once, here (JSON, keys, turns, the number of images, each image file and its
    header size, the length after image expansion), so `skipped` lists every bad row, as
    `Skipped(line, reason, unit)` (printed "line 9: 3120 tokens after image expansion > max_length
    2048", or "item 9: ..."), before training starts. A broken array (truncated, unbalanced, trailing
    text) is a ValueError naming the byte offset. Images are decoded when their batch is built.
    Relative image paths are read under `image_root` (default: the data file's directory).

    Bucketing: epoch e = index // len(self) uses `numpy.random.default_rng([seed, e])` to
      1. shuffle the good rows (file order when shuffle=False),
      2. cut them into chunks of `sort_window * batch_size` rows,
      3. sort each chunk by length (stable), and cut it into batches of batch_size,
      4. shuffle the batches (kept in order when shuffle=False).
    So a batch holds rows of similar length, every good row is in exactly one batch per epoch, and only
    the epoch's last chunk can end in a short batch (filled with empty rows). Each batch is padded on
    the right to L, the smallest of `length_buckets` (default: multiples of 128, then max_length) that
    holds its longest row: the train step compiles at most len(length_buckets) shapes.

    Images per row: a row may hold up to `max_images` images (`"image": [...]`, see the module
    docstring); a row with more is skipped ("3 images > max_images 2").

    `batch(index)` returns numpy arrays ready for `train.train_step`, with M = max_images:
      input_ids      int32 `[B, L]`   pad id (the tokenizer's pad, else its eos, else 0) after each row
      attention_mask int32 `[B, L]`   1 on real tokens
      labels         int32 `[B, L]`   IGNORE on pads, prompts, image tokens
      sources        int32 `[B, L]`   `anyres.token_sources` for the batch's images (B*M image slots)
      pixel_values   float32 `[I, P, C, S, S]`, P = the geometry's max_tiles; I = `image_slots(n)` for
                     the batch's n images: B x ceil(n / B), at least B, at most B*M. Real images fill
                     slots 0..n-1 in row order, and within a row in placeholder order (the order their
                     tokens come in input_ids); the rest are zeros that no token reads. None when the
                     file has no image rows at all.
      image_sizes    int32 `[I, 2]` (h, w) of each slot's image, (0, 0) for an empty slot
      lines          int32 `[B]`      each row's line in the file (its item index in an array), -1 for a
                                      filler row
    Every array's shape depends only on B, L and I, so the whole dict can go to `train_step`, which
    compiles at most len(length_buckets) x M shapes. In `sources`, the newline vector is the row after
    all I*P tiles' features (where `image_embeddings` puts it). The vision tower runs on every slot,
    empty or not: a batch of rows with one image each (or none) costs B slots whatever M is, and the
    rows with more images cost only in the batches they fall in.
    `iterate(start)` yields (index, batch(index)) from `start` on, building the next batches on a thread.

    An image that passed the header check but fails to decode later (or decodes to another size)
    does not stop training: its row becomes an empty row (all padding, nothing learned; `lines` still
    names it) in that batch, a RuntimeWarning names the row's line (or item) and the reason, and `failed`
    records it (once, with the batch it was first left out of). Turn the warning into an error
    (`warnings.simplefilter("error", RuntimeWarning)`) to stop instead. The data file itself becoming
    unreadable (removed, no permission, cut short) is no row's fault: `batch` raises DataFileError.

    `fingerprint` is {"bytes", "blake2b"} of the file as it was scanned (hashed in the same pass), for a
    caller to tell whether a file by the same name holds the same rows. A leading UTF-8 BOM is skipped.
    When no row is usable, NoUsableRows (a ValueError) holds the `skipped` list and the fingerprint.
    """

    def __init__(self, path: str | os.PathLike, processor, config, image_root: str | os.PathLike | None = None,
                 max_length: int = 2048, batch_size: int = 4, seed: int = 0, shuffle: bool = True,
                 length_buckets: Sequence[int] | None = None, sort_window: int = 8, max_images: int = 1):
        for name, value, least in (("max_length", max_length, 1), ("batch_size", batch_size, 1),
                                   ("sort_window", sort_window, 1), ("seed", seed, 0), ("max_images", max_images, 1)):
            if not is_int(value) or value < least:
                raise ValueError(f"{name} must be an int >= {least}; got {value!r}")
        if processor.geometry != config.geometry or processor.image_token_id != config.image_token_id:
            raise ValueError(f"the processor ({processor.geometry}, image token {processor.image_token_id}) does not "
                             f"match the model config ({config.geometry}, image token {config.image_token_id})")
        buckets = length_buckets_for(max_length) if length_buckets is None else tuple(sorted(set(length_buckets)))
        if not buckets or any(not is_positive_int(b) for b in buckets):
            raise ValueError(f"length_buckets must be ints >= 1; got {length_buckets!r}")
        if buckets[-1] < max_length:
            raise ValueError(f"length_buckets top out at {buckets[-1]} < max_length {max_length}: rows up to "
                             f"max_length could not be batched; add a bucket >= {max_length} or lower max_length")
        self.path = Path(path)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.processor, self.config = processor, config
        self.max_length, self.batch_size, self.seed, self.shuffle = int(max_length), int(batch_size), int(seed), shuffle
        self.sort_window, self.max_images = int(sort_window), int(max_images)
        self.length_buckets: tuple[int, ...] = tuple(int(b) for b in buckets)
        self.skipped: list[Skipped] = []
        self.failed: list[Skipped] = []   # rows whose image failed to decode when batched (see the docstring)
        lines, spans, lengths, with_image = [], array("q"), [], []   # spans: start, end, start, end, ...
        digest = hashlib.blake2b(digest_size=16)
        with open(self.path, "rb") as f:
            self.unit = "item" if _first_byte(f) == b"[" else "line"
            for number, start, raw in (self._items(f, digest) if self.unit == "item" else self._lines(f, digest)):
                try:
                    row = self._parse(raw)
                    images = self._image_files(row)
                    sizes = [self._header_size(path, name) for name, path in images]
                    ids, _ = encode_conversation(processor, row["conversations"], sizes, self.max_length)
                except _ROW_ERRORS as e:
                    self.skipped.append(Skipped(number, str(e), self.unit))
                    continue
                lines.append(number)
                spans.extend((start, start + len(raw)))
                lengths.append(len(ids))
                with_image.append(bool(images))
            self.fingerprint = {"bytes": f.tell(), "blake2b": digest.hexdigest()}
        if not lines:
            reasons = "".join(f"; {s}" for s in self.skipped[:3])
            raise NoUsableRows(f"{self.path}: no usable rows ({len(self.skipped)} skipped{reasons})", self.skipped,
                               self.fingerprint)
        self.lines = np.asarray(lines, dtype=np.int64)        # line (or item) number of each good row
        self.lengths = np.asarray(lengths, dtype=np.int64)    # its token count after image expansion
        self._spans = np.frombuffer(spans, np.int64).reshape(-1, 2)   # its bytes [start, end) in the file
        self.has_images = any(with_image)
        self._plans: dict[int, list[np.ndarray]] = {}

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.lines) / self.batch_size)

    def __repr__(self) -> str:
        return (f"ConversationData({str(self.path)!r}: {len(self.lines)} rows, {len(self.skipped)} skipped, "
                f"{len(self)} batches of {self.batch_size}, lengths {self.length_buckets})")

    # -- rows --------------------------------------------------------------------------------------

    @staticmethod
    def _lines(f, digest) -> Iterator[tuple[int, int, bytes]]:
        """(line number, byte offset, bytes) of each non-blank line of a JSONL file (a leading UTF-8 BOM
        left out); every byte read goes to `digest`."""
        offset = 0
        for number, raw in enumerate(f, start=1):
            digest.update(raw)
            if number == 1 and raw.startswith(BOM):
                raw, offset = raw[len(BOM):], len(BOM)
            if raw.strip():
                yield number, offset, raw
            offset += len(raw)

    def _items(self, f, digest) -> Iterator[tuple[int, int, bytes]]:
        """(item index, byte offset, bytes) of each item of a JSON-array file (`array_items`); the whole
        file goes to `digest`, and the file is left at its end."""
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as text:
            digest.update(text)
            f.seek(len(text))
            starts, ends = array_items(text, self.path)
            for number, (start, end) in enumerate(zip(starts, ends), start=1):
                yield number, int(start), text[start:end]

    def _parse(self, raw: bytes) -> dict:
        """A row's bytes (a JSONL line or an array item) -> its object, checked to hold "conversations"."""
        try:
            row = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 text ({e})") from None
        except RecursionError:
            raise ValueError("JSON nested too deeply to parse") from None
        except json.JSONDecodeError as e:   # its own "line 1" would confuse: say where in the row
            where = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
            if self.unit == "item":
                where += " of the item"
            raise ValueError(f"not valid JSON ({e.msg} at {where})") from None
        if not isinstance(row, dict):
            raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        if "conversations" not in row:
            raise ValueError(f"no 'conversations' key (keys: {sorted(row)})")
        return row

    def _image_files(self, row: dict) -> list[tuple[str, Path]]:
        """(name, path) of the row's images in placeholder order; "image" is absent (none), a file path, or
        a non-empty list of them."""
        names = row.get("image")
        if names is None:
            return []
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"'image' must be a file path string or a non-empty list of them, "
                             f"got {_short(row['image'])}")
        if len(names) > self.max_images:
            raise ValueError(f"{len(names)} images > max_images {self.max_images}")
        for name in names:
            if not (self.image_root / name).is_file():
                where = "" if Path(name).is_absolute() else f" under {self.image_root}"
                raise ValueError(f"image {name!r} not found{where}")
        return [(name, self.image_root / name) for name in names]

    def _header_size(self, path: Path, name: str) -> tuple[int, int]:
        """(h, w) as the processor will decode it (EXIF rotation per its setting), from the header only."""
        from PIL import Image
        from .caption import header_size
        try:
            if self.processor.apply_exif_orientation is not False:
                size = header_size(str(path))
            else:
                with Image.open(path) as image:
                    size = (image.height, image.width)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"image {name!r} cannot be read: {e}") from None
        if min(size) <= 0:
            raise ValueError(f"image {name!r} has zero area (h, w) = {size}")
        return size

    def example(self, row: int) -> dict:
        """`build_example` of the row-th good row (its image decoded now)."""
        start, end = self._spans[row].tolist()
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                raw = f.read(end - start)
        except OSError as e:
            raise DataFileError(f"{self.path}: cannot be read any more ({e})") from None
        if len(raw) != end - start:
            raise DataFileError(f"{self.path}: ends before byte {end} of line/item {self.lines[row]}; it was cut "
                                f"short after it was checked")
        data = self._parse(raw)
        images = [path for _, path in self._image_files(data)]
        example = build_example(self.processor, data["conversations"], images, self.max_length)
        if len(example["input_ids"]) != self.lengths[row]:
            raise ValueError(f"{len(example['input_ids'])} tokens now but {self.lengths[row]} when the file was "
                             f"checked (the images decode to {example['image_sizes']}, not their headers' sizes, "
                             f"or the file changed)")
        return example

    # -- batches -----------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's batches as arrays of good-row indices (the bucketing rule in the class docstring)."""
        if epoch not in self._plans:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.lines)) if self.shuffle else np.arange(len(self.lines))
            chunk, batches = self.sort_window * self.batch_size, []
            for begin in range(0, len(order), chunk):
                rows = order[begin:begin + chunk]
                rows = rows[np.argsort(self.lengths[rows], kind="stable")]
                batches += [rows[i:i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            self._plans = {epoch: batches}   # keep one epoch: batch() walks them in order
        return self._plans[epoch]

    def bucket(self, length: int) -> int:
        """The padded length for a longest row of `length` tokens."""
        index = int(np.searchsorted(self.length_buckets, length))
        if index == len(self.length_buckets):
            raise ValueError(f"{length} tokens exceed the largest length bucket {self.length_buckets[-1]}")
        return self.length_buckets[index]

    def batch(self, index: int) -> dict:
        """The index-th batch (epoch index // len(self)); a function of the file, the settings and index."""
        if not is_int(index) or index < 0:
            raise ValueError(f"batch index must be an int >= 0; got {index!r}")
        epoch, step = divmod(int(index), len(self))
        rows = self.epoch_batches(epoch)[step]
        B, L, P = self.batch_size, self.bucket(int(self.lengths[rows].max())), self.config.geometry.max_tiles
        pad = self.processor.pad_token_id
        if pad is None:
            pad = self.processor.tokenizer.token_to_id(self.processor.special_tokens.get("eos_token", "")) or 0
        input_ids = np.full((B, L), pad, dtype=np.int32)
        attention_mask = np.zeros((B, L), dtype=np.int32)
        labels = np.full((B, L), IGNORE, dtype=np.int32)
        lines = np.full((B,), -1, dtype=np.int32)
        images = []   # (tiles, size) in row order, then placeholder order within a row
        for slot, row in enumerate(rows):
            lines[slot] = self.lines[row]
            try:
                example = self.example(row)
            except _ROW_ERRORS as e:
                self._fail(Skipped(int(self.lines[row]), str(e), self.unit), index)
                continue
            T = len(example["input_ids"])
            input_ids[slot, :T], labels[slot, :T], attention_mask[slot, :T] = example["input_ids"], example["labels"], 1
            images += zip(example["pixel_values"], example["image_sizes"])
        slots = self.image_slots(len(images))
        image_sizes = np.zeros((slots, 2), dtype=np.int32)
        pixel_values = None
        if self.has_images:
            S, C = self.config.vision.image_size, self.config.vision.num_channels
            pixel_values = np.zeros((slots, P, C, S, S), dtype=np.float32)
        for i, (tiles, size) in enumerate(images):
            pixel_values[i, :len(tiles)] = tiles
            image_sizes[i] = size
        sources = anyres.token_sources(input_ids, self.config.image_token_id, image_sizes[:len(images)] if images
                                       else None, self.config.geometry, P, image_slots=slots)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "sources": sources,
                "pixel_values": pixel_values, "image_sizes": image_sizes, "lines": lines}

    def image_slots(self, n_images: int) -> int:
        """Image slots of a batch holding `n_images` images: the next multiple of the batch size, at
        least one per row and at most max_images per row (so a mesh's "data" axis that divides the
        batch size also divides them)."""
        B = self.batch_size
        return B * min(self.max_images, max(1, -(-n_images // B)))

    def iterate(self, start: int = 0, prefetch: int = 2) -> Iterator[tuple[int, dict]]:
        """(index, batch(index)) for index = start, start + 1, ... without end; the next `prefetch` batches
        are built on a background thread while the caller trains on the current one (image decoding,
        resizing and tokenizing release the GIL). A resumed run passes its step count as `start`."""
        from concurrent.futures import ThreadPoolExecutor
        if not is_positive_int(prefetch):
            raise ValueError(f"prefetch must be an int >= 1; got {prefetch!r}")
        pool = ThreadPoolExecutor(1, thread_name_prefix="llava-next-data")
        try:
            pending = collections.deque(pool.submit(self.batch, i) for i in range(start, start + prefetch))
            index = start
            while True:
                batch = pending.popleft().result()
                pending.append(pool.submit(self.batch, index + prefetch))
                yield index, batch
                index += 1
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _fail(self, record: Skipped, index: int) -> None:
        if all(record[:3] != failed[:3] for failed in self.failed):
            self.failed.append(record._replace(batch=index))
        warnings.warn(f"{self.path} {record}; the row is left empty in batch {index}", RuntimeWarning, stacklevel=3)


BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte-order mark some editors write first: skipped."""


def _first_byte(f) -> bytes:
    """The first byte of the file that is not whitespace or the BOM (b"" for none); the file is left at its start."""
    chunk = f.read(1 << 16).removeprefix(BOM)
    while chunk and not (chunk := chunk.lstrip()):
        chunk = f.read(1 << 16)
    f.seek(0)
    return chunk[:1]


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _template_error():
    from jinja2.exceptions import TemplateError
    return TemplateError


_ROW_ERRORS = (ValueError, OSError, _template_error())
"""What a bad row raises (JSON, turns, template, image file); anything else is a bug and propagates."""
