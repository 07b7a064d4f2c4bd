"""scripts/finetune.py on the demo model: a run killed mid-way and resumed equals an uninterrupted one,
and its exports load in LlavaNext and in transformers with equal logits."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from llava_next_jax import LlavaNext, checkpoint, convert, demo, finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A JSONL of caption conversations over the example images, plus one row whose image is missing."""
    root = tmp_path_factory.mktemp("data")
    images = sorted(demo.example_images_dir().iterdir())[:3]
    rows = []
    for i, image in enumerate(images):
        shutil.copy(image, root / image.name)
        rows.append({"image": image.name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": ["a red car parked near a tree", "two people walking on a beach",
                                      "a small dog sitting in the grass"][i]}]})
    rows.append({"image": "missing.jpg", "conversations": rows[0]["conversations"]})
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def flags(demo_dir, dataset, out, *extra):
    return ["--model", demo_dir, "--data", str(dataset), "--output", str(out), "--steps", str(STEPS),
            "--batch-size", "2", "--learning-rate", "1e-3", "--warmup-steps", "2", *extra]


def exported(run_dir):
    return checkpoint.flatten(checkpoint.load_params(str(run_dir / "export")))


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def test_killed_run_resumes_to_the_same_params(demo_dir, dataset, tmp_path):
    straight = tmp_path / "straight"
    assert finetune.main(flags(demo_dir, dataset, straight), log=lambda *_: None) == 0
    skipped = [json.loads(line) for line in open(straight / "skipped.jsonl")]
    assert len(skipped) == 1 and skipped[0]["line"] == 4 and "missing.jpg" in skipped[0]["reason"], skipped

    killed = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "llava_next_jax.finetune",
                             *flags(demo_dir, dataset, killed, "--save-every", "1")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / str(STEPS // 2)).is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "export").exists()          # it really died before the end
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < STEPS, saved

    messages = []
    assert finetune.main(flags(demo_dir, dataset, killed, "--save-every", "1"), log=messages.append) == 0
    assert any(m.startswith(f"resumed from {killed}/checkpoints/{saved[-1]}") for m in messages), messages
    a, b = exported(straight), exported(killed)
    assert a.keys() == b.keys()
    worst = max(float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in a)
    assert worst <= 1e-6, worst
    moved = ("multi_modal_projector", "linear_1", "kernel")
    original = checkpoint.flatten(checkpoint.load_params(demo_dir))
    assert np.abs(np.asarray(a[moved]) - np.asarray(original[moved])).max() > 1e-4   # training changed it
    np.testing.assert_array_equal(np.asarray(a[("vision_tower", "layers", "0", "mlp", "fc1", "kernel")]),
                                  np.asarray(original[("vision_tower", "layers", "0", "mlp", "fc1", "kernel")]))
    np.testing.assert_allclose(losses(killed), losses(straight), rtol=1e-6)
    assert len(losses(straight)) == STEPS


def test_resume_with_other_settings_is_refused(demo_dir, dataset, tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / "run.json").write_text(json.dumps(finetune._settings(finetune.build_parser().parse_args(
        flags(demo_dir, dataset, out)))))
    messages = []
    assert finetune.main(flags(demo_dir, dataset, out, "--trainable", "projector"), log=messages.append) == 2
    assert "trainable: 'projector+decoder' then, 'projector' now" in messages[-1], messages
    assert finetune.main(flags(demo_dir, dataset, out, "--batch-size", "0"), log=messages.append) == 2
    assert "--batch-size must be >= 1" in messages[-1]


def test_run_json_without_a_newer_key_resumes_with_its_default(tmp_path):
    """A run.json written before --max-images existed lacks the key: it reads as the default (1), so the run
    resumes with the same flags and is refused with another value. (Only the settings check runs here.)"""
    out = tmp_path / "run"
    out.mkdir()
    argv = ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "train.jsonl"), "--output", str(out)]
    old = finetune._settings(finetune.build_parser().parse_args(argv))
    del old["max_images"]
    (out / "run.json").write_text(json.dumps(old))

    def check(*extra):
        run = finetune.Run.__new__(finetune.Run)   # no model or data: only _check_resume_settings
        run.args, run.dir = finetune.build_parser().parse_args(argv + list(extra)), str(out)
        run._check_resume_settings()

    check()
    check("--max-images", "1")
    with pytest.raises(finetune.UsageError, match="max_images: 1 then, 2 now"):
        check("--max-images", "2")
    assert json.loads((out / "run.json").read_text()) == old   # left as it was


