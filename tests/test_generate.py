"""Generation against HF's `generate`, batch invariance, sampling and the compile count."""

import os
import time

import numpy as np
import pytest
import torch

import tiny_models as tm
from llava_next_jax import LlavaNext, generate
from llava_next_jax.generate import compiled_programs, select_tokens

ROWS = [(3, [(480, 640)], 4), (5, [(88, 55)], 2), (9, [(1, 300)], 3)]
NEW = 20


@pytest.fixture(scope="module", params=["mistral", "llama3", "qwen2", "vicuna"])
def family(request, tmp_path_factory):
    hf = tm.build_model(request.param, seed=3)
    path = tmp_path_factory.mktemp(request.param)
    tm.save_checkpoint(hf, str(path))
    return hf, LlavaNext.from_pretrained(str(path))


def hf_generate(hf, batch, **kw):
    return tm.hf_generate(hf, batch, NEW, **kw)   # pad id 0


def test_greedy_equals_hf_and_stops_like_hf(family):
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    ref = hf_generate(hf, batch, eos_token_id=[])
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0), ref)
    # Stop ids taken from the reference's own output: row 0 stops at step 4, others when they meet them.
    stops = [int(ref[0, 4]), int(ref[1, 7])]
    ref = hf_generate(hf, batch, eos_token_id=stops)
    assert (ref[0, 5:] == 0).all()
    ours = model.generate(**batch, max_new_tokens=NEW, eos_token_id=stops, pad_token_id=0)
    np.testing.assert_array_equal(ours, ref)
    ref = hf_generate(hf, batch, eos_token_id=stops, min_new_tokens=8)
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, min_new_tokens=8, eos_token_id=stops,
                                                 pad_token_id=0), ref)


def test_logprobs_equal_hf_scores(family):
    """Greedy: HF's `compute_transition_scores(normalize_logits=True)` (min_new_tokens and stop ids in
    play). Sampled: the log-probability of each drawn token under HF's warpers (temperature, top-k,
    top-p) applied to HF's logits for the prompt plus our tokens."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    T = batch["input_ids"].shape[1]
    first = hf_generate(hf, batch, eos_token_id=[])
    stops = [int(first[0, 4]), int(first[1, 7])]
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        out = hf.generate(**args, do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=stops,
                          min_new_tokens=3, output_scores=True, return_dict_in_generate=True)
        theirs = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).numpy()
    tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=stops, min_new_tokens=3,
                                      pad_token_id=0, return_logprobs=True)
    n = theirs.shape[1]
    np.testing.assert_array_equal(tokens[:, :n], out.sequences[:, T:].numpy())
    stopped = np.cumsum(np.isin(tokens, stops), axis=1) - np.isin(tokens, stops) > 0   # steps after a stop id
    np.testing.assert_allclose(logprobs[:, :n][~stopped[:, :n]], theirs[~stopped[:, :n]], rtol=1e-4, atol=1e-4)
    assert (logprobs[stopped] == 0).all() and stopped.any()

    warp = dict(temperature=0.7, top_k=5, top_p=0.9)
    tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], do_sample=True, seed=4,
                                      return_logprobs=True, **warp)
    mask = np.concatenate([batch["attention_mask"], np.ones_like(tokens)], axis=1)
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(np.concatenate([batch["input_ids"], tokens], axis=1)),
                    attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(np.clip(np.cumsum(mask, axis=1) - 1, 0, None)),
                    pixel_values=args["pixel_values"], image_sizes=args["image_sizes"]).logits[:, T - 1:-1]
    probs = _hf_filtered(logits.reshape(-1, logits.shape[-1]).numpy(), warp["top_k"], warp["top_p"],
                         warp["temperature"])
    expected = np.log(probs[np.arange(tokens.size), tokens.reshape(-1)]).reshape(tokens.shape)
    np.testing.assert_allclose(logprobs, expected, rtol=1e-4, atol=1e-4)


def test_repetition_penalty_equals_hf(family):
    """Greedy with HF's repetition penalty (prompt tokens, pads included, and the output so far), and
    the sampled distribution it leaves: the tokens HF picks, and our log-probabilities its scores."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    T = batch["input_ids"].shape[1]
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    plain = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    for penalty in (1.5, 0.7):
        with torch.no_grad():
            out = hf.generate(**args, do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[],
                              repetition_penalty=penalty, output_scores=True, return_dict_in_generate=True)
            theirs = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).numpy()
        tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                          repetition_penalty=penalty, return_logprobs=True)
        np.testing.assert_array_equal(tokens, out.sequences[:, T:].numpy())
        np.testing.assert_allclose(logprobs, theirs, rtol=1e-4, atol=1e-4)
        assert (tokens != plain).any(), penalty   # the penalty changed something


def test_no_repeat_ngram_equals_hf(family):
    """HF's no_repeat_ngram_size (n-grams over the prompt as given, pads and image tokens included, and
    the output), alone and after the repetition penalty: HF's tokens and scores; n compiles nothing."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    T = batch["input_ids"].shape[1]
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    plain = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    compiled = compiled_programs()
    for n, penalty in ((2, 1.0), (3, 1.0), (1, 1.0), (2, 1.3)):
        with torch.no_grad():
            out = hf.generate(**args, do_sample=False, max_new_tokens=NEW, pad_token_id=0, eos_token_id=[],
                              no_repeat_ngram_size=n, repetition_penalty=penalty, output_scores=True,
                              return_dict_in_generate=True)
            theirs = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).numpy()
        tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                          no_repeat_ngram_size=n, repetition_penalty=penalty, return_logprobs=True)
        np.testing.assert_array_equal(tokens, out.sequences[:, T:].numpy(), err_msg=f"n={n}")
        np.testing.assert_allclose(logprobs, theirs, rtol=1e-4, atol=1e-4)
        assert (tokens != plain).any(), n   # the ban changed something
    assert compiled_programs() == compiled
    with pytest.raises(ValueError, match=r"no_repeat_ngram_size must be an int in \[0, 16\] \(0: off\); got 17"):
        model.generate(**batch, max_new_tokens=NEW, no_repeat_ngram_size=17)


def test_banned_ngrams_equal_hf_processor():
    """`generate.banned_ngrams` against HF's NoRepeatNGramLogitsProcessor on sequences of a 4-token
    vocabulary (many repeats), every n up to 6 and every length from 0 on, behind prefixes of -1s and
    before tokens not generated yet (the decode state's pads, here random)."""
    import jax
    import jax.numpy as jnp
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
    rng = np.random.default_rng(0)
    V, S = 4, 24
    seqs = rng.integers(0, V, (3, S))
    ban = jax.jit(generate.banned_ngrams, static_argnums=3)
    checked = 0
    for n in range(0, 7):
        for prefix in (0, 5):
            for length in range(0, S - prefix + 1):
                history = np.concatenate([np.full((3, prefix), -1), seqs[:, :length],
                                          rng.integers(0, V, (3, S - prefix - length))], axis=1).astype(np.int32)
                ours = np.asarray(ban(jnp.asarray(history), prefix + length, n, V))
                if n == 0 or length == 0:
                    assert not ours.any()
                    continue
                scores = NoRepeatNGramLogitsProcessor(n)(torch.from_numpy(seqs[:, :length]), torch.zeros(3, V))
                np.testing.assert_array_equal(ours, torch.isinf(scores).numpy(), err_msg=f"n={n} length={length}")
                checked += int(ours.any())
    assert checked > 100   # most cases ban something


@pytest.mark.parametrize("family", ["mistral", "qwen2"], indirect=True)   # two: the search is no family's own code
def test_beam_search_equals_hf(family):
    """num_beams > 1: HF's hypotheses (returned best first, pads after a stop id) and sequences_scores,
    over early_stopping, length penalties, stop ids taken from the search's own output, min_new_tokens
    and the repetition / n-gram processors; a row alone gives what it gives in the batch; the beam
    settings compile nothing past one program per num_beams."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    T = batch["input_ids"].shape[1]
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    pad = 7   # HF fills beam outputs with pad_token_id only when it is not 0
    first = model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad, num_beams=3, eos_token_id=[])
    stops = [int(first[0, 3]), int(first[1, 6]), int(first[2, 2])]
    cases = [dict(num_beams=3, eos_token_id=[]),
             dict(num_beams=3, eos_token_id=stops, num_return_sequences=3),
             dict(num_beams=4, eos_token_id=stops, early_stopping=True, length_penalty=0.5, num_return_sequences=2),
             dict(num_beams=3, eos_token_id=stops, early_stopping="never", length_penalty=-1.0),
             dict(num_beams=3, eos_token_id=stops, min_new_tokens=6, repetition_penalty=1.3, no_repeat_ngram_size=2)]
    stopped_early = 0
    for kw in cases:
        with torch.no_grad():
            out = hf.generate(**args, do_sample=False, max_new_tokens=NEW, pad_token_id=pad, output_scores=True,
                              return_dict_in_generate=True, **kw)
        ref = out.sequences[:, T:].numpy()
        ref = np.pad(ref, ((0, 0), (0, NEW - ref.shape[1])), constant_values=pad)
        tokens, scores = model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad, return_logprobs=True, **kw)
        np.testing.assert_array_equal(tokens, ref, err_msg=str(kw))
        np.testing.assert_allclose(scores, out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
        stopped_early += int((tokens[:, -1] == pad).sum())
        if kw is cases[0]:
            compiled = compiled_programs()
    assert stopped_early >= 4   # the stop ids ended hypotheses before max_new_tokens
    assert compiled_programs() == compiled + 1   # num_beams=4: one more; the rest compiled nothing
    alone = tm.make_batch(hf.config, [ROWS[1]], seed=5)
    ids = batch["input_ids"][1][batch["attention_mask"][1] == 1][None]
    out = model.generate(ids, batch["pixel_values"][1:2, :alone["pixel_values"].shape[1]], batch["image_sizes"][1:2],
                         max_new_tokens=NEW, pad_token_id=pad, num_beams=3, eos_token_id=[])
    np.testing.assert_array_equal(out[0], first[1])
    with pytest.raises(ValueError, match=r"num_return_sequences must be an int in \[1, num_beams=3\]"):
        model.generate(**batch, num_beams=3, num_return_sequences=4)
    with pytest.raises(ValueError, match=r"early_stopping must be True, False or \"never\"; got 'always'"):
        model.generate(**batch, num_beams=3, early_stopping="always")
    with pytest.raises(ValueError, match="beam search \\(num_beams=3\\) takes none"):
        model.generate(**batch, num_beams=3, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match=r"prompt_lookup_num_tokens must be None or an int in \[0, 32\]"):
        model.generate(**batch, prompt_lookup_num_tokens=33)


@pytest.mark.parametrize("family", ["mistral"], indirect=True)   # no family's own code (greedy beams: two families)
def test_beam_sampling_top_k_1_equals_hf(family):
    """num_beams > 1 with do_sample and top_k=1: each beam keeps its min_tokens_to_keep (stop ids + 1)
    best tokens, so the draw of (stop ids + 1) * num_beams continuations takes them all, as HF's
    multinomial does: HF's beams and sequences_scores, token for token, whatever the seed."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    T = batch["input_ids"].shape[1]
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    pad = 7
    first = model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad, num_beams=2, eos_token_id=[])
    stops = [int(first[0, 4]), int(first[2, 5])]
    for kw in (dict(num_beams=2, eos_token_id=stops, num_return_sequences=2),
               dict(num_beams=3, eos_token_id=stops[:1], temperature=0.7, length_penalty=0.5)):
        torch.manual_seed(0)
        with torch.no_grad():
            out = hf.generate(**args, do_sample=True, top_k=1, max_new_tokens=NEW, pad_token_id=pad,
                              output_scores=True, return_dict_in_generate=True, **kw)
        ref = out.sequences[:, T:].numpy()
        ref = np.pad(ref, ((0, 0), (0, NEW - ref.shape[1])), constant_values=pad)
        for seed in (0, 1):
            tokens, scores = model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad, do_sample=True, top_k=1,
                                            seed=seed, return_logprobs=True, **kw)
            np.testing.assert_array_equal(tokens, ref, err_msg=str(kw))
            np.testing.assert_allclose(scores, out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)


