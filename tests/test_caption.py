"""The demo model and scripts/caption.py, run as a user runs them (subprocesses) on the demo model.

The demo model is built once per session into a temporary LLAVA_NEXT_JAX_DEMO_DIR; subprocesses
share a persistent XLA compilation cache so each run does not recompile the same programs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from llava_next_jax import caption, demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "caption.py")
MIXED_SIZES = [(480, 640), (900, 300), (250, 1000), (128, 128), (60, 40), (300, 310), (700, 200)]  # (h, w)


@pytest.fixture(scope="session")
def env(demo_home, demo_dir):
    """Environment for subprocesses: the session's demo model dir, a shared compilation cache, the checkout."""
    base = demo_home
    e = dict(os.environ, LLAVA_NEXT_JAX_DEMO_DIR=str(base / "demo-v1"), PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=str(base / "xla-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PLATFORMS="cpu")
    return e


def write_images(directory, sizes, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = directory / f"img{i}_{h}x{w}.{'png' if i % 2 else 'jpg'}"
        pixels = (np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.integers(0, 60, (h, 1, 3)))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


# Runs scripts/caption.py with torch and transformers made unimportable: the script must not need them.
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = sys.modules['transformers'] = None; "
            "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_caption(env, *args, check_rc=None, without_torch=False):
    launcher = [sys.executable, "-c", NO_TORCH] if without_torch else [sys.executable]
    proc = subprocess.run([*launcher, SCRIPT, "--no-progress", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr[-3000:]
    return proc


def load_jsonl(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.endswith("\n"), "the output must end with a complete line"
    return [json.loads(line) for line in text.splitlines()]


# --- the demo model --------------------------------------------------------------------------------

def test_demo_model_is_a_converted_checkpoint_our_processor_loads(demo_dir):
    from llava_next_jax import LlavaNext, LlavaNextProcessor
    from llava_next_jax.checkpoint import is_converted
    assert is_converted(demo_dir)
    processor = LlavaNextProcessor.from_pretrained(demo_dir)
    model = LlavaNext.from_pretrained(demo_dir)
    assert processor.image_token_id == model.config.image_token_id
    assert processor.tokenizer.get_vocab_size(with_added_tokens=True) <= model.config.text.vocab_size
    assert model.pad_token_id == processor.pad_token_id
    assert model.eos_token_ids == (processor.tokenizer.token_to_id("</s>"),)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": "What is this?"}]}])
    assert prompt == "[INST] <image>\nWhat is this? [/INST]"
    inputs = processor(images=[Image.new("RGB", (100, 40), (200, 30, 30))], text=[prompt])
    assert inputs["input_ids"][0, 0] == processor.tokenizer.token_to_id("<s>")
    assert processor.decode(inputs["input_ids"][0], skip_special_tokens=True) == "[INST] \nWhat is this? [/INST]"
    assert demo.demo_model_dir() == demo_dir  # cached: not rebuilt


def test_demo_hf_files_match_transformers(tmp_path):
    """The HF-layout files the demo writes are what transformers reads: same token ids from HF's processor,
    and HF's model loads the weights with no missing or unexpected keys."""
    from transformers import LlavaNextForConditionalGeneration
    from transformers import LlavaNextProcessor as HFProcessor

    from llava_next_jax import LlavaNextProcessor
    hf_dir = demo.write_hf_checkpoint(tmp_path / "hf")
    image = Image.new("RGB", (90, 200), (10, 120, 40))
    text = "[INST] <image>\nDescribe this image, please. [/INST]"
    ours = LlavaNextProcessor.from_pretrained(hf_dir)(images=[image], text=[text])
    theirs = HFProcessor.from_pretrained(hf_dir)(images=[image], text=[text], return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], theirs["input_ids"])
    np.testing.assert_allclose(ours["pixel_values"], theirs["pixel_values"], atol=1e-6)
    _, info = LlavaNextForConditionalGeneration.from_pretrained(hf_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_demo_command_writes_its_jsonl(env, demo_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llava_next_jax.demo"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANDOM weights" in proc.stdout and "meaningless" in proc.stdout
    rows = load_jsonl(tmp_path / "demo_captions.jsonl")
    shipped = sorted(f for f in os.listdir(demo.example_images_dir()))
    assert sorted(os.path.basename(r["image"]) for r in rows) == shipped and len(shipped) >= 4
    assert all(isinstance(r.get("caption"), str) and r["caption"] for r in rows), rows


# --- the caption script --------------------------------------------------------------------------

def test_broken_inputs_become_error_rows_and_exit_1(env, demo_dir, tmp_path):
    folder = tmp_path / "mixed"
    good = write_images(folder / "sub", [(64, 96), (120, 50)])
    (folder / "empty.png").write_bytes(b"")
    jpeg = open(good[0], "rb").read()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "notes.png").write_text("this is a text file, not a PNG\n")
    (folder / "ignored.md").write_text("not an image extension: not an input\n")
    out = tmp_path / "out.jsonl"
    proc = run_caption(env, "--model", demo_dir, "--images", folder, "--output", out, "--max-new-tokens", 8,
                       check_rc=1, without_torch=True)
    rows = {r["image"]: r for r in load_jsonl(out)}
    assert sorted(rows) == sorted(good + [str(folder / n) for n in ("empty.png", "truncated.jpg", "notes.png")])
    for path in good:
        assert rows[path].get("caption"), rows[path]
    for name in ("empty.png", "truncated.jpg", "notes.png"):
        row = rows[str(folder / name)]
        assert "caption" not in row and str(folder / name) in row["error"], row
    assert "3 failed" in proc.stderr and "2/5 images captioned" in proc.stderr


def test_help_and_hints_name_the_command_as_run(monkeypatch):
    """Installed as llava-next-caption, its help and merge hint say so (they said caption.py)."""
    from llava_next_jax import caption
    for argv0, name in (("/env/bin/llava-next-caption", "llava-next-caption"), (SCRIPT, "caption.py"),
                        ("", "caption.py")):
        monkeypatch.setattr(sys, "argv", [argv0])
        assert f"`{name} merge --output OUT` then joins them" in " ".join(caption.build_parser().format_help().split())
        assert caption.build_merge_parser().format_usage().startswith(f"usage: {name} merge ")


def test_usage_errors_exit_2(env, tmp_path):
    (tmp_path / "empty_dir").mkdir()
    image = write_images(tmp_path / "imgs", [(30, 30)])[0]
    out = tmp_path / "o.jsonl"
    cases = [(["--model", tmp_path / "nope", "--images", image], "no such directory"),
             (["--model", tmp_path / "empty_dir", "--images", image], "no config.json"),
             (["--images", tmp_path / "empty_dir"], "no images found"),
             (["--images", tmp_path / "missing.png"], "no such file"),
             (["--images", image, "--batch-size", "0"], "--batch-size"),
             (["--images", image, "--top-p", "0"], "top-p"),
             (["--images", image, "--typical-p", "0"], "--typical-p must be in (0, 1] (1.0: off); got 0.0"),
             (["--images", image, "--no-repeat-ngram-size", "17"], "--no-repeat-ngram-size must be in [0, 16]"),
             (["--images", image, "--num-beams", "0"], "--num-beams must be >= 1 (with --do-sample: beam sampling); got 0"),
             (["--images", image, "--num-beams", "3", "--prompt-lookup", "2"], "--prompt-lookup must be in [0, 32]"),
             (["--images", image, "--bogus"], "unrecognized")]
    for args, message in cases:
        proc = run_caption(env, *args, "--output", out)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.returncode, proc.stderr[-2000:])
    assert not out.exists() or out.read_text() == ""


def test_kill_midway_then_resume_records_every_image_once(env, demo_dir, tmp_path):
    paths = write_images(tmp_path / "imgs", MIXED_SIZES[:6])
    out = tmp_path / "out.jsonl"
    args = [sys.executable, SCRIPT, "--no-progress", "--model", demo_dir, "--images", tmp_path / "imgs",
            "--output", out, "--batch-size", "1", "--max-new-tokens", "48"]
    proc = subprocess.Popen(list(map(str, args)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished (or died) before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = load_jsonl(out)
    assert 1 <= len(before) < len(paths)
    with open(out, "ab") as f:  # a kill in the middle of a write
        f.write(b'{"image": "' + paths[-1].encode() + b'", "capt')

    rerun = run_caption(env, "--model", demo_dir, "--images", tmp_path / "imgs", "--output", out,
                        "--batch-size", 1, "--max-new-tokens", 48, check_rc=0)
    assert "partial last line" in rerun.stderr
    assert f"{len(before)} of {len(paths)} inputs already recorded" in rerun.stderr
    rows = load_jsonl(out)  # every line valid JSON
    assert sorted(r["image"] for r in rows) == sorted(paths)  # every image exactly once
    assert rows[:len(before)] == before and all(r.get("caption") for r in rows)

    again = run_caption(env, "--model", demo_dir, "--images", tmp_path / "imgs", "--output", out, check_rc=0)
    assert load_jsonl(out) == rows and "0 this run" in again.stderr


def test_greedy_captions_do_not_depend_on_batch_size(env, demo_dir, tmp_path):
    paths = write_images(tmp_path / "imgs", MIXED_SIZES)
    listing = tmp_path / "list.txt"
    listing.write_text("# inputs\n" + "\n".join(os.path.relpath(p, tmp_path) for p in paths) + "\n")
    captions = {}
    for batch in (1, 4):
        out = tmp_path / f"b{batch}.jsonl"
        run_caption(env, "--images", listing, "--output", out, "--batch-size", batch, "--max-new-tokens", 12,
                    "--prompt", "What is in the picture?", check_rc=0)
        captions[batch] = {os.path.basename(r["image"]): r["caption"] for r in load_jsonl(out)}
    assert len(captions[1]) == len(paths)
    assert len(set(captions[1].values())) > 1, "captions should vary with the image"
    assert captions[1] == captions[4]


def test_a_short_batch_runs_on_the_full_batches_programs(demo_dir, tmp_path):
    """A last batch short of --batch-size (and `LlavaNext.caption`'s last chunk) runs as a full one: it
    compiles no program of its own, and its captions are those of the images captioned one at a time."""
    from llava_next_jax import LlavaNext
    from llava_next_jax.generate import compiled_programs
    paths = write_images(tmp_path / "imgs", [(300, 400), (310, 400), (300, 410)])
    run = lambda name, images, batch: caption.main(
        ["--model", demo_dir, "--images", *images, "--output", str(tmp_path / name), "--batch-size", str(batch),
         "--max-new-tokens", "6", "--no-progress"])
    assert run("two.jsonl", paths[:2], 2) == 0      # compiles the batch-of-2 programs
    compiled = compiled_programs()
    assert run("three.jsonl", paths, 2) == 0        # batches of 2 and 1
    assert compiled_programs() == compiled
    model = LlavaNext.from_pretrained(demo_dir)
    in_chunks = model.caption(paths, batch_size=2, max_new_tokens=6)
    assert compiled_programs() == compiled
    assert run("one.jsonl", paths, 1) == 0
    alone = {r["image"]: r["caption"] for r in load_jsonl(tmp_path / "one.jsonl")}
    assert {r["image"]: r["caption"] for r in load_jsonl(tmp_path / "three.jsonl")} == alone
    assert in_chunks == [alone[p] for p in paths]


def test_a_second_run_loads_its_programs_from_the_compilation_cache(env, demo_dir, tmp_path):
    """--compilation-cache DIR: the first run stores its compiled programs there, a second run of the
    same shapes stores nothing new (every program a hit) and writes the same captions."""
    paths = write_images(tmp_path / "imgs", MIXED_SIZES[:3])
    cache = tmp_path / "programs"
    quiet = {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT") and k != "JAX_COMPILATION_CACHE_DIR"}
    entries, rows = [], []
    for run in range(2):
        out = tmp_path / f"run{run}.jsonl"
        run_caption(quiet, "--images", *paths, "--output", out, "--batch-size", 2, "--max-new-tokens", 6,
                    "--compilation-cache", cache, check_rc=0)
        entries.append(sorted(name for name in os.listdir(cache) if name.endswith("-cache")))
        rows.append([(r["image"], r["caption"]) for r in load_jsonl(out)])
    assert any(name.startswith("jit_prefill_program") for name in entries[0]), entries[0]
    assert any(name.startswith("jit_decode_program") for name in entries[0]), entries[0]
    assert entries[1] == entries[0]
    assert rows[1] == rows[0] and len(rows[0]) == 3


def test_sampling_is_reproducible_and_follows_the_seed(demo_dir, tmp_path):
    """In process (caption.main): same --seed -> same captions, whatever the batching; another seed -> others."""
    paths = write_images(tmp_path / "imgs", MIXED_SIZES[:4])
    captions = []
    for run, (seed, batch) in enumerate(((1, 2), (1, 1), (2, 2))):
        out = tmp_path / f"s{run}.jsonl"
        code = caption.main(["--model", demo_dir, "--images", *paths, "--output", str(out), "--batch-size", str(batch),
                             "--max-new-tokens", "12", "--do-sample", "--temperature", "1.5", "--top-k", "50",
                             "--top-p", "0.95", "--seed", str(seed), "--no-progress"])
        assert code == 0
        captions.append({r["image"]: r["caption"] for r in load_jsonl(out)})
    assert captions[0] == captions[1]
    assert captions[0] != captions[2]


def test_scores_repetition_penalty_and_ngrams_reach_generate(demo_dir, tmp_path):
    """--scores: each row's logprob and tokens are those of `generate(return_logprobs=True)` for its image
    alone, over the tokens up to its stop id (the caption those tokens decode to); --repetition-penalty
    and --no-repeat-ngram-size: the captions of `generate` with them (checked against HF in
    test_generate); --prompt-lookup: the captions and scores without it."""
    from llava_next_jax import LlavaNext
    from llava_next_jax.prompting import chat_prompt, decode_new_tokens
    paths = write_images(tmp_path / "imgs", MIXED_SIZES[:3])
    out = tmp_path / "scored.jsonl"
    assert caption.main(["--model", demo_dir, "--images", *paths, "--output", str(out), "--batch-size", "3",
                         "--max-new-tokens", "16", "--scores", "--no-progress"]) == 0
    rows = load_jsonl(out)
    model = LlavaNext.from_pretrained(demo_dir)
    processor = model.get_processor()
    prompt, add_special = chat_prompt(processor, caption.DEFAULT_PROMPT)
    for row in rows:
        inputs = processor(images=[row["image"]], text=[prompt], add_special_tokens=add_special)
        tokens, logprobs = model.generate(**inputs, max_new_tokens=16, return_logprobs=True)
        n = row["tokens"]
        assert 1 <= n <= 16 and (n == 16 or tokens[0, n - 1] in model.eos_token_ids)
        assert not np.isin(tokens[0, :n - 1], model.eos_token_ids).any()
        assert decode_new_tokens(processor, tokens[:, :n])[0] == row["caption"]
        assert abs(row["logprob"] - float(logprobs[0, :n].sum())) <= 1e-3, (row, logprobs[0, :n].sum())
        assert row["logprob"] < 0
    assert len(rows) == 3
    # --repetition-penalty and --no-repeat-ngram-size reach generate: the captions are generate's with them.
    # --num-beams/--length-penalty: the best beam's caption, and with --scores its score x tokens**L.
    for flags, setting in ((["--repetition-penalty", "1.3"], dict(repetition_penalty=1.3)),
                           (["--no-repeat-ngram-size", "2"], dict(no_repeat_ngram_size=2)),
                           (["--num-beams", "3", "--length-penalty", "0.7", "--scores"],
                            dict(num_beams=3, length_penalty=0.7))):
        out = tmp_path / f"{flags[0]}.jsonl"
        assert caption.main(["--model", demo_dir, "--images", *paths, "--output", str(out), "--batch-size", "3",
                             "--max-new-tokens", "16", *flags, "--no-progress"]) == 0
        for row in load_jsonl(out):
            inputs = processor(images=[row["image"]], text=[prompt], add_special_tokens=add_special)
            tokens, scores = model.generate(**inputs, max_new_tokens=16, return_logprobs=True, **setting)
            assert decode_new_tokens(processor, tokens)[0] == row["caption"], flags
            if "num_beams" in setting:
                assert abs(row["logprob"] - float(scores[0]) * row["tokens"] ** 0.7) <= 1e-3, row
        assert [r["caption"] for r in load_jsonl(out)] != [r["caption"] for r in rows], flags
    # --prompt-lookup: the same captions and scores as without it.
    out = tmp_path / "lookup.jsonl"
    assert caption.main(["--model", demo_dir, "--images", *paths, "--output", str(out), "--batch-size", "3",
                         "--max-new-tokens", "16", "--scores", "--prompt-lookup", "3", "--no-progress"]) == 0
    for row, plain in zip(load_jsonl(out), rows):
        assert row["caption"] == plain["caption"] and row["tokens"] == plain["tokens"], (row, plain)
        assert abs(row["logprob"] - plain["logprob"]) <= 1e-3, (row, plain)
    # A stop id met mid-caption (the demo model never emits its eos): the score ends with that token.
    captioner = caption.Captioner(model, processor, caption.DEFAULT_PROMPT, 16, scores=True)
    batches, _ = caption.plan_batches([rows[0]["image"]], processor.geometry, 1)
    inputs = processor(images=[rows[0]["image"]], text=[prompt], add_special_tokens=add_special)
    tokens, logprobs = model.generate(**inputs, max_new_tokens=16, return_logprobs=True)
    model.eos_token_ids = (int(tokens[0, 5]),)
    n = int(np.argmax(tokens[0] == tokens[0, 5])) + 1
    (row,) = captioner.caption(captioner.prepare(batches[0]))
    assert row["tokens"] == n and abs(row["logprob"] - float(logprobs[0, :n].sum())) <= 1e-3, (row, n)
    assert row["caption"] == decode_new_tokens(processor, tokens[:, :n])[0]
    # --stop-string: generate's captions with that stop string; scores up to the token completing it.
    model.eos_token_ids = tuple(LlavaNext.from_pretrained(demo_dir).eos_token_ids)
    stop = rows[0]["caption"][4:7]
    out = tmp_path / "stop.jsonl"
    assert caption.main(["--model", demo_dir, "--images", *paths, "--output", str(out), "--batch-size", "3",
                         "--max-new-tokens", "16", "--scores", "--stop-string", stop, "--no-progress"]) == 0
    assert json.loads(open(caption.settings_path(str(out))).read())["settings"]["stop_string"] == [stop]
    for row in load_jsonl(out):
        inputs = processor(images=[row["image"]], text=[prompt], add_special_tokens=add_special)
        tokens, logprobs = model.generate(**inputs, max_new_tokens=16, return_logprobs=True, stop_strings=[stop],
                                          tokenizer=processor)
        n = int(np.sum(logprobs[0] != 0))
        assert row["tokens"] == n and decode_new_tokens(processor, tokens)[0] == row["caption"], (row, n)
        assert abs(row["logprob"] - float(logprobs[0].sum())) <= 1e-3, row
    assert load_jsonl(out)[0]["tokens"] < 16 and stop in load_jsonl(out)[0]["caption"]
    assert caption.main(["--model", demo_dir, "--images", *paths, "--output", str(tmp_path / "bad.jsonl"),
                         "--stop-string", "x" * 33, "--no-progress"]) == 2


# --- pieces, in process --------------------------------------------------------------------------

def test_collect_inputs_lists_dirs_and_dedupes(tmp_path):
    paths = write_images(tmp_path / "d" / "deep", [(20, 20), (30, 20)])
    (tmp_path / "d" / "readme.txt").write_text("not a list\n")  # inside a directory: not an image, skipped
    listing = tmp_path / "l.jsonl"
    listing.write_text(json.dumps({"image": "d/deep/" + os.path.basename(paths[0])}) + "\n"
                       + json.dumps("missing.png") + "\n")
    got = caption.collect_inputs([str(tmp_path / "d"), str(listing), paths[1]])
    assert got == [paths[0], paths[1], str(tmp_path / "missing.png")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(caption.UsageError, match="no images found"):
        caption.collect_inputs([str(tmp_path / "empty")])
    with pytest.raises(caption.UsageError, match="no such file"):
        caption.collect_inputs([str(tmp_path / "nothing.png")])


def test_repair_output_cuts_only_a_partial_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    good = b'{"image": "a.png", "caption": "x"}\n{"image": "b.png", "error": "e"}\n'
    out.write_bytes(good + b'{"image": "c.p')
    caption.repair_output(str(out))
    assert out.read_bytes() == good
    caption.repair_output(str(out))
    assert out.read_bytes() == good
    assert [r["image"] for r in caption.read_rows(str(out))] == ["a.png", "b.png"]


def test_repair_output_keeps_a_whole_last_row_without_its_newline(tmp_path, capsys):
    """A file edited by hand and saved without a final newline: its last row is kept, not cut."""
    out = tmp_path / "o.jsonl"
    rows = b'{"image": "a.png", "caption": "x"}\n{"image": "b.png", "caption": "fixed by hand"}'
    out.write_bytes(rows)
    assert [r["image"] for r in caption.read_rows(str(out))] == ["a.png", "b.png"]
    caption.repair_output(str(out), caption._log)
    assert out.read_bytes() == rows + b"\n"
    assert "added the newline missing after its last row" in capsys.readouterr().err


def test_an_output_that_is_not_a_caption_file_is_refused_untouched(tmp_path, capsys):
    image = write_images(tmp_path / "imgs", [(20, 20)])[0]
    victims = {"photo.jpg": open(image, "rb").read(), "notes.txt": b"line one\nline two", "list.jsonl": b'"a.png"\n'}
    for name, data in victims.items():
        (tmp_path / name).write_bytes(data)
        assert caption.main(["--images", image, "--output", str(tmp_path / name), "--no-progress"]) == 2, name
        assert f"--output {tmp_path / name} is not a caption file" in capsys.readouterr().err
        assert (tmp_path / name).read_bytes() == data, name
    torn = tmp_path / "torn.jsonl"   # killed in the middle of its first row: a caption file, repaired
    torn.write_bytes(b'{"image": "a.png", "capt')
    caption.repair_output(str(torn))
    assert torn.read_bytes() == b""


def test_a_second_run_on_a_locked_output_is_refused(tmp_path, capsys):
    image = write_images(tmp_path / "imgs", [(20, 20)])[0]
    out = tmp_path / "o.jsonl"
    holder = caption.RowWriter(str(out))   # another run, captioning into out
    try:
        assert caption.main(["--images", image, "--output", str(out), "--no-progress"]) == 2
        assert "another run is writing that output" in capsys.readouterr().err
        assert out.read_bytes() == b""
    finally:
        holder.close()


def test_an_output_on_a_file_system_without_locks_is_written_unlocked(tmp_path, capsys, monkeypatch):
    import errno
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(caption.fcntl, "flock", no_locks)
    writer = caption.RowWriter(str(tmp_path / "o.jsonl"))
    writer.write([{"image": "a.jpg", "caption": "x"}])
    writer.close()
    assert caption.read_rows(str(tmp_path / "o.jsonl")) == [{"image": "a.jpg", "caption": "x"}]
    assert "cannot lock it" in capsys.readouterr().err


def test_only_the_checkpoints_own_failures_are_usage_errors(demo_dir, monkeypatch):
    """A model that fails to load for want of device memory is a crash (its traceback kept), not a bad --model."""
    from llava_next_jax import LlavaNext
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    monkeypatch.setattr(LlavaNext, "from_pretrained", out_of_memory)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        caption._load(str(demo_dir), None, lambda *_: None)


def test_resuming_with_other_caption_settings_is_refused(demo_dir, tmp_path, capsys, monkeypatch):
    paths = write_images(tmp_path / "imgs", [(40, 60), (60, 40), (50, 50)])
    out = tmp_path / "o.jsonl"
    flags = ["--model", str(demo_dir), "--output", str(out), "--max-new-tokens", "4", "--no-progress"]
    assert caption.main([*flags, "--images", paths[0]]) == 0
    record = json.loads((tmp_path / "o.settings.json").read_text())["settings"]
    assert record["model"] == os.path.abspath(demo_dir) and record["max_new_tokens"] == 4
    first = out.read_bytes()
    capsys.readouterr()
    changed = ["--images", *paths[:2], "--prompt", "List every object.", "--max-new-tokens", "6", "--do-sample",
               "--min-p", "0.1"]
    assert caption.main([*flags, *changed]) == 2
    err = capsys.readouterr().err
    assert f"{out} holds captions made with other settings" in err and "another --output" in err
    assert f"--prompt {caption.DEFAULT_PROMPT!r} -> 'List every object.'" in err
    assert "--max-new-tokens 4 -> 6" in err and "--do-sample None -> True" in err and "--min-p None -> 0.1" in err
    assert out.read_bytes() == first
    # A record from before the min_p ... top_h flags (without them) holds their defaults.
    old = {k: v for k, v in record.items() if k not in ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")}
    (tmp_path / "o.settings.json").write_text(json.dumps({"settings": old}))
    # Settings that do not change captions may change; a relative --model is the same model.
    monkeypatch.chdir(os.path.dirname(demo_dir))
    same = ["--model", os.path.basename(demo_dir), "--batch-size", "2", "--prompt-lookup", "2", "--scores"]
    assert caption.main([*flags, *same, "--images", *paths[:2]]) == 0
    assert "1 of 2 inputs already recorded" in capsys.readouterr().err
    # Nothing left to caption: other settings are only noted.
    assert caption.main([*flags, "--images", *paths[:2], "--max-new-tokens", "5"]) == 0
    assert "nothing to caption" in capsys.readouterr().err
    # An output from before the settings record resumes unchecked, and stays so.
    os.remove(tmp_path / "o.settings.json")
    assert caption.main([*flags, "--images", *paths, "--max-new-tokens", "5"]) == 0
    assert len(load_jsonl(out)) == 3 and not (tmp_path / "o.settings.json").exists()


def test_shards_with_other_caption_settings_neither_resume_nor_merge(sharded, tmp_path, capsys):
    out = copy_shards(sharded, tmp_path)
    shard = tmp_path / "out.part-00000-of-00002.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-1]))
    assert caption.main([*sharded.flags, "--output", str(out), "--process-index", "0", "--process-count", "2",
                         "--prompt", "Other."]) == 2
    assert f"--prompt {caption.DEFAULT_PROMPT!r} -> 'Other.'" in capsys.readouterr().err
    assert shard.read_text() == "".join(lines[:-1])
    shard.write_text("".join(lines))
    record_path = tmp_path / "out.part-00001-of-00002.inputs.json"
    record = json.loads(record_path.read_text())
    record["settings"]["max_new_tokens"] = 99
    record_path.write_text(json.dumps(record))
    assert caption.main(["merge", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "were captioned with different settings" in err and f"{tmp_path / 'out.part-00001-of-00002.jsonl'}: " \
        f"--max-new-tokens 10 -> 99" in err
    assert not out.exists()
    record["settings"]["max_new_tokens"] = 10
    record_path.write_text(json.dumps(record))
    out.write_bytes(b"\x89PNG\r\n\x1a\n not captions")   # merge --output naming an image: left as it is
    assert caption.main(["merge", "--output", str(out)]) == 2
    assert f"--output {out} is not a caption file" in capsys.readouterr().err
    assert out.read_bytes() == b"\x89PNG\r\n\x1a\n not captions"


def test_paths_are_normalised_and_resume_from_any_spelling(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path / "mix", [(30, 40), (40, 30)])
    a = os.path.join("mix", os.listdir("mix")[0])
    assert caption.collect_inputs([a, "./" + a, a.replace("/", "//"), os.path.abspath(a)]) == [a]
    assert caption.collect_inputs(["./mix"]) == caption.collect_inputs(["mix/"]) == sorted(
        os.path.join("mix", f) for f in os.listdir("mix"))
    flags = ["--model", str(demo_dir), "--output", "o.jsonl", "--max-new-tokens", "3", "--no-progress"]
    assert caption.main([*flags, "--images", "./mix"]) == 0
    rows = load_jsonl(tmp_path / "o.jsonl")
    assert sorted(r["image"] for r in rows) == caption.collect_inputs(["mix"])
    for spelling in ("mix", "mix//", str(tmp_path / "mix")):
        assert caption.main([*flags, "--images", spelling]) == 0
        assert "0 this run" in capsys.readouterr().err
    assert load_jsonl(tmp_path / "o.jsonl") == rows


def test_an_earlier_output_as_a_list_reads_its_paths_as_its_run_wrote_them(tmp_path, monkeypatch):
    """Rows of a caption output hold paths relative to where their run started (the working directory
    here); other list rows are relative to the list file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run1").mkdir()
    (tmp_path / "run1" / "captions.jsonl").write_text(
        json.dumps({"image": "good.jpg", "caption": "c"}) + "\n" + json.dumps({"image": "bad.jpg", "error": "e"})
        + "\n" + json.dumps({"image": "listed.jpg"}) + "\n" + json.dumps("plain.jpg") + "\n")
    assert caption.collect_inputs(["run1/captions.jsonl"]) == ["good.jpg", "bad.jpg", "run1/listed.jpg",
                                                              "run1/plain.jpg"]


def test_bad_list_files_are_usage_errors_naming_file_and_line(tmp_path, monkeypatch, capsys):
    cases = {"num.jsonl": (b'"ok.png"\n{"image": 123}\n', "num.jsonl:2: expected a JSON string or an object"),
             "null.jsonl": (b'{"image": null}\n', "null.jsonl:1: expected"),
             "broken.jsonl": (b'{"image": \n', "broken.jsonl:1: not JSON"),
             "latin1.txt": (b"ok.png\n\xff\xfe a.jpg\n", "latin1.txt:2: not UTF-8 text (byte 0xff at column 1)")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(caption.UsageError, match=re.escape(message)):
            caption.collect_inputs([str(tmp_path / name)])
    out = tmp_path / "o.jsonl"
    assert caption.main(["--images", str(tmp_path / "num.jsonl"), "--output", str(out), "--no-progress"]) == 2
    assert "num.jsonl:2:" in capsys.readouterr().err and not out.exists()
    real_open = open

    def deny(path, *args, **kwargs):
        if str(path).endswith("secret.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)
    (tmp_path / "secret.txt").write_text("a.png\n")
    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(caption.UsageError, match="secret.txt: cannot read this list file \\(Permission denied\\)"):
        caption.collect_inputs([str(tmp_path / "secret.txt")])


def test_a_damaged_checkpoint_is_a_one_line_usage_error(demo_dir, tmp_path, env):
    """The error names the params directory, the array and the file; it is all the command prints (the
    reads Orbax left in flight when it gave up printed thousands of lines of tracebacks over it, some
    of them at exit)."""
    broken = tmp_path / "broken"
    shutil.copytree(demo_dir, broken)
    files = [os.path.join(d, f) for d, _, fs in os.walk(broken / "params") for f in fs]
    biggest = max(files, key=os.path.getsize)
    os.truncate(biggest, 1000)
    image = write_images(tmp_path / "imgs", [(20, 20)])[0]
    result = subprocess.run([sys.executable, SCRIPT, "--model", str(broken), "--images", image, "--output",
                             str(tmp_path / "o.jsonl"), "--no-progress"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and len(err[0]) < 600, result.stderr[-3000:]
    assert err[0].startswith(f"error: --model {broken} cannot be loaded: {broken / 'params'}: "), err
    assert "in OCDBT database at local file" in err[0] and not err[0].endswith("{"), err


# Root ignores file permissions: the tests of unreadable and unwritable files run their command
# without the capabilities that let it (as the reviewer's repro scripts do).
NO_DAC = (["setpriv", "--inh-caps=-dac_override,-dac_read_search", "--ambient-caps=-dac_override,-dac_read_search",
           "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else [])


def run_without_override(env, *args):
    if NO_DAC and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    return subprocess.run([*NO_DAC, sys.executable, SCRIPT, "--no-progress", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_unwritable_outputs_are_usage_errors_before_the_model_loads(env, tmp_path):
    image = write_images(tmp_path / "imgs", [(20, 20)])[0]
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "old.jsonl").write_text(json.dumps({"image": "x", "caption": "y"}) + "\n")
    os.chmod(ro / "old.jsonl", 0o444)
    os.chmod(ro, 0o555)
    try:
        for name in ("old.jsonl", "new.jsonl"):
            proc = run_without_override(env, "--model", tmp_path / "no-such-model", "--images", image,
                                        "--output", ro / name)
            assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
                f"error: --output {ro / name}: cannot open it for writing (Permission denied)"], proc.stderr[-2000:]
    finally:
        os.chmod(ro, 0o755)


def test_directories_follow_symlinks_once_and_unreadable_ones_fail_the_run(env, demo_dir, tmp_path):
    top = tmp_path / "top"
    write_images(tmp_path / "real", [(20, 30)])
    write_images(top / "sub", [(30, 20)], seed=1)
    write_images(top, [(25, 25)], seed=2)
    os.symlink("../real", top / "linked")
    os.symlink("..", top / "sub" / "up")   # a loop
    got = caption.collect_inputs([str(top)])
    assert [os.path.relpath(p, top) for p in got] == ["img0_25x25.jpg", "linked/img0_20x30.jpg", "sub/img0_30x20.jpg"]
    os.chmod(top / "sub", 0o000)
    try:
        proc = run_without_override(env, "--model", demo_dir, "--images", top, "--output", tmp_path / "o.jsonl",
                                    "--max-new-tokens", 2)
    finally:
        os.chmod(top / "sub", 0o755)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"warning: cannot read directory {top / 'sub'} (Permission denied)" in proc.stderr
    assert "1 directories could not be read" in proc.stderr
    assert len(load_jsonl(tmp_path / "o.jsonl")) == 2


def test_sampling_seeds_are_per_image():
    assert caption.image_seed(0, "a.png") == caption.image_seed(0, "a.png")
    assert len({caption.image_seed(s, p) for s in (0, 1) for p in ("a.png", "b.png")}) == 4


def test_generation_config_num_return_sequences_keeps_one_caption_per_image(demo_dir, tmp_path):
    """A generation config's num_return_sequences (sampled) does not give an image another image's
    caption: each row is its image's own, as the Captioner gives it with that image alone."""
    from llava_next_jax import LlavaNext
    model = LlavaNext.from_pretrained(demo_dir)
    processor = model.get_processor()
    paths = write_images(tmp_path / "imgs", MIXED_SIZES[:3])
    gen = {"eos_token_id": model.eos_token_ids, "pad_token_id": model.pad_token_id, "do_sample": True}
    plain = LlavaNext(model.config, model.params, gen)
    configured = LlavaNext(model.config, model.params, {**gen, "num_return_sequences": 2})
    batch, _ = caption.plan_batches(paths, processor.geometry, 3)
    captioner = caption.Captioner(configured, processor, caption.DEFAULT_PROMPT, 8)
    rows = captioner.caption(captioner.prepare(batch[0]))
    alone = caption.Captioner(plain, processor, caption.DEFAULT_PROMPT, 8)
    assert len(rows) == 3
    for row in rows:
        (one,) = caption.plan_batches([row["image"]], processor.geometry, 1)[0]
        assert alone.caption(alone.prepare(one)) == [row], row


# --- many processes: shards and merge ------------------------------------------------------------

SHARD_FLAGS = ["--batch-size", "2", "--max-new-tokens", "10", "--no-progress"]


@pytest.fixture(scope="module")
def sharded(demo_dir, tmp_path_factory):
    """Six images captioned in process twice: by one process (single.jsonl), and as the two shards of
    a two-process job with --output out.jsonl."""
    base = tmp_path_factory.mktemp("sharded")
    write_images(base / "imgs", MIXED_SIZES[:6], seed=3)
    flags = ["--model", str(demo_dir), "--images", str(base / "imgs"), *SHARD_FLAGS]
    assert caption.main([*flags, "--output", str(base / "single.jsonl")]) == 0
    for index in ("0", "1"):
        assert caption.main([*flags, "--output", str(base / "out.jsonl"), "--process-index", index,
                             "--process-count", "2"]) == 0
    return types.SimpleNamespace(base=base, flags=flags, inputs=caption.collect_inputs([str(base / "imgs")]),
                                 single={r["image"]: r for r in load_jsonl(base / "single.jsonl")})


def copy_shards(sharded, directory, indices=(0, 1)):
    """The fixture's shard files (rows and inputs records) copied into `directory`; the merged path there."""
    for i in indices:
        for name in (f"out.part-{i:05d}-of-00002.jsonl", f"out.part-{i:05d}-of-00002.inputs.json"):
            shutil.copy(sharded.base / name, directory / name)
    return directory / "out.jsonl"


def test_two_process_shards_merge_into_the_single_process_output(sharded, tmp_path, capsys):
    inputs = sharded.inputs
    for i in (0, 1):  # process i captions inputs i, i + 2, ...: each input in exactly one shard
        rows = load_jsonl(sharded.base / f"out.part-{i:05d}-of-00002.jsonl")
        assert sorted(r["image"] for r in rows) == sorted(inputs[i::2])
    out = copy_shards(sharded, tmp_path)
    assert caption.main(["merge", "--output", str(out)]) == 0  # the process count read from the shard names
    merged = load_jsonl(out)
    assert [r["image"] for r in merged] == inputs  # input order, not the order batches finished in
    assert merged == [sharded.single[p] for p in inputs]
    assert len({r["caption"] for r in merged}) > 1, "captions should vary with the image"
    assert "merged 2 shards: 6/6 images captioned" in capsys.readouterr().err
    first = out.read_bytes()
    assert caption.main(["merge", "--output", str(out), "--process-count", "2"]) == 0  # merging again: harmless
    assert out.read_bytes() == first
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.part-00000-of-00002.inputs.json",
                                            "out.part-00000-of-00002.jsonl", "out.part-00001-of-00002.inputs.json",
                                            "out.part-00001-of-00002.jsonl"]  # no temp file left behind


# Runs scripts/caption.py and SIGKILLs it halfway through writing its second batch's rows: a kill at
# the worst moment, at the same place every time.
KILL_IN_SECOND_WRITE = (
    "import os, runpy, signal, sys\n"
    "from llava_next_jax import caption\n"
    "write, batches = caption.RowWriter.write, []\n"
    "def write_then_die(self, rows):\n"
    "    batches.extend([rows] if rows else [])\n"
    "    if len(batches) < 2:\n"
    "        return write(self, rows)\n"
    "    data = b''.join(map(caption._row_bytes, rows))\n"
    "    os.write(self._fd, data[:len(data) // 2])\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "caption.RowWriter.write = write_then_die\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def test_killed_shard_resumes_and_the_merge_still_equals_one_process(env, sharded, tmp_path, capsys):
    out = copy_shards(sharded, tmp_path, indices=(1,))
    shard = tmp_path / "out.part-00000-of-00002.jsonl"
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_WRITE, SCRIPT, *sharded.flags, "--output", str(out),
                             "--batch-size", "1", "--process-index", "0", "--process-count", "2"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not shard.read_bytes().endswith(b"\n")  # torn mid-row
    before = caption.read_rows(str(shard))
    assert len(before) == 1

    assert caption.main(["merge", "--output", str(out)]) == 4
    err = capsys.readouterr().err
    assert f"{shard}: 2 of its 3 inputs have no row yet" in err and "--process-index 0" in err
    assert not out.exists()

    assert caption.main([*sharded.flags, "--output", str(out), "--process-index", "0", "--process-count", "2"]) == 0
    err = capsys.readouterr().err
    assert "partial last line" in err and "1 of 3 inputs already recorded" in err
    rows = load_jsonl(shard)
    assert rows[:1] == before and sorted(r["image"] for r in rows) == sorted(sharded.inputs[0::2])
    assert caption.main(["merge", "--output", str(out), "--process-count", "2"]) == 0
    assert load_jsonl(out) == [sharded.single[p] for p in sharded.inputs]


def test_merge_names_missing_and_incomplete_shards_and_keeps_finished_work(sharded, tmp_path, capsys):
    out = copy_shards(sharded, tmp_path, indices=(0,))
    assert caption.main(["merge", "--output", str(out), "--process-count", "2"]) == 4
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out.part-00001-of-00002.jsonl'} is missing" in err and "--process-index 1" in err
    assert "out.part-00000" not in err and not out.exists()

    copy_shards(sharded, tmp_path, indices=(1,))
    shard = tmp_path / "out.part-00001-of-00002.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join(lines[:-1] + lines[:1]))  # last row lost, first row written twice (verbatim)
    assert caption.main(["merge", "--output", str(out)]) == 4
    err = capsys.readouterr().err
    assert f"{shard}: 1 of its 3 inputs have no row yet" in err and "out.part-00000" not in err

    other = dict(json.loads(lines[0]), caption="another caption")  # e.g. the same shard run twice, sampling
    shard.write_text("".join(lines) + json.dumps(other) + "\n")
    assert caption.main(["merge", "--output", str(out)]) == 4
    assert f"{shard}: 1 inputs have several different rows (first: {other['image']})" in capsys.readouterr().err

    shard.write_text("".join(lines))
    out.write_text(json.dumps({"image": "elsewhere.png", "caption": "from an earlier job"}) + "\n")
    assert caption.main(["merge", "--output", str(out)]) == 2  # that caption would be lost
    assert "1 captions that the merged shards drop or change (first: elsewhere.png)" in capsys.readouterr().err
    assert load_jsonl(out) == [{"image": "elsewhere.png", "caption": "from an earlier job"}]
    out.unlink()

    # Process 1 re-run on a shorter input list: its inputs there (positions 1, 3) are already
    # captioned, so it only records the new list, which process 0's shard was not split from.
    images = [p for p in sharded.inputs if p != sharded.inputs[-1]]
    flags = ["--model", str(sharded.base / "no-model-needed"), "--images", *images, *SHARD_FLAGS]
    assert caption.main([*flags, "--output", str(out), "--process-index", "1", "--process-count", "2"]) == 0
    assert "the input list differs" in capsys.readouterr().err
    assert caption.main(["merge", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not split from one input list" in err and "3 of 6 inputs" in err and "2 of 5 inputs" in err
    assert not out.exists()

    assert caption.main(["merge", "--output", str(tmp_path / "other.jsonl")]) == 4
    assert "no shards of" in capsys.readouterr().err
    assert caption.main(["merge", "--output", str(out), "--process-count", "1"]) == 2
    assert "--process-count must be >= 2 to merge" in capsys.readouterr().err


def test_process_flags_default_to_jax_distributed_and_are_checked(monkeypatch, tmp_path):
    import jax
    assert caption.process_slot(None, None) == (0, 1)  # jax.distributed not initialised here
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax, "process_index", lambda: 3)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert caption.process_slot(None, None) == (3, 4)
    assert caption.process_slot(0, 2) == (0, 2)
    image = write_images(tmp_path / "imgs", [(20, 20)])[0]
    for index, count in (("2", "2"), ("-1", "2"), ("0", "0")):
        with pytest.raises(SystemExit) as stop:
            caption.main(["--images", image, "--output", str(tmp_path / "o.jsonl"), "--process-index", index,
                          "--process-count", count])
        assert stop.value.code == 2
    assert os.listdir(tmp_path) == ["imgs"]  # no output, no shard written


def test_shards_split_every_input_list_exactly_once():
    for total in range(12):
        for count in range(1, 6):
            parts = [list(caption.shard_positions(total, i, count)) for i in range(count)]
            assert sorted(k for part in parts for k in part) == list(range(total))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert caption.shard_path("d/caps.jsonl", 1, 4) == "d/caps.part-00001-of-00004.jsonl"
    assert caption.shard_path("caps", 0, 2) == "caps.part-00000-of-00002.jsonl"
    assert caption.shard_inputs_path("d/caps.part-00001-of-00004.jsonl") == "d/caps.part-00001-of-00004.inputs.json"
