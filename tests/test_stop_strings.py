"""stop_strings against HF's StopStringCriteria: its per-token tables and its decisions, on a
byte-level and two SentencePiece-style (byte-fallback) tiny tokenizers, ours (tokenizer.json through
our loader) and HF's objects alike; and generation with stop strings against HF's generate."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from transformers.generation.stopping_criteria import StopStringCriteria

import tiny_tokenizers as tt
from llava_next_jax import generate, stop_strings
from llava_next_jax.processor import load_tokenizer

# Several at once: text in one token or across several, bytes of multi-byte characters, a special
# token's text, a prefix of itself repeated ("a a"), punctuation, a newline.
STRINGS = ["the", "e c", "東", "é", "<|im_end|>", " a a", "?!", "\n"]


def _hf_sets(criteria, index: int, count: int):
    """(valid positions, end overlaps) per string and the length of token `index`, from HF's table."""
    row, P, E = criteria.embedding_vec[index].numpy(), criteria.max_valid_positions, criteria.max_valid_end_lens
    positions = [set(row[P * s:P * (s + 1)]) - {-1} for s in range(count)]
    ends = [set(row[P * count + E * s:P * count + E * (s + 1)]) - {-1} for s in range(count)]
    return positions, ends, int(row[-1])


def _bits(mask) -> set[int]:
    return {v for v in range(1, 33) if int(mask) >> (v - 1) & 1}


@pytest.mark.parametrize("family", ["chatml-qwen2", "mistral", "llama3"])
def test_tables_and_decisions_equal_hf(family, tmp_path):
    """Our tables hold HF's valid positions, end overlaps and (capped) lengths for every token, built
    from tokenizer.json through our loader and from HF's tokenizer object alike; and for every prefix
    of texts holding the strings, `generate.stop_string_hits` says what HF's criteria says (prompt
    slots of -1 before them: no token)."""
    hf = tt.build_tokenizer(family)
    ours = load_tokenizer(tt.write_tokenizer(tmp_path, family))[0]
    rows = len(hf)
    tables = stop_strings.tables(ours, STRINGS, rows)
    from_hf = stop_strings.tables(hf, STRINGS, rows)
    for key in tables:
        np.testing.assert_array_equal(tables[key], from_hf[key], err_msg=key)
    criteria = StopStringCriteria(hf, STRINGS)
    for index in range(rows):
        positions, ends, length = _hf_sets(criteria, index, len(STRINGS))
        assert tables["stop_string_token_lengths"][index] == min(length, stop_strings.MAX_STOP_STRING_LENGTH)
        for s in range(len(STRINGS)):
            assert _bits(tables["stop_string_positions"][index, s]) == positions[s], (index, s)
            assert _bits(tables["stop_string_ends"][index, s]) == ends[s], (index, s)

    texts = ["the cat sits on the mat", "a blue car?! 東京 café", "one two\nthree", "<|im_end|> a a a red",
             "naïve photo ééé", "what is there"]
    sequences = [ids[:n] for ids in (hf(t, add_special_tokens=False)["input_ids"] for t in texts)
                 for n in range(1, len(ids) + 1)]
    S = max(map(len, sequences)) + 3
    padded = np.array([[-1] * (S - len(ids)) + ids for ids in sequences], np.int32)
    options = generate.options(1, 4, 0, False, 1.0, 0, 1.0, 0, (), 0, prompt_ids=np.zeros((1, 1), np.int64),
                               vocab_size=rows, stop_strings=tables)
    ours = np.asarray(jax.jit(generate.stop_string_hits)(padded, S, options))
    theirs = np.array([bool(criteria(torch.tensor([ids]), None)[0]) for ids in sequences])
    np.testing.assert_array_equal(ours, theirs)
    assert 10 < theirs.sum() < len(theirs) - 10   # both answers, many times


