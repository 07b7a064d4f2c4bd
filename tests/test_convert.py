"""The converter's checks and the config parser, against what transformers writes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_models as tm
from llava_next_jax import LlavaNext, checkpoint, convert
from llava_next_jax.config import LlavaNextConfig
from llava_next_jax.convert_cli import convert_checkpoint, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    tm.save_checkpoint(tm.build_model("mistral"), str(path))
    return path


def edited_copy(src, dst, edit):
    """A copy of checkpoint `src` whose tensors dict went through `edit`."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name.endswith(".json"):
            with open(os.path.join(src, name)) as f, open(os.path.join(dst, name), "w") as g:
                g.write(f.read())
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def files_of(directory):
    """Every file under `directory` with its bytes: equal snapshots mean the directory did not change."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), directory)] = f.read()
    return out


def flat_params(path):
    return {k: np.asarray(v) for k, v in checkpoint.flatten(LlavaNext.from_pretrained(path).params).items()}


def test_missing_tensor_names_parameter_and_layers(hf_dir, tmp_path):
    src = edited_copy(hf_dir, tmp_path / "x", lambda t: t.pop("language_model.model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(ValueError, match=r"no source tensor for 1 parameters.*language_model/layers/1/self_attn/"
                                         r"q_proj/kernel"):
        convert_checkpoint(src, str(tmp_path / "out"))


def test_misshaped_tensor_names_key_and_both_shapes(hf_dir, tmp_path):
    def shrink(t):
        t["multi_modal_projector.linear_1.weight"] = t["multi_modal_projector.linear_1.weight"][:, :-1]
    src = edited_copy(hf_dir, tmp_path / "x", shrink)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor multi_modal_projector.linear_1.weight has "
                                         r"shape \(64, 31\).*expects \(64, 32\)"):
        convert_checkpoint(src, str(tmp_path / "out"))


def test_patch_embedding_of_wrong_rank_names_key_and_both_shapes(hf_dir, tmp_path):
    """The shape is checked before the layout change, which would fail on a 2-D tensor with numpy's words."""
    key = "vision_tower.embeddings.patch_embedding.weight"
    src = edited_copy(hf_dir, tmp_path / "x", lambda t: t.update({key: t[key].reshape(32, -1).copy()}))
    with pytest.raises(ValueError, match=rf"{key} has shape \(32, 588\).*expects \(32, 3, 14, 14\)"):
        convert_checkpoint(src, str(tmp_path / "out"))


def test_unknown_tensor_is_reported(hf_dir, tmp_path):
    src = edited_copy(hf_dir, tmp_path / "x", lambda t: t.update(extra_head=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"match no LLaVA-NeXT parameter.*extra_head \(in model.safetensors\)"):
        convert_checkpoint(src, str(tmp_path / "out"))


def test_absent_untied_lm_head_is_an_error_with_a_hint(hf_dir, tmp_path):
    src = edited_copy(hf_dir, tmp_path / "x", lambda t: t.pop("language_model.lm_head.weight"))
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_torch_weights.py"), src,
                             str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "lm_head/kernel" in result.stderr and "tie_word_embeddings=false" in result.stderr


def test_no_weights_and_broken_index(tmp_path, hf_dir):
    os.makedirs(tmp_path / "empty")
    with open(tmp_path / "empty" / "config.json", "w") as f, open(hf_dir / "config.json") as g:
        f.write(g.read())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        convert_checkpoint(str(tmp_path / "empty"), str(tmp_path / "out"))
    src = edited_copy(hf_dir, tmp_path / "x", lambda t: None)
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"image_newline": "model.safetensors", "ghost": "model-2.safetensors"}}, f)
    with pytest.raises(FileNotFoundError, match="ghost"):
        convert_checkpoint(src, str(tmp_path / "out"))
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        f.write("{oops")
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a valid index file"):
        convert_checkpoint(src, str(tmp_path / "out"))