def test_beam_sampling_warpers_keep_min_tokens_as_hf():
    """warp with min_keep (beam sampling's min_tokens_to_keep) removes the tokens HF's warpers given
    min_tokens_to_keep remove, each warper set where alone it would keep fewer (logits without ties)."""
    from transformers.generation import logits_process as lp
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    cases = [(dict(top_k=1), lp.TopKLogitsWarper(1, min_tokens_to_keep=3)),
             (dict(top_p=0.05), lp.TopPLogitsWarper(0.05, min_tokens_to_keep=3)),
             (dict(min_p=0.9), lp.MinPLogitsWarper(0.9, min_tokens_to_keep=3)),
             (dict(typical_p=0.05), lp.TypicalLogitsWarper(0.05, min_tokens_to_keep=3)),
             (dict(epsilon_cutoff=0.3), lp.EpsilonLogitsWarper(0.3, min_tokens_to_keep=3)),
             (dict(eta_cutoff=0.5), lp.EtaLogitsWarper(0.5, min_tokens_to_keep=3))]
    import jax
    warp = jax.jit(generate.warp, static_argnums=2)   # one compile for each min_keep, not op by op
    for kw, hf_warper in cases:
        opts = {k: np.asarray(v, np.int32 if k == "top_k" else np.float32)
                for k, v in {**generate.NO_WARP, **kw}.items()}
        ours = np.asarray(warp(logits.numpy(), opts, 3))
        ref = hf_warper(None, logits.clone()).numpy()
        np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref), err_msg=str(kw))
        assert (np.isfinite(ours).sum(-1) >= 3).all()
        alone = np.asarray(warp(logits.numpy(), opts, None))     # sampling's min 1: fewer here
        assert (np.isfinite(alone).sum(-1) < 3).any(), kw