def test_lora_run_exports_for_llavanext_and_transformers(demo_dir, dataset, tmp_path):
    import torch
    from transformers import LlavaNextForConditionalGeneration
    out, hf_dir = tmp_path / "lora", tmp_path / "hf"
    assert finetune.main(flags(demo_dir, dataset, out, "--trainable", "lora+projector", "--lora-rank", "4",
                               "--lora-targets", "q_proj,v_proj,down_proj", "--export-hf", str(hf_dir)),
                         log=lambda *_: None) == 0
    assert convert.is_hf_export(str(hf_dir)) and not convert.is_hf_export(demo_dir)   # --export-hf may write there again
    model = LlavaNext.from_pretrained(str(out / "export"))
    base = LlavaNext.from_pretrained(demo_dir)
    q = ("language_model", "layers", "1", "self_attn", "q_proj", "kernel")
    k = ("language_model", "layers", "1", "self_attn", "k_proj", "kernel")
    merged, original = checkpoint.flatten(model.params), checkpoint.flatten(base.params)
    assert np.abs(np.asarray(merged[q]) - np.asarray(original[q])).max() > 1e-5      # adapted
    np.testing.assert_array_equal(np.asarray(merged[k]), np.asarray(original[k]))   # not a target

    processor = model.get_processor()
    from PIL import Image
    image = Image.open(sorted(demo.example_images_dir().iterdir())[0])
    inputs = processor(images=[image], text=["[INST] <image>\nDescribe the image. [/INST]"])
    ours = np.asarray(model.forward(inputs["input_ids"], inputs["pixel_values"], inputs["image_sizes"],
                                    inputs["attention_mask"]))
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        ref = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4


def test_sigterm_saves_a_checkpoint_then_exits_130(demo_dir, dataset, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "llava_next_jax.finetune",
                             *flags(demo_dir, dataset, out, "--steps", "1000", "--save-every", "1000")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no training step after 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == finetune.INTERRUPTED
    done = len(losses(out))
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()] == [str(done)]
    assert f"interrupted at update {done}" in proc.stderr.read().decode()
    assert not (out / "export").exists()


# --- startup checks, resume rules, failures mid-run -------------------------------------------------

def copy_of(dataset, directory):
    """The dataset (file and images) copied into `directory`, to change or remove."""
    shutil.copytree(dataset.parent, directory)
    return directory / dataset.name


def test_refused_first_run_leaves_no_settings_behind(demo_dir, dataset, tmp_path):
    """A first run refused at startup writes no run.json, so the corrected command runs; a run.json that
    cannot be read is a clear error; when no row is usable, skipped.jsonl still lists them."""
    out, messages = tmp_path / "run", []
    one = ("--steps", "1")
    for bad, fixed, message in [(("--trainable", "lora", "--lora-targets", "q_prj"), ("--trainable", "lora"),
                                 "--lora-*: LoRA targets ['q_prj']"),
                                (("--max-length", "50"), (), "no usable rows (4 skipped"),
                                (("--mesh", "2,1"), (), "--mesh 2,1: ")]:
        shutil.rmtree(out, ignore_errors=True)
        assert finetune.main(flags(demo_dir, dataset, out, *one, *bad), log=messages.append) == 2
        assert message in messages[-1], messages[-1]
        assert not (out / "run.json").exists()
        if "--max-length" in bad:
            skipped = [json.loads(line) for line in open(out / "skipped.jsonl")]
            assert [row["line"] for row in skipped] == [1, 2, 3, 4], skipped
            (out / "run.json.tmp-12345").write_text('{"mo')   # and a run.json write cut by a kill: still empty
        assert finetune.main(flags(demo_dir, dataset, out, *one, *fixed), log=messages.append) == 0, messages[-1]
        saved = json.loads((out / "run.json").read_text())
        assert saved["steps"] == 1 and saved["data_fingerprint"]["bytes"] == dataset.stat().st_size
    (out / "run.json").write_text('{"model": "/x", "da')   # torn by a kill in an older version
    assert finetune.main(flags(demo_dir, dataset, out, *one), log=messages.append) == 2
    assert f"{out}/run.json: not a readable settings file (" in messages[-1], messages[-1]


