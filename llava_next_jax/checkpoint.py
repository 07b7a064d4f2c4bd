"""Orbax checkpoints of params: written one leaf at a time, restored straight to a dtype and sharding.

A converted directory holds `params/` (an Orbax checkpoint of the params tree), `llava_next_jax.json`
(format marker) and the HF side files (config, tokenizer, processor, generation config) copied verbatim.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np

MARKER = "llava_next_jax.json"
PARAMS_DIR = "params"
CHUNK_BYTES = 8 << 20   # storage chunk of a tensor: what a host restoring part of it reads at least
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "preprocessor_config.json",
              "processor_config.json", "chat_template.json", "chat_template.jinja")
# Inside OUT_DIR while a checkpoint is written, then swapped in (Orbax's partial save writes beside its target).
_TEMP_DIRS = ("params.new", "params.new.partial_save", "params.old")   # no leading dot: Orbax globs `*`
# In OUT_DIR, in the marker's place, while a new checkpoint is swapped in: a directory that holds it is
# ours (a conversion killed then may run again), but not a checkpoint to load.
SWAP_JOURNAL = MARKER + ".swap"


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _converted_or_swapping(path: str) -> bool:
    return is_converted(path) or os.path.isfile(os.path.join(path, SWAP_JOURNAL))


def params_dir(path: str) -> str:
    """`path/params`, absolute (Orbax refuses a relative checkpoint path)."""
    return os.path.join(os.path.abspath(path), PARAMS_DIR)


def check_out_dir(out_dir: str, src_dir: str | None = None, ours: Callable[[str], bool] = _converted_or_swapping,
                  what: str = f"a converted checkpoint (no {MARKER})", leftovers: Iterable[str] = _TEMP_DIRS) -> None:
    """Refuses an OUT_DIR something of ours must not be written to: a file, SRC_DIR itself (by any path),
    or a non-empty directory that `ours` does not recognise as `what` (the user's files: never touched).
    Holding only `leftovers` (names or fnmatch patterns: what an earlier, failed write of ours leaves)
    counts as empty. The one policy for every directory we write: converted checkpoints, fine-tuning
    runs (`finetune`), HF exports."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a directory")
    if not os.path.isdir(out_dir):
        return
    if src_dir and os.path.isdir(src_dir) and os.path.samefile(src_dir, out_dir):
        raise ValueError(f"OUT_DIR {out_dir} is SRC_DIR {src_dir}; write to another directory")
    foreign = [name for name in os.listdir(out_dir) if not any(fnmatch.fnmatchcase(name, p) for p in leftovers)]
    if foreign and not ours(out_dir):
        raise ValueError(f"{out_dir}: holds files but is not {what}; choose a new or empty directory")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise PermissionError(f"{out_dir}: not writable")