@pytest.mark.parametrize("family", ["mistral"], indirect=True)   # no family's own code
def test_beam_sampling_seeds_and_rows(family):
    """Beam sampling: a seed gives the same beams again, other seeds other beams; with a seed per row a
    prompt's beams do not depend on the other rows of the batch (it alone gives them too); greedy beam
    search is what do_sample=False gives, whatever the seed."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    kw = dict(max_new_tokens=NEW, num_beams=3, num_return_sequences=3, eos_token_id=[], do_sample=True,
              temperature=1.5)
    seeds = [11, 12, 13]
    out = model.generate(**batch, seed=seeds, **kw)
    np.testing.assert_array_equal(model.generate(**batch, seed=seeds, **kw), out)
    other = [model.generate(**batch, seed=[s + 100 * i for s in seeds], **kw) for i in (1, 2)]
    for o in other:   # every prompt's beams change with its seed
        assert all((o[3 * b:3 * b + 3] != out[3 * b:3 * b + 3]).any() for b in range(3))
    alone = tm.make_batch(hf.config, [ROWS[1]], seed=5)
    ids = batch["input_ids"][1][batch["attention_mask"][1] == 1][None]
    row = model.generate(ids, batch["pixel_values"][1:2, :alone["pixel_values"].shape[1]], batch["image_sizes"][1:2],
                         seed=[12], **kw)
    np.testing.assert_array_equal(row, out[3:6])
    greedy = dict(kw, do_sample=False)
    np.testing.assert_array_equal(model.generate(**batch, seed=1, **greedy), model.generate(**batch, seed=2, **greedy))


@pytest.mark.parametrize("family", ["mistral"], indirect=True)   # no family's own code
def test_beam_sampling_draws_without_replacement_from_warped(family):
    """One step of beam sampling (num_beams=2, num_return_sequences=2, one stop id: HF draws 4
    continuations without replacement from the warped softmax of beam 0, beam 1 starting at -1e9, and
    returns the 2 best of them): over many seeds, how often each token comes first and each comes at
    all matches the exact distribution of that draw, enumerated from HF's logits and warpers (a bound
    that sampling with replacement, or from the unwarped distribution, or 2 draws, fails)."""
    import itertools

    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper
    hf, model = family
    one = tm.make_batch(hf.config, ROWS[:1], seed=5)
    with torch.no_grad():
        logits = hf(**{k: torch.from_numpy(v) for k, v in one.items()}).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)[None]
    stop = int(torch.argsort(logits)[0])     # the least likely token: never in the support
    warped = TopKLogitsWarper(8, min_tokens_to_keep=2)(None, TemperatureLogitsWarper(3.0)(None, logp))
    probs = torch.softmax(warped[0].double(), -1).numpy()
    support = np.nonzero(probs)[0]
    assert len(support) == 8
    first, anywhere = np.zeros(len(probs)), np.zeros(len(probs))
    for seq in itertools.permutations(support, 4):   # ordered draws without replacement
        p, left = 1.0, 1.0
        for t in seq:
            p, left = p * probs[t] / left, left - probs[t]
        best = sorted(seq, key=lambda t: -probs[t])[:2]
        first[best[0]] += p
        anywhere[best] += p
    rows, calls = 200, 4
    batch = {k: np.repeat(v, rows, axis=0) for k, v in one.items()}
    got_first, got_any = np.zeros(len(probs)), np.zeros(len(probs))
    for c in range(calls):
        out = model.generate(**batch, max_new_tokens=1, num_beams=2, num_return_sequences=2, do_sample=True,
                             temperature=3.0, top_k=8, eos_token_id=[stop], seed=list(range(c * rows, (c + 1) * rows)))
        pairs = out[:, 0].reshape(rows, 2)
        assert (pairs[:, 0] != pairs[:, 1]).all()   # without replacement
        np.add.at(got_first, pairs[:, 0], 1)
        np.add.at(got_any, pairs.reshape(-1), 1)
    n = rows * calls
    assert got_any[probs == 0].sum() == 0      # nothing outside the warped support
    for expected, got in ((first, got_first), (anywhere, got_any)):
        bound = 5 * np.sqrt(expected * (1 - np.minimum(expected, 1)) / n + 1e-6) + 0.01
        np.testing.assert_array_less(np.abs(got / n - expected), bound)
    with pytest.raises(ValueError, match=r"max_matching_ngram_size must be an int in \[1, 8\]; got 0"):
        model.generate(**batch, prompt_lookup_num_tokens=3, max_matching_ngram_size=0)


@pytest.mark.parametrize("family", ["vicuna", "qwen2"], indirect=True)   # two: no family's own code
def test_stream_equals_hf_and_generate(family):
    """Streamed chunks, joined, are HF's greedy tokens (stopping rows included) and generate's sampled
    ones; the stream ends when every row has stopped; the chunks run one program, and another chunk
    size compiles nothing. The params here are not committed to a device, as a program that makes
    them hands them over (`from_pretrained` commits its own): the first three chunks compiled the
    chunk program three times."""
    import copy
    import jax
    hf, model = family
    model = copy.copy(model)
    model.params = jax.tree.map(lambda a: jax.numpy.array(np.asarray(a)), model.params)
    assert not any(a.committed for a in jax.tree.leaves(model.params))
    chunk_programs = generate.decode_chunk_program._cache_size()
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    ref = hf_generate(hf, batch, eos_token_id=[])
    stops = [int(ref[0, 4]), int(ref[1, 7]), int(ref[2, 2])]
    ref = hf_generate(hf, batch, eos_token_id=stops)
    last = max(int(np.argmax(np.isin(row, stops))) for row in ref) + 1   # the step after which all have stopped
    for given in (None, 7):   # None: the backend's default (1 on a CPU)
        pieces = list(model.generate_stream(**batch, max_new_tokens=NEW, eos_token_id=stops, pad_token_id=0,
                                            chunk=given))
        chunk = given or generate.default_stream_chunk()
        assert all(p.shape[1] <= chunk for p in pieces) and len(pieces) == -(-last // chunk), [p.shape for p in pieces]
        joined = np.concatenate(pieces, axis=1)
        np.testing.assert_array_equal(joined, ref[:, :last])
        assert (ref[:, last:] == 0).all()
        if given is None:
            compiled = compiled_programs()
    assert compiled_programs() == compiled
    sampled = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=1.5, seed=3)
    streamed = model.generate_stream(**batch, max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=1.5,
                                     seed=3, chunk=6)
    np.testing.assert_array_equal(np.concatenate(list(streamed), axis=1), sampled)
    assert generate.decode_chunk_program._cache_size() <= chunk_programs + 1


def _decode_state(model, batch, **generation):
    """The decode loop's final state (tokens, step, passes, passes that checked drafts) for
    `generate(**batch, **generation)`."""
    args = model.generation_inputs(**batch, **generation)
    lookup = args.pop("lookup")
    logits, cache, kv_valid = generate.prefill_program(
        model.params, model.config, args["input_ids"], args["pixel_values"], args["sources"], args["attention_mask"],
        args["dtype"], args["input_ids"].shape[1] + args["new_bucket"] + lookup)
    state, _ = generate.decode_program(model.params, model.config, logits, cache, kv_valid, args["options"],
                                       args["dtype"], args["new_bucket"], lookup)
    return {k: np.asarray(state[k]) for k in ("tokens", "step", "passes", "checked")}


@pytest.mark.parametrize("family", ["mistral", "llama3"], indirect=True)   # sliding windows; llama3's rope
def test_prompt_lookup_equals_hf(family):
    """Prompt lookup decoding: a mixed batch keeps HF's greedy tokens (stop ids, min_new_tokens, the
    repetition penalty and the n-gram ban in play); a row alone equals HF's own prompt lookup decoding
    in fewer passes of the model than tokens; on mistral (sliding windows), streamed too, and sampled
    tokens and log-probabilities (the sampling warpers in play) are generate's without drafts."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    first = hf_generate(hf, batch, eos_token_id=[])
    processors = dict(eos_token_id=[int(first[0, 9]), int(first[1, 12])], min_new_tokens=4,
                      repetition_penalty=1.1, no_repeat_ngram_size=4)
    ref = hf_generate(hf, batch, **processors)
    ours = model.generate(**batch, max_new_tokens=NEW, pad_token_id=0, prompt_lookup_num_tokens=3, **processors)
    np.testing.assert_array_equal(ours, ref)

    one = tm.make_batch(hf.config, ROWS[1:2], seed=5)
    with torch.no_grad():
        out = hf.generate(**{k: torch.from_numpy(v) for k, v in one.items()}, do_sample=False, max_new_tokens=NEW,
                          eos_token_id=[], pad_token_id=0, prompt_lookup_num_tokens=3)
    state = _decode_state(model, one, max_new_tokens=NEW, eos_token_id=[], prompt_lookup_num_tokens=3)
    np.testing.assert_array_equal(state["tokens"][:, :NEW], out[:, one["input_ids"].shape[1]:].numpy())
    assert state["step"] == NEW and state["passes"] < NEW, state
    if hf.config.text_config.model_type != "mistral":   # the rest (no family's own code) on one family
        return
    streamed = list(model.generate_stream(**one, max_new_tokens=NEW, eos_token_id=[], chunk=2,
                                          prompt_lookup_num_tokens=3))
    assert all(p.shape[1] <= 2 + 3 for p in streamed) and len(streamed) < NEW // 2
    np.testing.assert_array_equal(np.concatenate(streamed, axis=1), state["tokens"][:, :NEW])

    for warpers in (dict(temperature=0.5), dict(temperature=0.9, top_k=0, min_p=0.05, typical_p=0.9, top_h=0.9,
                                               epsilon_cutoff=0.01, eta_cutoff=0.01)):
        sample = dict(max_new_tokens=NEW, eos_token_id=[], do_sample=True, seed=[4, 5, 6], return_logprobs=True,
                      **warpers)
        plain = model.generate(**batch, **sample)
        drafted = model.generate(**batch, **sample, prompt_lookup_num_tokens=3)
        np.testing.assert_array_equal(drafted[0], plain[0])
        np.testing.assert_allclose(drafted[1], plain[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_stop_strings_with_prompt_lookup_equal_hf(family):
    """HF's stop_strings with prompt lookup, on the row whose drafts the model keeps (above): for each
    step k, the shortest text ending with token k that the prompt and the tokens before it do not
    hold as the stop string: HF's greedy tokens with it, which stop at k, tokens that passes kept as
    drafts among them (such a pass ends at the token completing the string, as without drafts; HF's
    own prompt lookup checks only a pass's last token). Tokens are text in the demo's tokenizer, whose
    first 160 ids are characters and short merges."""
    from transformers import PreTrainedTokenizerFast
    from llava_next_jax import demo
    hf, model = family
    tok = PreTrainedTokenizerFast(tokenizer_object=demo.build_tokenizer())
    one = tm.make_batch(hf.config, ROWS[1:2], seed=5)
    free = hf_generate(hf, one, eos_token_id=[])[0]
    passes = [p.shape[1] for p in model.generate_stream(**one, max_new_tokens=NEW, eos_token_id=[], chunk=1,
                                                         prompt_lookup_num_tokens=3)]
    drafted = set(range(NEW)) - set(np.cumsum(passes) - passes)     # steps a pass kept as a draft
    prompt, inside = list(one["input_ids"][0]), 0
    for k in range(NEW - 1):
        text, before = tok.decode(prompt + list(free[:k + 1])), tok.decode(prompt + list(free[:k]))
        stop = next(text[-n:] for n in range(1, len(text)) if text[-n:] not in before)
        ref = hf_generate(hf, one, eos_token_id=[], stop_strings=stop, tokenizer=tok)
        assert (ref[0, :k + 1] == free[:k + 1]).all() and (ref[0, k + 1:] == 0).all(), (k, stop)
        ours = model.generate(**one, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0, prompt_lookup_num_tokens=3,
                              stop_strings=[stop, "~~~"], tokenizer=demo.build_tokenizer())
        np.testing.assert_array_equal(ours, ref, err_msg=repr(stop))
        inside += k in drafted
    assert inside >= 3, passes


def _most_checks(passes: int) -> int:
    """The most passes of `passes` that check drafts when none is ever kept: `decode_loop`'s pauses
    (LOOKUP_MISSES failed passes in a row, then pauses of 1, 2, 4, ... passes, at most LOOKUP_PAUSE)."""
    misses = pause = checks = 0
    for _ in range(passes):
        if pause:
            pause -= 1
            continue
        checks, misses = checks + 1, misses + 1
        if misses >= generate.LOOKUP_MISSES:
            pause = min(2 ** (misses - generate.LOOKUP_MISSES), generate.LOOKUP_PAUSE)
    return checks


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_prompt_lookup_pauses_where_drafts_fail(family):
    """Sampled from random weights at a high temperature, drafted tokens are almost never what the
    model draws: prompt lookup then checks drafts in fewer and fewer passes (at most `_most_checks`
    of them, counted again after each pass that kept a draft) rather than in every pass that found
    some, with the tokens of a decode without drafts."""
    hf, model = family
    one = tm.make_batch(hf.config, ROWS[1:2], seed=5)
    sample = dict(max_new_tokens=128, eos_token_id=[], do_sample=True, temperature=50.0, top_k=0, seed=9)
    state = _decode_state(model, one, **sample, prompt_lookup_num_tokens=3)
    np.testing.assert_array_equal(state["tokens"][:, :128], model.generate(**one, **sample))
    kept = int(state["step"]) - int(state["passes"])   # drafted tokens kept (a pass takes 1 + its kept ones)
    assert state["step"] == 128 and kept <= 2, state
    assert 0 < state["checked"] <= (kept + 1) * _most_checks(int(state["passes"])), state


def test_lookup_drafts_equal_hf_candidates():
    """`lookup_drafts` against HF's `PromptLookupCandidateGenerator` on random sequences of a small
    vocabulary (so n-grams recur), a -1 prefix (no token) before them and junk after their length."""
    import jax
    import jax.numpy as jnp
    from transformers.generation.candidate_generator import PromptLookupCandidateGenerator
    rng = np.random.default_rng(0)
    drafts = jax.jit(generate.lookup_drafts, static_argnums=3)   # one program: 5 drafts, cut to `count` below
    found = 0
    for trial in range(60):
        length, ngram, count = int(rng.integers(2, 40)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
        tokens = rng.integers(0, 5, length)
        sequence = np.concatenate([np.full(7, -1), tokens, rng.integers(0, 5, 49 - length)])[None]
        ours = np.asarray(drafts(jnp.asarray(sequence), jnp.int32(7 + length), jnp.int32(ngram), 5))[0, :count]
        hf = PromptLookupCandidateGenerator(num_output_tokens=count, max_matching_ngram_size=ngram, max_length=1000)
        candidates = hf.get_candidates(torch.from_numpy(tokens)[None])[0][0, length:].numpy()
        np.testing.assert_array_equal(ours[:len(candidates)], candidates, err_msg=f"trial {trial}")
        assert (ours[len(candidates):] == -1).all(), (trial, ours, candidates)
        found += len(candidates) > 0
    assert 10 < found < 60, found


@pytest.mark.parametrize("family", ["mistral", "llama3"], indirect=True)   # two (sliding windows in one)
def test_row_alone_equals_row_in_mixed_batch(family):
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=6)
    together = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[])
    for row, spec in enumerate(ROWS):
        alone = tm.make_batch(hf.config, [spec], seed=6)
        # same tokens as that row of the batch (make_batch draws the same ids per row for one seed)
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1][None]
        image = slice(row, row + 1)
        out = model.generate(ids, batch["pixel_values"][image, :alone["pixel_values"].shape[1]],
                             batch["image_sizes"][image], max_new_tokens=NEW, eos_token_id=[])
        np.testing.assert_array_equal(out[0], together[row])