NEW = 16
PROMPTS = ["describe the photo", "a red car near the tree and", "what is this"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model as an HF checkpoint (its tokenizer's vocabulary is the model's): HF's model and
    fast tokenizer, and our processor; our model is loaded in the test (after its generation config)."""
    from transformers import AutoTokenizer, LlavaNextForConditionalGeneration
    from llava_next_jax import LlavaNextProcessor, demo
    path = demo.write_hf_checkpoint(tmp_path_factory.mktemp("stop-demo"))
    hf = LlavaNextForConditionalGeneration.from_pretrained(str(path)).eval()
    return path, hf, AutoTokenizer.from_pretrained(str(path)), LlavaNextProcessor.from_pretrained(str(path))


def _hf(hf, batch, tokenizer=None, **settings):
    with torch.no_grad():
        out = hf.generate(**{k: torch.from_numpy(v) for k, v in batch.items()}, do_sample=False,
                          max_new_tokens=NEW, tokenizer=tokenizer, **settings)
    new = out[:, batch["input_ids"].shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, NEW - new.shape[1])), constant_values=hf.generation_config.pad_token_id)


def test_generation_stops_as_hf(demo):
    """Greedy with stop strings read off HF's own output (one across a token boundary, one inside one
    token, one begun in the prompt, with the eos id in play): HF's tokens, the completing token kept
    and pads after; so streamed, in beam search (HF's ends hypotheses there), and from generation_config.json
    where a tokenizer is given; errors where none is, or for bad strings; new strings compile nothing.
    (Prompt lookup: tests/test_generate.py, where the model repeats itself.)"""
    import json
    from llava_next_jax import LlavaNext
    path, hf, hf_tok, proc = demo
    batch = proc(text=PROMPTS)
    free = _hf(hf, batch)
    text = lambda row, n: hf_tok.decode(free[row, :n])
    # row 0: 2 characters before the boundary between its tokens 5 and 6, and 1 after
    across = text(0, 7)[len(text(0, 6)) - 2:len(text(0, 6)) + 1]
    # row 1: the middle of its longest token among its first 8
    k = max(range(8), key=lambda i: len(hf_tok.decode(free[1, i:i + 1])))
    piece = hf_tok.decode(free[1, k:k + 1]).strip()
    inside = piece[1:-1] if len(piece) > 3 else piece
    # row 2: the prompt's last 2 characters and the first 2 new ones
    prompt = [int(t) for t in batch["input_ids"][2][batch["attention_mask"][2] == 1]]
    end = len(hf_tok.decode(prompt, skip_special_tokens=True))
    begun = hf_tok.decode(prompt + [int(free[2, 0])], skip_special_tokens=True)[end - 2:end + 2]
    strings = [across, inside, begun]
    ref = _hf(hf, batch, hf_tok, stop_strings=strings)
    pad = hf.generation_config.pad_token_id
    assert (ref[:, -1] == pad).all() and (ref[2, 1:] == pad).all(), (strings, ref)   # each row stopped early

    (path / "generation_config.json").write_text(json.dumps(
        {**json.loads((path / "generation_config.json").read_text()), "stop_strings": strings}))
    model = LlavaNext.from_pretrained(str(path))
    hf.generation_config.stop_strings = strings
    ours = model.generate(**batch, max_new_tokens=NEW, tokenizer=proc)     # the generation config's strings
    np.testing.assert_array_equal(ours, ref)
    compiled = generate.compiled_programs()
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, stop_strings=across,
                                                 tokenizer=proc.tokenizer), _hf(hf, batch, hf_tok, stop_strings=across))
    assert generate.compiled_programs() == compiled   # other strings: the same programs
    streamed = list(model.generate_stream(**batch, max_new_tokens=NEW, tokenizer=hf_tok, chunk=3))
    joined = np.concatenate(streamed, axis=1)
    np.testing.assert_array_equal(joined, ref[:, :joined.shape[1]])
    assert joined.shape[1] < NEW and (ref[:, joined.shape[1]:] == pad).all()
    beams = dict(num_beams=2, num_return_sequences=2)
    beam_ref = _hf(hf, batch, hf_tok, **beams)
    np.testing.assert_array_equal(model.generate(**batch, max_new_tokens=NEW, tokenizer=proc, **beams), beam_ref)
    assert (beam_ref[:, -1] == pad).sum() >= 2   # hypotheses the strings ended

    with pytest.raises(ValueError, match="need the model's tokenizer: pass tokenizer="):
        model.generate(**batch, max_new_tokens=NEW)
    with pytest.raises(ValueError, match="tokenizer"):   # HF's raises too
        _hf(hf, batch)
    with pytest.raises(TypeError, match="tokenizer must be a LlavaNextProcessor.*got object"):
        model.generate(**batch, max_new_tokens=NEW, tokenizer=object())
    for bad, message in (([""], "non-empty string or a non-empty list"), ([], "non-empty"), ("x" * 33, "33 char"),
                         (["a"] * 9, "at most 8 stop_strings; got 9"), ("Ω", "no token .* can end")):
        with pytest.raises(ValueError, match=message):
            model.generate(**batch, max_new_tokens=NEW, stop_strings=bad, tokenizer=proc)
