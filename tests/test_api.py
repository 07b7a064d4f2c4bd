"""The high-level calls `LlavaNext.caption` and `LlavaNext.chat`, on the random-weight demo model.

References are built by hand: the processor's own `apply_chat_template(tokenize=True)` with the image
in the message, `LlavaNext.generate` on that one image, `batch_decode`.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from llava_next_jax import LlavaNext, LlavaNextProcessor
from llava_next_jax.prompting import DEFAULT_CAPTION_PROMPT

SIZES = [(480, 640), (900, 300), (128, 128), (60, 40), (300, 310)]   # (h, w): several tile grids
NEW = 8


@pytest.fixture(scope="session")
def model(demo_dir):
    return LlavaNext.from_pretrained(demo_dir)


@pytest.fixture(scope="session")
def processor(demo_dir):
    return LlavaNextProcessor.from_pretrained(demo_dir)


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """Mixed inputs: PIL images, a file path, uint8 arrays (RGB and grey)."""
    rng = np.random.default_rng(1)
    arrays = [np.clip(np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1, 3) + rng.integers(0, 90, (h, 1, 3)),
                      0, 255).astype(np.uint8) for h, w in SIZES]
    path = tmp_path_factory.mktemp("api-images") / "img1.png"
    Image.fromarray(arrays[1]).save(path)
    return [Image.fromarray(arrays[0]), str(path), arrays[2], arrays[3][..., 0], Image.fromarray(arrays[4])]


def by_hand(model, processor, image, question, history=(), new=NEW, **generation):
    """The answer through the processor's own chat-template tokenization, one image (or a list), no batching."""
    messages, images = [], image if isinstance(image, list) else [image]
    for i, (q, a) in enumerate([*history, (question, None)]):
        messages.append({"role": "user", "content": ([{"type": "image", "image": im} for im in images] if i == 0
                                                     else []) + [{"type": "text", "text": q}]})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    tokens = model.generate(**inputs, max_new_tokens=new, **generation)
    return processor.batch_decode(tokens, skip_special_tokens=True)[0].strip()


@pytest.fixture(scope="session")
def captions(model, images):
    return model.caption(images, batch_size=5, max_new_tokens=NEW)


class Spy:
    """Delegates to a processor, recording rendered chat prompts and the texts it tokenizes."""

    def __init__(self, processor):
        self._p, self.rendered, self.texts = processor, [], []

    def __getattr__(self, name):
        return getattr(self._p, name)

    def apply_chat_template(self, *args, **kwargs):
        out = self._p.apply_chat_template(*args, **kwargs)
        self.rendered.append(out)
        return out

    def __call__(self, *args, text=None, **kwargs):
        self.texts.append(list(text))
        return self._p(*args, text=text, **kwargs)


def test_caption_matches_per_image_generate(model, processor, images, captions):
    assert isinstance(captions, list) and len(captions) == len(images)
    assert all(isinstance(c, str) for c in captions)
    expected = [by_hand(model, processor, image, DEFAULT_CAPTION_PROMPT) for image in images]
    assert captions == expected
    assert any(captions) and len(set(captions)) > 1, captions   # random weights, but not degenerate


def test_caption_batch_size_does_not_matter(model, images, captions):
    assert model.caption(images, batch_size=1, max_new_tokens=NEW) == captions
    # the processor loaded from the checkpoint is cached on the model
    assert model.get_processor() is model.get_processor()


def test_beam_search_captions_and_chat(model, processor, images, captions):
    """num_beams in caption and chat: each image's best beam, as generate gives it for that image alone
    (beam search itself is checked against HF in test_generate); streaming and several beams per
    image are refused with what to call instead."""
    beams = dict(num_beams=3, length_penalty=0.8)
    out = model.caption(images, batch_size=5, max_new_tokens=NEW, **beams)
    assert out == [by_hand(model, processor, image, DEFAULT_CAPTION_PROMPT, **beams) for image in images]
    assert out != captions   # the search found other captions than greedy decoding
    assert model.chat(images[1], "What is here?", max_new_tokens=NEW, **beams) == \
        by_hand(model, processor, images[1], "What is here?", **beams)
    with pytest.raises(ValueError, match="num_beams=3 needs generate"):
        next(model.chat_stream(images[0], "hi", num_beams=3))
    with pytest.raises(TypeError, match="num_return_sequences=R"):
        model.caption(images[:1], num_beams=3, num_return_sequences=2)


def test_caption_prompt_goes_through_chat_template(model, processor, images):
    spy = Spy(processor)
    out = model.caption(images[:2], prompt="What is there?", processor=spy, batch_size=2, max_new_tokens=NEW)
    assert spy.rendered == ["[INST] <image>\nWhat is there? [/INST]"]     # the demo's (Mistral release) template
    assert spy.texts == [["[INST] <image>\nWhat is there? [/INST]"] * 2]
    assert out == [by_hand(model, processor, image, "What is there?") for image in images[:2]]


def test_chat_equals_caption_for_the_same_question(model, images, captions):
    assert model.chat(images[0], DEFAULT_CAPTION_PROMPT, max_new_tokens=NEW) == captions[0]
    assert model.chat(images[3], DEFAULT_CAPTION_PROMPT, max_new_tokens=NEW) == captions[3]


@pytest.mark.parametrize("generation", [{}, {"do_sample": True, "temperature": 2.0, "seed": 2}])
def test_chat_stream_pieces_join_to_the_answer(model, images, generation):
    answer = model.chat(images[1], "What is here?", max_new_tokens=24, **generation)
    for chunk in (1, 5):
        pieces = list(model.chat_stream(images[1], "What is here?", max_new_tokens=24, chunk=chunk, **generation))
        assert len(pieces) > 1 and all(pieces), pieces
        assert "".join(pieces) == answer


