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

RUN_DIR holds
    run.json           the settings of the run (a resume must use the same ones)
    skipped.jsonl      the data rows left out and why (`data.ConversationData.skipped`): {"line": N, "reason"}
                       for a JSONL file, {"item": N, "reason"} for a JSON array
    checkpoints/STEP/  Orbax checkpoints of the whole train state: params (or base + adapters),
                       optimizer state, micro-step, rng; written atomically every --save-every updates,
                       the last --keep kept. The data position is the micro-step: micro-batch i is
                       `ConversationData.batch(i)`, a pure function of the data file and settings.
    metrics.jsonl      one row per micro-step: loss, learning rate, tokens, seconds
    export/            the final params (adapters merged) in the converted layout, for
                       `LlavaNext.from_pretrained`; `--export-hf DIR` also writes HF safetensors.

Re-running the same command resumes from the newest checkpoint: the steps after it are redone and give
the same params as an uninterrupted run. SIGINT/SIGTERM save a checkpoint at the current step first.
A run that reached --steps only exports again.

Exit status: 0 done, 2 usage or input error (bad flags, no usable data row, a resume with other
settings), 130 interrupted (after saving).
"""

from __future__ import annotations

import argparse
import json
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


def _settings(args) -> dict:
    s = {k: getattr(args, k) for k in RESUME_KEYS}
    s["model"], s["data"] = os.path.abspath(args.model), os.path.abspath(args.data)
    if not args.trainable.startswith("lora"):
        s.update(lora_rank=None, lora_alpha=None, lora_targets=None)
    return s


def _check_flags(args) -> None:
    for name in ("steps", "batch_size", "accumulate", "max_length", "max_images", "save_every", "keep"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    for flag, path, want in (("--model", args.model, os.path.isdir), ("--data", args.data, os.path.isfile)):
        if not want(path):
            raise UsageError(f"{flag} {path}: no such {'directory' if want is os.path.isdir else 'file'}")
    if args.fsdp and args.mesh is None:
        raise UsageError("--fsdp splits the params over the mesh's DATA axis; give --mesh DATA,MODEL too")


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


class Run:
    """One fine-tuning run: model, data, optimizer and checkpoints of RUN_DIR."""

    def __init__(self, args, log=print):
        import jax
        import orbax.checkpoint as ocp
        from . import data, lora, train
        from .model import LlavaNext
        self.args, self.log = args, log
        self.dir = os.path.abspath(args.output)
        os.makedirs(self.dir, exist_ok=True)
        self._check_resume_settings()

        mesh = _mesh(args.mesh)
        self.model = LlavaNext.from_pretrained(args.model, dtype="float32", mesh=mesh, fsdp=args.fsdp)
        processor = self.model.get_processor()
        try:
            self.data = data.ConversationData(args.data, processor, self.model.config, image_root=args.image_root,
                                              max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
                                              max_images=args.max_images)
        except ValueError as e:
            raise UsageError(str(e)) from None
        with open(os.path.join(self.dir, "skipped.jsonl"), "w") as f:
            for record in self.data.skipped:
                f.write(json.dumps({record.unit: record.line, "reason": record.reason}) + "\n")
        if self.data.skipped:
            log(f"{args.data}: skipped {len(self.data.skipped)} rows (listed in {self.dir}/skipped.jsonl); "
                f"first: {self.data.skipped[0]}")

        self.lora = None
        params = self.model.params
        if args.trainable.startswith("lora"):
            try:
                self.lora = lora.LoraConfig(args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))
            except ValueError as e:
                raise UsageError(f"--lora-*: {e}") from None
            params = lora.attach(params, self.lora, jax.random.key(args.seed))
        self.optimizer = train.make_optimizer(
            params, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, total_steps=args.steps,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, accumulate=args.accumulate,
            trainable=args.trainable)
        self.schedule = train.learning_rate_schedule(args.learning_rate, args.warmup_steps, args.steps)
        self.state = train.init_state(params, self.optimizer, args.seed)
        self.manager = ocp.CheckpointManager(
            os.path.join(self.dir, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True))

    def _check_resume_settings(self) -> None:
        path = os.path.join(self.dir, "run.json")
        settings = _settings(self.args)
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            parser = build_parser()
            saved = {k: saved[k] if k in saved else parser.get_default(k) for k in settings}
            changed = {k: (saved[k], v) for k, v in settings.items() if saved[k] != v}
            if changed:
                described = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items())
                raise UsageError(f"{self.dir} is a run with other settings ({described}); resume with the same "
                                 f"flags or pick a new --output")
        else:
            with open(path, "w") as f:
                json.dump(settings, f, indent=2)

    @property
    def micro_steps(self) -> int:
        return self.args.steps * self.args.accumulate

    def restore(self) -> int:
        """Loads the newest checkpoint into the state; returns its micro-step (0 without one)."""
        import jax
        import orbax.checkpoint as ocp
        from jax.sharding import NamedSharding, PartitionSpec
        step = self.manager.latest_step()
        if step is None:
            return 0
        mesh = self.model.mesh
        def target(leaf):   # the leaf's layout; on a mesh, leaves made on one device (counters) replicated
            if mesh is None or isinstance(leaf.sharding, NamedSharding):
                return ocp.utils.to_shape_dtype_struct(leaf)
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
        abstract = jax.tree.map(target, self.state)
        self.state = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
        self.log(f"resumed from {self.dir}/checkpoints/{step} (update {step // self.args.accumulate} of "
                 f"{self.args.steps})")
        return step

    def save(self, step: int) -> None:
        import orbax.checkpoint as ocp
        if self.manager.latest_step() != step:
            self.manager.save(step, args=ocp.args.StandardSave(self.state))
            self.manager.wait_until_finished()

    def _metrics_file(self, start: int):
        """metrics.jsonl holding the rows of micro-steps before `start` (later ones are redone), open to append."""
        path = os.path.join(self.dir, "metrics.jsonl")
        rows = []
        if os.path.isfile(path):
            with open(path) as f:
                for line in f:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        break          # a line torn by a kill ends the file
                    if row.get("step", start) < start:
                        rows.append(line if line.endswith("\n") else line + "\n")
        with open(path, "w") as f:
            f.writelines(rows)
        return open(path, "a")

    def train(self, stop) -> bool:
        """Runs from the newest checkpoint to --steps; False if `stop()` turned true first (state saved)."""
        import jax.numpy as jnp
        from . import train
        start = self.restore()
        accumulate, save_every = self.args.accumulate, self.args.save_every * self.args.accumulate
        step = start
        batches = self.data.iterate(start)       # the next batches are built on a thread meanwhile
        with self._metrics_file(start) as metrics:
            while step < self.micro_steps:
                if stop():
                    self.save(step)
                    self.log(f"interrupted at update {step // accumulate}; saved {self.dir}/checkpoints/{step}")
                    batches.close()
                    return False
                began = time.perf_counter()
                index, batch = next(batches)
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
        if self.data.failed:   # each was warned about when its batch was built
            self.log(f"{len(self.data.failed)} rows had images that failed to decode and were left out")
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


def main(argv=None, log=None) -> int:
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    parser = build_parser()
    args = parser.parse_args(argv)
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _check_flags(args)
        run = Run(args, log)
        if not run.train(lambda: stop["signal"] is not None):
            return INTERRUPTED
        run.export()
        return 0
    except (UsageError, FileNotFoundError) as e:
        log(f"error: {e}")
        return USAGE
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