def test_resume_holds_one_copy_of_the_params(demo_dir, dataset, tmp_path):
    """A resumed LoRA run restores into a state built from shapes, after letting the loaded base params go:
    the live arrays are the restored state's, not the state plus a second base."""
    import gc
    import jax
    argv = flags(demo_dir, dataset, tmp_path / "run", "--trainable", "lora", "--lora-rank", "2", "--save-every", "1")
    run = finetune.Run(finetune.build_parser().parse_args(argv), log=lambda *_: None)
    stops = iter([False, True])
    assert not run.train(lambda: next(stops)) and run.manager.latest_step() == 1
    del run
    gc.collect()
    live = lambda: sum(a.nbytes for a in jax.live_arrays() if not a.is_deleted())  # noqa: E731
    before = live()
    resumed = finetune.Run(finetune.build_parser().parse_args(argv), log=lambda *_: None)
    assert not resumed.train(lambda: True)
    gc.collect()
    state = sum(leaf.nbytes for leaf in jax.tree.leaves(resumed.state))
    assert int(resumed.state["step"]) == 1
    assert live() - before <= 1.05 * state, (live() - before, state)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_resume_with_another_data_file_is_refused(demo_dir, dataset, tmp_path):
    data = copy_of(dataset, tmp_path / "data")
    out, messages = tmp_path / "run", []
    assert finetune.main(flags(demo_dir, data, out, "--steps", "1"), log=messages.append) == 0
    data.write_text(data.read_text().replace("a red car", "a blue car"))   # same size, other rows
    assert finetune.main(flags(demo_dir, data, out, "--steps", "1"), log=messages.append) == 2
    assert f"--data {data}: the file changed since this run began" in messages[-1], messages[-1]
    record = json.loads((out / "run.json").read_text())
    del record["data_fingerprint"]   # a run recorded before fingerprints: resumed as before
    (out / "run.json").write_text(json.dumps(record))
    assert finetune.main(flags(demo_dir, data, out, "--steps", "1"), log=messages.append) == 0


def test_steps_on_resume(demo_dir, dataset, tmp_path):
    out, messages = tmp_path / "run", []
    assert finetune.main(flags(demo_dir, dataset, out, "--steps", "2"), log=messages.append) == 0
    assert finetune.main(flags(demo_dir, dataset, out, "--steps", "1"), log=messages.append) == 2
    assert messages[-1] == (f"error: --steps 1: {out} has made 2 updates already (its newest checkpoint); give "
                            f"--steps 2 or more, or pick a new --output")
    assert finetune.main(flags(demo_dir, dataset, out, "--steps", "3"), log=messages.append) == 0
    assert any(m.startswith("--steps 3: this run had --steps 2; from update 2 on, the learning rate follows "
                            "the schedule for 3 updates") for m in messages), messages
    assert json.loads((out / "run.json").read_text())["steps"] == 3
    assert len(losses(out)) == 3


def test_damaged_checkpoint_is_a_usage_error_naming_it(demo_dir, dataset, tmp_path):
    """Resuming from a checkpoint whose file was cut short: exit 2 with one message naming the
    checkpoint, the array and the file (not a crash under pages of the reads Orbax abandoned)."""
    out, messages = tmp_path / "run", []
    assert finetune.main(flags(demo_dir, dataset, out, "--steps", "1"), log=messages.append) == 0
    files = [os.path.join(d, f) for d, _, fs in os.walk(out / "checkpoints" / "1") for f in fs]
    os.truncate(max(files, key=os.path.getsize), 1000)
    assert finetune.main(flags(demo_dir, dataset, out, "--steps", "2"), log=messages.append) == 2
    assert messages[-1].startswith(f"error: {out}/checkpoints/1: ")
    assert "in OCDBT database at local file" in messages[-1]
    assert messages[-1].endswith(f"; move {out}/checkpoints/1 away to resume from the checkpoint before it")