def test_right_padded_rows_generate_as_left_padded(family):
    """Rows given right-padded are moved left, the prompt the penalties and n-gram bans see with them."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=6)
    mask = batch["attention_mask"]
    right = {**batch, "input_ids": np.stack([np.roll(r, -int((m == 0).sum())) for r, m in zip(batch["input_ids"], mask)]),
             "attention_mask": mask[:, ::-1].copy()}
    assert not (right["attention_mask"][:, -1]).all()
    settings = dict(max_new_tokens=NEW, eos_token_id=[], no_repeat_ngram_size=2, repetition_penalty=1.5)
    np.testing.assert_array_equal(model.generate(**right, **settings), model.generate(**batch, **settings))
    given, aligned = (model.generation_inputs(**b, **settings)["options"] for b in (right, batch))
    for key in aligned:                      # the n-gram history and the penalised tokens among them
        np.testing.assert_array_equal(given[key], aligned[key], err_msg=key)


@pytest.mark.parametrize("family", ["vicuna", "qwen2"], indirect=True)   # two: no family's own code
def test_text_only_row_beside_an_image_row_equals_hf(family):
    """Two rows, one image: the image count is padded to the batch size for a fixed shape, and the
    newline feature must still come from after every (padded) image slot."""
    hf, model = family
    batch = tm.make_batch(hf.config, [ROWS[0], (6, [], 2)], seed=8)
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0),
                                  hf_generate(hf, batch, eos_token_id=[]))


def test_sampling_limits_reproducibility_and_row_independence(family):
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=7)
    greedy = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[])
    sample = lambda b=batch, **kw: model.generate(**b, max_new_tokens=NEW, eos_token_id=[], do_sample=True, **kw)
    np.testing.assert_array_equal(sample(top_k=1, seed=1), greedy)
    np.testing.assert_array_equal(sample(temperature=1e-4, seed=2), greedy)
    a, b = sample(seed=11, temperature=1.5), sample(seed=11, temperature=1.5)
    np.testing.assert_array_equal(a, b)
    assert (sample(seed=12, temperature=1.5) != a).any()
    # Row 0's draws depend on (seed, row) only, not on the other rows.
    other = tm.make_batch(hf.config, [ROWS[0], ROWS[2], ROWS[1]], seed=7)
    np.testing.assert_array_equal(sample(other, seed=11, temperature=1.5)[0], a[0])
    # With a seed per row, a row samples the same in any position.
    per_row = sample(seed=[5, 6, 7], temperature=1.5)
    swapped = {k: v[[0, 2, 1]] for k, v in batch.items()}  # one image per row: rows and images move together
    np.testing.assert_array_equal(sample(swapped, seed=[5, 7, 6], temperature=1.5), per_row[[0, 2, 1]])


def test_settings_left_out_resolve_as_hf(tmp_path):
    """Settings a call leaves out are the checkpoint's generation config's, else HF's defaults (top_k
    50 among them), as HF's generate resolves them: the resolved values equal HF's; greedy output with
    a config's repetition penalty and n-gram size equals HF's; default sampling draws from HF's
    warpers' distribution with the config's temperature and the default top_k 50."""
    from llava_next_jax.model import GENERATION_DEFAULTS
    hf = tm.build_model("vicuna", seed=4)
    batch = tm.make_batch(hf.config, ROWS[:2], seed=9)
    settings = {"greedy": dict(repetition_penalty=1.2, no_repeat_ngram_size=3),
                "sampling": dict(do_sample=True, temperature=1.5)}
    for name, values in settings.items():
        for key, value in values.items():
            setattr(hf.generation_config, key, value)
        tm.save_checkpoint(hf, str(tmp_path / name))
        model = LlavaNext.from_pretrained(str(tmp_path / name))
        resolved, _ = hf._prepare_generation_config(None)
        # max_length: HF fills in 20 once it has noted that none was set (`_prepare_generated_length`)
        for key in sorted(set(GENERATION_DEFAULTS) - {"min_new_tokens", "max_matching_ngram_size", "max_length"}):
            assert model.generation_defaults[key] == getattr(resolved, key), (name, key)
        if name == "greedy":
            np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0),
                                          hf_generate(hf, batch, eos_token_id=[]))
            for key in values:
                setattr(hf.generation_config, key, None)
            continue
        tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], seed=2, return_logprobs=True)
        mask = np.concatenate([batch["attention_mask"], np.ones_like(tokens)], axis=1)
        T = batch["input_ids"].shape[1]
        with torch.no_grad():
            logits = hf(input_ids=torch.from_numpy(np.concatenate([batch["input_ids"], tokens], axis=1)),
                        attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(np.clip(np.cumsum(mask, axis=1) - 1, 0, None)),
                        pixel_values=torch.from_numpy(batch["pixel_values"]),
                        image_sizes=torch.from_numpy(batch["image_sizes"])).logits[:, T - 1:-1]
        probs = _hf_filtered(logits.reshape(-1, logits.shape[-1]).numpy(), 50, 1.0, 1.5)
        expected = np.log(probs[np.arange(tokens.size), tokens.reshape(-1)]).reshape(tokens.shape)
        np.testing.assert_allclose(logprobs, expected, rtol=1e-4, atol=1e-4)
        assert ((probs > 0).sum(-1) == 50).all()    # the default top_k is what cuts (160 tokens)


@pytest.mark.parametrize("generation, text, top", [
    (dict(eos_token_id=[7, 99]), dict(pad_token_id=11), {}),    # a generation config without pad: not text_config's
    ({}, dict(eos_token_id=7), {}),                              # nor eos: no stop id (HF's)
    (None, dict(pad_token_id=11, eos_token_id=7), {}),           # no generation_config.json: config.json's
    (None, dict(eos_token_id=[7, 99]), dict(pad_token_id=13)),   # top level first, then text_config
])
def test_stop_and_pad_ids_resolve_as_hf(tmp_path, generation, text, top):
    """The stop and pad ids a call leaves out are those HF's `from_pretrained` + `generate` use: the
    generation_config.json's alone, else config.json's (top level, then text_config); with no pad id
    there, rows pad with the call's first stop id. Greedy and beam output against HF's."""
    import json
    from transformers import LlavaNextForConditionalGeneration
    tm.save_checkpoint(tm.build_model("vicuna", seed=4), str(tmp_path))
    os.remove(tmp_path / "generation_config.json")
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"].update(text)
    (tmp_path / "config.json").write_text(json.dumps({**config, **top}))
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    model = LlavaNext.from_pretrained(str(tmp_path))
    batch = tm.make_batch(hf.config, ROWS[:2], seed=9)    # greedy: row 0 emits 7 at step 2, row 1 99 at 2
    T = batch["input_ids"].shape[1]
    for call in (dict(), dict(eos_token_id=[88]), dict(eos_token_id=[88], pad_token_id=3), dict(num_beams=2)):
        with torch.no_grad():
            ref = hf.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, max_new_tokens=12, **call)
        ref = ref[:, T:].numpy()
        ours = model.generate(**batch, max_new_tokens=12, **call)
        np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref, err_msg=str(call))
        assert ref.shape[1] == 12 or (ours[:, ref.shape[1]:] == ours[:, -1:]).all()


def test_generation_settings_generate_does_not_apply_are_named_on_load(tmp_path):
    """A generation_config.json setting HF's generate applies and ours does not (its output would differ
    from HF's) is named in a warning when the checkpoint loads; settings at their no-op values are not."""
    import json
    import warnings
    from transformers import GenerationConfig
    from llava_next_jax.model import UNAPPLIED_GENERATION
    hf = tm.build_model("vicuna", seed=4)
    tm.save_checkpoint(hf, str(tmp_path))
    path = tmp_path / "generation_config.json"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LlavaNext.from_pretrained(str(tmp_path))      # bos, eos, pad: nothing to say
    known = set(GenerationConfig().__dict__)
    assert set(UNAPPLIED_GENERATION) <= known   # HF's own names
    config = json.loads(path.read_text())
    applied = {"suppress_tokens": [3], "stop_strings": ["."], "forced_bos_token_id": 2, "max_new_tokens": 64,
               "remove_invalid_values": True, "encoder_no_repeat_ngram_size": 2, "guidance_scale": 1.5}
    path.write_text(json.dumps({**config, "num_beam_groups": 1, "penalty_alpha": 0.6, "constraints": [[1, 2]],
                                **applied}))
    with pytest.warns(UserWarning, match=r"generation config sets constraints=\[\[1, 2\]\], penalty_alpha=0.6, "
                                         r"which generate does not apply") as caught:
        LlavaNext.from_pretrained(str(tmp_path))
    message = str(caught[0].message)
    assert not any(k in message for k in ["num_beam_groups", *applied])
    # where the checkpoint's default samples, num_beams > 1 is beam sampling, as in HF
    path.write_text(json.dumps({**config, "do_sample": True}))
    model = LlavaNext.from_pretrained(str(tmp_path))
    batch = tm.make_batch(hf.config, ROWS[:1], seed=9)
    sampled = model.generate(**batch, max_new_tokens=4, num_beams=2, seed=3)
    np.testing.assert_array_equal(sampled, model.generate(**batch, max_new_tokens=4, num_beams=2, seed=3,
                                                          do_sample=True))
    assert model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False).shape == (1, 4)


