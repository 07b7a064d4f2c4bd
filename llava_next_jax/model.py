"""`LlavaNext`: holds (config, params) and calls the pure jitted functions with HF-layout inputs."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from . import anyres, checkpoint, convert, distributed, generate, sharding
from .checks import is_int, is_positive_int
from .config import LlavaNextConfig
from .modeling import llava_next
from .stop_strings import tables as stop_string_tables

# HF's defaults for the generation settings `LlavaNext.generate` takes (GenerationConfig's
# `_get_default_generation_params`: top_k 50 among them; None where HF has none), used where neither
# the call nor the checkpoint's generation_config.json sets one. Not max_length's 20: with neither
# max_new_tokens nor max_length set, generate makes 32 new tokens (`generate.new_token_count`).
GENERATION_DEFAULTS: dict[str, Any] = dict(
    max_new_tokens=None, max_length=None, min_new_tokens=None, min_length=0, do_sample=False, temperature=1.0,
    top_k=50, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, top_h=None,
    repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1, length_penalty=1.0, early_stopping=False,
    num_return_sequences=1, prompt_lookup_num_tokens=None, max_matching_ngram_size=2, suppress_tokens=None,
    begin_suppress_tokens=None, bad_words_ids=None, sequence_bias=None, forced_eos_token_id=None,
    exponential_decay_length_penalty=None, encoder_repetition_penalty=1.0, renormalize_logits=None,
    encoder_no_repeat_ngram_size=0, forced_bos_token_id=None, remove_invalid_values=False, stop_strings=None,
    max_time=None, guidance_scale=None)
# generation_config.json settings that HF's generate applies and ours does not, with the values that
# change nothing (transformers' defaults before 5 wrote them): a checkpoint that sets one otherwise
# loads with a warning naming it, since its output would differ from HF's.
UNAPPLIED_GENERATION: dict[str, Any] = dict(
    force_words_ids=None, constraints=None, num_beam_groups=1,
    diversity_penalty=0.0, penalty_alpha=None, dola_layers=None, watermarking_config=None, token_healing=False)
# `generate`'s settings that are HF's logits processors beyond the sampling warpers and beam search's
# (None: the checkpoint's, else off): passed through to `generate.options`.
PROCESSOR_SETTINGS = ("guidance_scale", "min_length", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
                      "sequence_bias", "forced_eos_token_id", "exponential_decay_length_penalty",
                      "encoder_repetition_penalty", "renormalize_logits", "encoder_no_repeat_ngram_size",
                      "forced_bos_token_id", "remove_invalid_values")


class LlavaNext:
    """A loaded LLaVA-NeXT model.

    Attributes: `config` (LlavaNextConfig), `params` (pytree of jax Arrays), `dtype` (compute dtype,
    the params' dtype).
    """

    def __init__(self, config: LlavaNextConfig, params: Any, generation_config: dict | None = None, mesh=None):
        self.config = config
        self.params = params
        self.mesh = mesh  # a ("data", "model") jax.sharding.Mesh the params are laid out on, or None
        self.dtype = jnp.dtype(params["language_model"]["embed_tokens"]["embedding"].dtype)
        # the checkpoint's generation config as HF reads it: generation_config.json alone where there is
        # one (`from_pretrained`), else the model config's special tokens (`generation_config_from_model_config`)
        gen = (dict(eos_token_id=config.text.eos_token_id, pad_token_id=config.text.pad_token_id)
               if generation_config is None else generation_config)
        eos = gen.get("eos_token_id")
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, (list, tuple)) else (
            () if eos is None else (int(eos),))
        # None: a call pads with its first stop id (its eos_token_id's, else `eos_token_ids`'), as HF's
        # generate does where the generation config names no pad token (0 where there is no stop id)
        pad = gen.get("pad_token_id")
        self.pad_token_id: int | None = None if pad is None else int(pad)
        # generate's settings when a call leaves them out (None): the checkpoint's generation config,
        # else HF's defaults (`GENERATION_DEFAULTS`), as HF's generate resolves them
        self.generation_defaults: dict[str, Any] = {
            k: default if gen.get(k) is None else gen[k] for k, default in GENERATION_DEFAULTS.items()}
        self.path: str | None = None      # the directory from_pretrained loaded (where caption/chat find the processor)
        self._processor = None

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | Any | None = None, mesh=None, fsdp: bool = False) -> "LlavaNext":
        """Loads a directory written by `scripts/convert_torch_weights.py`, or an HF checkpoint directory.

        dtype: "float32", "bfloat16", "float16" (or a numpy/jax dtype). None: bfloat16 on GPU/TPU
        (norms and softmax still run in float32), the stored dtype on CPU.
        mesh: a `jax.sharding.Mesh` with axes ("data", "model") (`sharding.make_mesh`): weights are
        restored straight into their tensor-parallel shardings (`sharding.RULES`), and inputs are split
        over "data"; results equal one device's. The mesh may span several processes
        (`distributed.initialize`, docs/multihost.md): each then reads only the parts of each tensor
        its own devices hold, and every process must make the same calls with the same inputs.
        fsdp: on a mesh, also split every weight over "data" (`sharding.spec_for`): for training, where
        the optimizer state follows the params' layout; inference is faster without (it gathers weights).
        """
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a directory (expected a converted or HF LLaVA-NeXT checkpoint)")
        if os.path.isfile(os.path.join(path, checkpoint.SWAP_JOURNAL)) and not checkpoint.is_converted(path):
            raise ValueError(f"{path}: a conversion into it was stopped before it finished; run the converter again")
        config = LlavaNextConfig.from_file(path)
        if dtype is None and jax.default_backend() != "cpu":
            dtype = "bfloat16"
        dtype = None if dtype is None else _compute_dtype(dtype)
        if mesh is not None:
            sharding.check_mesh(mesh)
        if fsdp and mesh is None:
            raise ValueError("fsdp=True splits the weights over a mesh's \"data\" axis; pass a mesh too")
        if checkpoint.is_converted(path):
            shardings = None if mesh is None else sharding.param_shardings(checkpoint.saved_shapes(path), mesh, fsdp)
            params = checkpoint.load_params(path, dtype, shardings)
        else:
            tensors = convert.iter_tensors(path, config, None if dtype is None else dtype.name)
            if mesh is None:   # committed to the device, as a converted checkpoint's are restored
                device = jax.local_devices()[0]
                params = checkpoint.nest({p: jax.device_put(a, device) for p, a in tensors})
            else:  # one tensor at a time, straight into its sharding (each process keeps its devices' part)
                params = checkpoint.nest({p: distributed.put(a, NamedSharding(mesh, sharding.spec_for(
                    "/".join(p), a.shape, mesh, fsdp))) for p, a in tensors})
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            with open(os.path.join(path, "generation_config.json")) as f:
                generation_config = json.load(f)
        else:   # as HF's from_pretrained: a generation config made from config.json
            with open(os.path.join(path, "config.json")) as f:
                generation_config = generation_config_from_model_config(json.load(f))
        unapplied = {k: generation_config[k] for k, default in UNAPPLIED_GENERATION.items()
                     if generation_config.get(k) not in (None, default)}
        if unapplied:
            warnings.warn(f"{path}: its generation config sets {', '.join(f'{k}={v!r}' for k, v in unapplied.items())}, "
                          "which generate does not apply (HF's would, so outputs may differ from HF's)",
                          UserWarning, stacklevel=2)
        model = cls(config, params, generation_config, mesh)
        model.path = os.fspath(path)
        return model

    def image_token_sources(self, input_ids: np.ndarray, image_sizes: Any, tiles_per_image: int,
                            image_slots: int | None = None) -> np.ndarray:
        """Where each position's image feature comes from (`anyres.token_sources`); validates counts."""
        return anyres.token_sources(input_ids, self.config.image_token_id, image_sizes, self.config.geometry,
                                    tiles_per_image, image_slots)

    def _place(self, *arrays):
        """On a mesh: each numpy array's leading (batch) axis split over "data" (on a multi-process
        mesh each process copies only its own rows). Else unchanged."""
        if self.mesh is None:
            return arrays
        return tuple(None if a is None else distributed.put(a, sharding.batch_sharding(self.mesh, np.shape(a)))
                     for a in arrays)

    def _inputs(self, input_ids, pixel_values, image_sizes, attention_mask, tiles=None, images_multiple=1):
        """Checked numpy inputs and their `sources`; `tiles`/`images_multiple` zero-pad pixel_values to a
        fixed tile count and an image count that is a multiple, for shape-stable compiled programs."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or 0 in ids.shape:
            raise ValueError(f"input_ids must be [batch, length] with at least one row and one token; got shape "
                             f"{ids.shape}")
        generate.check_token_ids(ids, self.config.text.vocab_size)
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"attention_mask must hold 0 (padding) and 1 (tokens); got values {np.unique(mask)[:8]}")
        mask = mask.astype(ids.dtype)
        if pixel_values is None:
            return ids, None, self.image_token_sources(ids, None, 0), mask
        S = self.config.vision.image_size
        pixels = np.asarray(pixel_values)
        if pixels.ndim != 5 or pixels.shape[2:] != (self.config.vision.num_channels, S, S):
            raise ValueError(f"pixel_values must be [images, tiles, {self.config.vision.num_channels}, {S}, {S}]; "
                             f"got shape {tuple(pixels.shape)}")
        if image_sizes is None or np.asarray(image_sizes).shape != (pixels.shape[0], 2):
            raise ValueError(f"image_sizes must be [{pixels.shape[0]}, 2] (height, width per image); got "
                             f"{None if image_sizes is None else np.asarray(image_sizes).shape}")
        anyres.check_tiles(np.asarray(image_sizes), self.config.geometry, pixels.shape[1])   # before padding
        n_images = -(-pixels.shape[0] // images_multiple) * images_multiple
        P = max(pixels.shape[1], tiles or 0)
        if (n_images, P) != pixels.shape[:2]:
            pad = [(0, n_images - pixels.shape[0]), (0, P - pixels.shape[1])] + [(0, 0)] * 3
            pixels = np.pad(pixels, pad)
        return ids, pixels, self.image_token_sources(ids, image_sizes, P, n_images), mask

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None) -> jnp.ndarray:
        """Logits `[B, T, V]` (float32): a jax Array, or numpy when the mesh spans several processes.

        input_ids `[B, T]` with each `<image>` already expanded (the processor does it);
        pixel_values `[B_img, P, C, S, S]`, image_sizes `[B_img, 2]` (height, width);
        attention_mask `[B, T]`, 1 for real tokens (default all ones).
        """
        ids, pixels, sources, mask = self._place(*self._inputs(input_ids, pixel_values, image_sizes, attention_mask))
        logits = llava_next.forward(self.params, self.config, ids, pixels, sources if pixels is not None else None,
                                    mask, self.dtype)
        return logits if logits.is_fully_addressable else distributed.fetch(logits)

    def loss(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, labels=None) -> float:
        """Mean next-token cross-entropy over `labels != -100` (HF's shift), as a float.

        Inputs as in `forward`; labels `[B, T]` int (default: input_ids, with pads masked out).
        """
        return float(distributed.fetch(self._loss_and_grad(input_ids, pixel_values, image_sizes, attention_mask,
                                                           labels, False)))

    def grad(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, labels=None) -> Any:
        """The gradient of `loss` with respect to every parameter: a pytree shaped like `self.params`."""
        return self._loss_and_grad(input_ids, pixel_values, image_sizes, attention_mask, labels, True)

    def train_batch(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, labels=None) -> dict:
        """The batch `train.train_step` / `train.loss_fn` take: input_ids, pixel_values, sources (None
        without images), attention_mask, labels, checked and placed on the mesh.

        Inputs as in `forward`; labels `[B, T]` int (default: input_ids, with pads masked out).
        """
        from . import train
        ids, pixels, sources, mask = self._inputs(input_ids, pixel_values, image_sizes, attention_mask)
        labels = np.where(mask == 1, ids, train.IGNORE) if labels is None else np.asarray(labels)
        if labels.shape != ids.shape:
            raise ValueError(f"labels shape {labels.shape} differs from input_ids shape {ids.shape}")
        generate.check_token_ids(np.where(labels == train.IGNORE, 0, labels), self.config.text.vocab_size,
                                 f"labels (or {train.IGNORE})")
        placed = self._place(ids, pixels, sources if pixels is not None else None, mask, labels)
        return dict(zip(("input_ids", "pixel_values", "sources", "attention_mask", "labels"), placed))

    def _loss_and_grad(self, input_ids, pixel_values, image_sizes, attention_mask, labels, with_grad: bool):
        from . import train
        batch = self.train_batch(input_ids, pixel_values, image_sizes, attention_mask, labels)
        args = (self.params, self.config, batch["input_ids"], batch["pixel_values"], batch["sources"],
                batch["attention_mask"], batch["labels"], self.dtype)
        return train.loss_and_grad(*args)[1] if with_grad else train.loss_fn(*args)

    def generate(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, max_new_tokens=None,
                 min_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None, seed=0,
                 eos_token_id=None, pad_token_id=None, repetition_penalty=None, no_repeat_ngram_size=None,
                 num_beams=None, length_penalty=None, early_stopping=None, num_return_sequences=None,
                 prompt_lookup_num_tokens=None, max_matching_ngram_size=None, return_logprobs=False, *,
                 min_p=None, typical_p=None, epsilon_cutoff=None, eta_cutoff=None, top_h=None,
                 stop_strings=None, tokenizer=None, max_time=None,
                 max_length=None, min_length=None, suppress_tokens=None, begin_suppress_tokens=None,
                 bad_words_ids=None, sequence_bias=None, forced_eos_token_id=None,
                 exponential_decay_length_penalty=None, encoder_repetition_penalty=None, renormalize_logits=None,
                 encoder_no_repeat_ngram_size=None, forced_bos_token_id=None, remove_invalid_values=None,
                 guidance_scale=None, negative_prompt_ids=None, negative_prompt_attention_mask=None):
        """New tokens `[B, max_new_tokens]` (int32); after a row emits a stop id, the pad id. With
        `return_logprobs`, (tokens, logprobs): float32 `[B, max_new_tokens]`, each token's log-probability
        under the distribution it was chosen from (the warpers below applied when sampling; HF's
        `compute_transition_scores(..., normalize_logits=True)`), 0 after a row stopped.

        Inputs as in `forward` (left padding expected; right-padded rows are moved left). A setting left
        out (None) is the checkpoint's generation_config.json's, else HF's default (`GENERATION_DEFAULTS`,
        `self.generation_defaults`), as HF's `generate` resolves it. The length too: max_new_tokens (the
        call's, else the generation config's), else max_length (HF's: the whole sequence, the prompt as
        given, pads included, counted in; the call's, else the generation config's) less the prompt's
        length, else 32 (HF's default is 20; a checkpoint's max_new_tokens wins over a call's
        max_length, as in HF: `generate.new_token_count`). Greedy unless `do_sample`; sampling
        applies HF's warpers in HF's order (`generate.warp`): temperature, top_h (None = off), top_k (0 =
        off; HF's default 50), top_p (1.0 = off), min_p (None = off), typical_p (1.0 = off),
        epsilon_cutoff and eta_cutoff (0.0 = off), each as HF's warper class (where tokens of equal logits
        straddle top_p's or top_h's boundary, they stay together; HF's sort keeps some by position).
        num_return_sequences n > 1 with sampling (num_beams 1): n samples of each prompt, `[B * n,
        max_new_tokens]`, prompt b's in rows b * n + j as HF's (one prefill per prompt; greedy refuses
        n > 1, as HF's). `seed`: one int (row r's draws depend on (seed, r) only; with n, prompt b's
        sample j on (seed, b, j)) or one per prompt row (a row's draws depend on its own seed only, and
        with n on the sample's index, so it samples the same wherever it sits in a batch); a prompt's
        first sample is its sample of n = 1.
        eos_token_id: int or list (default: the checkpoint's generation config). pad_token_id: what
        follows a row's stop id (default: the generation config's, else the first stop id, as HF's).
        repetition_penalty: HF's (> 1 discourages every token of the prompt, from its first real token on
        as HF counts them, and of the output so far; 1.0 off). no_repeat_ngram_size: HF's (n > 0: no
        n-gram of the prompt, pads and image tokens as given included, and the output occurs twice; at
        most `generate.MAX_NGRAM`).
        stop_strings: HF's (a string or a list; needs `tokenizer`: this model's `LlavaNextProcessor`,
        its `.tokenizer`, or an HF fast tokenizer, as HF's generate needs one, and raises without):
        a row stops after the token with which its text ends in one of them, that token kept and pads
        after it, as after a stop id; the prompt's text counts, as in HF's check, so a string begun at
        the prompt's end stops at the token that completes it. Matched as HF matches them
        (`stop_strings`: as UTF-8 bytes for byte-level and byte-fallback tokenizers); at most
        `stop_strings.MAX_STOP_STRINGS`, each at most `MAX_STOP_STRING_LENGTH` characters (bytes).
        Beam search ends a hypothesis there, as HF's. Runtime values: they compile nothing.
        max_time: HF's (seconds from the call, the prefill's included; None: none): once past it, every
        row stops after its current token (beam search: every hypothesis then ends). Checked after each
        token as HF checks it, by a call from the compiled loop to the host's clock (it slows a
        mid-size batch-1 decode on this project's CPU by ~6%, docs/benchmarks.md) in programs of
        their own, compiled where a call sets max_time (one per bucket, as without); where it stops
        depends on the machine's speed, so the output may differ between runs.
        Refused on a multi-process mesh (each host's clock could stop it at a different step).

        guidance_scale: HF's classifier-free guidance (None or 1: off), the first of HF's processors:
        the scores are `g * (log_softmax(logits) - log_softmax(u)) + log_softmax(u)`, u the logits of an
        unconditional sequence that starts, as HF's does, with the prompt's last token alone (no image)
        and continues with the output (`generate.unconditional_prefill`): a second row of the cache
        per row, stepped in the same pass of the decoder, in programs of their own, compiled where a
        call sets it. Not with beam search or prompt lookup (refused). negative_prompt_ids `[B, n]`
        (HF's; with its negative_prompt_attention_mask, default all ones, left-padded, each row at least
        one token): the unconditional sequence starts with that prompt instead (text only; ignored
        where guidance is off, as in HF); n is rounded up to a prompt bucket, and the prompt's bucket
        is at least that.

        HF's other logits processors, in HF's order (`generate.process_scores`), before the sampling
        warpers and in beam search on the log-probabilities; each off where None and not in the
        generation config: sequence_bias (HF's: {tuple of ids: bias}, or [[ids, bias], ...] as
        generation_config.json holds it; a single id's bias always applies, a longer sequence's to its
        last id where the text so far ends with the rest); encoder_repetition_penalty (HF gives a
        decoder-only model its prompt as the "encoder" input: the prompt's tokens as given, pads
        included, rewarded above 1, penalized below); encoder_no_repeat_ngram_size (n > 0: no n-gram of
        that prompt occurs in the output, the prompt's end and the output read as one sequence, as in
        HF; at most `generate.MAX_NGRAM`); bad_words_ids (a list of id lists, banned as
        sequence_bias bans with -inf; an entry that is one stop id alone is dropped, as HF drops it);
        at most `generate.MAX_BIAS_SEQUENCES` entries of 2 or more ids in each of the two, each at most
        `MAX_BIAS_LENGTH` long (single ids: any number); min_length (HF's: stop ids banned while the
        prompt as given plus the new tokens is shorter; min_new_tokens, where given, overrides it, as in
        HF); forced_bos_token_id (an id: every other token banned at the first step where the prompt,
        pads included, is one token long, as HF's processor reads it; other prompts as HF: unchanged);
        forced_eos_token_id (an id or a list: every other token banned at the last step);
        remove_invalid_values (True: nan scores become 0 and infinite ones, the bans of the processors
        before it included, the float32 extremes, as HF's InfNanRemoveLogitsProcessor);
        exponential_decay_length_penalty ((start_index, decay_factor): at step k > start_index,
        steps counted from 0, a stop id's score gains |score| * (decay_factor**(k - start_index) - 1));
        suppress_tokens (ids banned at every step); begin_suppress_tokens (ids banned at the first new
        token; the second after a forced bos); renormalize_logits (a log-softmax after the processors:
        it changes beam search's scores and so its choices; greedy and sampled tokens and their log-probabilities, which are taken under
        the normalized distribution anyway, it leaves as they are). Runtime values: they compile nothing.

        num_beams > 1: HF's beam search (`beam`), with its length_penalty (a finished hypothesis
        scores sum of log-probabilities / length**length_penalty) and early_stopping (False: stop when
        HF's heuristic says no running beam can win; True: as soon as num_beams hypotheses finished;
        "never": only when none can win at max_new_tokens). With do_sample, HF's beam sampling: the
        warpers (each keeping at least the stop ids' count + 1 tokens a beam, HF's min_tokens_to_keep)
        act on the processed log-probabilities, and each step draws HF's (stop ids + 1) * num_beams
        continuations of a prompt without replacement from the softmax of their accumulated scores
        (Gumbel-top-k, keyed by the prompt row's seed as sampling keys it, and the step), best first.
        Returns the best num_return_sequences (<= num_beams) of each row, rows in order: `[B *
        num_return_sequences, max_new_tokens]`; with `return_logprobs`, (tokens, scores): float32 `[B
        * num_return_sequences]`, HF's `sequences_scores`.

        prompt_lookup_num_tokens (HF's prompt lookup decoding; None or 0: off): each pass of the model
        also takes up to this many tokens drafted from the prompt and the output so far (where the
        last max_matching_ngram_size or fewer tokens occurred before, what followed them), and keeps
        those the model would have chosen itself: the same tokens and log-probabilities as without,
        greedy or sampled, in fewer passes where the output repeats the prompt or itself; where drafts
        keep failing, it pauses drafting for longer and longer (`generate.LOOKUP_MISSES`,
        `LOOKUP_PAUSE`). The rows of a batch keep as many as the row that keeps fewest
        (`generate.decode_loop`). At most
        `generate.MAX_LOOKUP`; on a CPU, up to 7 (passes of batch x (n + 1) <= 8 rows) stay on the
        native few-row kernels.

        Compiled programs: a prefill and a decode loop per (batch size, prompt bucket, new-token
        bucket, images or not, num_beams, sampled num_return_sequences, prompt_lookup_num_tokens,
        max_time set or not);
        prompt lengths round up to `generate.PROMPT_BUCKETS`,
        max_new_tokens to `NEW_TOKEN_BUCKETS`, tiles to the most the pinpoints allow, and the image
        count to a multiple of the batch size. Sampling and beam settings are runtime values: they
        compile nothing.
        """
        settings = self.generation_settings(
            min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_h=top_h,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size, num_beams=num_beams,
            length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_return_sequences,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens, max_matching_ngram_size=max_matching_ngram_size,
            stop_strings=stop_strings)
        num_beams, num_return_sequences = settings.pop("num_beams"), settings["num_return_sequences"]
        prompt_lookup_num_tokens = settings["prompt_lookup_num_tokens"]
        if not is_positive_int(num_beams):
            raise ValueError(f"num_beams must be an int >= 1; got {num_beams!r}")
        if num_beams > 1 and not (is_int(num_return_sequences) and 1 <= num_return_sequences <= num_beams):
            raise ValueError(f"num_return_sequences must be an int in [1, num_beams={num_beams}] (beam search "
                             f"returns its best beams); got {num_return_sequences!r}")
        if num_beams > 1 and prompt_lookup_num_tokens:
            raise ValueError(f"prompt_lookup_num_tokens={prompt_lookup_num_tokens} drafts one sequence per row; "
                             f"beam search (num_beams={num_beams}) takes none")
        if num_beams > 1:   # the best num_return_sequences beams, below
            settings["num_return_sequences"] = 1
        args = self.generation_inputs(input_ids, pixel_values, image_sizes, attention_mask, max_new_tokens, seed=seed,
                                      eos_token_id=eos_token_id, pad_token_id=pad_token_id, tokenizer=tokenizer,
                                      max_length=max_length,
                                      min_length=min_length, suppress_tokens=suppress_tokens,
                                      begin_suppress_tokens=begin_suppress_tokens, bad_words_ids=bad_words_ids,
                                      sequence_bias=sequence_bias, forced_eos_token_id=forced_eos_token_id,
                                      exponential_decay_length_penalty=exponential_decay_length_penalty,
                                      encoder_repetition_penalty=encoder_repetition_penalty,
                                      renormalize_logits=renormalize_logits,
                                      encoder_no_repeat_ngram_size=encoder_no_repeat_ngram_size,
                                      forced_bos_token_id=forced_bos_token_id,
                                      remove_invalid_values=remove_invalid_values, max_time=max_time,
                                      guidance_scale=guidance_scale, negative_prompt_ids=negative_prompt_ids,
                                      negative_prompt_attention_mask=negative_prompt_attention_mask, **settings)
        max_new_tokens = int(args["options"]["max_new_tokens"])
        if num_beams == 1:
            tokens, logprobs = (distributed.fetch(a)[:, :max_new_tokens]
                                for a in generate.generate_tokens(self.params, self.config, **args))
            return (tokens, logprobs) if return_logprobs else tokens
        from .beam import beam_tokens
        if args.pop("guided"):
            guidance_scale = self.generation_settings(guidance_scale=guidance_scale)["guidance_scale"]
            raise ValueError(f"guidance_scale={guidance_scale!r} (the call's or the checkpoint's generation config's) "
                             f"with beam search (num_beams={num_beams}): classifier-free guidance decodes one "
                             f"sequence per row here; leave guidance_scale None or 1 with beams")
        args.pop("lookup"), args.pop("samples"), args.pop("negative")   # no drafts, no guidance; rows: beams
        tokens, scores = (distributed.fetch(a) for a in beam_tokens(self.params, self.config, **args,
                                                                   num_beams=int(num_beams)))
        tokens = tokens[:, :num_return_sequences, :max_new_tokens].reshape(-1, max_new_tokens)
        scores = scores[:, :num_return_sequences].reshape(-1)
        return (tokens, scores) if return_logprobs else tokens

    def generate_stream(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None,
                        max_new_tokens=None, chunk: int | None = None, return_logprobs=False,
                        **generation) -> Iterator:
        """`generate` as it goes: yields the new tokens `[B, n]` (int32, n <= chunk) of every `chunk`
        decode steps, until every row has stopped or max_new_tokens is reached. Concatenated along
        axis 1 they are `generate`'s tokens (which pads the steps after the last row stopped).
        return_logprobs: yields (tokens, logprobs) pairs instead, as `generate` returns them.

        Arguments as `generate` (**generation: min_new_tokens, do_sample, temperature, top_k, top_p,
        min_p, typical_p, epsilon_cutoff, eta_cutoff, top_h, num_return_sequences (sampled: `B * n`
        rows), seed, eos_token_id, pad_token_id, repetition_penalty, no_repeat_ngram_size, stop_strings
        and tokenizer, the processors (`PROCESSOR_SETTINGS`), max_length, prompt_lookup_num_tokens,
        max_matching_ngram_size: a chunk then holds up to chunk + prompt_lookup_num_tokens tokens).
        Between chunks the
        loop returns to Python, which costs a dispatch a chunk: nothing measurable on a CPU, ~3 ms for a
        7B model on an H100 against a 6 ms step. chunk defaults to `generate.default_stream_chunk()`: 1
        on a CPU, 8 on an accelerator. The programs are `generate`'s prefill and a resumable decode
        loop, compiled once per bucket as `generate`'s (a new chunk size compiles nothing).
        """
        num_beams = self.generation_settings(num_beams=generation.pop("num_beams", None))["num_beams"]
        beam_only = sorted({"length_penalty", "early_stopping"} & set(generation))
        if num_beams != 1 or beam_only:
            what = f"num_beams={num_beams}" if num_beams != 1 else f"beam search's {', '.join(beam_only)}"
            raise ValueError(f"streaming decodes one sequence per row; {what} needs generate (a beam's tokens "
                             f"are known only when the search ends)")
        args = self.generation_inputs(input_ids, pixel_values, image_sizes, attention_mask, max_new_tokens,
                                      **generation)
        chunk = generate.default_stream_chunk() if chunk is None else chunk
        for tokens, logprobs in generate.stream_tokens(self.params, self.config, **args, chunk=chunk,
                                                       fetch=distributed.fetch):
            yield (tokens, logprobs) if return_logprobs else tokens

    def generation_settings(self, **given) -> dict[str, Any]:
        """`given` generation settings with each None replaced by `self.generation_defaults`' value (the
        checkpoint's generation config, else HF's default)."""
        return {k: self.generation_defaults[k] if v is None else v for k, v in given.items()}

    def generation_inputs(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None,
                          max_new_tokens=None, min_new_tokens=None, do_sample=None, temperature=None, top_k=None,
                          top_p=None, min_p=None, typical_p=None, epsilon_cutoff=None, eta_cutoff=None, top_h=None,
                          seed=0, eos_token_id=None, pad_token_id=None,
                          repetition_penalty=None, no_repeat_ngram_size=None, length_penalty=None,
                          early_stopping=None, num_return_sequences=None, prompt_lookup_num_tokens=None,
                          max_matching_ngram_size=None, stop_strings=None, tokenizer=None, max_length=None,
                          max_time=None, negative_prompt_ids=None, negative_prompt_attention_mask=None,
                          **processors) -> dict[str, Any]:
        """The bucketed, padded arguments `generate.generate_tokens` takes (see `generate`; settings left
        out as there; num_return_sequences: rows per prompt, sampled, as `generate`'s with num_beams 1).
        processors: `PROCESSOR_SETTINGS`."""
        unknown = sorted(set(processors) - set(PROCESSOR_SETTINGS))
        if unknown:
            raise TypeError(f"unexpected generation argument(s): {', '.join(unknown)}")
        s = self.generation_settings(
            max_new_tokens=max_new_tokens, max_length=max_length,
            min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, typical_p=typical_p, epsilon_cutoff=epsilon_cutoff, eta_cutoff=eta_cutoff, top_h=top_h,
            repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
            length_penalty=length_penalty, early_stopping=early_stopping, num_return_sequences=num_return_sequences,
            prompt_lookup_num_tokens=prompt_lookup_num_tokens, max_matching_ngram_size=max_matching_ngram_size,
            stop_strings=stop_strings, max_time=max_time, **{k: processors.get(k) for k in PROCESSOR_SETTINGS})
        samples, prompt_lookup_num_tokens = s.pop("num_return_sequences"), s.pop("prompt_lookup_num_tokens")
        max_new_tokens, max_length = s.pop("max_new_tokens"), s.pop("max_length")
        stop_strings = s.pop("stop_strings")
        if s["max_time"] is not None and jax.process_count() > 1:
            raise ValueError(f"max_time={s['max_time']!r} on a multi-process mesh: each host's clock could stop the "
                             f"decode loop at a different step; leave max_time None there")
        if stop_strings is not None and tokenizer is None:   # HF raises too
            raise ValueError(f"stop_strings={stop_strings!r} (the call's or the checkpoint's generation config's) "
                             f"need the model's tokenizer: pass tokenizer= (a LlavaNextProcessor, its .tokenizer, "
                             f"or an HF fast tokenizer)")
        tables = None if stop_strings is None else stop_string_tables(tokenizer, stop_strings,
                                                                      self.config.text.vocab_size)
        if not is_positive_int(samples):
            raise ValueError(f"num_return_sequences must be an int >= 1; got {samples!r}")
        if samples > 1 and not s["do_sample"]:
            raise ValueError(f"num_return_sequences={samples} needs do_sample=True (or num_beams >= {samples}): "
                             f"greedy decoding has one sequence per prompt (HF's generate raises too)")
        lookup = 0 if prompt_lookup_num_tokens is None else prompt_lookup_num_tokens
        if not is_int(lookup) or not 0 <= lookup <= generate.MAX_LOOKUP:
            raise ValueError(f"prompt_lookup_num_tokens must be None or an int in [0, {generate.MAX_LOOKUP}] "
                             f"(0: off); got {prompt_lookup_num_tokens!r}")
        ids, pixels, sources, mask = self._inputs(input_ids, pixel_values, image_sizes, attention_mask,
                                                  tiles=self.config.geometry.max_tiles,
                                                  images_multiple=np.asarray(input_ids).shape[0])
        ids, mask, sources = _left_align(ids, mask, sources)
        prompt_ids, prompt_mask = ids, mask   # before bucketing: the penalties' and n-gram bans' prompt
        stop_ids = self.stop_ids(eos_token_id)
        pad_id = self.pad_id(eos_token_id, pad_token_id)
        B, T = ids.shape
        max_new_tokens = generate.new_token_count(max_new_tokens, max_length, T)
        negative = None
        if negative_prompt_ids is not None and s["guidance_scale"] not in (None, 1):   # HF ignores it unguided
            negative = _negative_prompt(negative_prompt_ids, negative_prompt_attention_mask, B,
                                        self.config.text.vocab_size, pad_id)
        longest = max(T, 0 if negative is None else negative["ids"].shape[1])   # the negative prompt fits in its slots
        ids, mask, sources = generate.pad_prompt(ids, mask, sources,
                                                 generate.bucket(longest, generate.PROMPT_BUCKETS), pad_id)
        opts = generate.options(B, max_new_tokens, s.pop("min_new_tokens"), s.pop("do_sample"), s.pop("temperature"),
                                s.pop("top_k"), s.pop("top_p"), seed, stop_ids, pad_id, prompt_ids=prompt_ids,
                                prompt_mask=prompt_mask, vocab_size=self.config.text.vocab_size,
                                prompt_bucket=ids.shape[1], num_return_sequences=samples, stop_strings=tables, **s)
        guided = bool(opts["guidance_scale"] != 1)   # checked there
        if guided and lookup:
            raise ValueError(f"guidance_scale={s['guidance_scale']!r} with prompt_lookup_num_tokens={lookup}: a pass "
                             f"that checks drafts has no unconditional sequence to guide it; leave one of them off")
        ids, mask, sources, pixels = self._place(ids, mask, sources, pixels)
        if negative is not None:
            negative = {key: self._place(value)[0] for key, value in negative.items()}
        return dict(input_ids=ids, pixel_values=pixels, sources=None if pixels is None else sources,
                    attention_mask=mask, options=opts, dtype=self.dtype,
                    new_bucket=generate.bucket(max_new_tokens, generate.NEW_TOKEN_BUCKETS), lookup=int(lookup),
                    samples=int(samples), timed=s["max_time"] is not None, guided=guided, negative=negative)

    def pad_id(self, eos_token_id=None, pad_token_id=None) -> int:
        """The id `generate` pads with after a row stops, given the call's eos_token_id and pad_token_id:
        the pad id (the call's, else the generation config's), else the first stop id, as HF's (0
        where there is none)."""
        pad_id = self.pad_token_id if pad_token_id is None else pad_token_id
        return int((self.stop_ids(eos_token_id) or (0,))[0] if pad_id is None else pad_id)

    def stop_ids(self, eos_token_id=None) -> tuple[int, ...]:
        """The ids that end a row: the call's eos_token_id (an int or a list), else the checkpoint's."""
        return self.eos_token_ids if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())

    # -- high-level calls -------------------------------------------------------------------------

    def get_processor(self, processor=None):
        """The `LlavaNextProcessor` caption/chat use: `processor` if given, else the one loaded from
        `self.path` (once, then cached on the model)."""
        if processor is not None:
            return processor
        if self._processor is None:
            if self.path is None:
                raise ValueError("this model was built without a checkpoint path (not via LlavaNext.from_pretrained), "
                                 "so there is no processor to load: pass processor=LlavaNextProcessor."
                                 "from_pretrained(checkpoint_dir)")
            from .processor import LlavaNextProcessor
            try:
                self._processor = LlavaNextProcessor.from_pretrained(self.path)
            except (FileNotFoundError, KeyError, ValueError) as e:
                raise ValueError(f"cannot load the processor (tokenizer and image settings) from {self.path}: {e}; "
                                 f"copy the checkpoint's tokenizer/processor files there or pass processor=") from e
        return self._processor

    def caption(self, images, prompt: str | None = None, processor=None, batch_size: int = 8,
                max_new_tokens: int = 64, **generation) -> list[str]:
        """One caption (str) per image, in input order.

        images: a list (or one) of PIL images, image file paths, or uint8 numpy arrays `[H, W]` /
            `[H, W, 1|3|4]` (a uint8 `[N, H, W, C]` array, numpy, jax or torch, is N images); any sizes (anyres tiling as
            the checkpoint's processor does).
        prompt: the question asked of every image (default `prompting.DEFAULT_CAPTION_PROMPT`), put
            through the checkpoint's chat template with the image in the user turn.
        processor: a `LlavaNextProcessor`; default: loaded from the checkpoint directory and cached.
        batch_size: images per `generate` call (chunks of the input, in order). Greedy captions do not
            depend on it; with `do_sample=True` image i is seeded with `seed + i` (`seed` default 0),
            so sampled captions do not depend on it either.
        max_new_tokens, **generation: as `generate` (do_sample, temperature, top_k, top_p, min_p,
            typical_p, epsilon_cutoff, eta_cutoff, top_h, seed,
            min_new_tokens, eos_token_id, pad_token_id, repetition_penalty, no_repeat_ngram_size,
            stop_strings (matched with the processor's tokenizer), the processors (suppress_tokens,
            bad_words_ids, ...: `PROCESSOR_SETTINGS`);
            num_beams, length_penalty, early_stopping: an image's caption is then its best beam).
        Compiles a generate program per (batch size, prompt bucket, ...); a last chunk shorter than
        batch_size runs as a full one (its last image repeated, those captions dropped), so it
        compiles nothing of its own.

        Raises ValueError when the model has no checkpoint path (built by hand) and no processor is
        given, or when the prompt holds an image placeholder itself; TypeError / FileNotFoundError /
        ValueError from the processor for an unreadable image (nothing is captioned then).
        """
        from .processor import image_list
        from .prompting import DEFAULT_CAPTION_PROMPT, chat_prompt, decode_new_tokens
        _text_only(generation, "caption")
        images = image_list(images)
        if not is_positive_int(batch_size):
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        proc = self.get_processor(processor)
        generation.setdefault("tokenizer", proc)   # for stop_strings
        text, add_special = chat_prompt(proc, DEFAULT_CAPTION_PROMPT if prompt is None else prompt)
        seed = generation.pop("seed", 0)
        per_image_seed = np.ndim(seed) > 0
        if per_image_seed and np.shape(seed) != (len(images),):
            raise ValueError(f"seed must be one int or one per image ({len(images)}); got shape {np.shape(seed)}")
        seeds = (np.asarray(seed, np.int64) if per_image_seed
                 else int(seed) + np.arange(len(images), dtype=np.int64)) % 2 ** 32
        rows = min(batch_size, len(images))   # every chunk's batch size
        captions: list[str] = []
        for start in range(0, len(images), batch_size):
            chunk = list(images[start:start + batch_size])
            inputs = proc(images=chunk, text=[text] * len(chunk), add_special_tokens=add_special)
            tokens = self.generate(**repeat_last_row(inputs, rows), max_new_tokens=max_new_tokens,
                                   num_return_sequences=1, **generation,
                                   seed=repeat_last_row(seeds[start:start + len(chunk)], rows).astype(np.uint32))
            captions += decode_new_tokens(proc, tokens[:len(chunk)])
        return captions

    def chat(self, image, question: str, history=None, processor=None, max_new_tokens: int = 128,
             **generation) -> str:
        """The answer (str) to `question` about `image` (a PIL image, path or uint8 array, or a list of
        them: several images in one prompt, in order).

        history: earlier turns as a list of (question, answer) string pairs, oldest first; the images
            go in the first user turn, so `chat(img, q2, history=[(q1, a1)])` continues the chat
            that `a1 = chat(img, q1)` started. processor, max_new_tokens, **generation: as `caption`.
        """
        from .prompting import decode_new_tokens
        _text_only(generation, "chat")
        proc, inputs = self._chat_inputs(image, question, history, processor)
        generation.setdefault("tokenizer", proc)   # for stop_strings
        return decode_new_tokens(proc, self.generate(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=1,
                                                     **generation))[0]

    def _chat_inputs(self, image, question: str, history, processor):
        """(processor, its inputs) for `chat`: one image or a list of them in the first user turn."""
        from .prompting import chat_prompt
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("chat needs at least one image")
        proc = self.get_processor(processor)
        text, add_special = chat_prompt(proc, question, history, len(images))
        return proc, proc(images=images, text=[text], add_special_tokens=add_special)

    def chat_stream(self, image, question: str, history=None, processor=None, max_new_tokens: int = 128,
                    **generation) -> Iterator[str]:
        """`chat`'s answer in pieces as it is generated; the pieces join to `chat`'s answer.

        A piece ends before the last space decoded so far, so the word being written (which may still
        change: a multi-byte character split over tokens, a space the tokenizer folds into punctuation)
        comes with the next piece; the rest comes when generation ends. Arguments as `chat`;
        `chunk` sets how many tokens are decoded between pieces (`generate_stream`; by default 1 on a
        CPU, 8 on an accelerator).
        """
        from .prompting import decode_new_tokens
        _text_only(generation, "chat_stream")
        proc, inputs = self._chat_inputs(image, question, history, processor)
        generation.setdefault("tokenizer", proc)   # for stop_strings
        tokens, sent = np.zeros((1, 0), np.int32), ""
        for new in self.generate_stream(**inputs, max_new_tokens=max_new_tokens, num_return_sequences=1,
                                        **generation):
            tokens = np.concatenate([tokens, new], axis=1)
            answer = decode_new_tokens(proc, tokens)[0]
            ready = answer[:max(answer.rfind(" "), 0)].rstrip()
            if len(ready) > len(sent) and ready.startswith(sent):
                yield ready[len(sent):]
                sent = ready
        answer = decode_new_tokens(proc, tokens)[0]
        if not answer.startswith(sent):   # a tokenizer whose decoding of a prefix is not a prefix
            raise RuntimeError(f"streamed {sent!r}, but the whole answer decodes to {answer!r}")
        if len(answer) > len(sent):
            yield answer[len(sent):]


def generation_config_from_model_config(raw: dict) -> dict:
    """The generation settings HF's `from_pretrained` takes from config.json where a checkpoint has no
    generation_config.json (`GenerationConfig.from_model_config`): the top level's values, then, for
    those it leaves unset, text_config's (the special tokens, and any generation setting written there)."""
    keys = ("eos_token_id", "pad_token_id", *GENERATION_DEFAULTS)
    text = raw.get("text_config") or {}
    return {k: raw[k] if raw.get(k) is not None else text.get(k) for k in keys}


def _text_only(generation: dict, call: str) -> None:
    """The string-returning calls take `generate`'s sampling and beam settings, not its output options
    (they pass num_return_sequences=1 themselves, over a generation config's)."""
    if "return_logprobs" in generation:
        raise TypeError(f"{call} returns text; for log-probabilities call generate(..., return_logprobs=True) "
                        f"with the processor's inputs")
    if "num_return_sequences" in generation:
        raise TypeError(f"{call} returns one text per prompt (the best beam); for several beams or samples call "
                        f"generate(..., num_return_sequences=R) (with num_beams=K >= R, or do_sample=True) with the "
                        f"processor's inputs")


DTYPES = tuple(convert.DTYPES)   # float32, bfloat16, float16


def _compute_dtype(given) -> jnp.dtype:
    """`from_pretrained`'s dtype: a float32, bfloat16 or float16 name or dtype."""
    try:
        dtype = jnp.dtype(given)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} (or None: as stored); got {given!r}")
    return dtype


def _negative_prompt(ids, mask, rows: int, vocab_size: int, pad_id: int) -> dict[str, np.ndarray]:
    """HF's negative_prompt_ids `[rows, n]` and its attention mask (None: all ones), checked, as
    `generate.unconditional_prefill` takes them: left-padded to a prompt bucket with `pad_id`."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[0] != rows or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"negative_prompt_ids must be integer ids [batch={rows}, length >= 1]; got "
                         f"{ids.dtype} {list(ids.shape)}")
    generate.check_token_ids(ids, vocab_size, "negative_prompt_ids")
    mask = np.ones(ids.shape, np.int32) if mask is None else np.asarray(mask)
    if mask.shape != ids.shape or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"negative_prompt_attention_mask must be 0/1 values shaped like negative_prompt_ids "
                         f"{list(ids.shape)}; got {mask.dtype} {list(mask.shape)}")
    mask = mask.astype(np.int32)
    for r, row in enumerate(mask):   # zeros, then ones to the end
        if not row.any():
            raise ValueError(f"negative_prompt_attention_mask row {r} holds no token (all 0)")
        if not row[-1] or (np.diff(row) < 0).any():
            at = int(np.argmax(row)) + int(np.argmin(row[np.argmax(row):]))
            raise ValueError(f"negative_prompt_attention_mask row {r} has a pad (0) at index {at} after a token: "
                             f"each row must be left-padded (zeros, then ones to the end)")
    ids, mask, _ = generate.pad_prompt(ids.astype(np.int32), mask, None,
                                       generate.bucket(ids.shape[1], generate.PROMPT_BUCKETS), pad_id)
    return {"ids": ids, "mask": mask}


def repeat_last_row(batch, rows: int):
    """A batch (an array, or a dict of them: a processor's output for prompts of one image each) grown
    to `rows` rows along axis 0 by repeating its last: a short batch then runs the programs compiled for
    a full one (each new batch size compiles its own), its extra rows' results to be dropped."""
    if isinstance(batch, dict):
        return {key: repeat_last_row(value, rows) for key, value in batch.items()}
    batch = np.asarray(batch)
    extra = rows - batch.shape[0]
    return np.concatenate([batch, np.repeat(batch[-1:], extra, axis=0)]) if extra > 0 else batch


def _left_align(ids: np.ndarray, mask: np.ndarray, sources: np.ndarray):
    """Moves each row's real tokens to the right end (generation needs left padding)."""
    if ((mask[:, 1:] > mask[:, :-1]).sum(1) + mask[:, 0] > 1).any():   # a second block of ones starts
        raise ValueError("attention_mask rows must be one block of ones (left or right padding)")
    if mask[:, -1].all():
        return ids, mask, sources
    shifts = mask.shape[1] - 1 - np.where(mask.any(1), mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1), 0)
    roll = lambda a: np.stack([np.roll(row, s) for row, s in zip(a, shifts)])
    return roll(ids), roll(mask), roll(sources)