@pytest.mark.filterwarnings("ignore:.*cannot be read:RuntimeWarning")   # the cut image, left out of its batches
def test_data_file_gone_mid_run_saves_and_exits_2(demo_dir, dataset, tmp_path, monkeypatch):
    """The data file removed after two batches: the run saves its two updates and exits 2 naming the file,
    instead of training on empty rows. An image that fails to decode when batched is in skipped.jsonl."""
    from llava_next_jax import data as data_lib
    data = copy_of(dataset, tmp_path / "data")
    image = next(data.parent.glob("*.jpg"))
    image.write_bytes(image.read_bytes()[:image.stat().st_size * 6 // 10])   # the header reads, the pixels do not
    original = data_lib.ConversationData.batch
    kept = data.read_bytes()

    removed = []

    def batch(self, index):
        if index == 2 and not removed:
            removed.append(data.unlink())
        return original(self, index)
    monkeypatch.setattr(data_lib.ConversationData, "batch", batch)
    out, messages = tmp_path / "run", []
    assert finetune.main(flags(demo_dir, data, out, "--save-every", "100"), log=messages.append) == 2
    assert messages[-1].startswith(f"error: {data}: cannot be read any more (")
    assert messages[-1].endswith(f"; saved {out}/checkpoints/2 (update 2); re-run the same command to resume")
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    failed = [row for row in map(json.loads, open(out / "skipped.jsonl")) if "batch" in row]
    assert len(failed) == 1 and image.name in failed[0]["reason"] and failed[0]["batch"] in (0, 1), failed

    data.write_bytes(kept)   # back: the run resumes and ends; the image row is listed once
    assert finetune.main(flags(demo_dir, data, out, "--save-every", "100"), log=messages.append) == 0
    assert [row for row in map(json.loads, open(out / "skipped.jsonl")) if "batch" in row] == failed
    assert len(losses(out)) == STEPS


def test_ctrl_c_during_startup_exits_130_writing_nothing(demo_dir, dataset, tmp_path, monkeypatch):
    """SIGINT while the data file is scanned stops the run there: no run.json, no step-0 checkpoint."""
    from llava_next_jax import data as data_lib
    original = data_lib.ConversationData.__init__

    def scan(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        original(self, *args, **kwargs)
    monkeypatch.setattr(data_lib.ConversationData, "__init__", scan)
    out, messages = tmp_path / "run", []
    assert finetune.main(flags(demo_dir, dataset, out), log=messages.append) == finetune.INTERRUPTED
    assert not (out / "run.json").exists() and not (out / "checkpoints").exists()
    assert messages[-1].startswith("interrupted")


def test_output_dirs_and_flag_values_are_checked_first(demo_dir, dataset, tmp_path):
    (tmp_path / "afile").write_text("x")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text('{"acc": 0.93}\n')
    for extra, message in [
            (("--output", str(tmp_path / "afile")), "--output {tmp}/afile: exists and is not a directory"),
            (("--output", str(mine)), "--output {tmp}/mine: holds files but is not a fine-tuning run (no run.json)"),
            (("--export-hf", str(tmp_path / "afile")), "--export-hf {tmp}/afile: exists and is not a directory"),
            (("--export-hf", str(mine)), "--export-hf {tmp}/mine: holds files but is not an earlier HF export"),
            (("--export-hf", demo_dir), "is SRC_DIR"),
            (("--warmup-steps", "-1"), "--warmup-steps must be >= 0; got -1"),
            (("--lora-alpha", "0"), "--lora-alpha must be > 0; got 0.0"),
            (("--max-grad-norm", "0"), "--max-grad-norm must be > 0 (0 would clip every update to nothing); got 0.0"),
            (("--learning-rate", "nan"), "--learning-rate must be > 0; got nan")]:
        messages = []
        assert finetune.main(flags(demo_dir, dataset, tmp_path / "run", *extra), log=messages.append) == 2, extra
        assert message.format(tmp=tmp_path) in messages[-1], messages
    assert (mine / "metrics.jsonl").read_text() == '{"acc": 0.93}\n' and not (tmp_path / "run").exists()


def test_image_root_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "m", "--data", "d.jsonl", "--output", "run", "--image-root", "images"]
    assert finetune._settings(finetune.build_parser().parse_args(argv))["image_root"] == str(tmp_path / "images")