def save_streaming(out_dir: str, tensors: Iterable[tuple[tuple[str, ...], np.ndarray]],
                   side_files_from: str | None = None, marker: dict | None = None,
                   on_tensor: Callable[[tuple[str, ...], np.ndarray], None] | None = None,
                   group_bytes: int = 64 << 20) -> list[str]:
    """Writes a converted checkpoint to `out_dir` from (storage path, array) pairs, holding about
    `group_bytes` at a time; returns the side files copied from `side_files_from`.

    One transaction: the params go to a temporary directory in `out_dir`; only once all are written is
    the old checkpoint replaced (the marker turned into `SWAP_JOURNAL` first, params swapped, side files
    replaced by those of `side_files_from` where given, the marker `{"format": 1, **marker}` written
    last). If anything fails before, `out_dir` is as it was; a conversion killed during the swap leaves
    the journal, so the next one may write there again.
    Tensors are committed in groups through Orbax's partial save, so memory stays near the largest
    tensor plus one group, whatever the model's size. Each tensor is stored in chunks of about
    CHUNK_BYTES, so a host restoring a shard of it (on a mesh) reads the chunks it needs, not the whole.
    """
    check_out_dir(out_dir, side_files_from)
    created = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.abspath(out_dir)
    temps = [os.path.join(out, name) for name in _TEMP_DIRS]
    try:
        for stale in temps:   # left by a conversion that was killed
            shutil.rmtree(stale, ignore_errors=True)
        _write_params(temps[0], tensors, on_tensor, group_bytes)
    except BaseException:
        for temp in temps:
            shutil.rmtree(temp, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out)
        raise
    journal = os.path.join(out, SWAP_JOURNAL)
    if is_converted(out):
        os.replace(os.path.join(out, MARKER), journal)
    else:
        open(journal, "w").close()
    target, old = params_dir(out), temps[-1]
    if os.path.exists(target):
        os.rename(target, old)
    os.rename(temps[0], target)
    shutil.rmtree(old, ignore_errors=True)
    copied = []
    if side_files_from:
        for name in SIDE_FILES:   # an older conversion's, which the new source may lack
            if os.path.isfile(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        copied = copy_side_files(side_files_from, out)
    write_marker(out, **(marker or {}))
    os.remove(journal)
    return copied


def _write_params(target: str, tensors, on_tensor, group_bytes: int) -> None:
    from orbax.checkpoint.experimental.v1 import Context, partial
    context = Context()
    context.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    group, size = {}, 0
    with context:
        for path, tensor in tensors:
            group[path] = tensor
            size += tensor.nbytes
            if on_tensor:
                on_tensor(path, tensor)
            del tensor
            if size >= group_bytes:
                partial.save(target, nest(group))
                group, size = {}, 0
        if group:
            partial.save(target, nest(group))
        partial.finalize(target)


def flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    """A params tree as `{("language_model", "layers", "0", ..., "kernel"): leaf}`."""
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def nest(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
    """The inverse of `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def save_params(out_dir: str, params: Any, side_files_from: str | None = None, **marker) -> None:
    """Writes a whole in-memory params tree (e.g. after fine-tuning) as a converted checkpoint
    (`save_streaming`): side files from `side_files_from`, `marker` in the marker file."""
    save_streaming(out_dir, ((path, np.asarray(leaf)) for path, leaf in flatten(params).items()),
                   side_files_from, marker)


def write_marker(out_dir: str, **info) -> None:
    with open(os.path.join(out_dir, MARKER), "w") as f:
        json.dump({"format": 1, **info}, f, indent=2)


def copy_side_files(src_dir: str, out_dir: str) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
            copied.append(name)
    return copied


def saved_shapes(path: str) -> Any:
    """The params tree with `jax.ShapeDtypeStruct` leaves, read from the checkpoint's metadata."""
    from orbax.checkpoint.experimental.v1 import metadata
    tree = metadata(params_dir(path)).metadata
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))


def load_params(path: str, dtype=None, shardings: Any = None) -> Any:
    """Restores `path/params` as jax Arrays, cast to `dtype` (None: as saved).

    shardings: a pytree of `jax.sharding.Sharding` matching the params, or None for the default device.
    ValueError naming the array and the file where one cannot be read (`restore_orbax`).
    """
    from orbax.checkpoint.experimental.v1 import load
    shapes = saved_shapes(path)
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, shapes)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype or s.dtype, sharding=sh),
                            shapes, shardings)
    return restore_orbax(lambda: load(params_dir(path), abstract), params_dir(path))


def restore_orbax(restore: Callable[[], Any], where: str) -> Any:
    """`restore()`, an Orbax restore of the checkpoint at `where`; an array it cannot read (a damaged
    file) is a ValueError "where: <the reader's first line>", naming the array and the file.

    Orbax gives up a restore at the first array it cannot read and closes its event loop while the
    reads of the others are in flight: each then reports, as it ends or is collected, that the loop is
    closed or that its exception was never retrieved (thousands of lines over the one error, some at
    exit). Those reports are dropped while the restore runs and its abandoned reads end."""
    hook, asyncio_log = sys.unraisablehook, logging.getLogger("asyncio")
    sys.unraisablehook = lambda report: None if _abandoned_read(report.exc_value, report.object) else hook(report)
    asyncio_log.addFilter(_not_abandoned_read)
    try:
        try:
            return restore()
        except Exception as e:  # noqa: BLE001 -- Orbax reports an unreadable array as a bare Exception
            if type(e) is not Exception:
                raise
            error = ValueError(f"{where}: {first_line(e)}")
        time.sleep(0.5)   # the Orbax error (whose traceback holds the reads) dropped: they end, are collected
        gc.collect()
        raise error
    finally:
        sys.unraisablehook = hook
        asyncio_log.removeFilter(_not_abandoned_read)


def _abandoned_read(error: BaseException | None, source: Any) -> bool:
    """Whether an error reported as unraisable is one of a failed restore's abandoned reads: a callback
    into the closed event loop, or an Orbax coroutine collected with its exception."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    return "orbax" in getattr(getattr(source, "cr_code", None), "co_filename", "")


def _not_abandoned_read(record: logging.LogRecord) -> bool:
    """asyncio's log without "Task exception was never retrieved" for an Orbax coroutine."""
    message = record.getMessage()
    return not (message.startswith("Task exception was never retrieved") and "orbax" in message)


def first_line(e: BaseException) -> str:
    """The first line of `e`'s message, or of its cause's where `e` is a bare Exception wrapping it (as
    Orbax wraps a damaged array's error in a page of TensorStore details)."""
    while type(e) is Exception and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