def test_chat_about_several_images(model, processor, images):
    """A list of images: all in the first user turn, in order (the processor's own rendering of those
    messages); the order matters; streaming gives the same answer."""
    spy = Spy(processor)
    pair = [images[0], images[1]]
    answer = model.chat(pair, "Which is wider?", processor=spy, max_new_tokens=NEW)
    assert spy.rendered[-1] == "[INST] <image>\n<image>\nWhich is wider? [/INST]"
    assert answer == by_hand(model, processor, pair, "Which is wider?")
    assert model.chat(pair[::-1], "Which is wider?", max_new_tokens=NEW) == by_hand(model, processor, pair[::-1],
                                                                                   "Which is wider?")
    assert "".join(model.chat_stream(pair, "Which is wider?", max_new_tokens=NEW)) == answer
    with pytest.raises(ValueError, match="at least one image"):
        model.chat([], "hi")


def test_chat_history_adds_turns(model, processor, images):
    spy = Spy(processor)
    first = model.chat(images[0], "What is there?", processor=spy, max_new_tokens=NEW)
    second = model.chat(images[0], "And the color?", history=[("What is there?", first)], processor=spy,
                        max_new_tokens=NEW)
    expected = f"[INST] <image>\nWhat is there? [/INST] {first}</s> [INST] And the color? [/INST]"
    assert spy.rendered[-1] == expected
    assert spy.texts[-1] == [expected]
    assert second == by_hand(model, processor, images[0], "And the color?", [("What is there?", first)])


def test_errors(model, demo_dir, images, processor):
    bare = LlavaNext(model.config, model.params)
    with pytest.raises(ValueError, match="pass processor="):
        bare.caption(images[:1], max_new_tokens=NEW)
    with pytest.raises(ValueError, match="pass processor="):
        bare.chat(images[0], "hi", max_new_tokens=NEW)
    with pytest.raises(ValueError, match="need exactly 1 "):
        model.caption(images[:1], prompt="two <image> here", max_new_tokens=NEW)
    with pytest.raises(ValueError, match="batch_size"):
        model.caption(images[:1], batch_size=0)
    for call in (lambda: model.chat(images[0], "hi", return_logprobs=True),
                 lambda: next(model.chat_stream(images[0], "hi", return_logprobs=True)),
                 lambda: model.caption(images[:1], return_logprobs=True)):
        with pytest.raises(TypeError, match="return_logprobs=True"):
            call()
    with pytest.raises(TypeError, match="question, answer"):
        model.chat(images[0], "hi", history=["not a pair"])
    with pytest.raises(TypeError, match="uint8"):
        model.caption([np.zeros((4, 4, 3), np.float32)], max_new_tokens=NEW)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.caption([os.path.join(demo_dir, "no-such.png")], max_new_tokens=NEW)
    # an explicit processor makes a path-less model work
    assert bare.chat(images[3], DEFAULT_CAPTION_PROMPT, processor=processor, max_new_tokens=NEW) == \
        model.chat(images[3], DEFAULT_CAPTION_PROMPT, max_new_tokens=NEW)


def test_sampled_captions_do_not_depend_on_batching(model, images, captions):
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=1.5, seed=3)
    together = model.caption(images, batch_size=5, **kw)
    assert together != captions                               # it did sample
    assert model.caption(images, batch_size=1, **kw) == together
    # image i is seeded with seed + i
    assert model.chat(images[2], DEFAULT_CAPTION_PROMPT, **{**kw, "seed": 5}) == together[2]


def test_caption_accepts_one_image_and_an_array_batch(model, images, captions):
    assert model.caption(images[2], max_new_tokens=NEW) == [captions[2]]
    assert model.caption(np.stack([images[2]] * 2), batch_size=1, max_new_tokens=NEW) == [captions[2]] * 2
    import torch
    batch = np.stack([images[2], images[2]])
    for array in (torch.from_numpy(batch), jnp.asarray(batch)):   # a batch of another array library
        assert model.caption(array, batch_size=2, max_new_tokens=NEW) == [captions[2]] * 2, type(array)
    assert model.caption([], max_new_tokens=NEW) == []


def test_generation_config_num_return_sequences_gives_one_text_per_image(model, processor, images):
    """A generation config's num_return_sequences (sampled, or with its num_beams) does not multiply
    caption's, chat's or chat_stream's texts: one per image, the prompt's first sample (its sample of
    n = 1) or best beam, as a call that sets the rest of that config gives."""
    gen = {"eos_token_id": model.eos_token_ids, "pad_token_id": model.pad_token_id}
    kw = dict(max_new_tokens=NEW, processor=processor)
    for settings, call in (({"do_sample": True, "num_return_sequences": 2}, dict(do_sample=True)),
                           ({"num_beams": 3, "num_return_sequences": 2}, dict(num_beams=3))):
        configured = LlavaNext(model.config, model.params, {**gen, **settings})
        assert configured.caption(images[:3], batch_size=3, **kw) == model.caption(images[:3], batch_size=3, **kw,
                                                                                   **call), settings
        assert configured.chat(images[1], "What is here?", **kw) == model.chat(images[1], "What is here?", **kw,
                                                                               **call), settings
    sampled = LlavaNext(model.config, model.params, {**gen, "do_sample": True, "num_return_sequences": 2})
    assert "".join(sampled.chat_stream(images[1], "What is here?", **kw)) == \
        model.chat(images[1], "What is here?", **kw, do_sample=True)
