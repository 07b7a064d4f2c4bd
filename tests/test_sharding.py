"""Sharded runs on 8 forced CPU devices equal the single-device run (forward, generate, loss and
training steps, with and without FSDP, and the fine-tuning job; a "model" size that divides no head or
vocabulary axis too), and hold on each device the bytes
`sharding.memory_per_device` says (in a subprocess: the device count must be set before jax starts);
the steps after a first compile nothing, as a call of generate's programs without their defaults.
The subprocess takes ~2.5 minutes alone, 4-5 in the suite, most of it XLA compiling on one core:
conftest.py runs it first."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import collections, os, sys
    import jax, numpy as np
    sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
    import tiny_models as tm
    from llava_next_jax import LlavaNext, generate, sharding
    from llava_next_jax.convert_cli import convert_checkpoint
    assert len(jax.devices()) == 8, jax.devices()
    compiles = []   # one entry per program XLA compiles
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)

    def bytes_per_device(arrays):  # what the most loaded device holds of these arrays
        held = collections.Counter()
        for array in arrays:
            for shard in array.addressable_shards:
                held[shard.device] += shard.data.nbytes
        assert len(held) == len(arrays[0].sharding.device_set), held
        return max(held.values())

    def generate_keeping_cache(model, batch):  # model.generate's two programs, keeping the cache
        args = model.generation_inputs(**batch, max_new_tokens=12, eos_token_id=[])
        ids, dtype, new_bucket = args["input_ids"], args["dtype"], args["new_bucket"]
        logits, cache, kv_valid = generate.prefill_program(model.params, model.config, ids, args["pixel_values"],
                                                           args["sources"], args["attention_mask"], dtype,
                                                           ids.shape[1] + new_bucket)
        state, cache = generate.decode_program(model.params, model.config, logits, cache, kv_valid,
                                               args["options"], dtype, new_bucket)
        return np.asarray(state["tokens"])[:, :12], cache, kv_valid.shape

    def check_memory(model, mesh, batch):  # devices hold what sharding.memory_per_device says
        tokens, cache, (B, S) = generate_keeping_cache(model, batch)
        expected = sharding.memory_per_device(model.config, mesh, B, S, model.dtype)
        assert bytes_per_device(jax.tree.leaves(model.params)) == expected.weights, mesh
        assert bytes_per_device(jax.tree.leaves(cache)) == expected.kv_cache, (mesh, B)
        spec = sharding.cache_spec(model.config.text, mesh, B)
        assert cache[0][0].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, spec), 3), (
            mesh, B, cache[0][0].sharding, spec)
        print(f"mesh {dict(mesh.shape)} batch {B}: {expected.weights} weight + {expected.kv_cache} cache bytes "
              f"per device (cache {spec})")
        return tokens

    from llava_next_jax import demo
    hf = tm.build_model("mistral", seed=11)
    work, demo_dir = sys.argv[2], sys.argv[3]   # an empty directory for the files written here; the demo model
    tm.save_checkpoint(hf, work + "/hf")
    convert_checkpoint(work + "/hf", work + "/out", log=lambda *_: None)
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 4), (5, [(88, 55)], 2), (9, [(1, 300)], 3),
                                      (4, [(300, 200)], 1)], seed=11)
    single = LlavaNext.from_pretrained(work + "/out")
    ref_logits = np.asarray(single.forward(**batch))
    ref_tokens = single.generate(**batch, max_new_tokens=12, eos_token_id=[])
    beams = dict(max_new_tokens=12, eos_token_id=[], num_beams=2, num_return_sequences=2, pad_token_id=7)
    ref_beams = single.generate(**batch, **beams)
    guided = dict(max_new_tokens=12, eos_token_id=[], guidance_scale=2.0)
    ref_guided = single.generate(**batch, **guided)
    ref_loss = single.loss(**batch)
    for data, model_axis in [(1, 8), (2, 4), (8, 1)]:
        mesh = sharding.make_mesh(data=data, model=model_axis)
        model = LlavaNext.from_pretrained(work + "/out", mesh=mesh)
        gate = model.params["language_model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"]
        assert gate.sharding.shard_shape(gate.shape) == (64, 96 // model_axis), gate.sharding
        down = model.params["language_model"]["layers"]["1"]["mlp"]["down_proj"]["kernel"]
        assert down.sharding.shard_shape(down.shape) == (96 // model_axis, 64)
        lm_head = model.params["lm_head"]["kernel"]
        assert lm_head.sharding.shard_shape(lm_head.shape) == (64, 160 // model_axis), lm_head.sharding
        embed = model.params["language_model"]["embed_tokens"]["embedding"]
        per_device = {s.device: s.data.nbytes for s in embed.addressable_shards}
        assert len(per_device) == 8 and set(per_device.values()) == {embed.nbytes // model_axis}
        logits = np.asarray(model.forward(**batch))
        diff = np.abs(logits - ref_logits)[batch["attention_mask"] == 1].max()
        assert diff <= 1e-5, (data, model_axis, diff)
        tokens = model.generate(**batch, max_new_tokens=12, eos_token_id=[])
        assert (tokens == ref_tokens).all(), (data, model_axis)
        if data == 2:   # beam search: the beams' cache rows gathered within each prompt's, over "data" shards
            assert (model.generate(**batch, **beams) == ref_beams).all()
            # classifier-free guidance: the unconditional sequences split over "data" as the rows are
            assert (model.generate(**batch, **guided) == ref_guided).all()
            # prompt lookup: drafts checked in passes of 3 tokens, kept as far as every row agrees
            assert (model.generate(**batch, max_new_tokens=12, eos_token_id=[], prompt_lookup_num_tokens=2)
                    == ref_tokens).all()
            # streaming: the chunks after the first run its program (the state laid out as it was)
            parts = model.generate_stream(**batch, max_new_tokens=12, eos_token_id=[], chunk=4)
            streamed = [next(parts)]
            compiled = len(compiles)
            streamed += list(parts)
            assert len(compiles) == compiled and len(streamed) == 3
            assert (np.concatenate(streamed, axis=1) == ref_tokens).all()
        compiled = len(compiles)
        assert (check_memory(model, mesh, batch) == ref_tokens).all()
        assert len(compiles) == compiled   # generate's programs, called without their defaults
        assert abs(model.loss(**batch) - ref_loss) <= 1e-5 * abs(ref_loss)
        print(f"mesh {data}x{model_axis}: max |delta logits| {diff:.2e}, tokens equal")

    # The kv heads (2) split over "model" on 4 x 2 and 2 x 2 meshes (sharding.cache_spec): batch 4 puts
    # the cache over both axes (one row per "data" shard on 4 x 2, two on 2 x 2), batch 1 over "model".
    for mesh in [sharding.make_mesh(data=4, model=2), sharding.make_mesh(data=2, model=2, devices=jax.devices()[:4])]:
        model = LlavaNext.from_pretrained(work + "/out", mesh=mesh)
        assert (check_memory(model, mesh, batch) == ref_tokens).all()
        check_memory(model, mesh, {k: v[:1] for k, v in batch.items()})

    # A "model" size that divides neither the attention projections (64 and 32 columns) nor the vocabulary
    # (160): those axes stay whole on every device (sharding.spec_for), the MLP's 96 splits 3 ways.
    mesh = sharding.make_mesh(data=2, model=3, devices=jax.devices()[:6])
    model = LlavaNext.from_pretrained(work + "/out", mesh=mesh)
    layer = model.params["language_model"]["layers"]["0"]
    assert model.params["lm_head"]["kernel"].sharding.is_fully_replicated
    assert layer["self_attn"]["q_proj"]["kernel"].sharding.is_fully_replicated
    assert layer["mlp"]["gate_proj"]["kernel"].sharding.shard_shape((64, 96)) == (64, 32)
    diff = np.abs(np.asarray(model.forward(**batch)) - ref_logits)[batch["attention_mask"] == 1].max()
    assert diff <= 1e-5, diff
    assert (check_memory(model, mesh, batch) == ref_tokens).all()
    print(f"mesh 2x3: max |delta logits| {diff:.2e}, tokens equal")

    # Training: AdamW steps on a mesh equal the single-device steps, and the params and every moment of
    # AdamW keep the params' layout through them.
    from llava_next_jax import train
    def train_two_steps(model):
        inputs = model.train_batch(**batch)
        optimizer = train.make_optimizer(model.params, learning_rate=1e-4, total_steps=10)
        state, losses = train.init_state(model.params, optimizer), []
        for step in range(2):
            if step == 1:
                compiled = len(compiles)
            state, out = train.train_step(state, inputs, model.config, optimizer)
            losses.append(float(out["loss"]))
        assert len(compiles) == compiled   # the second step runs the first's program (`train.init_state`)
        return state, losses
    ref_state, ref_losses = train_two_steps(LlavaNext.from_pretrained(work + "/out"))

    def check_layout(tree, shardings, what):   # each leaf laid out as the param whose path ends its own
        by_path = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            key = jax.tree_util.keystr(path)
            owners = [k for k in by_path if key.endswith(k)]
            assert leaf.ndim == 0 or len(owners) == 1, (what, key, owners)
            if leaf.ndim:
                assert leaf.sharding.is_equivalent_to(by_path[owners[0]], leaf.ndim), (
                    what, key, leaf.sharding.spec, by_path[owners[0]].spec)

    def train_like_one_device(model):
        layout = jax.tree.map(lambda a: a.sharding, model.params)
        state, losses = train_two_steps(model)
        assert np.allclose(losses, ref_losses, rtol=1e-5, atol=0), (losses, ref_losses)
        param_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                         for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])))
        assert param_diff <= 2e-5, param_diff
        check_layout(state["params"], layout, "params")
        check_layout(state["opt_state"], layout, "optimizer state")
        return state, param_diff

    mesh = sharding.make_mesh(data=2, model=4)
    state, param_diff = train_like_one_device(LlavaNext.from_pretrained(work + "/out", mesh=mesh))
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
               if "['layers']['0']['mlp']['gate_proj']['kernel']" in jax.tree_util.keystr(path)]
    assert len(moments) == 2 and all(m.sharding.shard_shape(m.shape) == (64, 96 // 4) for m in moments)  # mu, nu
    print(f"train 2x4: max |delta params| {param_diff:.1e}, steps equal")

    # FSDP: every weight also split over "data"; a device holds what memory_per_device(fsdp=True) says,
    # less than without; forward and training steps equal the single device's, in the FSDP layout.
    for data, model_axis in [(2, 4), (8, 1)]:
        mesh = sharding.make_mesh(data=data, model=model_axis)
        model = LlavaNext.from_pretrained(work + "/out", mesh=mesh, fsdp=True)
        fsdp = sharding.memory_per_device(model.config, mesh, 1, 1, model.dtype, fsdp=True)
        plain = sharding.memory_per_device(model.config, mesh, 1, 1, model.dtype)
        assert bytes_per_device(jax.tree.leaves(model.params)) == fsdp.weights < plain.weights, (fsdp, plain)
        gate = model.params["language_model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"]
        assert gate.sharding.shard_shape(gate.shape) == (64 // data, 96 // model_axis), gate.sharding
        logits = np.asarray(model.forward(**batch))
        diff = np.abs(logits - ref_logits)[batch["attention_mask"] == 1].max()
        assert diff <= 1e-5, (data, model_axis, diff)
        _, param_diff = train_like_one_device(model)
        print(f"fsdp {data}x{model_axis}: {fsdp.weights} weight bytes on each device (without fsdp {plain.weights}), "
              f"max |delta logits| {diff:.1e}, |delta params| {param_diff:.1e}, fsdp steps equal")

    # LoRA on the FSDP layout: adapters (attached after the model is laid out) train as on one device.
    from llava_next_jax import lora
    adapters = lora.LoraConfig(4, 8.0, ("q_proj", "v_proj", "down_proj"))
    def lora_steps(model):
        inputs = model.train_batch(**batch)
        params = lora.attach(model.params, adapters, jax.random.key(0))
        optimizer = train.make_optimizer(params, learning_rate=1e-3, total_steps=10, trainable="lora+projector")
        state, losses = train.init_state(params, optimizer), []
        for step in range(3):
            if step == 1:
                compiled = len(compiles)
            state, out = train.train_step(state, inputs, model.config, optimizer, lora=adapters)
            losses.append(float(out["loss"]))
        assert len(compiles) == compiled   # after the first step none: the adapters laid out as a step lays them out
        return state, losses
    ref_lora, ref_lora_losses = lora_steps(LlavaNext.from_pretrained(work + "/out"))
    mesh = sharding.make_mesh(data=2, model=4)
    lora_state, lora_losses = lora_steps(LlavaNext.from_pretrained(work + "/out", mesh=mesh, fsdp=True))
    assert np.allclose(lora_losses, ref_lora_losses, rtol=1e-5, atol=0), (lora_losses, ref_lora_losses)
    lora_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                    for a, b in zip(jax.tree.leaves(lora_state["params"]), jax.tree.leaves(ref_lora["params"])))
    assert lora_diff <= 2e-5 and ref_lora_losses[-1] < ref_lora_losses[0], (lora_diff, ref_lora_losses)
    print(f"lora fsdp 2x4: losses {lora_losses}, max |delta params| {lora_diff:.1e}, lora steps equal")

    # The fine-tuning job: a 2-update run on a 2 x 4 mesh, stopped after one update and resumed with
    # --fsdp, exports the params of the run on one device.
    import json, shutil
    from llava_next_jax import checkpoint, finetune
    data_dir = work + "/data"
    os.makedirs(data_dir)
    rows = []
    for image, answer in zip(sorted(demo.example_images_dir().iterdir())[:2], ["a red car", "a small dog"]):
        shutil.copy(image, data_dir)
        rows.append({"image": image.name, "conversations": [
            {"from": "human", "value": "<image>\\nDescribe the image."}, {"from": "gpt", "value": answer}]})
    with open(data_dir + "/train.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\\n" for r in rows)
    def job(out, *extra):
        return ["--model", demo_dir, "--data", data_dir + "/train.jsonl", "--output", work + out, "--steps", "2",
                "--batch-size", "2", "--learning-rate", "1e-3", *extra]
    exported = lambda out: checkpoint.flatten(checkpoint.load_params(work + out + "/export"))
    assert finetune.main(job("/single"), log=lambda *_: None) == 0
    assert finetune.main(job("/refused", "--fsdp"), log=lambda *_: None) == finetune.USAGE   # --fsdp needs --mesh
    stops = iter([False, True])   # stop before the second update: a checkpoint at step 1, in the 2 x 4 layout
    stopped = finetune.Run(finetune.build_parser().parse_args(job("/run", "--mesh", "2,4")), log=lambda *_: None)
    assert not stopped.train(lambda: next(stops)) and stopped.manager.latest_step() == 1
    del stopped
    runs = [finetune.Run(finetune.build_parser().parse_args(job(out, "--mesh", "2,4", "--fsdp")), log=lambda *_: None)
            for out in ("/fresh", "/run")]   # a new run, and the stopped one resumed: the same layout
    fresh, resumed = ([leaf.sharding for leaf in jax.tree.leaves(run.state)] for run in runs)
    named = [(a, b) for a, b in zip(fresh, resumed) if isinstance(a, jax.sharding.NamedSharding)]  # not counters
    assert named and all(a == b for a, b in named) and any(not a.is_fully_replicated for a, _ in named), named
    del runs
    assert finetune.main(job("/run", "--mesh", "2,4", "--fsdp"), log=lambda *_: None) == 0
    single, resumed = exported("/single"), exported("/run")
    initial = checkpoint.flatten(checkpoint.load_params(demo_dir))
    moved = max(float(np.abs(single[k] - initial[k]).max()) for k in single)
    export_diff = max(float(np.abs(single[k] - resumed[k]).max()) for k in single)
    # Adam moves a weight by up to the learning rate (1e-3) an update, whatever its gradient's size, so
    # gradients that differ in rounding move weights by a small part of it.
    assert moved > 1e-3 and export_diff <= 5e-5, (moved, export_diff)
    print(f"finetune 2x4 resumed with --fsdp: max |delta params| {export_diff:.1e}, job equal")
""")


