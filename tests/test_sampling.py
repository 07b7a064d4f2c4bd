"""HF's sampling warpers past top-k/top-p (min_p, typical_p, epsilon_cutoff, eta_cutoff, top_h) and
several samples per prompt (num_return_sequences), against HF's warper classes and generate."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_models as tm
from llava_next_jax import LlavaNext, generate
from llava_next_jax.generate import compiled_programs, select_tokens

ROWS = [(3, [(480, 640)], 4), (5, [(88, 55)], 2), (9, [(1, 300)], 3)]
NEW = 12
WARPERS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "top_h")


def hf_warpers(**settings):
    """HF's own warper list, in its order, for sampling with `settings` (GenerationMixin._get_logits_processor)."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    class Bare(GenerationMixin):
        pass
    return GenerationMixin._get_logits_processor(Bare(), GenerationConfig(do_sample=True, **settings))


def hf_probs(logits: np.ndarray, **settings) -> np.ndarray:
    """The distribution HF samples from after its warpers, `[B, V]`."""
    scores = hf_warpers(**settings)(None, torch.from_numpy(logits))
    return torch.softmax(scores, -1).numpy()


def _logits():
    """Random logits `[48, 3000]` of several scales, with rows of many ties, -inf entries, all equal."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (48, 3000)).astype(np.float32) * rng.choice([0.1, 1.0, 4.0], (48, 1)).astype(np.float32)
    logits[:8] = np.round(logits[:8] * 2) / 2    # many ties
    logits[8:12, ::3] = -np.inf
    logits[12, :] = -5.0                          # all equal
    logits[13, :5] = 9.0                          # a tied top far above the rest
    return logits


def test_warpers_keep_hf_warpers_tokens():
    """Each new filter keeps the tokens HF's warper class keeps (and leaves the kept logits as they
    were), over random logits with ties, -inf entries, an all-equal row and a tied top, at edge values
    of each setting; off values keep everything. top_h over rows without ties (HF's sort keeps some
    of a tie group at its boundary by position; ours keeps the group) and over a 60-token vocabulary
    (fewer than its 100 candidates)."""
    from transformers.generation.logits_process import (EpsilonLogitsWarper, EtaLogitsWarper, MinPLogitsWarper,
                                                        TopHLogitsWarper, TypicalLogitsWarper)
    logits = _logits()
    untied = np.concatenate([logits[8:12], logits[14:]])
    cases = [(generate._min_p_filter, MinPLogitsWarper, (0.0, 1e-4, 0.05, 0.3, 0.9, 1.0), logits),
             (generate._typical_filter, TypicalLogitsWarper, (1e-3, 0.2, 0.5, 0.9, 0.99), logits),
             (generate._epsilon_filter, EpsilonLogitsWarper, (1e-6, 3e-4, 0.01, 0.2, 0.9), logits),
             (generate._eta_filter, EtaLogitsWarper, (1e-6, 3e-4, 0.01, 0.2, 0.9), logits),
             (generate._top_h_filter, TopHLogitsWarper, (0.05, 0.3, 0.6, 0.9, 0.97), untied),
             (generate._top_h_filter, TopHLogitsWarper, (0.2, 0.7), untied[:, :60])]
    cut = 0
    for ours_filter, theirs, values, rows in cases:
        run = jax.jit(ours_filter)
        for value in values:
            ours = np.asarray(run(jnp.asarray(rows), jnp.float32(value)))
            ref = theirs(value)(None, torch.from_numpy(rows)).numpy() if value else rows
            np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref), err_msg=f"{theirs.__name__}({value})")
            np.testing.assert_array_equal(ours[np.isfinite(ours)], rows[np.isfinite(ours)])
            cut += int((np.isfinite(ref) < np.isfinite(rows)).any(-1).sum())
    assert cut > 300    # the settings do cut, in most rows
    for off, name in ((generate._typical_filter, 1.0), (generate._epsilon_filter, 0.0), (generate._eta_filter, 0.0),
                      (generate._top_h_filter, 0.0)):
        np.testing.assert_array_equal(np.asarray(off(jnp.asarray(logits), jnp.float32(name))), logits)


SETTINGS = [dict(temperature=0.7, min_p=0.15), dict(top_k=8, typical_p=0.6), dict(top_p=0.95, epsilon_cutoff=0.04),
            dict(temperature=1.5, eta_cutoff=0.2), dict(temperature=2.5, top_h=0.5),
            dict(top_k=0, top_h=0.9, typical_p=0.5),
            dict(temperature=0.8, top_k=10, top_p=0.97, min_p=0.05, typical_p=0.95, epsilon_cutoff=0.01,
                 eta_cutoff=0.05)]


def test_sampling_frequencies_match_hf_warpers():
    """Tokens drawn after temperature / top_k / top_p and the new warpers, in HF's order, occur as
    often as HF's warpers' distribution says (~5 sigma), never outside its support, and each draw's
    log-probability is its token's under that distribution; every setting cuts some token it would
    keep without its new warper, so a filter that keeps all fails. One compiled program for all."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (2, 12)).astype(np.float32)
    logits[1, 3] = logits[1, 7]                 # a tie
    draws = 40000
    keys = jax.random.split(jax.random.key(0), draws * 2).reshape(draws, 2)
    draw = jax.jit(jax.vmap(lambda k, options: select_tokens(logits, k, options), (0, None)))
    for settings in SETTINGS:
        full = {"top_k": 0, **settings}
        expected = hf_probs(logits, **full)
        without = hf_probs(logits, **{k: v for k, v in full.items() if k not in WARPERS})
        assert ((expected > 0) < (without > 0)).any(), settings
        options = {**generate.NO_WARP, **{k: v for k, v in full.items()}, "do_sample": True}
        tokens, logprobs = map(np.asarray, draw(keys, jax.tree.map(jnp.asarray, options)))
        for row in range(2):
            np.testing.assert_allclose(np.exp(logprobs[:, row]), expected[row][tokens[:, row]], rtol=1e-5)
            counts = np.bincount(tokens[:, row], minlength=12) / draws
            assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected[row] > 0)), settings
            np.testing.assert_allclose(counts, expected[row], atol=0.012, err_msg=str(settings))