def _hf_filtered(logits, top_k, top_p, temperature):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    scores = torch.from_numpy(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, -1).numpy()


def test_top_k_top_p_keep_hf_warpers_tokens():
    """The kept tokens of `_top_k_filter` and `_top_p_filter` (thresholds found bit by bit, no sort) are
    those HF's TopKLogitsWarper and TopPLogitsWarper keep, over random logits of several scales, with
    ties (top-k keeps every tie of the k-th value, as HF's does; top-p too, where HF's sort keeps some of
    a tie group by position, so ties are left out there) and -inf entries."""
    import jax.numpy as jnp
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (48, 3000)).astype(np.float32) * rng.choice([0.1, 1.0, 8.0], (48, 1)).astype(np.float32)
    logits[:8] = np.round(logits[:8])           # many ties
    logits[8:12, ::3] = -np.inf
    logits[12, :] = -5.0                         # all equal
    for top_k in (1, 2, 50, 2999, 5000):
        ours = np.isfinite(np.asarray(generate._top_k_filter(jnp.asarray(logits), jnp.int32(top_k))))
        ref = np.isfinite(TopKLogitsWarper(top_k)(None, torch.from_numpy(logits)).numpy())
        np.testing.assert_array_equal(ours, ref, err_msg=f"top_k={top_k}")
    untied = np.concatenate([logits[8:12], logits[13:]])   # top-p over tied logits keeps them all (below)
    for top_p in (0.01, 0.3, 0.9, 0.999):
        ours = np.isfinite(np.asarray(generate._top_p_filter(jnp.asarray(untied), jnp.float32(top_p))))
        ref = np.isfinite(TopPLogitsWarper(top_p)(None, torch.from_numpy(untied)).numpy())
        np.testing.assert_array_equal(ours, ref, err_msg=f"top_p={top_p}")


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, 1.0, 1.0), (0, 0.7, 1.0), (5, 0.8, 0.7), (0, 1.0, 2.0)])
def test_sampling_frequencies_match_reference_distribution(top_k, top_p, temperature):
    import jax
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (2, 12)).astype(np.float32)
    logits[1, 3] = logits[1, 7]  # a tie at the boundary must be handled as the reference does
    expected = _hf_filtered(logits, top_k, top_p, temperature)
    draws = 40000
    keys = jax.random.split(jax.random.key(0), draws * 2).reshape(draws, 2)
    tokens, logprobs = map(np.asarray, jax.jit(jax.vmap(
        lambda k: select_tokens(logits, k, {**generate.NO_WARP, "do_sample": True, "temperature": temperature,
                                            "top_k": top_k, "top_p": top_p})))(keys))
    # each draw's log-probability is that of its token under the filtered distribution
    np.testing.assert_allclose(np.exp(logprobs[:, 1]), expected[1][tokens[:, 1]], rtol=1e-5)
    for row in range(2):
        counts = np.bincount(tokens[:, row], minlength=12) / draws
        assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(expected[row] > 0))
        np.testing.assert_allclose(counts, expected[row], atol=0.012)  # ~5 sigma at p=0.5


def test_compile_count_bounded_by_buckets(tmp_path):
    hf = tm.build_model("mistral", seed=4)
    tm.save_checkpoint(hf, str(tmp_path))
    model = LlavaNext.from_pretrained(str(tmp_path))
    run = lambda rows, new=10: model.generate(**tm.make_batch(hf.config, rows, seed=len(rows)), max_new_tokens=new)
    run([(3, [(480, 640)], 4), (5, [(88, 55)], 2)])
    compiled = compiled_programs()
    # New image sizes / aspect ratios / tile counts, other prompt lengths in the same bucket, other
    # max_new_tokens in the same bucket: nothing new to compile.
    run([(1, [(100, 100)], 1), (20, [(1, 900)], 9)], new=16)
    run([(4, [(1000, 20)], 0), (2, [(333, 444)], 30)], new=3)
    assert compiled_programs() == compiled
    assert generate.bucket(100, generate.PROMPT_BUCKETS) == 128
    run([(3, [(480, 640)], 4), (5, [(88, 55)], 200)])  # next prompt bucket: one more prefill and decode
    assert compiled_programs() == compiled + 2
    # beam search calls generate's prefill program without its `samples`: the same program, and only
    # the beam loop is new
    model.generate(**tm.make_batch(hf.config, [(3, [(480, 640)], 4), (5, [(88, 55)], 2)], seed=2),
                   max_new_tokens=10, num_beams=2)
    assert compiled_programs() == compiled + 3


# --- HF's other logits processors (`generate.process_scores`) ---------------------------------------