def test_bin_files_legacy_truncated_and_garbage(hf_dir, tmp_path):
    """A legacy (pre-zip) torch.save converts; a truncated or garbage .bin is an error naming it."""
    import torch
    from safetensors.torch import load_file as load_torch
    state = load_torch(str(hf_dir / "model.safetensors"))

    def bin_dir(name, write):
        os.makedirs(tmp_path / name)
        for side in ("config.json", "generation_config.json"):
            with open(hf_dir / side) as f, open(tmp_path / name / side, "w") as g:
                g.write(f.read())
        write(str(tmp_path / name / "pytorch_model.bin"))
        return str(tmp_path / name)

    legacy = bin_dir("legacy", lambda p: torch.save(state, p, _use_new_zipfile_serialization=False))
    convert_checkpoint(legacy, str(tmp_path / "out"), log=lambda *_: None)
    ours, ref = flat_params(str(tmp_path / "out")), flat_params(str(hf_dir))
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ours)

    def truncated(path):
        torch.save(state, path)
        os.truncate(path, os.path.getsize(path) // 2)
    for name, write in [("truncated", truncated), ("garbage", lambda p: open(p, "wb").write(b"no weights here"))]:
        src = bin_dir(name, write)
        with pytest.raises(ValueError, match=f"{src}/pytorch_model.bin: not a readable PyTorch weights file"):
            convert_checkpoint(src, str(tmp_path / "out2"))


def test_failed_conversion_leaves_out_dir_as_it_was(hf_dir, tmp_path):
    """Whatever fails (no weights, a misshaped tensor, an error halfway through writing), OUT_DIR keeps
    its previous checkpoint, marker and side files."""
    out = str(tmp_path / "out")
    convert_checkpoint(str(hf_dir), out, log=lambda *_: None)
    before, params = files_of(out), flat_params(out)
    os.makedirs(tmp_path / "no_weights")
    with open(tmp_path / "no_weights" / "config.json", "w") as f, open(hf_dir / "config.json") as g:
        f.write(g.read())
    misshaped = edited_copy(hf_dir, tmp_path / "misshaped", lambda t: t.update(
        {"image_newline": t["image_newline"][:-1].copy()}))
    for src in (str(tmp_path / "no_weights"), misshaped):
        with pytest.raises((ValueError, FileNotFoundError)):
            convert_checkpoint(src, out)
        assert files_of(out) == before

    def fails_halfway():   # some groups of tensors already written when a read fails
        for i, (path, value) in enumerate(params.items()):
            if i == 20:
                raise OSError("read error")
            yield path, value
    with pytest.raises(OSError, match="read error"):
        checkpoint.save_streaming(out, fails_halfway(), group_bytes=1)
    assert files_of(out) == before
    after = flat_params(out)
    assert after.keys() == params.keys() and all(np.array_equal(after[k], params[k]) for k in params)


def test_conversion_killed_while_swapping_in_may_run_again(hf_dir, tmp_path, monkeypatch):
    """A conversion killed after its marker went and before the new one is written (params swapped, side
    files half copied) leaves a directory no loader takes for a checkpoint, which the next conversion
    still recognises as its own."""
    import shutil
    reference = str(tmp_path / "reference")
    convert_checkpoint(str(hf_dir), reference, log=lambda *_: None)
    expected = flat_params(reference)
    out = str(tmp_path / "out")
    for earlier in (True, False):   # over an earlier conversion, and into a new directory
        if earlier:
            convert_checkpoint(str(hf_dir), out, log=lambda *_: None)

        def killed(*args):
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            m.setattr(checkpoint, "copy_side_files", killed)
            with pytest.raises(KeyboardInterrupt):
                convert_checkpoint(str(hf_dir), out, log=lambda *_: None)
        assert not checkpoint.is_converted(out) and os.path.isdir(os.path.join(out, "params"))
        with pytest.raises(ValueError, match="a conversion into it was stopped before it finished"):
            LlavaNext.from_pretrained(out)
        convert_checkpoint(str(hf_dir), out, log=lambda *_: None)
        assert sorted(os.listdir(out)) == sorted(os.listdir(reference))   # no journal, no temporary dirs
        got = flat_params(out)
        assert got.keys() == expected.keys() and all(np.array_equal(got[k], expected[k]) for k in got)
        shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:   # the user's own files are still refused
        f.write("mine")
    with pytest.raises(ValueError, match="holds files but is not a converted checkpoint"):
        convert_checkpoint(str(hf_dir), out)


def test_reconversion_drops_side_files_the_new_source_lacks(hf_dir, tmp_path):
    src = edited_copy(hf_dir, tmp_path / "with_tokenizer", lambda t: None)
    with open(os.path.join(src, "tokenizer.json"), "w") as f:
        f.write("{}")
    out = str(tmp_path / "out")
    convert_checkpoint(src, out, log=lambda *_: None)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    convert_checkpoint(str(hf_dir), out, log=lambda *_: None)
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))
    assert checkpoint.is_converted(out) and os.path.isfile(os.path.join(out, "config.json"))


