"""Fine-tuning from LLaVA conversations (JSONL, or LLaVA's JSON arrays), resumable after a kill, exported.

    python scripts/finetune.py --model DIR --data train.jsonl --output RUN_DIR [--image-root DIR]
                               [--steps 1000] [--batch-size 4] [--accumulate 1] [--max-length 2048] [--max-images 1]
                               [--learning-rate 2e-5] [--warmup-steps 30] [--weight-decay 0] [--max-grad-norm 1]
                               [--trainable projector+decoder] [--lora-rank 8 --lora-alpha 16 --lora-targets ...]
                               [--dtype float32|bfloat16] [--remat] [--mesh DATA,MODEL [--fsdp]]
                               [--save-every 100] [--keep 3] [--seed 0] [--export-hf DIR]
    (also installed as `llava-next-finetune`)

--trainable: projector (LLaVA's stage 1), projector+decoder (stage 2; the vision tower stays frozen),
all, lora (adapters on the decoder, `--lora-targets`), lora+projector. --dtype is the compute dtype;
the master weights and the optimizer state are float32 either way. --steps counts optimizer updates;
with --accumulate N each update averages N micro-batches of --batch-size rows. --fsdp also splits the
params and the optimizer state over the mesh's "data" axis (`sharding.spec_for`): a device holds
1/(DATA x MODEL) of them instead of 1/MODEL. A run may be resumed with or without it. --max-images N
lets a data row hold up to N images (`"image": [...]`, one <image> per image); rows with more are skipped.
A batch has batch-size image slots per started batch-size of its images (at most batch-size x N), and
the vision tower runs on all of them: the few rows with many images cost only in the batches they fall
in, and each slot count is a shape the train step compiles once per length bucket.

--output must be new, empty or a run directory, --export-hf new, empty or an earlier export: a
directory of other files is refused, never written into.

RUN_DIR holds
    run.json           the settings of the run (a resume must use the same ones), --steps, and the data
                       file's size and hash (a resume must read the same file); written once all is checked
    skipped.jsonl      the data rows left out and why (`data.ConversationData.skipped`): {"line": N, "reason"}
                       for a JSONL file, {"item": N, "reason"} for a JSON array; a row whose image failed to
                       decode when batched is added then, with "batch": the micro-step it was left out of
    checkpoints/STEP/  Orbax checkpoints of the whole train state: params (or base + adapters),
                       optimizer state, micro-step, rng; written atomically every --save-every updates,
                       the last --keep kept. The data position is the micro-step: micro-batch i is
                       `ConversationData.batch(i)`, a pure function of the data file and settings.
    metrics.jsonl      one row per micro-step: loss, learning rate, tokens, seconds
    export/            the final params (adapters merged) in the converted layout, for
                       `LlavaNext.from_pretrained`; `--export-hf DIR` also writes HF safetensors.

Re-running the same command resumes from the newest checkpoint: the steps after it are redone and give
the same params as an uninterrupted run. SIGINT/SIGTERM during training save a checkpoint at the current
step first (none when no step was made since the last one); during startup they just stop it. A run that
reached --steps only exports again. A resume may raise --steps (logged: the learning-rate schedule is
then the new total's from there on, so the result is no uninterrupted run's), not lower it below the
updates made. A data file that cannot be read any more mid-run stops the run after a checkpoint.

Exit status: 0 done, 2 usage or input error (bad flags, no usable data row, a resume with other
settings or another data file, a newest checkpoint that cannot be read, the data file unreadable
mid-run: after saving), 130 interrupted (after saving).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

USAGE, INTERRUPTED = 2, 130
# Settings that change the result: a resume must repeat them. (--steps, --save-every, --keep and the
# export paths may change between runs.)
# A key missing from an older run's run.json reads as its flag's default: adding a key keeps old runs resumable.
RESUME_KEYS = ("model", "data", "image_root", "batch_size", "accumulate", "max_length", "max_images",
               "learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "trainable", "lora_rank",
               "lora_alpha", "lora_targets", "dtype", "remat", "mesh", "seed")


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from .lora import ATTENTION, MLP
    from .train import TRAINABLE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="converted or HF LLaVA-NeXT checkpoint directory")
    p.add_argument("--data", required=True, help="LLaVA {'image', 'conversations'} rows: JSONL, or a JSON array")
    p.add_argument("--output", required=True, help="run directory (checkpoints, metrics, export)")
    p.add_argument("--image-root", default=None, help="relative image paths are under this (default: the data file's dir)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer updates in the whole run")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per update")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per row after image expansion")
    p.add_argument("--max-images", type=int, default=1,
                   help="images a row may hold (rows with more are skipped); a batch has batch-size "
                        "image slots per started batch-size of its images, at most batch-size x N")
    p.add_argument("--learning-rate", type=float, default=2e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--trainable", choices=TRAINABLE, default="projector+decoder")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", default=",".join(ATTENTION + MLP), help="comma-separated projections")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
    p.add_argument("--remat", action="store_true", help="recompute each decoder layer in the backward pass")
    p.add_argument("--mesh", default=None, help="DATA,MODEL device mesh (sharding.make_mesh); default one device")
    p.add_argument("--fsdp", action="store_true", help="also split params and optimizer state over DATA")
    p.add_argument("--save-every", type=int, default=100, help="updates between checkpoints")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA initialisation")
    p.add_argument("--export-hf", default=None, help="also write the final params as an HF checkpoint here")
    return p


RUN_FILE = "run.json"
LEFT_BY_A_REFUSED_RUN = ("skipped.jsonl", RUN_FILE + ".tmp-*")
"""What a first run refused at startup (no usable row) or killed while writing run.json leaves in RUN_DIR:
the directory still counts as empty for a new run."""


def _settings(args) -> dict:
    s = {k: getattr(args, k) for k in RESUME_KEYS}
    for k in ("model", "data", "image_root"):
        if s[k] is not None:
            s[k] = os.path.abspath(s[k])
    if not args.trainable.startswith("lora"):
        s.update(lora_rank=None, lora_alpha=None, lora_targets=None)
    return s


def _check_flags(args) -> None:
    """Every flag that can be checked without loading anything; UsageError naming the first bad one."""
    from . import checkpoint, convert
    for name in ("steps", "batch_size", "accumulate", "max_length", "max_images", "save_every", "keep"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    finite = math.isfinite
    for name, ok, rule in (("warmup_steps", args.warmup_steps >= 0, ">= 0"),
                           ("learning_rate", finite(args.learning_rate) and args.learning_rate > 0, "> 0"),
                           ("weight_decay", finite(args.weight_decay) and args.weight_decay >= 0, ">= 0"),
                           ("max_grad_norm", args.max_grad_norm > 0, "> 0 (0 would clip every update to nothing)"),
                           ("lora_alpha", finite(args.lora_alpha) and args.lora_alpha > 0, "> 0")):
        if not ok:
            raise UsageError(f"--{name.replace('_', '-')} must be {rule}; got {getattr(args, name)}")
    for flag, path, want in (("--model", args.model, os.path.isdir), ("--data", args.data, os.path.isfile)):
        if not want(path):
            raise UsageError(f"{flag} {path}: no such {'directory' if want is os.path.isdir else 'file'}")
    if args.fsdp and args.mesh is None:
        raise UsageError("--fsdp splits the params over the mesh's DATA axis; give --mesh DATA,MODEL too")
    try:   # the directories we would write into: never a file or a directory of the user's
        flag = "--output"
        checkpoint.check_out_dir(args.output, args.model, ours=lambda d: os.path.isfile(os.path.join(d, RUN_FILE)),
                                 what=f"a fine-tuning run (no {RUN_FILE})", leftovers=LEFT_BY_A_REFUSED_RUN)
        if args.export_hf:
            flag = "--export-hf"
            convert.check_hf_out_dir(args.export_hf, args.model)
    except (ValueError, OSError) as e:
        raise UsageError(f"{flag} {e}") from None


def _mesh(spec: str | None):
    if spec is None:
        return None
    from . import sharding
    try:
        data, model = (int(x) for x in spec.split(","))
    except ValueError:
        raise UsageError(f"--mesh {spec!r}: expected DATA,MODEL, e.g. 2,4") from None
    try:
        return sharding.make_mesh(data=data, model=model)
    except ValueError as e:
        raise UsageError(f"--mesh {spec}: {e}") from None


def _read_json_lines(path: str) -> list:
    """The rows of a JSONL file this run writes (none if it is absent), up to a line torn by a kill."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return rows


