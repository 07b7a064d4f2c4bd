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

from llava_next_jax import LlavaNext, checkpoint, demo, finetune

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