def _processor_settings(plain, T):
    """Settings for the processors, from HF's plain greedy tokens `plain` and the prompt length T: each
    alone, and two combinations HF applies together."""
    p = lambda row, step: int(plain[row, step])
    alone = dict(
        suppress=dict(suppress_tokens=[p(0, 2), p(2, 5)]),
        begin=dict(begin_suppress_tokens=[p(0, 0), p(1, 0)]),
        # a single token, two longer sequences, and a stop id alone (dropped, as HF drops it)
        bad=dict(bad_words_ids=[[p(1, 3)], [p(0, 5), p(0, 6)], [p(2, 1), p(2, 2), p(2, 3)], [p(0, 4)]],
                 eos_token_id=[p(0, 4)]),
        bias=dict(sequence_bias=[[[p(2, 8)], 3.0], [[p(0, 2), p(0, 3)], -4.0], [[p(1, 5), p(0, 3)], -1.5]]),
        encoder=dict(encoder_repetition_penalty=0.6),
        min_length=dict(eos_token_id=[p(0, 4), p(1, 7)], min_length=T + 9),
        forced=dict(forced_eos_token_id=7),
        decay=dict(eos_token_id=[11, 12], exponential_decay_length_penalty=(4, 1.6)),
        encoder_ngram=dict(encoder_no_repeat_ngram_size=1),
        # min_length bans the stop id (-inf), remove_invalid_values makes that the float32 minimum, and
        # the decay from step 1 on (3**k - 1 >= 2 times its magnitude) lifts it above every other token
        invalid=dict(eos_token_id=[p(0, 4)], min_length=T + 6, exponential_decay_length_penalty=(0, 3.0),
                     remove_invalid_values=True),
    )
    combined = [
        dict(suppress_tokens=[p(0, 2)], begin_suppress_tokens=[p(1, 0)], bad_words_ids=[[p(0, 5), p(0, 6)], [3]],
             sequence_bias={(p(2, 8),): 2.5, (p(1, 5), p(0, 3)): -2.0}, encoder_repetition_penalty=1.5,
             repetition_penalty=1.2, eos_token_id=[p(1, 7)], encoder_no_repeat_ngram_size=2),
        dict(eos_token_id=[11, 12], min_length=T + 3, forced_eos_token_id=[5, 7], suppress_tokens=[5],
             exponential_decay_length_penalty=[6, 1.4], renormalize_logits=True, no_repeat_ngram_size=3),
    ]
    return alone, combined


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_processors_equal_hf(family):
    """suppress_tokens, begin_suppress_tokens, bad_words_ids, sequence_bias, encoder_repetition_penalty,
    min_length, forced_eos_token_id, exponential_decay_length_penalty, encoder_no_repeat_ngram_size,
    remove_invalid_values (renormalize_logits too), each alone (each changes HF's tokens) and combined: HF's greedy tokens and scores as log-probabilities,
    on one compiled program; prompt lookup and streaming give generate's tokens with them; sampled
    tokens avoid what they ban."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    plain = hf_generate(hf, batch, eos_token_id=[])
    alone, combined = _processor_settings(plain, batch["input_ids"].shape[1])
    compiled = None
    for name, kw in list(alone.items()) + [(f"combined {i}", kw) for i, kw in enumerate(combined)]:
        kw = {"eos_token_id": [], **kw}
        with torch.no_grad():
            out = hf.generate(**args, do_sample=False, max_new_tokens=NEW, pad_token_id=0, output_scores=True,
                              return_dict_in_generate=True, **kw)
            theirs = hf.compute_transition_scores(out.sequences, out.scores, normalize_logits=True).numpy()
        ref = out.sequences[:, batch["input_ids"].shape[1]:].numpy()
        n = ref.shape[1]
        assert (np.pad(ref, ((0, 0), (0, NEW - n))) != plain).any(), name     # the setting changes HF's tokens
        tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, pad_token_id=0, return_logprobs=True, **kw)
        np.testing.assert_array_equal(tokens[:, :n], ref, err_msg=name)
        assert (tokens[:, n:] == 0).all(), name
        stop = np.isin(tokens[:, :n], kw["eos_token_id"])
        live = np.cumsum(stop, axis=1) - stop == 0
        # an infinite score (remove_invalid_values' case): HF's log-softmax gives nan, ours probability 1
        finite = live & np.isfinite(theirs)
        np.testing.assert_allclose(logprobs[:, :n][finite], theirs[finite], rtol=1e-4, atol=1e-4, err_msg=name)
        assert (logprobs[:, :n][live & ~finite] == 0).all() and (name == "invalid") == (live & ~finite).any()
        compiled = compiled_programs() if compiled is None else compiled
    assert compiled_programs() == compiled
    for kw in combined:   # the steps that depend on the position (min_length, the forced last token, the decay)
        ref = model.generate(**batch, max_new_tokens=NEW, pad_token_id=0, **kw)
        drafted = model.generate(**batch, max_new_tokens=NEW, pad_token_id=0, prompt_lookup_num_tokens=3, **kw)
        np.testing.assert_array_equal(drafted, ref, err_msg=str(kw))
        streamed = np.concatenate(list(model.generate_stream(**batch, max_new_tokens=NEW, pad_token_id=0, chunk=7,
                                                             **kw)), axis=1)
        np.testing.assert_array_equal(streamed, ref[:, :streamed.shape[1]], err_msg=str(kw))
        assert (ref[:, streamed.shape[1]:] == 0).all()
    banned = sorted({int(t) for t in plain[:, :6].reshape(-1)})
    forced = min(set(range(9, hf.config.text_config.vocab_size)) - set(banned))
    tokens = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=2.0, top_k=0,
                            seed=3, suppress_tokens=banned[:3], bad_words_ids=[[t] for t in banned[3:]],
                            begin_suppress_tokens=[1, 2], forced_eos_token_id=forced)
    assert not np.isin(tokens, banned).any() and not np.isin(tokens[:, 0], [1, 2]).any()
    assert (tokens[:, -1] == forced).all()


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_processors_in_beam_search_equal_hf(family):
    """Beam search with the processors on its log-probabilities, renormalize_logits re-normalizing them
    (as HF's LogitNormalization): HF's hypotheses and sequences_scores; renormalizing changes the scores."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    T = batch["input_ids"].shape[1]
    _, combined = _processor_settings(hf_generate(hf, batch, eos_token_id=[]), T)
    pad = 8   # HF fills beam outputs with pad_token_id only when it is not 0
    cases = [dict(combined[0], num_beams=3, renormalize_logits=True), dict(combined[1], num_beams=3)]
    for kw in cases:
        with torch.no_grad():
            out = hf.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, do_sample=False,
                              max_new_tokens=NEW, pad_token_id=pad, output_scores=True, return_dict_in_generate=True,
                              **kw)
        ref = out.sequences[:, T:].numpy()
        tokens, scores = model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad, return_logprobs=True, **kw)
        np.testing.assert_array_equal(tokens, np.pad(ref, ((0, 0), (0, NEW - ref.shape[1])), constant_values=pad),
                                      err_msg=str(kw))
        np.testing.assert_allclose(scores, out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
    plain = model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad, num_beams=3, eos_token_id=[],
                           return_logprobs=True)
    assert (plain[0] != tokens).any()
    unnormalized = model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad, return_logprobs=True,
                                  **dict(cases[0], renormalize_logits=False))
    assert not np.allclose(unnormalized[1], model.generate(**batch, max_new_tokens=NEW, pad_token_id=pad,
                                                           return_logprobs=True, **cases[0])[1])


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_forced_bos_equals_hf(family):
    """forced_bos_token_id: HF forces it where the input so far is one token (a one-token prompt's first
    step; begin_suppress_tokens then bans at the step after it) and leaves longer prompts alone."""
    hf, model = family
    V = hf.config.text_config.vocab_size
    one = {"input_ids": np.array([[5], [9]], np.int64), "attention_mask": np.ones((2, 1), np.int64)}
    plain = tm.hf_generate(hf, one, 6, eos_token_id=[])
    settings = dict(forced_bos_token_id=int(V - 1 - plain[0, 0]), begin_suppress_tokens=[int(plain[1, 1])],
                    eos_token_id=[])
    ref = tm.hf_generate(hf, one, 6, **settings)
    assert (ref[:, 0] == settings["forced_bos_token_id"]).all() and (ref != plain).any()
    np.testing.assert_array_equal(model.generate(**one, max_new_tokens=6, pad_token_id=0, **settings), ref)
    batch = tm.make_batch(hf.config, ROWS[:2], seed=5)
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=6, pad_token_id=0, **settings),
                                  tm.hf_generate(hf, batch, 6, **settings))


