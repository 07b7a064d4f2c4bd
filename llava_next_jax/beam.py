"""Beam search: HF's `generate(num_beams=K)` as one compiled `lax.while_loop` over a static-shape cache.

Each prompt is prefilled once and its cache rows repeated K times (row b*K + k is beam k of prompt b).
A step, as HF's vectorized beam search takes it: every beam's log-softmax (then HF's logits processors
on those log-probabilities, `generate.process_scores`, and with renormalize_logits a log-softmax again),
plus its running score; the best `kept` of the K*V continuations of each prompt; the best K of them that
did not just stop run on, and those of the first K that stopped (a stop id, a stop string their text,
prompt included, now ends with, or max_new_tokens: HF's stopping criteria) join the finished hypotheses
if they score higher (score / length**length_penalty). The loop ends when no prompt can improve (HF's
`early_stopping` heuristics), or at max_new_tokens.

With do_sample (and temperature > 0), HF's beam sampling: HF's warpers (`generate.warp`, keeping at
least HF's min_tokens_to_keep = stop ids + 1, 2 without any, tokens a beam) after the processors and
before the renormalization, and the `kept` continuations are HF's beams_to_keep = that * K drawn
without replacement from the softmax of the accumulated scores (Gumbel-top-k, keyed by the prompt
row's `generate.row_key` and the step), sorted by score; the draws past beams_to_keep are marked
undrawn and never run on ahead of a drawn one. Greedy, the step is unchanged.

The beams of a prompt share its prompt slots, which are equal in all K cache rows, so reordering the
cache after a step gathers only the new-token slots [T, T+N) (N slots, not the whole cache).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from . import xla_cpu
from .config import LlavaNextConfig
from .generate import (EARLY_STOPPING, MAX_STOP_IDS, decode_step, is_stop, past_deadline, prefill_program,
                       process_scores, row_key, stop_string_hits, warp)

NEG = -1.0e9   # HF's score for "never": added, not set, so a hypothesis keeps its order among its kind


def _gather(a: jax.Array, index: jax.Array) -> jax.Array:
    """`a` `[B, M, ...]` at `index` `[B, J]` along axis 1: `[B, J, ...]`."""
    return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def _reorder_new_slots(cache, rows: jax.Array, first_new: int):
    """Each layer's keys/values `[B*K, kv, H, S]` with slots [first_new, S) taken from `rows` `[B*K]`."""
    def take(a):
        new = jnp.take(a[..., first_new:], rows, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(a, new, first_new, axis=3)
    return jax.tree.map(take, cache)


def beam_loop(params, config: LlavaNextConfig, logits, cache, kv_valid, options: dict[str, jax.Array], dtype,
              new_bucket: int, num_beams: int, timed: bool = False):
    """Beam search from the prefill's last-slot logits `[B, V]` and cache (B rows, T + new_bucket
    slots). Returns (tokens `[B, K, new_bucket]`, scores `[B, K]`): the K finished hypotheses of each
    prompt, best first, pad after a stop id; a score is HF's `sequences_scores` (sum of the tokens'
    processed log-probabilities / length**length_penalty). timed: once the options' max_time deadline
    has passed (`past_deadline`), every candidate of the step ends as at max_new_tokens (HF's
    MaxTimeCriteria among its stopping criteria)."""
    B, V = logits.shape
    K, N = num_beams, new_bucket
    T = kv_valid.shape[1] - N
    kept = min((1 + MAX_STOP_IDS) * K, K * V)   # HF keeps (1 + stop ids) * K: enough that K can run on
    sampling = options["do_sample"] & (options["temperature"] > 0)
    # HF's beam sampling: its warpers keep min_tokens_to_keep = stop ids + 1 (2 without any) tokens a beam,
    # and it draws beams_to_keep = that * K continuations without replacement
    min_keep = jnp.maximum((options["stop_ids"] >= 0).sum(), 1) + 1
    draws = min_keep * K
    row_keys = jax.vmap(row_key)(options["seeds"], options["row_streams"], options["samples"])   # a prompt's own
    beam_rows = lambda tree: jax.tree.map(lambda a: jnp.repeat(a, K, axis=0), tree)
    cache, kv_valid, logits, history, seen = (beam_rows(a) for a in (cache, kv_valid, logits, options["history"],
                                                                        options["seen"]))
    options = {**options, "prompt_tokens": beam_rows(options["prompt_tokens"])}
    next_position = jnp.sum(kv_valid[:, :T], axis=1).astype(jnp.int32)
    stop_ids, max_new = options["stop_ids"], options["max_new_tokens"]
    penalty = options["length_penalty"]
    stop_when_full = options["early_stopping"] == EARLY_STOPPING[True]    # stop once K hypotheses finished
    never = options["early_stopping"] == EARLY_STOPPING["never"]         # judge improvement at max length
    pad = jnp.full((B, K, N), options["pad_id"], jnp.int32)
    state = {"step": jnp.int32(0), "running": pad, "running_scores": jnp.zeros((B, K)).at[:, 1:].set(NEG),
             "finished": pad, "scores": jnp.full((B, K), NEG), "is_finished": jnp.zeros((B, K), bool),
             "improvable": jnp.ones((B,), bool), "all_stopped": jnp.bool_(False), "logits": logits, "seen": seen}

    def cond(carry):
        s, _ = carry
        return ((s["step"] < max_new) & s["improvable"].any() & ~(s["is_finished"].all() & stop_when_full)
                & ~s["all_stopped"])

    def body(carry):
        s, cache = carry
        step = s["step"]
        logp = process_scores(jax.nn.log_softmax(s["logits"], axis=-1), s["seen"],
                              jnp.concatenate([history, s["running"].reshape(B * K, N)], axis=1), step, options)
        # sampling: HF's warpers after the processors, before the renormalization
        logp = jax.lax.cond(sampling, lambda logp: warp(logp, options, min_keep), lambda logp: logp, logp)
        # renormalize_logits: HF's LogitNormalization, last: the processed log-probabilities made whole again
        logp = jnp.where(options["renormalize"], jax.nn.log_softmax(logp, axis=-1), logp)
        total = (logp.reshape(B, K, V) + s["running_scores"][:, :, None]).reshape(B, K * V)

        def best(total):
            return (*jax.lax.top_k(total, kept), jnp.ones((B, kept), bool))

        def sample(total):
            """HF's torch.multinomial(softmax(total), beams_to_keep) without replacement, as the Gumbel-top-k
            trick draws it (the first `draws` of the noisy top `kept`; the rest, marked undrawn, can never
            run on ahead of a drawn one), sorted by score as HF sorts them."""
            keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
            noise = jax.vmap(lambda key: jax.random.gumbel(key, (K * V,), jnp.float32))(keys)
            _, index = jax.lax.top_k(total + noise, kept)
            drawn = jnp.broadcast_to(jnp.arange(kept) < draws, (B, kept))
            scores = jnp.take_along_axis(total, index, axis=1)
            _, order = jax.lax.top_k(jnp.where(drawn, scores, -jnp.inf), kept)   # ties: the drawn first
            return _gather(scores, order), _gather(index, order), _gather(drawn, order)

        cand_scores, index, drawn = jax.lax.cond(sampling, sample, best, total)
        parent, token = index // V, (index % V).astype(jnp.int32)
        cand = _gather(s["running"], parent).at[:, :, step].set(token)
        prompts = jnp.broadcast_to(options["history"][:, None], (B, kept, options["history"].shape[1]))
        texts = jnp.concatenate([prompts, cand], axis=2).reshape(B * kept, -1)
        ends_text = stop_string_hits(texts, prompts.shape[2] + step + 1, options).reshape(B, kept)
        stopped = is_stop(token, stop_ids) | ends_text | (step + 1 >= max_new)
        if timed:
            stopped |= past_deadline(options)

        # the best K that did not stop run on
        running_scores, pick = jax.lax.top_k(cand_scores + stopped * NEG + jnp.where(drawn, 0.0, 4 * NEG), K)
        running, parent = _gather(cand, pick), _gather(parent, pick)

        # those of the first K that stopped join the finished hypotheses, if they score higher
        fresh = stopped & (jnp.arange(kept) < K)
        final = cand_scores / ((step + 1).astype(jnp.float32) ** penalty)
        final += (s["is_finished"].all(-1, keepdims=True) & stop_when_full) * NEG
        final += ~s["improvable"][:, None] * NEG
        final += ~fresh * NEG
        scores, best = jax.lax.top_k(jnp.concatenate([s["scores"], final], axis=1), K)
        finished = _gather(jnp.concatenate([s["finished"], cand], axis=1), best)
        is_finished = _gather(jnp.concatenate([s["is_finished"], fresh], axis=1), best)

        # could a running beam still beat the worst finished one? (HF's heuristic, lengths as it takes them)
        length = jnp.where(never & (penalty > 0), max_new, step + 1).astype(jnp.float32)
        worst = jnp.where(is_finished, scores.min(-1, keepdims=True), NEG)
        improvable = s["improvable"] & (running_scores[:, :1] / length ** penalty > worst).any(-1)

        rows = (jnp.arange(B)[:, None] * K + parent).reshape(B * K)
        tokens = running[:, :, step].reshape(B * K)
        cache = _reorder_new_slots(cache, rows, T)
        seen = s["seen"][rows].at[jnp.arange(B * K), tokens].set(True)
        logits, cache = decode_step(params, config, tokens, next_position + step, T + step, kv_valid, cache, dtype)
        return {"step": step + 1, "running": running, "running_scores": running_scores, "finished": finished,
                "scores": scores, "is_finished": is_finished, "improvable": improvable,
                "all_stopped": stopped.all(), "logits": logits, "seen": seen}, cache

    state, _ = jax.lax.while_loop(cond, body, (state, cache))
    return state["finished"], state["scores"]


@partial(xla_cpu.jit, cpu_options=xla_cpu.DECODE,
         static_argnames=("config", "dtype", "new_bucket", "num_beams", "timed"))
def beam_program(params, config: LlavaNextConfig, logits, cache, kv_valid, options: dict[str, jax.Array], dtype,
                 new_bucket: int, num_beams: int, timed: bool = False):
    """`beam_loop`, compiled: one program per (batch size, prompt bucket, new-token bucket, num_beams);
    every option (length_penalty and early_stopping too) is traced."""
    return beam_loop(params, config, logits, cache, kv_valid, options, dtype, new_bucket, num_beams, timed)


def beam_tokens(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask,
                options: dict[str, jax.Array], dtype, new_bucket: int, num_beams: int, timed: bool = False):
    """Prefill then beam search: (tokens `[B, num_beams, new_bucket]`, scores `[B, num_beams]`), best first."""
    logits, cache, kv_valid = prefill_program(params, config, input_ids, pixel_values, sources, attention_mask,
                                              dtype, input_ids.shape[1] + new_bucket)
    return beam_program(params, config, logits, cache, kv_valid, options, dtype, new_bucket, num_beams, timed)