def test_out_dirs_refused_with_a_message_and_left_alone(hf_dir, tmp_path, capsys):
    user = tmp_path / "user"   # the user's own files: never overwritten or deleted
    os.makedirs(user / "params")
    (user / "params" / "notes.txt").write_text("precious")
    (user / "tokenizer.json").write_text("{}")
    (tmp_path / "afile").write_text("x")
    src = edited_copy(hf_dir, tmp_path / "src", lambda t: None)
    os.symlink(src, tmp_path / "link")
    snapshot = {d: files_of(d) for d in (user, src)}
    for out, message in [(user, "is not a converted checkpoint"), (tmp_path / "afile", "not a directory"),
                         (tmp_path / "afile" / "x", "afile/x"), (tmp_path / "link", "is SRC_DIR")]:
        assert main([src, str(out)]) == 2, out
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert {d: files_of(d) for d in (user, src)} == snapshot


def test_converted_dir_is_complete_and_dtype_cast(hf_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # relative paths, as the README writes them
    stats = convert_checkpoint(str(hf_dir), "out", "float16", log=lambda *_: None)
    assert {"config.json", "generation_config.json"} <= set(stats["side_files"])
    model = LlavaNext.from_pretrained("out")
    direct = LlavaNext.from_pretrained(str(hf_dir), dtype="float16")
    flat = lambda p: {k: np.asarray(v) for k, v in convert.jax.tree_util.tree_leaves_with_path(p)}
    ours, ref = flat(model.params), flat(direct.params)
    assert ours.keys() == ref.keys()
    for key in ours:
        assert ours[key].dtype == np.float16
        np.testing.assert_array_equal(ours[key], ref[key])
    assert stats["largest_tensor_bytes"] < stats["bytes"] and stats["tensors"] > 40


def test_hf_tensor_inverts_the_rules():
    """Every parameter's HF name maps back to it (the demo model and exports rely on this)."""
    config = LlavaNextConfig.from_dict(tm.hf_config("llama3").to_dict())
    for path, shape in convert.expected_shapes(config).items():
        name, torch_shape = convert.hf_tensor(path, shape)
        target = convert.target_of(name)
        assert target.path == path
        assert target.layout(np.zeros(torch_shape, np.float32)).shape == shape


def test_canonical_names():
    for key in ["model.language_model.layers.3.mlp.up_proj.weight", "language_model.model.layers.3.mlp.up_proj.weight"]:
        assert convert.target_of(key).path == ("language_model", "layers", "3", "mlp", "up_proj", "kernel")
    for key in ["vision_tower.vision_model.encoder.layers.0.layer_norm1.bias", "model.vision_tower.encoder.layers.0."
                "layer_norm1.bias", "vision_tower.encoder.layers.0.layer_norm1.bias"]:
        assert convert.target_of(key).path == ("vision_tower", "layers", "0", "layer_norm1", "bias")
    assert convert.target_of("language_model.lm_head.weight").path == convert.target_of("lm_head.weight").path
    assert convert.target_of("vision_tower.vision_model.embeddings.position_ids") is None


# --- config -------------------------------------------------------------------------------------

def test_config_defaults_match_transformers_classes():
    """Released configs omit sizes; our defaults must be transformers' class defaults. (A bare CLIP config
    is 224px, which the default pinpoints, multiples of 336, do not tile: one pinpoint of its size here.)"""
    from transformers import LlavaNextConfig as HFConfig
    for model_type in ("llama", "mistral", "qwen2"):
        raw = {"model_type": "llava_next", "text_config": {"model_type": model_type},
               "vision_config": {"model_type": "clip_vision_model"}, "image_grid_pinpoints": [[224, 448]]}
        ours, ref = LlavaNextConfig.from_dict(raw), HFConfig(**{k: v for k, v in raw.items() if k != "model_type"})
        t, r = ours.text, ref.text_config
        assert (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
                t.num_key_value_heads, t.rms_norm_eps, t.max_position_embeddings, t.rope.theta) == (
            r.vocab_size, r.hidden_size, r.intermediate_size, r.num_hidden_layers, r.num_attention_heads,
            r.num_key_value_heads, r.rms_norm_eps, r.max_position_embeddings, r.rope_parameters["rope_theta"])
        assert set(t.sliding_windows) == {getattr(r, "sliding_window", None) or 0}
        v, rv = ours.vision, ref.vision_config
        assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size, v.layer_norm_eps) == (
            rv.hidden_size, rv.num_hidden_layers, rv.image_size, rv.patch_size, rv.layer_norm_eps)
    no_vision = LlavaNextConfig.from_dict({"text_config": {"model_type": "mistral"}})
    assert (no_vision.vision.hidden_size, no_vision.vision.image_size) == (HFConfig().vision_config.hidden_size, 336)