def _write_json(path: str, value) -> None:
    """Writes `path` whole or not at all (a kill leaves the old file, or none, and a `*.tmp-PID`)."""
    from .caption import write_atomic
    write_atomic(path, [json.dumps(value, indent=2).encode("utf-8")])


class Run:
    """One fine-tuning run: model, data, optimizer and checkpoints of RUN_DIR.

    Everything is checked before anything is written: run.json (the settings, the data file's
    fingerprint, --steps) is written only once the flags, the model, the mesh and the data are known good,
    so a refused first run leaves no settings to trip the corrected command. A resume (run.json there)
    restores the newest checkpoint into a state built from shapes alone: the base params loaded from
    --model are let go first, so a resumed run holds one copy of the params, as a fresh one does."""

    def __init__(self, args, log=print):
        import jax
        from . import lora, train
        from .model import LlavaNext
        self.args, self.log = args, log
        self.dir = os.path.abspath(args.output)
        saved = self._check_resume_settings()   # None: a new run
        self.lora = None
        if args.trainable.startswith("lora"):
            try:
                self.lora = lora.LoraConfig(args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))
            except ValueError as e:
                raise UsageError(f"--lora-*: {e}") from None
        self.manager = None if saved is None else self._manager()
        latest = None if self.manager is None else self.manager.latest_step()   # a micro-step
        if latest is not None and latest > self.micro_steps:
            raise UsageError(f"--steps {args.steps}: {self.dir} has made {latest // args.accumulate} updates "
                             f"already (its newest checkpoint); give --steps {latest // args.accumulate} or more, "
                             f"or pick a new --output")

        mesh = _mesh(args.mesh)
        self.model = LlavaNext.from_pretrained(args.model, dtype="float32", mesh=mesh, fsdp=args.fsdp)
        self.data = self._scan_data(saved, latest or 0)

        self._attach = lambda params: (params if self.lora is None else
                                       lora.attach(params, self.lora, jax.random.key(args.seed)))
        self.optimizer = train.make_optimizer(   # from the params' tree structure alone
            jax.eval_shape(self._attach, self.model.params), learning_rate=args.learning_rate,
            warmup_steps=args.warmup_steps, total_steps=args.steps, weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm, accumulate=args.accumulate, trainable=args.trainable)
        self.schedule = train.learning_rate_schedule(args.learning_rate, args.warmup_steps, args.steps)

        if saved is None:
            _write_json(os.path.join(self.dir, RUN_FILE),
                        {**_settings(args), "steps": args.steps, "data_fingerprint": self.data.fingerprint})
            self.manager = self._manager()
        elif "steps" in saved and saved["steps"] != args.steps:   # run.json of this version: keep it current
            if latest:
                log(f"--steps {args.steps}: this run had --steps {saved['steps']}; from update "
                    f"{latest // args.accumulate} on, the learning rate follows the schedule for {args.steps} "
                    f"updates, so the result is neither run's uninterrupted one")
            _write_json(os.path.join(self.dir, RUN_FILE), {**saved, "steps": args.steps})
        self.start = self._initial_state(latest)
        self.saved_step = self.start   # the micro-step of the newest checkpoint (0: none is needed)

    def _check_resume_settings(self) -> dict | None:
        """run.json's record (None for a new run); UsageError when it differs from the flags, naming them."""
        path = os.path.join(self.dir, RUN_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                saved = json.load(f)
            if not isinstance(saved, dict):
                raise ValueError(f"expected a JSON object, got {type(saved).__name__}")
        except (ValueError, OSError) as e:
            raise UsageError(f"{path}: not a readable settings file ({e}); it may be one an older version "
                             f"left torn by a kill before the run's first checkpoint: remove {self.dir} to "
                             f"start the run over, or pick a new --output") from None
        settings, parser = _settings(self.args), build_parser()
        then = {k: saved[k] if k in saved else parser.get_default(k) for k in settings}
        if then["image_root"] is not None:   # an older run.json holds it as typed: relative to the cwd
            then["image_root"] = os.path.abspath(then["image_root"])
        changed = {k: (then[k], v) for k, v in settings.items() if then[k] != v}
        if changed:
            described = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
            raise UsageError(f"{self.dir} is a run with other settings ({described}); resume with the same "
                             f"flags or pick a new --output")
        return saved

    def _manager(self):
        import orbax.checkpoint as ocp
        return ocp.CheckpointManager(os.path.join(self.dir, "checkpoints"),
                                     options=ocp.CheckpointManagerOptions(max_to_keep=self.args.keep, create=True))

    def _scan_data(self, saved: dict | None, start: int):
        """The checked data; writes RUN_DIR/skipped.jsonl (also when no row is usable, before refusing),
        keeping the rows an earlier part of the run left out when batching before micro-step `start`.
        UsageError when a resumed run's data file is not the one it began with."""
        from . import data
        args, error = self.args, None
        try:
            loaded = data.ConversationData(args.data, self.model.get_processor(), self.model.config,
                                           image_root=args.image_root, max_length=args.max_length,
                                           batch_size=args.batch_size, seed=args.seed, max_images=args.max_images)
            skipped, fingerprint = loaded.skipped, loaded.fingerprint
        except data.NoUsableRows as e:
            skipped, fingerprint, error = e.skipped, e.fingerprint, e
        except (ValueError, OSError) as e:
            raise UsageError(f"--data {e}") from None
        if saved is not None and saved.get("data_fingerprint", fingerprint) != fingerprint:
            then = saved["data_fingerprint"]
            raise UsageError(f"--data {args.data}: the file changed since this run began ({then['bytes']} bytes, "
                             f"blake2b {then['blake2b']} then; {fingerprint['bytes']}, {fingerprint['blake2b']} now); "
                             f"a resume must read the same rows: restore the file or pick a new --output")
        earlier = [row for row in _read_json_lines(os.path.join(self.dir, "skipped.jsonl"))
                   if row.get("batch", start) < start]
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "skipped.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in [record.record() for record in skipped] + earlier)
        if error is not None:
            raise UsageError(f"{error} (all listed in {self.dir}/skipped.jsonl)")
        if skipped:
            self.log(f"{args.data}: skipped {len(skipped)} rows (listed in {self.dir}/skipped.jsonl); "
                     f"first: {skipped[0]}")
        unit = loaded.unit
        loaded.failed += [data.Skipped(row[unit], row["reason"], unit, row["batch"]) for row in earlier]
        self._reported = len(loaded.failed)   # loaded.failed[:_reported] are in skipped.jsonl
        return loaded

    def _report_failed(self) -> None:
        """Appends the rows left out since the last call (an image that failed to decode) to skipped.jsonl."""
        new = self.data.failed[self._reported:]
        if new:
            with open(os.path.join(self.dir, "skipped.jsonl"), "a") as f:
                f.writelines(json.dumps(record.record()) + "\n" for record in new)
            self._reported += len(new)

    @property
    def micro_steps(self) -> int:
        return self.args.steps * self.args.accumulate

    def _initial_state(self, step: int | None) -> int:
        """Sets self.state: fresh, or the checkpoint of micro-step `step`; returns its micro-step (0 when fresh)."""
        import jax
        import orbax.checkpoint as ocp
        from . import checkpoint, train
        fresh = lambda params: train.init_state(self._attach(params), self.optimizer, self.args.seed)  # noqa: E731
        if step is None:
            self.state = fresh(self.model.params)
            return 0
        # the layout a fresh run has (`train.init_state` places every leaf; jax.eval_shape drops the shardings)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh(self.model.params))
        self.model.params = None   # the checkpoint holds the params (LoRA's base too): keep one copy, the restored
        where = f"{self.dir}/checkpoints/{step}"
        try:
            self.state = checkpoint.restore_orbax(
                lambda: self.manager.restore(step, args=ocp.args.StandardRestore(abstract)), where)
        except ValueError as e:
            raise UsageError(f"{e}; move {where} away to resume from the checkpoint before it") from None
        self.log(f"resumed from {where} (update {step // self.args.accumulate} of "
                 f"{self.args.steps})")
        return step

    def save(self, step: int) -> bool:
        """Checkpoints the state at micro-step `step` unless nothing changed since the newest checkpoint;
        returns whether a checkpoint of `step` exists now."""
        import orbax.checkpoint as ocp
        if step != self.saved_step:
            self.manager.save(step, args=ocp.args.StandardSave(self.state))
            self.manager.wait_until_finished()
            self.saved_step = step
        return self.manager.latest_step() == step

    def _where_saved(self, step: int) -> str:
        if not self.save(step):
            return "no update was made, nothing saved"
        return (f"saved {self.dir}/checkpoints/{step} (update {step // self.args.accumulate}); re-run the same "
                f"command to resume")

    def _metrics_file(self, start: int):
        """metrics.jsonl holding the rows of micro-steps before `start` (later ones are redone), open to append."""
        path = os.path.join(self.dir, "metrics.jsonl")
        rows = [row for row in _read_json_lines(path) if row.get("step", start) < start]
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        return open(path, "a")

    def train(self, stop) -> bool:
        """Runs from the newest checkpoint to --steps; False if `stop()` turned true first (state saved).
        UsageError (state saved) when the data file can no longer be read."""
        import jax.numpy as jnp
        from . import data, train
        accumulate, save_every = self.args.accumulate, self.args.save_every * self.args.accumulate
        step = self.start
        batches = self.data.iterate(step)       # the next batches are built on a thread meanwhile
        with self._metrics_file(step) as metrics:
            while step < self.micro_steps:
                if stop():
                    batches.close()
                    self.log(f"interrupted at update {step // accumulate}; {self._where_saved(step)}")
                    return False
                began = time.perf_counter()
                try:
                    index, batch = next(batches)
                except data.DataFileError as e:   # no row can be read: stop, keeping the updates made
                    raise UsageError(f"{e}; {self._where_saved(step)}") from None
                finally:
                    self._report_failed()
                assert index == step, (index, step)
                inputs = dict(zip(("input_ids", "pixel_values", "sources", "attention_mask", "labels"),
                                  self.model._place(batch["input_ids"], batch["pixel_values"], batch["sources"],
                                                    batch["attention_mask"], batch["labels"])))
                self.state, out = train.train_step(self.state, inputs, self.model.config, self.optimizer,
                                                   jnp.dtype(self.args.dtype), self.args.remat, self.lora)
                loss = float(out["loss"])
                step += 1
                row = {"step": step - 1, "update": (step - 1) // accumulate, "loss": loss,
                       "learning_rate": float(self.schedule((step - 1) // accumulate)),
                       "tokens": int((batch["labels"] != train.IGNORE).sum()),
                       "seconds": round(time.perf_counter() - began, 4)}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if step % accumulate == 0 and (step // accumulate) % max(1, self.args.steps // 20) == 0:
                    self.log(f"update {step // accumulate}/{self.args.steps}: loss {loss:.4f}")
                if step % save_every == 0 or step == self.micro_steps:
                    self.save(step)
        batches.close()
        self._report_failed()
        if self.data.failed:   # each was warned about when its batch was built
            self.log(f"{len(self.data.failed)} rows had images that failed to decode and were left out (listed "
                     f"in {self.dir}/skipped.jsonl with the batch they were first left out of)")
        return True

    def export(self) -> str:
        """Writes RUN_DIR/export (converted layout) and --export-hf; returns the export directory."""
        from . import checkpoint, convert, lora
        params = lora.model_params(self.state["params"], self.lora)
        out = os.path.join(self.dir, "export")
        checkpoint.save_params(out, params, self.args.model, source=os.path.abspath(self.args.model),
                               finetuned=self.dir, steps=int(self.state["step"]) // self.args.accumulate)
        self.log(f"exported the fine-tuned params to {out} (LlavaNext.from_pretrained loads it)")
        if self.args.export_hf:
            convert.export_hf(params, self.args.model, self.args.export_hf)
            self.log(f"exported an HF checkpoint to {self.args.export_hf}")
        return out


@contextlib.contextmanager
def _stop_on_signals():
    """Within: SIGINT/SIGTERM only set the flag that the yielded `stop()` reads (the loop then saves and
    returns). Outside (startup, export), Ctrl-C interrupts at once: nothing is half done then."""
    caught = []
    previous = {s: signal.signal(s, lambda signum, _frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(caught)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv=None, log=None) -> int:
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    args = build_parser().parse_args(argv)
    try:
        _check_flags(args)
        run = Run(args, log)
        with _stop_on_signals() as stop:
            if not run.train(stop):
                return INTERRUPTED
        run.export()
        return 0
    except (UsageError, FileNotFoundError) as e:
        log(f"error: {e}")
        return USAGE
    except KeyboardInterrupt:
        log("interrupted (outside the training loop: nothing half written; re-run the same command)")
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