@pytest.mark.parametrize("family", ["mistral"], indirect=True)   # no family's own code
def test_guidance_scale_equals_hf(family):
    """Classifier-free guidance, HF's guidance_scale (its unconditional sequence: each prompt's last token
    alone, then the output): HF's greedy tokens and scores above and below 1, and with the processors
    after it and stop ids; streamed, generate's tokens; a sampled prompt's first of several rows, its
    row of one; 1 is off (nothing compiled for it); refused with beams, prompt lookup and bad values."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        out = hf.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, do_sample=False, max_new_tokens=NEW,
                          pad_token_id=0, eos_token_id=[], guidance_scale=3.0, output_scores=True,
                          return_dict_in_generate=True)
    ref = out.sequences[:, T:].numpy()
    tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                      guidance_scale=3.0, return_logprobs=True)
    np.testing.assert_array_equal(tokens, ref)
    scores = torch.stack(out.scores, 1).log_softmax(-1).numpy()
    np.testing.assert_allclose(logprobs, np.take_along_axis(scores, ref[..., None], -1)[..., 0], rtol=1e-4, atol=1e-4)
    plain = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    assert (tokens != plain).any()
    stops = [int(ref[0, 4]), int(ref[1, 7])]
    settings = dict(guidance_scale=0.5, repetition_penalty=1.3, no_repeat_ngram_size=2, eos_token_id=stops)
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, pad_token_id=0, **settings),
                                  hf_generate(hf, batch, **settings))
    streamed = model.generate_stream(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                     guidance_scale=3.0, chunk=7)
    np.testing.assert_array_equal(np.concatenate(list(streamed), axis=1), tokens)
    sample = dict(max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=1.5, seed=4, guidance_scale=2.0)
    rows = model.generate(**batch, **sample, num_return_sequences=2)
    np.testing.assert_array_equal(rows[::2], model.generate(**batch, **sample))
    compiled = compiled_programs()
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                                 guidance_scale=1.0), plain)
    assert compiled_programs() == compiled
    with pytest.raises(ValueError, match=r"guidance_scale=1.5 .*with beam search \(num_beams=2\)"):
        model.generate(**batch, guidance_scale=1.5, num_beams=2)
    with pytest.raises(ValueError, match=r"guidance_scale=1.5 with prompt_lookup_num_tokens=3"):
        model.generate(**batch, guidance_scale=1.5, prompt_lookup_num_tokens=3)
    for bad in (float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match=r"guidance_scale must be None or a finite number \(1: off\); got"):
            model.generate(**batch, guidance_scale=bad)


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_negative_prompt_equals_hf(family):
    """HF's negative_prompt_ids (with its attention mask: rows left-padded) as guidance's unconditional
    sequence: HF's greedy tokens and scores, for a short negative prompt and one longer than the
    prompt's bucket; streamed, generate's tokens; a sampled prompt's first of several rows, its row of
    one; ignored without guidance, as in HF; bad ids and masks refused, named."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    B, T = batch["input_ids"].shape
    V = hf.config.text_config.vocab_size
    rng = np.random.default_rng(1)
    plain = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0, guidance_scale=3.0)
    for n in (5, generate.bucket(T, generate.PROMPT_BUCKETS) + 9):
        mask = np.ones((B, n), np.int64)
        mask[1, :2] = mask[2, :n - 1] = 0   # row 1 two pads, row 2 one token
        ids = np.where(mask == 1, rng.integers(1, V, (B, n)), 0)
        negative = dict(negative_prompt_ids=ids, negative_prompt_attention_mask=mask)
        with torch.no_grad():
            out = hf.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, do_sample=False,
                              max_new_tokens=NEW, pad_token_id=0, eos_token_id=[], guidance_scale=3.0,
                              output_scores=True, return_dict_in_generate=True,
                              **{k: torch.from_numpy(v) for k, v in negative.items()})
        ref = out.sequences[:, T:].numpy()
        tokens, logprobs = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                          guidance_scale=3.0, return_logprobs=True, **negative)
        np.testing.assert_array_equal(tokens, ref)
        scores = torch.stack(out.scores, 1).log_softmax(-1).numpy()
        np.testing.assert_allclose(logprobs, np.take_along_axis(scores, ref[..., None], -1)[..., 0], rtol=1e-4,
                                   atol=1e-4)
        assert (tokens != plain).any()
    streamed = model.generate_stream(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                     guidance_scale=3.0, chunk=7, **negative)
    np.testing.assert_array_equal(np.concatenate(list(streamed), axis=1), tokens)
    as_bool = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0, guidance_scale=3.0,
                             negative_prompt_ids=ids, negative_prompt_attention_mask=mask.astype(bool))
    np.testing.assert_array_equal(as_bool, tokens)
    sample = dict(max_new_tokens=NEW, eos_token_id=[], do_sample=True, temperature=1.5, seed=4, guidance_scale=2.0)
    rows = model.generate(**batch, **sample, num_return_sequences=2, **negative)
    np.testing.assert_array_equal(rows[::2], model.generate(**batch, **sample, **negative))
    unguided = model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0)
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, eos_token_id=[], pad_token_id=0,
                                                 **negative), unguided)
    for bad, message in ((dict(negative_prompt_ids=ids[:2]), r"negative_prompt_ids must be integer ids \[batch=3"),
                         (dict(negative_prompt_ids=ids + V),
                          rf"negative_prompt_ids must be token ids in \[0, {V}\); got {ids[0, 0] + V} at row 0, "
                          r"position 0"),
                         (dict(negative_prompt_ids=ids, negative_prompt_attention_mask=mask[:, ::-1]),
                          rf"attention_mask row 1 has a pad \(0\) at index {n - 2} after a token: .*left-padded"),
                         (dict(negative_prompt_ids=ids, negative_prompt_attention_mask=mask * 0),
                          r"attention_mask row 0 holds no token")):
        with pytest.raises(ValueError, match=message):
            model.generate(**batch, guidance_scale=3.0, **bad)


@pytest.mark.parametrize("family", ["mistral"], indirect=True)
def test_max_time_stops_as_hf(family):
    """max_time: a deadline already past when the first token is out stops every row after it, as HF's
    MaxTimeCriteria does (greedy, streamed, beam search: HF's hypotheses and scores); a distant one
    changes nothing. A call with max_time compiles its own decode program once: another value compiles
    nothing."""
    hf, model = family
    batch = tm.make_batch(hf.config, ROWS, seed=5)
    plain = model.generate(**batch, max_new_tokens=8, eos_token_id=[])
    first = model.generate(**batch, max_new_tokens=8, eos_token_id=[], max_time=0.0)
    np.testing.assert_array_equal(first, tm.hf_generate(hf, batch, 8, eos_token_id=[], max_time=0.0))
    assert (first[:, 0] == plain[:, 0]).all() and (first[:, 1:] == 0).all()
    compiled = compiled_programs()
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=8, eos_token_id=[], max_time=600.0), plain)
    assert compiled_programs() == compiled
    streamed = list(model.generate_stream(**batch, max_new_tokens=8, eos_token_id=[], max_time=0.0, chunk=3))
    assert len(streamed) == 1 and (streamed[0] == first[:, :1]).all()
    beams = dict(max_new_tokens=8, eos_token_id=[], num_beams=2, num_return_sequences=2, pad_token_id=7)
    with torch.no_grad():
        out = hf.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, do_sample=False, max_time=0.0,
                          output_scores=True, return_dict_in_generate=True, **beams)
    T = batch["input_ids"].shape[1]
    tokens, scores = model.generate(**batch, max_time=0.0, return_logprobs=True, **beams)
    np.testing.assert_array_equal(tokens, np.pad(out.sequences[:, T:].numpy(), ((0, 0), (0, 7)), constant_values=7))
    np.testing.assert_allclose(scores, out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
    for bad in (-1.0, "1", float("nan")):
        with pytest.raises(ValueError, match=r"max_time must be None or a number of seconds >= 0; got"):
            model.generate(**batch, max_new_tokens=8, max_time=bad)
    # a deadline a third as far as the fastest of three whole runs of a short prompt (decoding most of
    # the run; the first call compiles): the loop checks the clock as it goes (a check hoisted out of
    # the loop would stop it after the first token, or never)
    long = dict(input_ids=np.array([[5, 9, 12, 7]]), attention_mask=np.ones((1, 4), np.int64), max_new_tokens=200,
                eos_token_id=[], return_logprobs=True)
    whole, runs = model.generate(**long, max_time=600.0), []
    for _ in range(3):
        start = time.perf_counter()
        model.generate(**long, max_time=600.0)
        runs.append(time.perf_counter() - start)
    cut = model.generate(**long, max_time=min(runs) / 3)
    made = int((cut[1] != 0).sum())
    assert 1 < made < 200, (made, runs)
    np.testing.assert_array_equal(cut[0][:, :made], whole[0][:, :made])


def test_remove_invalid_values_equals_hf_processor():
    """remove_invalid_values inside `process_scores` turns nan and infinities into what HF's
    InfNanRemoveLogitsProcessor does, before the length decay and after the bans, as HF orders them.
    (Not on a banned +inf, where HF's -inf bias makes nan and so 0: ours bans it.)"""
    import jax
    from transformers.generation.logits_process import (ExponentialDecayLengthPenalty, InfNanRemoveLogitsProcessor,
                                                        NoBadWordsLogitsProcessor)
    V, T = 6, 3
    scores = np.array([[1.0, np.nan, np.inf, -np.inf, -2.0, 0.5], [np.nan, 3.0, np.inf, 2.0, -np.inf, -1.0]],
                      np.float32)
    prompt = np.array([[1, 2, 3], [0, 1, 1]])
    opts = generate.options(2, 8, 0, False, 1.0, 0, 1.0, 0, (4,), 0, prompt_ids=prompt, vocab_size=V,
                            bad_words_ids=[[5]], exponential_decay_length_penalty=(1, 1.2), remove_invalid_values=True)
    step = 3
    history = np.concatenate([opts["history"], np.zeros((2, 8), np.int32)], axis=1)
    ours = jax.jit(generate.process_scores)(scores, opts["seen"], history, step, opts)
    ids = torch.from_numpy(np.concatenate([prompt, np.zeros((2, step), np.int64)], axis=1))
    theirs = torch.from_numpy(scores)
    for processor in (NoBadWordsLogitsProcessor([[5]], eos_token_id=[4]), InfNanRemoveLogitsProcessor(),
                      ExponentialDecayLengthPenalty((1, 1.2), [4], T)):
        theirs = processor(ids, theirs)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)
    assert np.isfinite(np.asarray(ours)).all()