def test_warper_settings_are_checked():
    """Values outside HF's ranges are refused, naming the argument and the value; None / off values pass."""
    base = dict(B=1, max_new_tokens=4, min_new_tokens=0, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                seed=0, stop_ids=(), pad_id=0, prompt_ids=np.zeros((1, 2), np.int32), vocab_size=10)
    for name, value, interval in (("min_p", 1.5, r"None or a number in \[0, 1\]"),
                                  ("min_p", -0.1, r"None or a number in \[0, 1\]"),
                                  ("top_h", 0.0, r"None or a number in \(0, 1\]"),
                                  ("typical_p", 0.0, r"a number in \(0, 1\] \(1.0: off\)"),
                                  ("typical_p", float("nan"), r"a number in \(0, 1\]"),
                                  ("epsilon_cutoff", 1.0, r"a number in \[0, 1\) \(0.0: off\)"),
                                  ("eta_cutoff", -1e-3, r"a number in \[0, 1\)"),
                                  ("eta_cutoff", "0.1", r"a number in \[0, 1\)"),
                                  ("num_return_sequences", 0, r"an int >= 1")):
        with pytest.raises(ValueError, match=f"{name} must be {interval}.*; got {value!r}"):
            generate.options(**base, **{name: value})
    opts = generate.options(**base, min_p=None, top_h=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    assert all(float(opts[k]) == v for k, v in generate.NO_WARP.items())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = tm.build_model("mistral", seed=3)
    path = tmp_path_factory.mktemp("mistral")
    tm.save_checkpoint(hf, str(path))
    return hf, path, LlavaNext.from_pretrained(str(path))


def _hf_logits(hf, batch, tokens, samples=1):
    """HF's logits `[B * samples * N, V]` before each of `tokens` `[B * samples, N]` (prompt b's rows
    b * samples + j)."""
    rep = lambda a: np.repeat(a, samples, axis=0)
    mask = np.concatenate([rep(batch["attention_mask"]), np.ones_like(tokens)], axis=1)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(np.concatenate([rep(batch["input_ids"]), tokens], axis=1)),
                    attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(np.clip(np.cumsum(mask, axis=1) - 1, 0, None)),
                    pixel_values=torch.from_numpy(rep(batch["pixel_values"])),
                    image_sizes=torch.from_numpy(rep(batch["image_sizes"]))).logits[:, T - 1:-1]
    return logits.reshape(-1, logits.shape[-1]).numpy()