def test_meshes_equal_single_device(tmp_path, demo_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SCRIPT, ROOT, str(tmp_path), str(demo_dir)], capture_output=True,
                            text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("tokens equal") == 4, result.stdout
    assert result.stdout.count("bytes per device") == 8, result.stdout
    assert result.stdout.count("steps equal") == 4, result.stdout
    assert result.stdout.count("fsdp steps equal") == 2, result.stdout
    assert result.stdout.count("lora steps equal") == 1, result.stdout
    assert result.stdout.count("job equal") == 1, result.stdout


def test_mesh_sizes_are_checked():
    from llava_next_jax import presets, sharding
    for sizes, match in ((dict(data=0), "mesh sizes must be ints >= 1; got data=0, model=None"),
                         (dict(data=1, model=-2), "got data=1, model=-2"),
                         (dict(data=1.5), "got data=1.5, model=None"),
                         (dict(data="2", model=4), "got data='2', model=4"),
                         (dict(data=1, model=2), r"a 1 x 2 mesh needs 2 devices; there are 1$")):
        with pytest.raises(ValueError, match=match):
            sharding.make_mesh(**sizes, devices=["only device"])
    # model left out: the devices left after data, which must divide them (was "a 16 x 0 mesh", "a 3 x 2 mesh")
    for data in (3, 16):
        with pytest.raises(ValueError, match=f"data={data} does not divide the 8 devices"):
            sharding.make_mesh(data=data, devices=list(range(8)))
    with pytest.raises(ValueError, match=r"mesh sizes must be ints >= 1; got \{'data': 0, 'model': 2\}"):
        sharding.memory_per_device(presets.config("mistral-7b"), {"data": 0, "model": 2}, 1, 4096)


def test_from_pretrained_names_a_mesh_that_is_not_one(demo_dir):
    from llava_next_jax import LlavaNext
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh .*sharding.make_mesh.*; got tuple \(2, 4\)"):
        LlavaNext.from_pretrained(demo_dir, mesh=(2, 4))   # was AttributeError: 'tuple' object has no attribute ...