def test_sequence_bias_equals_hf_processor():
    """`generate.sequence_bias` against HF's SequenceBiasLogitsProcessor (and NoBadWords) on sequences of
    a 4-token vocabulary: entries of 1 to 4 tokens sharing last tokens (their biases add up), contexts
    shorter than a prefix, behind a prefix of -1s (no part of the sequence)."""
    import jax
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor
    V, rng = 4, np.random.default_rng(0)
    entries = {(2,): 1.5, (1, 2): -2.0, (3, 1, 2): 0.75, (0, 0, 1, 3): 4.0, (3, 3): -1.0, (0, 2): 0.5}
    tokens, prefixes, last, values = generate._sequence_biases(entries, "sequence_bias", V)
    bias = jax.jit(generate.sequence_bias)
    theirs_bias = SequenceBiasLogitsProcessor(sequence_bias={k: float(v) for k, v in entries.items()})
    bad_words = [[1, 3], [2, 0, 1], [0]]
    bad = generate._sequence_biases(generate.bad_words_entries(bad_words, (), V), "bad_words_ids", V)
    theirs_bad = NoBadWordsLogitsProcessor(bad_words)
    longer = 0
    for length in range(0, 9):
        for _ in range(12):
            seq = rng.integers(0, V, (2, length))
            history = np.concatenate([np.full((2, 3), -1), seq, rng.integers(0, V, (2, 4))], axis=1)
            scores = torch.from_numpy(rng.standard_normal((2, V)).astype(np.float32))
            expected = theirs_bias(torch.from_numpy(seq), scores).numpy() - scores.numpy()
            np.testing.assert_allclose(bias(history, 3 + length, tokens, prefixes, last, values), expected,
                                       atol=1e-6, err_msg=str(seq))
            ours_bad = bias(history, 3 + length, np.where(np.isneginf(bad[0]), -np.inf, 0.0), bad[1], bad[2],
                            np.full(bad[2].shape, -np.inf))
            np.testing.assert_array_equal(np.isneginf(ours_bad),
                                          np.isneginf(theirs_bad(torch.from_numpy(seq), scores).numpy()))
            longer += int((expected != tokens).any())
    assert longer > 30   # most cases matched a longer entry


def test_processors_and_lengths_from_generation_config_apply_as_hf(tmp_path):
    """The processors and lengths a generation_config.json sets apply where a call leaves them out
    (loading without a warning): max_new_tokens, else max_length (the prompt as given counted in), else
    our 32; greedy and beam output against HF's from_pretrained + generate with no settings at all.
    Errors name the argument and the value."""
    import json
    import warnings
    from transformers import LlavaNextForConditionalGeneration
    tm.save_checkpoint(tm.build_model("vicuna", seed=4), str(tmp_path))
    path = tmp_path / "generation_config.json"
    base = json.loads(path.read_text())
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    batch = tm.make_batch(hf.config, ROWS[:2], seed=9)
    T = batch["input_ids"].shape[1]
    args = {k: torch.from_numpy(v) for k, v in batch.items()}
    plain = tm.hf_generate(hf, batch, 12, eos_token_id=[])
    p = lambda row, step: int(plain[row, step])
    configs = [
        dict(max_new_tokens=12, suppress_tokens=[p(0, 1)], bad_words_ids=[[p(1, 2), p(1, 3)]],
             sequence_bias=[[[p(0, 4)], 2.0]], encoder_repetition_penalty=1.3, pad_token_id=0),
        dict(max_length=T + 9, min_length=T + 4, forced_eos_token_id=5, begin_suppress_tokens=[p(0, 0)],
             exponential_decay_length_penalty=[2, 1.5], eos_token_id=[p(0, 3), 11], renormalize_logits=True),
    ]
    for config in configs:
        path.write_text(json.dumps({**base, **config}))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = LlavaNext.from_pretrained(str(tmp_path))
        hf = LlavaNextForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
        for call in (dict(), dict(num_beams=2)):
            with torch.no_grad():
                ref = hf.generate(**args, **call)[:, T:].numpy()
            ours = model.generate(**batch, **call)
            assert ours.shape == (2, config.get("max_new_tokens", 9)), ours.shape
            np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref, err_msg=f"{config} {call}")
            assert call or (ref != plain[:, :ref.shape[1]]).any()
    # a call's max_new_tokens wins; a max_length that leaves no new token is refused, as HF's refuses it
    assert model.generate(**batch, max_new_tokens=3).shape == (2, 3)
    assert model.generate(**batch, max_length=T + 2).shape == (2, 2)
    model = LlavaNext(model.config, model.params, base)     # neither max_new_tokens nor max_length
    assert model.generation_inputs(**batch)["options"]["max_new_tokens"] == 32   # ours: 32, HF's 20
    errors = [
        (dict(max_length=T), rf"max_length={T} counts the prompt's {T} tokens"),
        (dict(max_length=2.5), r"max_length must be an int .* got 2.5"),
        (dict(suppress_tokens=5), r"suppress_tokens must be a list of token ids; got 5"),
        (dict(suppress_tokens=[3, 160]), r"suppress_tokens must be token ids in \[0, 160\); got 160 in \[3, 160\]"),
        (dict(begin_suppress_tokens=["a"]), r"begin_suppress_tokens must be a list of token ids; got \['a'\]"),
        (dict(forced_eos_token_id=-1), r"forced_eos_token_id must be token ids in \[0, 160\); got -1"),
        (dict(forced_eos_token_id=[4], suppress_tokens=[4, 5]),
         r"every forced_eos_token_id \(\[4\]\) is in suppress_tokens"),
        (dict(bad_words_ids=[3, 4]),
         r"bad_words_ids must be a non-empty list of token id lists \(None: off\); got \[3, 4\]"),
        (dict(bad_words_ids=[[3], []]), r"bad_words_ids' token id lists must not be empty"),
        (dict(bad_words_ids=[[3, 200]]), r"bad_words_ids must be token ids in \[0, 160\); got 200"),
        (dict(bad_words_ids=[[1, i] for i in range(65)]),
         r"bad_words_ids holds 65 sequences of 2 or more tokens; at most 64"),
        (dict(sequence_bias={(1,) * 17: -1.0}), r"sequence_bias entries are at most 16 tokens long .* got 17"),
        (dict(sequence_bias={"(1, 2)": 1.0}), r"sequence_bias must be a dict \{tuple of token ids: bias\} .* keys"),
        (dict(sequence_bias=[[[1, 2], "x"]]), r"sequence_bias' biases must be numbers; got 'x' for \[1, 2\]"),
        (dict(sequence_bias={(1, 999): 1.0}), r"sequence_bias must be token ids in \[0, 160\); got 999"),
        (dict(min_length=-1), r"min_length must be an int >= 0 .* got -1"),
        (dict(exponential_decay_length_penalty=(1.5, 2.0)),
         r"exponential_decay_length_penalty must be \(start_index: int, decay_factor: number\); got \(1.5, 2.0\)"),
        (dict(encoder_repetition_penalty=0.0), r"encoder_repetition_penalty must be a number > 0 \(1.0: off\); got 0"),
        (dict(renormalize_logits="yes"), r"renormalize_logits must be True or False; got 'yes'"),
        (dict(remove_invalid_values=1.0), r"remove_invalid_values must be True or False; got 1.0"),
        (dict(encoder_no_repeat_ngram_size=17), r"encoder_no_repeat_ngram_size must be an int in \[0, 16\] "
                                                r"\(0: off\); got 17"),
        (dict(forced_bos_token_id=[1]), r"forced_bos_token_id must be an int; got \[1\]"),
        (dict(forced_bos_token_id=160), r"forced_bos_token_id must be token ids in \[0, 160\); got 160"),
    ]
    for kw, message in errors:
        with pytest.raises(ValueError, match=message):
            model.generation_inputs(**batch, **kw)