def test_num_return_sequences_rows_as_hf(tiny):
    """num_return_sequences n with sampling: `[B * n, N]`, prompt b's samples in rows b * n + j as HF
    orders them (HF's own top_k=1 output: n copies of greedy); each drawn under HF's warpers (new
    ones included) given its own prompt; a prompt's samples differ from each other, and with a seed
    per prompt they do not depend on the other prompts or its place among them (its first is drawn
    as its one sample of n=1); streaming gives the same rows; greedy refuses n > 1 as HF's."""
    hf, _, model = tiny
    n = 3
    batch = tm.make_batch(hf.config, ROWS[:2], seed=5)
    T = batch["input_ids"].shape[1]
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        ref = hf.generate(**args, do_sample=True, top_k=1, num_return_sequences=n, max_new_tokens=NEW,
                          eos_token_id=[], pad_token_id=0)[:, T:].numpy()
    np.testing.assert_array_equal(ref, np.repeat(tm.hf_generate(hf, batch, NEW, eos_token_id=[]), n, axis=0))
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], do_sample=True,
                                                 top_k=1, num_return_sequences=n), ref)

    sample = dict(max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=1.2, top_k=0, min_p=0.02,
                  typical_p=0.95, seed=[5, 6])
    tokens, logprobs = model.generate(**batch, **sample, num_return_sequences=n, return_logprobs=True)
    assert tokens.shape == (2 * n, NEW)
    probs = hf_probs(_hf_logits(hf, batch, tokens, n), **{k: sample[k] for k in ("temperature", "top_k", "min_p",
                                                                                  "typical_p")})
    expected = np.log(probs[np.arange(tokens.size), tokens.reshape(-1)]).reshape(tokens.shape)
    np.testing.assert_allclose(logprobs, expected, rtol=1e-4, atol=1e-4)
    per_prompt = tokens.reshape(2, n, NEW)
    assert all((per_prompt[b, i] != per_prompt[b, j]).any() for b in range(2) for i in range(n) for j in range(i))
    swapped = {k: v[[1, 0]] for k, v in batch.items()}    # one image per row: rows and images move together
    moved = model.generate(**swapped, **{**sample, "seed": [6, 5]}, num_return_sequences=n)
    np.testing.assert_array_equal(moved.reshape(2, n, NEW)[[1, 0]], per_prompt)
    # a prompt's first sample draws with the key of its one sample at n=1 (`generate.row_key`)
    one, three = (model.generation_inputs(**batch, **sample, num_return_sequences=k)["options"] for k in (1, 3))
    for key in ("seeds", "row_streams", "seen", "history"):
        np.testing.assert_array_equal(three[key], np.repeat(one[key], n, axis=0), err_msg=key)
    np.testing.assert_array_equal(three["samples"], [0, 1, 2, 0, 1, 2])
    assert (one["samples"] == 0).all()

    compiled = compiled_programs()
    other = model.generate(**batch, **{**sample, "seed": 3, "eta_cutoff": 0.01, "top_h": 0.9},
                           num_return_sequences=n)
    assert compiled_programs() == compiled and (other != tokens).any()    # the warpers compile nothing
    streamed = model.generate_stream(**batch, **sample, num_return_sequences=n, chunk=5)
    np.testing.assert_array_equal(np.concatenate(list(streamed), axis=1), tokens)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        model.generate(**batch, max_new_tokens=NEW, num_return_sequences=2)


def test_generation_config_warpers_apply_as_hf(tiny, tmp_path):
    """min_p, typical_p, epsilon_cutoff, eta_cutoff and top_h in generation_config.json load without a
    warning, resolve as HF resolves them, and sampled tokens' log-probabilities are those under the
    warpers HF's generate builds from that config (temperature and the default top_k 50 with them)."""
    import shutil
    import warnings
    from transformers import LlavaNextForConditionalGeneration
    _, source, _ = tiny
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    path = tmp_path / "generation_config.json"
    settings = dict(do_sample=True, temperature=0.9, min_p=0.03, typical_p=0.9, epsilon_cutoff=0.002,
                    eta_cutoff=0.003, top_h=0.95)
    path.write_text(json.dumps({**json.loads(path.read_text()), **settings}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = LlavaNext.from_pretrained(str(tmp_path))
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    resolved, _ = hf._prepare_generation_config(None)
    for key in settings:
        assert model.generation_defaults[key] == getattr(resolved, key), key
    batch = tm.make_batch(hf.config, ROWS[:2], seed=9)
    tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], seed=2, return_logprobs=True)
    scores = hf._get_logits_processor(resolved)(None, torch.from_numpy(_hf_logits(hf, batch, tokens)))
    probs = torch.softmax(scores, -1).numpy()
    expected = np.log(probs[np.arange(tokens.size), tokens.reshape(-1)]).reshape(tokens.shape)
    np.testing.assert_allclose(logprobs, expected, rtol=1e-4, atol=1e-4)
    plain = hf_probs(_hf_logits(hf, batch, tokens), temperature=0.9, top_k=50)
    assert ((probs > 0).sum(-1) < (plain > 0).sum(-1)).mean() > 0.5   # the config's warpers cut, most steps
