"""Prefill + decode with a static KV cache: two compiled programs per shape bucket.

Layout of a batch in the cache, for a prompt bucket of T slots and a new-token bucket of N:

    slot:    0   1   2   3   4 | 5   6   7 ...            (T = 5, N = 8: S = 13 slots)
    row 0:   pad pad  a   b   c | x0  x1  x2 ...
    row 1:    d   e   f   g   h | y0  y1  y2 ...

Prompts are left-padded so every row's last prompt token sits in slot T-1 and new token i of every
row goes to slot T+i: one scalar write index for the whole batch. RoPE positions ignore pads
(`cumsum(mask) - 1`), so a row's numbers do not depend on how much padding it got, and the prompt
bucket only changes which slots are masked. `kv_valid [B, S]` is the prompt's attention mask
followed by ones; causality (`slot <= query slot`) hides slots not written yet.

The decode loop is one `lax.while_loop`: it runs while `step < max_new_tokens and not all(done)`,
with no Python between tokens; the cache moves from the prefill program to the decode program
donated, so it is never copied.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from .checks import is_int, is_positive_int
from .config import LlavaNextConfig
from . import xla_cpu
from .modeling import decoder, llava_next
from .stop_strings import MAX_STOP_STRING_LENGTH, no_stop_strings

# Prompt lengths round up to these: fine steps where image prompts live (1-3k tokens), so padding
# wastes at most ~5% of the prefill; each bucket used costs one compile.
PROMPT_BUCKETS = (64, 128, 256, 384) + tuple(range(512, 4097, 128)) + tuple(range(4608, 8193, 512))
NEW_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
MAX_STOP_IDS = 8
MAX_NGRAM = 16   # the largest no_repeat_ngram_size (a runtime value up to this: it compiles nothing)
MAX_LOOKUP = 32          # the largest prompt_lookup_num_tokens (each value compiles its own decode loop)
MAX_LOOKUP_NGRAM = 8     # the largest max_matching_ngram_size (a runtime value: it compiles nothing)
LOOKUP_MISSES = 3        # prompt lookup's drafted passes in a row that keep no draft before it pauses
LOOKUP_PAUSE = 16        # the most passes such a pause lasts (`decode_loop`)
MAX_BIAS_SEQUENCES = 64  # the most entries of 2+ tokens in sequence_bias, and in bad_words_ids (single ids: any)
MAX_BIAS_LENGTH = 16     # the longest such entry (runtime values within both: they compile nothing)
EARLY_STOPPING = {False: 0, True: 1, "never": 2}   # beam search's early_stopping, as a traced int


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """Smallest bucket >= n; past the last, continue in steps of the last gap."""
    for b in buckets:
        if n <= b:
            return b
    step = buckets[-1] - buckets[-2]
    return buckets[-1] + -(-(n - buckets[-1]) // step) * step


# --- sampling ------------------------------------------------------------------------------------

def _ordered_bits(logits: jax.Array) -> jax.Array:
    """uint32 keys in the order of the float32 logits (-inf lowest): flipped sign bit for positives,
    all bits flipped for negatives. A value threshold found bit by bit over these keys (32 masked
    passes over the vocabulary) replaces a sort, which XLA:CPU takes ~7 ms a row over 32k logits for."""
    logits = jnp.where(logits == 0, 0.0, logits.astype(jnp.float32))      # -0.0 as +0.0: equal values, one key
    bits = jax.lax.bitcast_convert_type(logits, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_key(keys: jax.Array, fits) -> jax.Array:
    """Per row, the largest uint32 t with fits(t `[B, 1]`) true (`fits` true for small t, false past some
    t; 0 where it holds nowhere), built from the top bit down. `[B, 1]`."""
    def bit(i, t):
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(fits(candidate), candidate, t)
    return jax.lax.fori_loop(0, 32, bit, jnp.zeros((keys.shape[0], 1), jnp.uint32))


def _kth_largest_key(keys: jax.Array, k) -> jax.Array:
    """Per row, the k-th largest of `keys` `[B, V]` (ties counted): the largest t with k keys >= t. `[B, 1]`."""
    return _largest_key(keys, lambda t: (keys >= t).sum(axis=-1, keepdims=True) >= k)


def _top_k_filter(logits: jax.Array, top_k: jax.Array) -> jax.Array:
    """Keeps logits >= the k-th largest (ties kept, as the reference does); k <= 0 keeps all. `[B, V]`."""
    def kept(logits):
        keys = _ordered_bits(logits)
        return jnp.where(keys < _kth_largest_key(keys, top_k), -jnp.inf, logits)
    return jax.lax.cond(top_k > 0, kept, lambda logits: logits, logits)


def _top_p_filter(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """Drops the least likely tokens whose total probability is <= 1 - top_p; the top token always stays:
    those whose probability summed with that of every token below them is <= 1 - top_p. Tokens of
    equal logits stay or go together (HF's sort order splits such a group at the boundary by position)."""
    def kept(logits):
        keys, probs = _ordered_bits(logits), jax.nn.softmax(logits, axis=-1)
        below = lambda t: jnp.where(keys <= t, probs, 0).sum(axis=-1, keepdims=True)
        limit = _largest_key(keys, lambda t: below(t) <= 1 - top_p)
        remove = (keys <= limit) & (below(limit) <= 1 - top_p) & (keys < keys.max(axis=-1, keepdims=True))
        return jnp.where(remove, -jnp.inf, logits)
    return jax.lax.cond(top_p < 1.0, kept, lambda logits: logits, logits)


def _min_p_filter(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """HF's MinPLogitsWarper: drops the tokens whose probability is below min_p times the top token's
    (which always stays); 0 keeps all. `[B, V]`."""
    def kept(logits):
        probs = jax.nn.softmax(logits, axis=-1)
        return jnp.where(probs < min_p * probs.max(axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.lax.cond(min_p > 0, kept, lambda logits: logits, logits)


def _typical_filter(logits: jax.Array, mass: jax.Array, min_keep=None) -> jax.Array:
    """HF's TypicalLogitsWarper (typical_p): ranks tokens by |-log p - entropy| (most typical first) and
    keeps those ranked up to and including the one where the probability summed in that order first
    reaches `mass` (all where it never does); 1.0 keeps all. Tokens of equal rank stay or go together,
    as HF's threshold on the rank value keeps them. min_keep (HF's min_tokens_to_keep; None: 1): the
    min_keep most typical tokens stay too (ties of the last of them kept). `[B, V]`."""
    def kept(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        probs = jnp.exp(logp)
        entropy = -jnp.where(probs > 0, probs * logp, 0).sum(axis=-1, keepdims=True)
        keys = _ordered_bits(jnp.abs(-logp - entropy))          # -inf logits: +inf, ranked last
        limit = _largest_key(keys, lambda t: jnp.where(keys < t, probs, 0).sum(axis=-1, keepdims=True) < mass)
        if min_keep is not None:   # the min_keep-th smallest key: the largest t with fewer than min_keep below it
            limit = jnp.maximum(limit, _largest_key(keys, lambda t: (keys < t).sum(axis=-1, keepdims=True) < min_keep))
        return jnp.where(keys > limit, -jnp.inf, logits)
    return jax.lax.cond(mass < 1.0, kept, lambda logits: logits, logits)


def _below_cutoff(logits: jax.Array, cutoff) -> jax.Array:
    """HF's epsilon and eta warpers' removal: probability below `cutoff` `[B, 1]`, the top token (ties
    too) kept. `[B, V]`."""
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where((probs < cutoff) & (logits < logits.max(axis=-1, keepdims=True)), -jnp.inf, logits)


def _epsilon_filter(logits: jax.Array, epsilon: jax.Array) -> jax.Array:
    """HF's EpsilonLogitsWarper (epsilon_cutoff): drops tokens of probability < epsilon but the top one;
    0 keeps all. `[B, V]`."""
    return jax.lax.cond(epsilon > 0, _below_cutoff, lambda logits, _: logits, logits, epsilon)


def _eta_filter(logits: jax.Array, epsilon: jax.Array) -> jax.Array:
    """HF's EtaLogitsWarper (eta_cutoff): drops tokens of probability < min(epsilon, sqrt(epsilon) *
    exp(-entropy)) but the top one; 0 keeps all. `[B, V]`."""
    def kept(logits):
        logp = jax.nn.log_softmax(logits, axis=-1)
        entropy = -jnp.where(logp > -jnp.inf, jnp.exp(logp) * logp, 0).sum(axis=-1, keepdims=True)
        return _below_cutoff(logits, jnp.minimum(epsilon, jnp.sqrt(epsilon) * jnp.exp(-entropy)))
    return jax.lax.cond(epsilon > 0, kept, lambda logits: logits, logits)


TOP_H_CANDIDATES = 100   # HF's TopHLogitsWarper looks at the 100 most likely tokens


def _top_h_filter(logits: jax.Array, top_h: jax.Array) -> jax.Array:
    """HF's TopHLogitsWarper: over the TOP_H_CANDIDATES most likely tokens (ties of the last kept) and
    their renormalized distribution of entropy H, keeps the most likely ones while their terms -p log p,
    summed from the top down, stay <= top_h * H (the top token always); 0 keeps all. Tokens of equal
    logits stay or go together: a tie group at the boundary stays whole where HF, going by position,
    keeps its first members. `[B, V]`."""
    def kept(logits):
        top = _top_k_filter(logits, jnp.int32(TOP_H_CANDIDATES))
        logp = jax.nn.log_softmax(top, axis=-1)
        terms = -jnp.where(top > -jnp.inf, jnp.exp(logp) * logp, 0)
        tau = top_h * terms.sum(axis=-1, keepdims=True)
        keys = _ordered_bits(top)
        from_top = lambda t: jnp.where(keys >= t, terms, 0).sum(axis=-1, keepdims=True)
        limit = _largest_key(keys, lambda t: from_top(t) > tau)     # the group whose terms pass tau
        above = jnp.where(keys > limit, terms, 0).sum(axis=-1, keepdims=True)
        first = jnp.where(keys == limit, terms, 0).max(axis=-1, keepdims=True)   # one of that group's terms
        keep = (keys > limit) | ((keys == limit) & (above + first <= tau)) | (keys == keys.max(axis=-1, keepdims=True))
        return jnp.where(keep & (top > -jnp.inf), logits, -jnp.inf)
    return jax.lax.cond(top_h > 0, kept, lambda logits: logits, logits)


def warp(logits: jax.Array, options: dict[str, jax.Array], min_keep=None) -> jax.Array:
    """HF's sampling warpers on float32 logits `[B, V]`, in the order HF's `_get_logits_processor` applies
    them: temperature, top_h, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff (each a traced
    option; at its off value a `lax.cond` skips it). Removed tokens are -inf.

    min_keep (HF's min_tokens_to_keep, which beam sampling sets to the stop ids' count + 1, at least 2;
    None: 1, sampling's): top_k, top_p, min_p, epsilon_cutoff and eta_cutoff leave the min_keep most
    likely tokens (after top_h, which HF gives no minimum; ties of the last of them kept, where HF's
    top_p and min_p keep exactly min_keep by sort position), typical_p its min_keep most typical."""
    logits = _top_h_filter(logits / jnp.maximum(options["temperature"], 1e-6), options["top_h"])
    if min_keep is None:
        guard = lambda logits, filtered: filtered
    else:   # the filters below only remove, so the top min_keep now stay the top: each leaves them
        keys = _ordered_bits(logits)
        protect = keys >= _kth_largest_key(keys, min_keep)
        guard = lambda logits, filtered: jnp.where(protect, logits, filtered)
    logits = guard(logits, _top_k_filter(logits, options["top_k"]))
    logits = guard(logits, _top_p_filter(logits, options["top_p"]))
    logits = guard(logits, _min_p_filter(logits, options["min_p"]))
    logits = _typical_filter(logits, options["typical_p"], min_keep)   # its own min_keep: the most typical
    logits = guard(logits, _epsilon_filter(logits, options["epsilon_cutoff"]))
    return guard(logits, _eta_filter(logits, options["eta_cutoff"]))


# The values HF's warper classes take (min_p and top_h also None: off), and their intervals.
WARPER_RANGES = {"min_p": (lambda v: 0 <= v <= 1, "[0, 1]"), "top_h": (lambda v: 0 < v <= 1, "(0, 1]"),
                 "typical_p": (lambda v: 0 < v <= 1, "(0, 1] (1.0: off)"),
                 "epsilon_cutoff": (lambda v: 0 <= v < 1, "[0, 1) (0.0: off)"),
                 "eta_cutoff": (lambda v: 0 <= v < 1, "[0, 1) (0.0: off)")}
# Each warper's setting that changes nothing, as `warp` takes it (top_h, min_p: HF's None).
NO_WARP = dict(temperature=1.0, top_h=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0,
               eta_cutoff=0.0)


def select_tokens(logits: jax.Array, keys: jax.Array, options: dict[str, jax.Array]):
    """(next tokens `[B]` int32, their log-probabilities `[B]` float32) from float32 logits `[B, V]`:
    argmax, or `warp` then sample where options["do_sample"] (and temperature > 0). A log-probability
    is under the distribution the token was chosen from (the warped one when sampling), as HF's
    `compute_transition_scores(..., normalize_logits=True)` gives it."""
    def chosen(logits, tokens):
        return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]

    def sample(logits):
        logits = warp(logits, options)
        tokens = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
        return tokens, chosen(logits, tokens)

    def greedy(logits):
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, chosen(logits, tokens)

    return jax.lax.cond(options["do_sample"] & (options["temperature"] > 0), sample, greedy, logits)


# --- prefill and decode --------------------------------------------------------------------------

@decoder.full_float32
def prefill(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask, cache, dtype):
    """Runs the prompt `[B, T]` through the model, filling cache slots [0, T).

    Returns (logits of the last slot `[B, V]` float32, cache, kv_valid `[B, S]`).
    """
    B, T = input_ids.shape
    S = cache[0][1].shape[-1]
    x = llava_next.embed_inputs(params, config, input_ids, pixel_values, sources, dtype)
    kv_valid = jnp.concatenate([attention_mask.astype(bool), jnp.ones((B, S - T), bool)], axis=1)
    q_index = jnp.broadcast_to(jnp.arange(T), (B, T))
    kv_index = jnp.arange(S)
    mask = decoder.attention_mask(q_index, kv_index, kv_valid)
    hidden, cache = decoder.decode_hidden(params["language_model"], config.text, x,
                                          llava_next.positions_from_mask(attention_mask), mask, q_index, kv_index,
                                          cache, 0, dtype, last_only=True)
    return decoder.lm_logits(params, hidden, config.tie_word_embeddings)[:, 0], cache, kv_valid


@decoder.full_float32
def decode_tokens(params, config: LlavaNextConfig, tokens, positions, slot, kv_valid, cache, dtype):
    """n new tokens per row: tokens, positions `[B, n]`, written at cache slots [slot, slot + n), each
    seeing the cache before `slot` and the new tokens up to itself. Returns (logits `[B, n, V]`, cache)."""
    B, n = tokens.shape
    x = decoder.embed_tokens(params["language_model"]["embed_tokens"]["embedding"], tokens, dtype)
    q_index = jnp.broadcast_to(slot + jnp.arange(n), (B, n))
    kv_index = jnp.arange(kv_valid.shape[1])
    mask = decoder.attention_mask(q_index, kv_index, kv_valid)
    hidden, cache = decoder.decode_hidden(params["language_model"], config.text, x, positions, mask,
                                          q_index, kv_index, cache, slot, dtype)
    return decoder.lm_logits(params, hidden, config.tie_word_embeddings), cache


def decode_step(params, config: LlavaNextConfig, tokens, positions, slot, kv_valid, cache, dtype):
    """One new token per row: tokens, positions `[B]`, written at cache `slot`. Returns (logits `[B, V]`, cache)."""
    logits, cache = decode_tokens(params, config, tokens[:, None], positions[:, None], slot, kv_valid, cache, dtype)
    return logits[:, 0], cache


@partial(xla_cpu.jit, static_argnames=("config", "dtype", "cache_length", "samples"))
def prefill_program(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask, dtype,
                    cache_length: int, samples: int = 1):
    """The compiled prefill: a fresh cache of `cache_length` slots, filled with the prompt.

    Returns (last-slot logits `[B * samples, V]`, cache, kv_valid `[B * samples, S]`): each prompt's
    rows repeated `samples` times (HF's num_return_sequences, rows b * samples + j), after one prefill.
    """
    cache = decoder.init_cache(config.text, input_ids.shape[0], cache_length, dtype)
    out = prefill(params, config, input_ids, pixel_values, sources, attention_mask, cache, dtype)
    return out if samples == 1 else jax.tree.map(lambda a: jnp.repeat(a, samples, axis=0), out)


def start_state(logits, options: dict[str, jax.Array], new_bucket: int, guide=None) -> dict[str, jax.Array]:
    """The decode loop's state before its first step: step 0, no tokens yet (all pad, log-probabilities
    0), the prefill's last-slot logits `[B, V]`, no row done, the prompts' tokens seen, no pass of the
    model yet; and prompt lookup's counts (`decode_loop`): passes that checked drafts, drafted passes
    in a row that kept none, passes left before drafting again. guide: classifier-free guidance's
    unconditional logits `[B, V]` (`unconditional_prefill`), or None."""
    B = logits.shape[0]
    state = {"step": jnp.int32(0), "tokens": jnp.full((B, new_bucket), options["pad_id"], jnp.int32),
             "logprobs": jnp.zeros((B, new_bucket), jnp.float32), "logits": logits, "done": jnp.zeros((B,), bool),
             "seen": jnp.asarray(options["seen"], bool), "passes": jnp.int32(0), "checked": jnp.int32(0),
             "misses": jnp.int32(0), "pause": jnp.int32(0)}
    return state if guide is None else {**state, "guide_logits": guide}


def guided_scores(logits: jax.Array, unconditional: jax.Array, scale) -> jax.Array:
    """HF's classifier-free guidance (UnbatchedClassifierFreeGuidanceLogitsProcessor, the first of its
    processors): `scale * (log_softmax(logits) - log_softmax(unconditional)) + log_softmax(unconditional)`,
    the unconditional logits those of `unconditional_prefill`'s sequence."""
    conditional, unconditional = jax.nn.log_softmax(logits, axis=-1), jax.nn.log_softmax(unconditional, axis=-1)
    return scale * (conditional - unconditional) + unconditional


@partial(xla_cpu.jit, static_argnames=("config", "dtype"))
def unconditional_prefill(params, config: LlavaNextConfig, input_ids, cache, kv_valid, dtype, negative=None):
    """Classifier-free guidance's unconditional sequence as HF's processor starts it: each prompt's last
    token alone (left-padded prompts `[B, T]`: the last column), no image, at position 0, or, given
    `negative` (HF's negative_prompt_ids: ids and mask `[B, n]`, n <= T, left-padded), that prompt; each
    new token then follows it. (HF positions a negative prompt's tokens by their index, pads counted,
    ours by the mask: RoPE sees only their distances, so the logits are the same.) Each such sequence
    takes the row after its prompt's in the prefilled `cache`, so one pass of the model steps both (the
    weights read once a step, `decode_loop`): its keys and values in the prompt's last n slots, the
    slots before them and its pads invalid, the new tokens' slots shared (slots as far apart as HF's
    positions, so sliding windows hold as there). The cache's rows may repeat each prompt
    (`prefill_program`'s samples), the unconditional rows then too.

    Returns (unconditional logits `[R, V]`, cache of 2R rows: row 2r the cache's row r, 2r + 1 its
    unconditional sequence; their kv_valid `[2R, S]`), R the cache's rows."""
    B, T = input_ids.shape
    R, S = kv_valid.shape
    if negative is None:
        negative = {"ids": input_ids[:, -1:], "mask": jnp.ones((B, 1), jnp.int32)}
    n = negative["ids"].shape[1]
    logits, alone, _ = prefill(params, config, negative["ids"], None, None, negative["mask"],
                               decoder.init_cache(config.text, B, n, dtype), dtype)
    seen = jnp.zeros((B, S), bool).at[:, T - n:T].set(negative["mask"].astype(bool)) | (jnp.arange(S) >= T)
    if R != B:   # the prompts' rows repeated (num_return_sequences)
        logits, alone, seen = jax.tree.map(lambda a: jnp.repeat(a, R // B, axis=0), (logits, alone, seen))

    def paired(rows, unconditional):   # [R, ...] and their unconditional sequences' -> [2R, ...]
        return jnp.stack([rows, unconditional], axis=1).reshape(2 * R, *rows.shape[1:])
    at_end = lambda one: jnp.zeros(one.shape[:-1] + (S,), one.dtype).at[..., T - n:T].set(one)
    cache = [(paired(k, at_end(k1)), paired(v, at_end(v1))) for (k, v), (k1, v1) in zip(cache, alone)]
    return logits, cache, paired(kv_valid, seen)


def penalize_repeats(logits: jax.Array, seen: jax.Array, penalty) -> jax.Array:
    """HF's repetition penalty: the logits of tokens already seen divided by `penalty` when positive,
    multiplied when negative (1.0 changes nothing). `[B, V]`."""
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def banned_ngrams(history: jax.Array, length, n, vocab_size: int, windows_end=None) -> jax.Array:
    """HF's `no_repeat_ngram_size`: bool `[B, vocab_size]`, True for the tokens that would complete an
    n-gram a row already holds (n <= 0: none).

    history `[B, S]`: each row's sequence (prompt as given, pads included, then the new tokens) ending
    at slot `length` (traced) after a prefix of -1s that is no part of it. A window of n slots whose
    first n-1 tokens equal the sequence's last n-1 bans its last token, as HF's processor does; n is
    traced (at most MAX_NGRAM), so the comparisons run for every k < MAX_NGRAM - 1 and those past n-1
    count as equal. windows_end: the windows end by that slot (default `length`): the prompt's end for
    HF's `encoder_no_repeat_ngram_size`, which bans the n-grams of the prompt alone.
    """
    B, S = history.shape
    padded = jnp.pad(history, ((0, 0), (0, MAX_NGRAM)), constant_values=-1)
    start = jnp.arange(S)
    end = length if windows_end is None else windows_end
    match = (n > 0) & (history >= 0) & (start + n <= end)       # whole window inside the sequence (prompt)
    for k in range(MAX_NGRAM - 1):
        suffix_token = jax.lax.dynamic_index_in_dim(history, length - n + 1 + k, axis=1, keepdims=False)
        match &= (k >= n - 1) | (padded[:, k:k + S] == suffix_token[:, None])
    last = jax.lax.dynamic_slice_in_dim(padded, jnp.maximum(n - 1, 0), S, axis=1)   # each window's last token
    banned = jnp.where(match, last, vocab_size)                   # no match: a column past the vocabulary
    return jnp.zeros((B, vocab_size), bool).at[jnp.arange(B)[:, None], banned].set(True, mode="drop")


def is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """Whether each token is one of `stop_ids` `[MAX_STOP_IDS]` (-1 = unused): bool, `tokens`' shape."""
    return (tokens[..., None] == stop_ids).any(-1)


def completed_sequences(history: jax.Array, length, prefixes: jax.Array) -> jax.Array:
    """Which sequences the next token may complete: bool `[B, M]`, True where the tokens of `history`
    `[B, S]` (as `banned_ngrams`' history: -1 before the sequence) just before slot `length` (traced)
    end with `prefixes[m]` `[M, MAX_BIAS_LENGTH - 1]` (right-aligned, -1 before a shorter prefix: any
    token, or none), as HF's `SequenceBiasLogitsProcessor` matches the end of its input_ids."""
    P = prefixes.shape[1]
    recent = jax.lax.dynamic_slice_in_dim(jnp.pad(history, ((0, 0), (P, 0)), constant_values=-1), length, P, axis=1)
    return ((prefixes[None] == recent[:, None]) | (prefixes[None] < 0)).all(axis=-1)


def sequence_bias(history: jax.Array, length, tokens: jax.Array, prefixes: jax.Array, last: jax.Array,
                  values: jax.Array) -> jax.Array:
    """HF's `SequenceBiasLogitsProcessor` bias `[B, V]`, to add to the scores: `tokens` `[V]` (the
    single-token entries' biases) plus, for each longer entry m whose prefix the sequence so far ends
    with (`completed_sequences`), values[m] at its last token last[m] (-1: no entry); several add up."""
    B, V = history.shape[0], tokens.shape[0]
    match = completed_sequences(history, length, prefixes)
    return tokens[None] + jnp.zeros((B, V), jnp.float32).at[:, jnp.where(last >= 0, last, V)].add(
        jnp.where(match, values, 0.0), mode="drop")


def stop_string_hits(sequence: jax.Array, length, options: dict[str, jax.Array]) -> jax.Array:
    """HF's StopStringCriteria: whether each row of `sequence` `[R, S]` (the prompt as given, then the
    new tokens; -1: no token), cut at slot `length` (traced), ends in one of the options' stop strings
    (`stop_strings.tables`). As HF, it looks back over the last `stop_string_window` tokens (the
    longest string's length), the prompt's included: the last token must begin with the end of a
    string, each token before it end where the part still unmatched ends, until the string is
    matched. Bitmasks of the counts matched so far (count v at bit v - 1) follow every way of ending
    at once. All False without stop strings (skipped). bool `[R]`."""
    W = MAX_STOP_STRING_LENGTH

    def hits(sequence):
        back = jax.lax.dynamic_slice_in_dim(jnp.pad(sequence, ((0, 0), (W, 0)), constant_values=-1), length, W,
                                            axis=1)[:, ::-1]                     # the last token first
        inside = (back >= 0) & (jnp.arange(W) < options["stop_string_window"])
        ids = jnp.where(inside, back, 0)
        ends = jnp.where(inside[..., None], options["stop_string_ends"][ids], 0)               # [R, W, strings]
        positions = jnp.where(inside[..., None], options["stop_string_positions"][ids], 0)
        sizes = options["stop_string_token_lengths"][ids].astype(jnp.int32)[..., None]         # [R, W, 1]
        L = options["stop_string_lengths"]                                                   # 0: no string
        shift = lambda n: jnp.clip(n, 0, 31).astype(jnp.uint32)
        unmatched = (jnp.uint32(1) << shift(L - 1)) - 1       # counts 1 .. L-1: the string not matched yet
        hit = (L > 0) & (((ends[:, 0] >> shift(L - 1)) & 1) == 1)   # the last token holds the whole string
        alive = ends[:, 0] & unmatched
        for j in range(1, W):
            n = sizes[:, j]
            alive &= positions[:, j]
            hit |= (alive >> shift(L - n - 1)) != 0        # counts that reach L with this token
            alive = jnp.where(n < L - 1, (alive << shift(n)) & unmatched, 0)
        return hit.any(-1)

    return jax.lax.cond(options["stop_string_window"] > 0, hits, lambda s: jnp.zeros(s.shape[:1], bool), sequence)


def process_scores(scores: jax.Array, seen: jax.Array, history: jax.Array, step, options: dict[str, jax.Array]):
    """HF's logits processors, in the order HF's `_get_logits_processor` applies them, on scores `[B, V]`
    (the logits, or beam search's log-probabilities) before step `step`, with `history` `[B, T + N]`
    the sequences so far (options' prompt history, then the new tokens; `banned_ngrams`):

    sequence_bias (added); encoder_repetition_penalty (HF passes a decoder-only model its prompt,
    pads included, as the "encoder" input: the prompt's tokens' logits multiplied by the penalty when
    positive, divided when negative); the repetition penalty over `seen`; the no-repeat n-gram ban;
    encoder_no_repeat_ngram_size (the n-grams of that prompt banned); bad_words_ids (-inf);
    min_new_tokens (stop ids banned while step < min_new_tokens: min_length as well, `options`);
    forced_bos_token_id (at step 0 of a one-token prompt, as HF's, every other token -inf, it 0);
    forced_eos_token_id (at the last step, every other token -inf, the forced ones 0);
    remove_invalid_values (nan to 0, +-inf to the float32 extremes); exponential_decay_length_penalty
    (a stop id's score plus |score| * (factor**k - 1), k steps past its start); suppress_tokens (-inf);
    begin_suppress_tokens (-inf at the first step: step 1 after a forced bos, as HF's).

    Not renormalize_logits (HF's LogitNormalization, a log-softmax after everything): it shifts a row's
    scores by one constant, which changes neither the greedy token, nor the sampled distribution (the
    warpers that follow cut by rank, probability or ratio), nor the log-probabilities we return (taken
    under the normalized distribution anyway); beam search, which adds the scores up, applies it (`beam`)."""
    V = scores.shape[-1]
    length = options["history"].shape[1] + step
    stop = is_stop(jnp.arange(V), options["stop_ids"])
    scores = scores + sequence_bias(history, length, options["bias_tokens"], options["bias_prefixes"],
                                    options["bias_last"], options["bias_values"])
    inverse = options["encoder_penalty"]      # HF's EncoderRepetitionPenaltyLogitsProcessor keeps 1 / penalty
    scores = jnp.where(options["prompt_tokens"], jnp.where(scores < 0, scores * inverse, scores / inverse), scores)
    scores = penalize_repeats(scores, seen, options["repetition_penalty"])
    repeat = banned_ngrams(history, length, options["no_repeat_ngram_size"], V) | banned_ngrams(
        history, length, options["encoder_ngram_size"], V, windows_end=options["history"].shape[1])
    bad = jnp.isneginf(sequence_bias(history, length, jnp.where(options["bad_tokens"], -jnp.inf, 0.0),
                                     options["bad_prefixes"], options["bad_last"],
                                     jnp.full(options["bad_last"].shape, -jnp.inf)))
    too_early = (step < options["min_new_tokens"]) & stop
    scores = jnp.where(repeat | bad | too_early, -jnp.inf, scores)
    for forced, at in ((options["forced_bos"], 0), (options["forced_eos"], options["max_new_tokens"] - 1)):
        scores = jnp.where((step == at) & forced.any(), jnp.where(forced, 0.0, -jnp.inf), scores)
    finite = jnp.finfo(scores.dtype)
    scores = jnp.where(options["remove_invalid"], jnp.nan_to_num(scores, nan=0.0, posinf=finite.max,
                                                                 neginf=finite.min), scores)
    decay = options["decay"][jnp.minimum(step, options["decay"].shape[0] - 1)]
    scores = jnp.where(stop & jnp.isfinite(scores), scores + jnp.abs(scores) * decay, scores)
    suppressed = options["suppress"] | (options["begin_suppress"] & (step == options["begin_suppress_step"]))
    return jnp.where(suppressed, -jnp.inf, scores)


def lookup_drafts(sequence: jax.Array, length, ngram, count: int) -> jax.Array:
    """Prompt-lookup drafts, found as HF's `PromptLookupCandidateGenerator` finds them: in each row of
    `sequence` `[B, S]` (the prompt then the new tokens; -1: no token) of `length` slots (traced), the
    longest n <= `ngram` (traced, at most MAX_LOOKUP_NGRAM) whose last n tokens occur earlier with at
    least one token after them, and at the earliest such place the up to `count` tokens that follow.
    Returns int32 `[B, count]`, -1 where a row has no draft token."""
    B, S = sequence.shape
    slots = jnp.arange(S)
    padded = jnp.pad(sequence, ((0, 0), (MAX_LOOKUP_NGRAM, 0)), constant_values=-1)
    agree, found, end = jnp.ones((B, S), bool), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32)
    for r in range(MAX_LOOKUP_NGRAM):       # windows of r + 1 tokens, by the slot e they end at
        earlier = padded[:, MAX_LOOKUP_NGRAM - r:MAX_LOOKUP_NGRAM - r + S]          # [b, e]: sequence[b, e - r]
        latest = jax.lax.dynamic_index_in_dim(sequence, length - 1 - r, axis=1, keepdims=False)
        agree &= (earlier == latest[:, None]) & (earlier >= 0)
        match = agree & (slots + 1 < length) & (r < ngram) & (r < length)
        end = jnp.where(match.any(axis=1), jnp.argmax(match, axis=1).astype(jnp.int32), end)
        found |= match.any(axis=1)
    follow = end[:, None] + 1 + jnp.arange(count)
    drafts = jnp.take_along_axis(sequence, jnp.minimum(follow, S - 1), axis=1)
    return jnp.where(found[:, None] & (follow < length), drafts, -1)


def deadline(max_time: float | None) -> np.ndarray:
    """HF's max_time as a deadline: the monotonic clock's (seconds, nanoseconds) `max_time` seconds from
    now (int32 [2]; HF's MaxTimeCriteria counts from its creation, before the prefill, too), or (-1, 0)
    for none."""
    if max_time is None:
        return np.array([-1, 0], np.int32)
    if not _is_number(max_time) or not max_time >= 0:
        raise ValueError(f"max_time must be None or a number of seconds >= 0; got {max_time!r}")
    ns = time.monotonic_ns() + int(min(float(max_time), 2.0**31) * 1e9)
    return np.array([min(ns // 10**9, 2**31 - 1), ns % 10**9], np.int32)


def _past(deadline: np.ndarray) -> np.ndarray:
    return np.bool_(time.monotonic_ns() > int(deadline[0]) * 10**9 + int(deadline[1]))


def past_deadline(options: dict[str, jax.Array]) -> jax.Array:
    """Whether the options' max_time `deadline` has passed: a scalar bool read from the host's clock
    (a call back to Python: 0.3 ms alone on this project's 2-core CPU, 1-2 ms a mid-size decode step
    in all, docs/benchmarks.md; only the programs compiled with `timed` make it)."""
    return io_callback(_past, jax.ShapeDtypeStruct((), jnp.bool_), options["deadline"])


def row_key(seed, stream, sample) -> jax.Array:
    """A row's sampling key: `fold_in(key(seed), stream)`, folded again with `sample` where sample > 0 (a
    prompt's second, third... sample of num_return_sequences; its first is the one sample of 1)."""
    key = jax.random.fold_in(jax.random.key(seed), stream)
    return jax.lax.cond(sample > 0, lambda key: jax.random.fold_in(key, sample), lambda key: key, key)


def decode_loop(params, config: LlavaNextConfig, state, cache, kv_valid, options: dict[str, jax.Array], dtype,
                new_bucket: int, stop_at, lookup: int = 0, timed: bool = False):
    """Steps the decode loop from `state` (`start_state`'s keys) while `step < stop_at` (and
    max_new_tokens) and some row is not done; returns (state, cache). One `lax.while_loop`. A row is
    done after a stop id or the token completing a stop string (`stop_string_hits`), pad after it;
    with `timed`, every row is done after the step that finds the max_time deadline passed
    (`past_deadline`; HF's MaxTimeCriteria, checked after each token as HF checks it).

    lookup > 0 (HF's prompt_lookup_num_tokens): a pass of the model takes the step's token and up to
    `lookup` tokens drafted after it from the sequence so far (`lookup_drafts`), and the step keeps
    the drafts each row's model would have chosen itself, the same for all rows (so the batch shares
    one cache slot), and the next token after them: the tokens and log-probabilities of lookup=0 in
    fewer passes (the cache holds `lookup` slots more). When some row has no draft, the pass takes
    the step's token alone. So does a pass in a pause: after the k-th drafted pass in a row that kept
    no draft, k >= LOOKUP_MISSES, the next min(2**(k - LOOKUP_MISSES), LOOKUP_PAUSE) passes draft
    nothing (a pass that checks drafts costs up to ~1.3x a plain one on a CPU, so output that repeats
    nothing decodes at about the speed without lookup; the tokens are the same either way)."""
    B, S = state["done"].shape[0], kv_valid.shape[1]
    T = S - new_bucket - lookup
    # each cache row's first new token's RoPE position; guided, the rows pair each prompt with its
    # unconditional sequence (`unconditional_prefill`), one decoder pass stepping both
    next_position = jnp.sum(kv_valid[:, :T], axis=1).astype(jnp.int32)
    guided = "guide_logits" in state   # classifier-free guidance (`guided_scores`); never with lookup
    assert not (guided and lookup), "classifier-free guidance with prompt lookup"
    row_keys = jax.vmap(row_key)(options["seeds"], options["row_streams"], options["samples"])
    last = jnp.minimum(stop_at, options["max_new_tokens"])
    rows, pad = jnp.arange(B), options["pad_id"]

    def stops(token, tokens, step):
        """Whether `token`, new token `step` of `tokens` `[B, N]`, ends its row: a stop id, or a stop
        string the row's text now ends with (HF stops after that token)."""
        sequence = jnp.concatenate([options["history"], tokens], axis=1)
        return is_stop(token, options["stop_ids"]) | stop_string_hits(
            sequence, options["history"].shape[1] + step + 1, options)

    def out_of_time(done):
        return done | past_deadline(options) if timed else done

    def choose(logits, seen, tokens, step, done):
        """Step `step`'s token per row (pad where done) and its log-probability, from the logits before it."""
        scores = process_scores(logits, seen, jnp.concatenate([options["history"], tokens], axis=1), step, options)
        keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
        token, logprob = select_tokens(scores, keys, options)
        return jnp.where(done, pad, token), jnp.where(done, 0.0, logprob)

    def cond(carry):
        state, _ = carry
        return (state["step"] < last) & ~jnp.all(state["done"])

    def body(carry):
        state, cache = carry
        step = state["step"]
        logits = state["logits"]
        if guided:
            logits = guided_scores(logits, state["guide_logits"], options["guidance_scale"])
        token, logprob = choose(logits, state["seen"], state["tokens"], step, state["done"])
        inputs = jnp.repeat(token, 2) if guided else token   # guided: each row's unconditional sequence too
        logits, cache = decode_step(params, config, inputs, next_position + step, T + step, kv_valid, cache, dtype)
        if guided:   # rows 2b and 2b + 1: prompt b's and its unconditional sequence's
            logits, unconditional = logits.reshape(B, 2, -1).transpose(1, 0, 2)
        tokens = state["tokens"].at[:, step].set(token)
        state = {**state, "step": step + 1, "tokens": tokens,
                 "logprobs": state["logprobs"].at[:, step].set(logprob), "logits": logits,
                 "done": out_of_time(state["done"] | stops(token, tokens, step)),
                 "seen": state["seen"].at[rows, token].set(True), "passes": state["passes"] + 1}
        if guided:
            state["guide_logits"] = unconditional
        return state, cache

    def body_lookup(carry):
        state, cache = carry
        step, width = state["step"], lookup + 1
        first, first_logprob = choose(state["logits"], state["seen"], state["tokens"], step, state["done"])
        tokens = state["tokens"].at[:, step].set(first)
        first_ended = state["done"] | stops(first, tokens, step)
        drafts = lookup_drafts(jnp.concatenate([options["history"], tokens], axis=1),
                               options["history"].shape[1] + step + 1, options["lookup_ngram"], lookup)
        inputs = jnp.concatenate([first[:, None], jnp.where(drafts >= 0, drafts, pad)], axis=1)
        positions = (next_position + step)[:, None] + jnp.arange(width)
        blank = lambda value, dtype: jnp.full((B, width), value, dtype)

        def alone(cache):   # some row has no draft: the step's token only
            logits, cache = decode_tokens(params, config, inputs[:, :1], positions[:, :1], T + step, kv_valid,
                                          cache, dtype)
            return (jnp.int32(0), blank(pad, jnp.int32).at[:, 0].set(first),
                    blank(0.0, jnp.float32).at[:, 0].set(first_logprob), first_ended, logits[:, 0]), cache

        def checked(cache):  # each drafted position's token as the model chooses it, given the drafts before it
            logits, cache = decode_tokens(params, config, inputs, positions, T + step, kv_valid, cache, dtype)
            chosen, logprobs, ended = [first], [first_logprob], [first_ended]
            seen, history = state["seen"], tokens
            agreed, kept = jnp.ones((B,), bool), jnp.zeros((B,), jnp.int32)
            for j in range(1, width):
                seen = seen.at[rows, chosen[-1]].set(True)
                token, logprob = choose(logits[:, j - 1], seen, history, step + j, ended[-1])
                agreed &= (drafts[:, j - 1] == token) | ended[-1]
                kept += agreed
                history = history.at[:, step + j].set(token, mode="drop")
                chosen, logprobs = chosen + [token], logprobs + [logprob]
                ended.append(ended[-1] | stops(token, history, step + j))
            ended = jnp.stack(ended)                                               # [width, B]
            everyone = ended.all(axis=1)
            m = jnp.minimum(jnp.min(kept), jnp.where(everyone.any(), jnp.argmax(everyone), lookup))
            m = jnp.minimum(m, options["max_new_tokens"] - step - 1)       # drafts kept after the first token
            keep = jnp.arange(width) <= m
            return (m, jnp.where(keep, jnp.stack(chosen, 1), pad), jnp.where(keep, jnp.stack(logprobs, 1), 0.0),
                    jax.lax.dynamic_index_in_dim(ended, m, axis=0, keepdims=False),
                    jax.lax.dynamic_index_in_dim(logits, m, axis=1, keepdims=False)), cache

        drafted = ((drafts[:, 0] >= 0) | first_ended).all() & ~first_ended.all() & (state["pause"] == 0)
        (m, block, block_logprobs, done, logits), cache = jax.lax.cond(drafted, checked, alone, cache)
        at, seen = step + jnp.arange(width), state["seen"]
        for j in range(width):
            seen = seen.at[rows, block[:, j]].set(seen[rows, block[:, j]] | (j <= m))
        missed = drafted & (m == 0)
        misses = jnp.where(drafted, jnp.where(missed, state["misses"] + 1, 0), state["misses"])
        pause = jnp.where(missed & (misses >= LOOKUP_MISSES),
                          jnp.minimum(1 << jnp.clip(misses - LOOKUP_MISSES, 0, 30), LOOKUP_PAUSE),
                          jnp.maximum(state["pause"] - 1, 0))
        return {"step": step + m + 1, "tokens": state["tokens"].at[:, at].set(block, mode="drop"),
                "logprobs": state["logprobs"].at[:, at].set(block_logprobs, mode="drop"), "logits": logits,
                "done": out_of_time(done), "seen": seen, "passes": state["passes"] + 1,
                "checked": state["checked"] + drafted, "misses": misses, "pause": pause}, cache

    return jax.lax.while_loop(cond, body_lookup if lookup else body, (state, cache))


@partial(xla_cpu.jit, cpu_options=xla_cpu.DECODE,
         static_argnames=("config", "dtype", "new_bucket", "lookup", "timed"), donate_argnames=("cache",))
def decode_program(params, config: LlavaNextConfig, logits, cache, kv_valid, options: dict[str, jax.Array], dtype,
                   new_bucket: int, lookup: int = 0, timed: bool = False, guide=None):
    """The compiled decode loop, one `lax.while_loop`; returns (state, cache): state["tokens"] the new
    tokens `[B, new_bucket]`, state["logprobs"] theirs (`select_tokens`; 0 after a row stopped).

    logits `[B, V]`: the prefill's last slot. The cache (donated, updated in place) has
    `T + new_bucket + lookup` slots, the prompt in the first T. options (all traced, so changing them
    compiles nothing): max_new_tokens, min_new_tokens, do_sample, `warp`'s settings (temperature,
    top_h, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff), seeds, row_streams, samples
    `[B]`, stop_ids `[MAX_STOP_IDS]` (-1 = unused), the stop strings' tables (`stop_string_hits`), pad_id,
    repetition_penalty, seen `[B, V]`, no_repeat_ngram_size, history `[B, T]`, lookup_ngram, and the
    processors' arrays (`options`, `process_scores`). Row r samples with `row_key(seeds[r],
    row_streams[r], samples[r])`, then the step.
    lookup: prompt-lookup drafts per pass (`decode_loop`; 0: none); state["passes"] counts the passes.
    timed: the options' max_time deadline checked after each step (`decode_loop`).
    guide: classifier-free guidance's unconditional logits `[B, V]`, the cache and kv_valid then
    `unconditional_prefill`'s (2B rows), or None.
    """
    state = start_state(logits, options, new_bucket, guide)
    # returning the cache lets XLA reuse the donated buffers in place
    return decode_loop(params, config, state, cache, kv_valid, options, dtype, new_bucket, options["max_new_tokens"],
                       lookup, timed)


@partial(xla_cpu.jit, static_argnames=("new_bucket",))
def start_program(logits, options: dict[str, jax.Array], new_bucket: int, guide=None):
    """(`start_state`, options), compiled: both then sit where the logits do, on one device or a mesh,
    so the chunks that follow take the options from there instead of copying them from the host each
    call (a one-step chunk of the 7B model on an H100: 8.9-9.3 ms with them as numpy, 8.1-8.4 placed;
    docs/benchmarks.md)."""
    return start_state(logits, options, new_bucket, guide), options


@partial(xla_cpu.jit, cpu_options=xla_cpu.DECODE,
         static_argnames=("config", "dtype", "new_bucket", "lookup", "timed"), donate_argnames=("state", "cache"))
def decode_chunk_program(params, config: LlavaNextConfig, state, cache, kv_valid, options: dict[str, jax.Array],
                         dtype, new_bucket: int, stop_at, lookup: int = 0, timed: bool = False):
    """`decode_program` in pieces, for streaming: continues `state` (from `start_program` or the last
    call) up to step `stop_at` (traced: any value compiles nothing; with `lookup`, a pass may end up to
    `lookup` steps past it) and returns (state, cache). Calls that together reach max_new_tokens
    produce `decode_program`'s tokens."""
    return decode_loop(params, config, state, cache, kv_valid, options, dtype, new_bucket, stop_at, lookup, timed)


def prefill_for_decode(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask, dtype,
                       new_bucket: int, lookup: int, samples: int, guided: bool, negative=None):
    """The prefill a decode loop starts from: (last-slot logits, cache of `T + new_bucket + lookup`
    slots, kv_valid, the unconditional logits or None), guided with each row's unconditional sequence
    beside it (`unconditional_prefill`; negative: its negative prompt)."""
    logits, cache, kv_valid = prefill_program(params, config, input_ids, pixel_values, sources, attention_mask,
                                              dtype, input_ids.shape[1] + new_bucket + lookup, samples)
    if not guided:
        return logits, cache, kv_valid, None
    guide, cache, kv_valid = unconditional_prefill(params, config, input_ids, cache, kv_valid, dtype, negative)
    return logits, cache, kv_valid, guide


def generate_tokens(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask,
                    options: dict[str, jax.Array], dtype, new_bucket: int, lookup: int = 0,
                    samples: int = 1, timed: bool = False, guided: bool = False,
                    negative=None) -> tuple[jax.Array, jax.Array]:
    """Prefill then decode: (new tokens `[B * samples, new_bucket]`, pad after a row stops; their
    log-probabilities, 0 after a row stops). Two compiled programs. lookup: prompt-lookup drafts per
    pass (`decode_loop`); samples: rows per prompt (`prefill_program`; options built for them);
    timed: max_time's deadline checked (`decode_loop`); guided: classifier-free guidance
    (`unconditional_prefill`, the options' guidance_scale; negative: the negative prompt or None)."""
    logits, cache, kv_valid, guide = prefill_for_decode(params, config, input_ids, pixel_values, sources,
                                                        attention_mask, dtype, new_bucket, lookup, samples, guided,
                                                        negative)
    state, _ = decode_program(params, config, logits, cache, kv_valid, options, dtype, new_bucket, lookup, timed,
                              guide)
    return state["tokens"], state["logprobs"]


def stream_tokens(params, config: LlavaNextConfig, input_ids, pixel_values, sources, attention_mask,
                  options: dict[str, jax.Array], dtype, new_bucket: int, chunk: int = 1, fetch=np.asarray,
                  lookup: int = 0, samples: int = 1, timed: bool = False, guided: bool = False, negative=None):
    """`generate_tokens` as it goes: yields (new tokens `[B, n]`, their log-probabilities `[B, n]`) every
    `chunk` steps (n <= chunk, or chunk + lookup with prompt-lookup drafts; pad after a row's stop id;
    `samples` rows per prompt; `timed`, `guided` and `negative` as there) until every row is done or
    max_new_tokens is reached.
    Concatenated, they are `generate_tokens`' up to that step. fetch: device array -> numpy
    (`distributed.fetch` on a multi-process mesh)."""
    if not is_positive_int(chunk):
        raise ValueError(f"chunk must be an int >= 1; got {chunk!r}")
    logits, cache, kv_valid, guide = prefill_for_decode(params, config, input_ids, pixel_values, sources,
                                                        attention_mask, dtype, new_bucket, lookup, samples, guided,
                                                        negative)
    end, yielded = int(options["max_new_tokens"]), 0
    state, options = start_program(logits, options, new_bucket, guide)
    # jax.jit caches a call apart from one whose inputs differ in layout or in being committed to their
    # devices. A chunk's outputs are committed once any input is (on one device too), and on a mesh
    # laid out as the chunk lays them out (the state split over "data" where start_program returned
    # it whole): each of the first chunks compiled the program again (three times streaming a model
    # whose params were never committed). Every chunk gets its inputs committed, laid out as the
    # first chunk's were (nothing moves).
    layout = jax.tree.map(lambda a: a.sharding, (state, cache, kv_valid, options))
    state, cache, kv_valid, options = jax.device_put((state, cache, kv_valid, options), layout)
    while yielded < end:
        stop_at = min(yielded + int(chunk), end)
        state, cache = decode_chunk_program(params, config, state, cache, kv_valid, options, dtype, new_bucket,
                                            np.int32(stop_at), lookup, timed)
        state, cache = jax.device_put((state, cache), layout[:2])
        step = int(fetch(state["step"]))
        yield fetch(state["tokens"])[:, yielded:step], fetch(state["logprobs"])[:, yielded:step]
        if fetch(state["done"]).all():   # every row has stopped
            return
        yielded = step


def default_stream_chunk() -> int:
    """Decode steps between a stream's returns to Python when the caller names none: 1 on a CPU, where
    a return costs nothing measurable against a step; 8 elsewhere (an H100 decoding a 7B model: ~3 ms
    a return against a 6 ms step, 1.5x the time at 1 and 1.12x at 8; docs/benchmarks.md)."""
    return 1 if jax.default_backend() == "cpu" else 8


def compiled_programs() -> int:
    """How many generation programs have been compiled so far (prefill + decode, streaming's and beam
    search's too)."""
    from .beam import beam_program
    return (prefill_program._cache_size() + decode_program._cache_size() + start_program._cache_size()
            + decode_chunk_program._cache_size() + beam_program._cache_size() + unconditional_prefill._cache_size())


def pad_prompt(input_ids: np.ndarray, attention_mask: np.ndarray, sources: np.ndarray | None, length: int,
               pad_id: int):
    """Left-pads `[B, T]` arrays to `[B, length]` (mask 0, sources TEXT) so prompts share a bucket;
    sources None (a text-only prompt, as guidance's negative prompt) stays None."""
    from .anyres import TEXT
    extra = length - input_ids.shape[1]
    pad = lambda a, value: np.pad(a, ((0, 0), (extra, 0)), constant_values=value)
    return pad(input_ids, pad_id), pad(attention_mask, 0), None if sources is None else pad(sources, TEXT)


def check_token_ids(ids: np.ndarray, vocab_size: int, name: str = "input_ids") -> None:
    """ValueError unless `ids` `[B, T]` are integer token ids in [0, vocab_size), naming the first id
    outside (an embedding gather would clamp it silently)."""
    if not np.issubdtype(ids.dtype, np.integer) and ids.size:
        raise ValueError(f"{name} must be integer token ids; got dtype {ids.dtype}")
    outside = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(outside):
        row, position = outside[0]
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}); got {ids[row, position]} at row {row}, "
                         f"position {position} ({len(outside)} such ids)")


def new_token_count(max_new_tokens: int | None, max_length: int | None, prompt_length: int) -> int:
    """How many new tokens a call makes, as HF's `_prepare_generated_length` resolves them from
    generation settings (each the call's, else the checkpoint's): max_new_tokens where set; else
    max_length (HF's: the whole sequence, the prompt as given, pads included, counted in) less
    `prompt_length`, a ValueError where that leaves none (HF's too); else 32 (ours: HF's makes 20)."""
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is None:
        return 32
    if not is_int(max_length):
        raise ValueError(f"max_length must be an int (the prompt's tokens, pads included, and the new ones); "
                         f"got {max_length!r}")
    if max_length <= prompt_length:
        raise ValueError(f"max_length={max_length} counts the prompt's {prompt_length} tokens (pads included), as "
                         f"HF's does, and leaves no new token: raise it, or pass max_new_tokens")
    return max_length - prompt_length


def _token_ids(value, name: str, vocab_size: int) -> list[int]:
    """A list (or tuple) of token ids in [0, vocab_size) (one int too, where `name` takes one), or a
    ValueError naming `name` and the value."""
    ids = [value] if is_int(value) and name == "forced_eos_token_id" else value
    if not isinstance(ids, (list, tuple, np.ndarray)) or not all(is_int(i) for i in ids):
        one = "an int or " if name == "forced_eos_token_id" else ""
        raise ValueError(f"{name} must be {one}a list of token ids; got {value!r}")
    outside = [int(i) for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}); got {outside[0]} in {value!r}")
    return [int(i) for i in ids]


def _id_mask(ids, vocab_size: int) -> np.ndarray:
    mask = np.zeros(vocab_size, bool)
    mask[list(ids)] = True
    return mask


def _sequence_biases(entries: dict, name: str, vocab_size: int):
    """`sequence_bias` / `bad_words_ids` as `sequence_bias`' arrays: (the single-token entries' biases
    `[V]`, the longer ones' prefixes `[MAX_BIAS_SEQUENCES, MAX_BIAS_LENGTH - 1]` (right-aligned, -1
    before), last tokens and biases `[MAX_BIAS_SEQUENCES]` (-1 and 0: no entry))."""
    tokens = np.zeros(vocab_size, np.float32)
    prefixes = np.full((MAX_BIAS_SEQUENCES, MAX_BIAS_LENGTH - 1), -1, np.int32)
    last, values = np.full(MAX_BIAS_SEQUENCES, -1, np.int32), np.zeros(MAX_BIAS_SEQUENCES, np.float32)
    longer = [(ids, bias) for ids, bias in entries.items() if len(ids) > 1]
    if len(longer) > MAX_BIAS_SEQUENCES:
        raise ValueError(f"{name} holds {len(longer)} sequences of 2 or more tokens; at most {MAX_BIAS_SEQUENCES} "
                         f"(generate.MAX_BIAS_SEQUENCES; single tokens: any number)")
    for m, (ids, bias) in enumerate(longer):
        if len(ids) > MAX_BIAS_LENGTH:
            raise ValueError(f"{name} entries are at most {MAX_BIAS_LENGTH} tokens long (generate.MAX_BIAS_LENGTH); "
                             f"got {len(ids)}: {list(ids)!r}")
        prefixes[m, MAX_BIAS_LENGTH - len(ids):] = ids[:-1]
        last[m], values[m] = ids[-1], bias
    for ids, bias in entries.items():
        if len(ids) == 1:
            tokens[ids[0]] = bias
    return tokens, prefixes, last, values


def _is_number(value) -> bool:
    """An int or float (numpy's too), not a bool, not nan."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and not np.isnan(value)


def sequence_bias_entries(sequence_bias, vocab_size: int) -> dict[tuple[int, ...], float]:
    """HF's `sequence_bias` (a dict {tuple of token ids: bias}, or a list of [token ids, bias] pairs, as
    generation_config.json holds it) as a dict, checked; a later pair for the same ids wins, as in HF."""
    what = "a dict {tuple of token ids: bias} or a list of [token ids, bias] pairs"
    if isinstance(sequence_bias, dict):
        pairs = list(sequence_bias.items())
        if not all(isinstance(ids, tuple) for ids, _ in pairs):
            raise ValueError(f"sequence_bias must be {what}; got {sequence_bias!r} (a dict's keys must be tuples)")
    elif isinstance(sequence_bias, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], (list, tuple)) for p in sequence_bias):
        pairs = [(tuple(ids), bias) for ids, bias in sequence_bias]
    else:
        raise ValueError(f"sequence_bias must be {what}; got {sequence_bias!r}")
    if not pairs:
        raise ValueError(f"sequence_bias must not be empty (None: off); got {sequence_bias!r}")
    entries = {}
    for ids, bias in pairs:
        if not ids:
            raise ValueError(f"sequence_bias' token sequences must not be empty; got {sequence_bias!r}")
        if not _is_number(bias):
            raise ValueError(f"sequence_bias' biases must be numbers; got {bias!r} for {list(ids)!r}")
        entries[tuple(_token_ids(ids, "sequence_bias", vocab_size))] = float(bias)
    return entries


def bad_words_entries(bad_words_ids, stop_ids, vocab_size: int) -> dict[tuple[int, ...], float]:
    """HF's `bad_words_ids` (a list of token id lists) as -inf `sequence_bias` entries, checked; an
    entry that is one stop id alone is dropped, as HF's `NoBadWordsLogitsProcessor` drops it."""
    if not isinstance(bad_words_ids, (list, tuple)) or not bad_words_ids or not all(
            isinstance(ids, (list, tuple)) for ids in bad_words_ids):
        raise ValueError(f"bad_words_ids must be a non-empty list of token id lists (None: off); got {bad_words_ids!r}")
    entries = {}
    for ids in bad_words_ids:
        if not ids:
            raise ValueError(f"bad_words_ids' token id lists must not be empty; got {bad_words_ids!r}")
        ids = tuple(_token_ids(ids, "bad_words_ids", vocab_size))
        if not (len(ids) == 1 and ids[0] in stop_ids):
            entries[ids] = -np.inf
    return entries


def options(B: int, max_new_tokens: int, min_new_tokens: int | None, do_sample: bool, temperature: float, top_k: int,
            top_p: float, seed: Any, stop_ids: tuple[int, ...], pad_id: int, *, prompt_ids: np.ndarray,
            vocab_size: int, prompt_mask: np.ndarray | None = None, repetition_penalty: float = 1.0,
            no_repeat_ngram_size: int = 0, prompt_bucket: int | None = None, length_penalty: float = 1.0,
            early_stopping: bool | str = False, max_matching_ngram_size: int = 2, min_p: float | None = None,
            typical_p: float = 1.0, epsilon_cutoff: float = 0.0, eta_cutoff: float = 0.0,
            top_h: float | None = None, num_return_sequences: int = 1, min_length: int | None = None,
            suppress_tokens=None, begin_suppress_tokens=None, bad_words_ids=None, sequence_bias=None,
            forced_eos_token_id=None, exponential_decay_length_penalty=None,
            encoder_repetition_penalty: float | None = None, renormalize_logits: bool | None = None,
            encoder_no_repeat_ngram_size: int | None = None, forced_bos_token_id: int | None = None,
            remove_invalid_values: bool | None = None, max_time: float | None = None,
            stop_strings: dict[str, np.ndarray] | None = None,
            guidance_scale: float | None = None) -> dict[str, np.ndarray]:
    """The traced generation options, checked, as fixed-shape arrays.

    B prompts (rows of prompt_ids); num_return_sequences n > 1 makes them `B * n` rows, prompt b's
    rows b * n + j (j < n, HF's order) with b's options and seed, sample index j (`row_key`).
    The sampling warpers (`warp`): temperature, top_k, top_p, min_p and top_h (None: off),
    typical_p (1.0: off), epsilon_cutoff and eta_cutoff (0.0: off), in HF's ranges.

    prompt_ids `[B, T]` (as the caller gave them, pads included) and their attention mask: the prompts'
    tokens from each row's first real one on (HF's repetition penalty leaves out a row's left padding)
    are marked in `seen [B, vocab_size]`, the tokens `repetition_penalty` applies to (1.0: none); the
    whole prompts, left-filled with -1 to `prompt_bucket` slots (default T), are `history`, where
    no_repeat_ngram_size (0: off) looks for n-grams, as HF's processor looks in its input_ids.
    length_penalty and early_stopping (True, False or "never") are beam search's (`beam`), as HF's;
    max_matching_ngram_size the longest n-gram prompt lookup matches (`lookup_drafts`), as HF's.

    min_new_tokens None: HF's min_length (the whole sequence, the T prompt slots as given counted in)
    as new tokens, max(min_length - T, 0) (up to max_new_tokens); a min_new_tokens overrides it, as
    in HF. The rest are HF's processors (`process_scores`), off where None: suppress_tokens,
    begin_suppress_tokens (lists of ids), bad_words_ids (token id lists), sequence_bias (`sequence_bias_entries`),
    forced_eos_token_id (an id or a list), exponential_decay_length_penalty ((start_index,
    decay_factor)), encoder_repetition_penalty (1.0: off), encoder_no_repeat_ngram_size (0: off; at most
    MAX_NGRAM), forced_bos_token_id (an id; it applies where T is 1, as in HF), remove_invalid_values
    (True or False) and renormalize_logits (a log-softmax after the processors; it changes beam
    search's scores alone: `beam`).
    stop_strings: `stop_strings.tables(tokenizer, strings, vocab_size)` (None: no stop string), which
    end a row as a stop id does (`stop_string_hits`). max_time: seconds from now (`deadline`; None:
    none), checked by the programs compiled `timed`."""
    for name, value in (("max_new_tokens", max_new_tokens), ("top_k", top_k)):
        if not is_int(value):
            raise ValueError(f"{name} must be an int; got {value!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    prompt_ids = np.asarray(prompt_ids)
    if prompt_ids.ndim != 2 or prompt_ids.shape[0] != B:
        raise ValueError(f"prompt_ids must be [{B}, T]; got shape {prompt_ids.shape}")
    T = prompt_ids.shape[1]
    if min_new_tokens is None:
        if min_length is not None and (not is_int(min_length) or min_length < 0):
            raise ValueError(f"min_length must be an int >= 0 (the prompt's tokens, pads included, and the new "
                             f"ones); got {min_length!r}")
        min_new_tokens = min(max((min_length or 0) - T, 0), max_new_tokens)
    if not is_int(min_new_tokens):
        raise ValueError(f"min_new_tokens must be an int; got {min_new_tokens!r}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}]; got {min_new_tokens}")
    if not temperature >= 0 or temperature == np.inf or not 0 < top_p <= 1 or top_k < 0:   # nan fails >=
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, {top_p}, {top_k}")
    given = dict(min_p=min_p, top_h=top_h, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff)
    for name, (ok, interval) in WARPER_RANGES.items():
        value = given[name]
        if value is None and name in ("min_p", "top_h"):   # HF's off
            continue
        if not _is_number(value) or not ok(value):
            raise ValueError(f"{name} must be " + ("None or " if name in ("min_p", "top_h") else "")
                             + f"a number in {interval}; got {value!r}")
    if not is_positive_int(num_return_sequences):
        raise ValueError(f"num_return_sequences must be an int >= 1; got {num_return_sequences!r}")
    if len(stop_ids) > MAX_STOP_IDS:
        raise ValueError(f"at most {MAX_STOP_IDS} eos_token_id values; got {len(stop_ids)}")
    check_token_ids(np.asarray([stop_ids], dtype=None if stop_ids else np.int64), vocab_size, "eos_token_id")
    check_token_ids(np.asarray([[pad_id]]), vocab_size, "pad_token_id")
    for name, value in (("repetition_penalty", repetition_penalty),
                        ("encoder_repetition_penalty", 1.0 if encoder_repetition_penalty is None
                         else encoder_repetition_penalty)):
        if not _is_number(value) or not value > 0:
            raise ValueError(f"{name} must be a number > 0 (1.0: off); got {value!r}")
    encoder_no_repeat_ngram_size = encoder_no_repeat_ngram_size or 0
    for name, value in (("no_repeat_ngram_size", no_repeat_ngram_size),
                        ("encoder_no_repeat_ngram_size", encoder_no_repeat_ngram_size)):
        if not is_int(value) or not 0 <= value <= MAX_NGRAM:
            raise ValueError(f"{name} must be an int in [0, {MAX_NGRAM}] (0: off); got {value!r}")
    if not is_int(max_matching_ngram_size) or not (
            1 <= max_matching_ngram_size <= MAX_LOOKUP_NGRAM):
        raise ValueError(f"max_matching_ngram_size must be an int in [1, {MAX_LOOKUP_NGRAM}]; "
                         f"got {max_matching_ngram_size!r}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number; got {length_penalty!r}")
    guidance_scale = 1.0 if guidance_scale is None else guidance_scale
    if not _is_number(guidance_scale) or not np.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be None or a finite number (1: off); got {guidance_scale!r}")
    if not any(early_stopping is v or (isinstance(early_stopping, str) and early_stopping == v)
               for v in (True, False, "never")):
        raise ValueError(f"early_stopping must be True, False or \"never\"; got {early_stopping!r}")
    for name, value in (("renormalize_logits", renormalize_logits), ("remove_invalid_values", remove_invalid_values)):
        if not (value is None or isinstance(value, (bool, np.bool_))):
            raise ValueError(f"{name} must be True or False; got {value!r}")
    suppress = [] if suppress_tokens is None else _token_ids(suppress_tokens, "suppress_tokens", vocab_size)
    begin = [] if begin_suppress_tokens is None else _token_ids(begin_suppress_tokens, "begin_suppress_tokens",
                                                                 vocab_size)
    forced = [] if forced_eos_token_id is None else _token_ids(forced_eos_token_id, "forced_eos_token_id", vocab_size)
    if forced_bos_token_id is not None and not is_int(forced_bos_token_id):
        raise ValueError(f"forced_bos_token_id must be an int; got {forced_bos_token_id!r}")
    bos = [] if forced_bos_token_id is None else _token_ids([forced_bos_token_id], "forced_bos_token_id", vocab_size)
    if forced and suppress and set(forced) <= set(suppress):   # HF's GenerationConfig.validate refuses it too
        raise ValueError(f"every forced_eos_token_id ({forced}) is in suppress_tokens: the forced step would "
                         f"leave no token")
    bias = _sequence_biases({} if sequence_bias is None else sequence_bias_entries(sequence_bias, vocab_size),
                            "sequence_bias", vocab_size)
    bad = _sequence_biases({} if bad_words_ids is None else bad_words_entries(bad_words_ids, stop_ids, vocab_size),
                           "bad_words_ids", vocab_size)
    new_bucket = bucket(max_new_tokens, NEW_TOKEN_BUCKETS)
    decay = np.zeros(new_bucket, np.float32)    # per step, the factor a stop id's |score| is added with
    if exponential_decay_length_penalty is not None:
        pair = exponential_decay_length_penalty
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and is_int(pair[0]) and _is_number(pair[1])
                and np.isfinite(pair[1])):
            raise ValueError(f"exponential_decay_length_penalty must be (start_index: int, decay_factor: number); "
                             f"got {pair!r}")
        start, factor = int(pair[0]), float(pair[1])
        past = np.arange(new_bucket) - start      # HF: from the first step its input is longer than start + T
        with np.errstate(over="ignore"):
            decay[past > 0] = np.power(factor, past[past > 0].astype(np.float64)) - 1
    check_token_ids(prompt_ids, vocab_size, "prompt_ids")
    started = np.ones(prompt_ids.shape, bool) if prompt_mask is None else np.cumsum(prompt_mask, axis=1) > 0
    seen = np.zeros((B, vocab_size), bool)
    seen[np.nonzero(started)[0], prompt_ids[started]] = True
    prompt_tokens = np.zeros((B, vocab_size), bool)   # encoder_repetition_penalty's: the prompt as given, pads too
    if encoder_repetition_penalty not in (None, 1.0):
        prompt_tokens[np.repeat(np.arange(B), T), prompt_ids.reshape(-1)] = True
    if prompt_bucket is not None and prompt_bucket < T:
        raise ValueError(f"prompt_bucket {prompt_bucket} < the prompts' {T} tokens")
    history = np.full((B, T if prompt_bucket is None else prompt_bucket), -1, np.int32)
    history[:, history.shape[1] - T:] = prompt_ids
    # One seed for the batch: row r draws from stream r. One seed per row: each row's draws depend on
    # its own seed alone, wherever it sits in the batch.
    per_row = np.ndim(seed) > 0
    if per_row and np.shape(seed) != (B,):
        raise ValueError(f"seed must be one int or one per row ({B}); got shape {np.shape(seed)}")
    given = np.asarray(seed)
    if not np.issubdtype(given.dtype, np.integer) or given.size and not (0 <= given.min() and given.max() < 2**32):
        raise ValueError(f"seed must be an int in [0, 2**32), or one per row; got {seed!r}")
    seeds = np.broadcast_to(given.astype(np.uint32), (B,)).copy()
    row_streams = np.zeros(B, np.uint32) if per_row else np.arange(B, dtype=np.uint32)
    n = num_return_sequences     # each prompt's rows, side by side
    seeds, row_streams, seen, history, prompt_tokens = (np.repeat(a, n, axis=0)
                                                       for a in (seeds, row_streams, seen, history, prompt_tokens))
    return dict(max_new_tokens=np.int32(max_new_tokens), min_new_tokens=np.int32(min_new_tokens),
                do_sample=np.bool_(do_sample), temperature=np.float32(temperature), top_k=np.int32(top_k),
                top_p=np.float32(top_p), min_p=np.float32(min_p or 0.0), typical_p=np.float32(typical_p),
                epsilon_cutoff=np.float32(epsilon_cutoff), eta_cutoff=np.float32(eta_cutoff),
                top_h=np.float32(top_h or 0.0), seeds=seeds, row_streams=row_streams,
                samples=np.tile(np.arange(n, dtype=np.uint32), B), pad_id=np.int32(pad_id),
                stop_ids=np.array(list(stop_ids) + [-1] * (MAX_STOP_IDS - len(stop_ids)), np.int32),
                repetition_penalty=np.float32(repetition_penalty), seen=seen,
                no_repeat_ngram_size=np.int32(no_repeat_ngram_size), history=history,
                length_penalty=np.float32(length_penalty),
                early_stopping=np.int32(EARLY_STOPPING[early_stopping]),
                lookup_ngram=np.int32(max_matching_ngram_size),
                bias_tokens=bias[0], bias_prefixes=bias[1], bias_last=bias[2], bias_values=bias[3],
                bad_tokens=np.isneginf(bad[0]), bad_prefixes=bad[1], bad_last=bad[2],
                encoder_penalty=np.float32(1.0 / (encoder_repetition_penalty or 1.0)), prompt_tokens=prompt_tokens,
                forced_eos=_id_mask(forced, vocab_size), decay=decay, suppress=_id_mask(suppress, vocab_size),
                begin_suppress=_id_mask(begin, vocab_size), renormalize=np.bool_(bool(renormalize_logits)),
                encoder_ngram_size=np.int32(encoder_no_repeat_ngram_size),
                # HF forces it where the input so far is one token long: a one-token prompt's first step,
                # begin_suppress_tokens moving to the step after it
                forced_bos=_id_mask(bos if T == 1 else [], vocab_size),
                begin_suppress_step=np.int32(bool(bos) and T == 1),
                remove_invalid=np.bool_(bool(remove_invalid_values)), deadline=deadline(max_time),
                guidance_scale=np.float32(guidance_scale),
                **(no_stop_strings(vocab_size) if stop_strings is None else _checked_tables(stop_strings, vocab_size)))


def _checked_tables(tables: dict[str, np.ndarray], vocab_size: int) -> dict[str, np.ndarray]:
    """`stop_strings.tables`' arrays, checked against the shapes `no_stop_strings` gives (a mismatch
    would compile a new program, or fail inside one)."""
    expected = no_stop_strings(vocab_size)
    if set(tables) != set(expected) or any(np.shape(tables[k]) != np.shape(v) for k, v in expected.items()):
        raise ValueError(f"stop_strings must be stop_strings.tables(tokenizer, strings, {vocab_size}); got arrays "
                         f"{ {k: np.shape(v) for k, v in tables.items()} }")
    return {k: np.asarray(tables[k], expected[k].dtype) for k in expected}
