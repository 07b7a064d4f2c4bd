"""Two processes on this machine as one JAX system (2 CPU devices each, gloo collectives) run the
sharded model with the single-process results, on a 1x4 mesh (weights split across the processes)
and a 2x2 mesh (the batch split across the processes); `distributed.initialize` fails with errors
that name the coordinator's address."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

import tiny_models as tm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = [(1, 4), (2, 2)]
NEW_TOKENS = 12

# argv: converted checkpoint, HF checkpoint, work dir, coordinator address, process id.
# Writes <work>/p<id>_<data>x<model>_*.npy.
CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from llava_next_jax import distributed
    ckpt, hf_dir, work, address, pid = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    distributed.initialize(address, num_processes=2, process_id=pid, timeout_s=60)
    import jax
    from llava_next_jax import LlavaNext, sharding
    assert jax.process_index() == pid and len(jax.devices()) == 4 and len(jax.local_devices()) == 2, jax.devices()
    batch = dict(np.load(work + "/batch.npz"))
    for data, model_axis in MESHES:
        mesh = sharding.make_mesh(data=data, model=model_axis)
        model = LlavaNext.from_pretrained(ckpt, mesh=mesh)
        out = f"{work}/p{pid}_{data}x{model_axis}_"
        # Of two big weights: [elements this process holds (its shards' distinct parts), the most one of
        # its devices holds, the whole weight's]; and the batch rows this process holds.
        for name, leaf in [("embed", model.params["language_model"]["embed_tokens"]["embedding"]),
                           ("gate", model.params["language_model"]["layers"]["0"]["mlp"]["gate_proj"]["kernel"])]:
            parts = {str(shard.index): shard.data.size for shard in leaf.addressable_shards}
            np.save(out + name + "_held.npy", [sum(parts.values()), max(parts.values()), leaf.size])
        ids = model._place(batch["input_ids"])[0]
        np.save(out + "rows.npy", sorted({row for shard in ids.addressable_shards
                                          for row in range(ids.shape[0])[shard.index[0]]}))
        np.save(out + "logits.npy", np.asarray(model.forward(**batch)))
        np.save(out + "tokens.npy", model.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[]))
        np.save(out + "streamed.npy", np.concatenate(list(model.generate_stream(
            **batch, max_new_tokens=NEW_TOKENS, eos_token_id=[], chunk=3)), axis=1))
        np.save(out + "loss.npy", np.asarray(model.loss(**batch)))
        if model_axis == 4:  # from the HF checkpoint: converted in memory, one tensor at a time
            np.save(out + "hf_logits.npy", np.asarray(LlavaNext.from_pretrained(hf_dir, mesh=mesh).forward(**batch)))
""").replace("MESHES", repr(MESHES)).replace("NEW_TOKENS", repr(NEW_TOKENS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(args_per_process, timeout_s=300):
    """Runs one `python -c CHILD` per args list with 2 forced CPU devices each; kills them all when one
    fails or time runs out (a process waiting in a collective would otherwise wait for ever).
    Returns [(returncode, output)] (-9: killed here)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    logs = [open(os.path.join(args[2], f"log{i}.txt"), "w+") for i, args in enumerate(args_per_process)]
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=ROOT) for args, log in zip(args_per_process, logs)]
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for p, log in zip(procs, logs):
        log.seek(0)
        results.append((p.returncode, log.read()))
        log.close()
    return results


def test_two_processes_equal_one(tmp_path):
    from llava_next_jax import LlavaNext
    from llava_next_jax.convert_cli import convert_checkpoint
    hf = tm.build_model("mistral", seed=11)
    tm.save_checkpoint(hf, str(tmp_path / "hf"))
    ckpt = str(tmp_path / "out")
    convert_checkpoint(str(tmp_path / "hf"), ckpt, log=lambda *_: None)
    batch = tm.make_batch(hf.config, [(3, [(480, 640)], 4), (5, [(88, 55)], 2), (9, [(1, 300)], 3),
                                      (4, [(300, 200)], 1)], seed=11)
    np.savez(tmp_path / "batch.npz", **batch)

    address = f"127.0.0.1:{free_port()}"
    results = run_processes([[ckpt, str(tmp_path / "hf"), str(tmp_path), address, str(pid)] for pid in range(2)])

    single = LlavaNext.from_pretrained(ckpt)  # the reference, computed while the two processes run
    ref_logits = np.asarray(single.forward(**batch))
    ref_tokens = single.generate(**batch, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    ref_loss = single.loss(**batch)
    for pid, (code, log) in enumerate(results):
        assert code == 0, f"process {pid} exited with {code}:\n{log[-3000:]}"
    real = batch["attention_mask"] == 1
    for data, model_axis in MESHES:
        for pid in range(2):
            out = lambda name: np.load(tmp_path / f"p{pid}_{data}x{model_axis}_{name}.npy")
            diff = np.abs(out("logits") - ref_logits)[real].max()
            assert diff <= 1e-5, (data, model_axis, pid, diff)
            assert (out("tokens") == ref_tokens).all(), (data, model_axis, pid, out("tokens"), ref_tokens)
            assert (out("streamed") == ref_tokens).all(), (data, model_axis, pid, out("streamed"), ref_tokens)
            assert abs(out("loss") - ref_loss) <= 1e-5 * abs(ref_loss), (data, model_axis, pid, out("loss"), ref_loss)
            # 1x4: a process holds half of each split weight, a device a quarter. 2x2: a process holds a
            # whole copy, a device half, and the process half the batch.
            for name in ("embed", "gate"):
                held, per_device, size = out(name + "_held")
                assert (held, per_device) == (2 * size // model_axis, size // model_axis), (
                    data, model_axis, pid, name, held, per_device, size)
            if model_axis == 4:
                assert np.abs(out("hf_logits") - ref_logits)[real].max() <= 1e-5, (pid, "from the HF checkpoint")
            rows = out("rows")
            assert (rows == (np.arange(4) if data == 1 else np.arange(2 * pid, 2 * pid + 2))).all(), rows
            print(f"mesh {data}x{model_axis} process {pid}: max |delta logits| {diff:.2e}, tokens equal, "
                  f"loss delta {abs(out('loss') - ref_loss):.1e}")


ERRORS = textwrap.dedent("""
    import json, socket
    from llava_next_jax import distributed
    errors = {}  # what failed: [the address tried, the error message]
    with socket.socket() as s:  # a port nobody serves
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    try:
        distributed.initialize(address, num_processes=2, process_id=1, timeout_s=2)
    except ConnectionError as e:
        errors["unreachable"] = [address, str(e)]
    with socket.socket() as busy:  # a port already taken
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        try:
            distributed.initialize(taken, num_processes=2, process_id=0)
        except RuntimeError as e:
            errors["taken"] = [taken, str(e)]
    import jax
    jax.devices()
    try:
        distributed.initialize(address, num_processes=1, process_id=0)
    except RuntimeError as e:
        errors["too late"] = [address, str(e)]
    print(json.dumps(errors))
""")


def test_initialize_errors_name_the_coordinator():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", ERRORS], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.splitlines()[-1])
    assert set(errors) == {"unreachable", "taken", "too late"}, errors
    address, message = errors["unreachable"]
    assert f"process 1 cannot reach the coordinator at {address}: " in message, errors
    address, message = errors["taken"]
    assert f"process 0 cannot serve the coordinator on [::]:{address.split(':')[1]}: " in message, errors
    assert "before any other JAX call" in errors["too late"][1], errors