def test_config_key_spellings_agree():
    old = {"text_config": {"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, "image_token_index": 7, "vision_feature_layer": [-2, -5]}
    new = {"text_config": {"model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}}, "image_token_id": 7, "vision_feature_layer": [-2, -5]}
    a, b = LlavaNextConfig.from_dict(old), LlavaNextConfig.from_dict(new)
    assert a == b and a.text.rope.type == "llama3" and a.image_token_id == 7
    assert a.vision_feature_layers == (23, 20) and a.vision_layers_needed == 23


@pytest.mark.parametrize("raw,key", [
    ({"vision_feature_select_strategy": "full"}, "vision_feature_select_strategy"),
    ({"text_config": {"model_type": "gemma"}}, "text_config.model_type"),
    ({"text_config": {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0}}}, "rope_parameters.rope_type"),
    ({"text_config": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}}, "yarn.*missing 'factor'"),
    ({"vision_config": {"model_type": "siglip_vision_model"}}, "vision_config.model_type"),
    ({"vision_feature_layer": 30}, "vision_feature_layer"),
    ({"projector_hidden_act": "mish"}, "projector_hidden_act"),
])
def test_unsupported_config_values_name_the_key(raw, key):
    with pytest.raises(ValueError, match=key):
        LlavaNextConfig.from_dict(raw)


def test_export_to_hf_loads_in_transformers_and_gives_our_logits(tmp_path):
    """Round trip: change our params, export, load with transformers: its logits are ours."""
    import jax
    from transformers import LlavaNextForConditionalGeneration
    hf = tm.build_model("qwen2", seed=12)   # tied embeddings: the export has no lm_head
    tm.save_checkpoint(hf, str(tmp_path / "hf"))
    model = LlavaNext.from_pretrained(str(tmp_path / "hf"))
    model.params = jax.tree.map(lambda w: w * 1.01, model.params)   # as if fine-tuned
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / convert.HF_EXPORT_TEMP).write_bytes(b"torn")   # a killed export's leftover
    convert.export_hf(model.params, str(tmp_path / "hf"), str(tmp_path / "export"))
    assert not (tmp_path / "export" / convert.HF_EXPORT_TEMP).exists() and convert.is_hf_export(tmp_path / "export")
    back = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path / "export")).eval()
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 4), (6, [], 2)], seed=12)
    ours = np.asarray(model.forward(**batch))
    ref = tm.hf_logits(back, batch)
    assert np.abs(ours - ref)[batch["attention_mask"] == 1].max() <= 1e-4
    assert np.abs(ref - tm.hf_logits(hf, batch)).max() > 1e-3   # the change really went through


def test_large_tensors_are_stored_in_chunks_a_host_can_read_apart(tmp_path):
    """A mesh host restores only its shard: with the tensor stored in CHUNK_BYTES chunks it reads those."""
    from orbax.checkpoint.experimental.v1 import metadata
    from llava_next_jax import checkpoint
    big = np.random.default_rng(0).standard_normal((2048, 3072)).astype(np.float32)    # 24 MiB
    small = np.arange(6, dtype=np.float32).reshape(2, 3)
    checkpoint.save_params(str(tmp_path), {"big": {"kernel": big}, "small": {"bias": small}})
    stored = metadata(str(tmp_path / checkpoint.PARAMS_DIR)).metadata
    chunk = stored["big"]["kernel"].storage_metadata.chunk_shape
    assert np.prod(chunk) * 4 <= checkpoint.CHUNK_BYTES < big.nbytes, chunk
    assert tuple(stored["small"]["bias"].storage_metadata.chunk_shape) == small.shape
    back = checkpoint.load_params(str(tmp_path))
    np.testing.assert_array_equal(np.asarray(back["big"]["kernel"]), big)
    np.testing.assert_array_equal(np.asarray(back["small"]["bias"]), small)
    (tmp_path / "config.json").write_text("{}")       # saving params alone again keeps the side files
    checkpoint.save_params(str(tmp_path), {"small": {"bias": small + 1}})
    assert (tmp_path / "config.json").read_text() == "{}" and checkpoint.is_converted(str(tmp_path))
