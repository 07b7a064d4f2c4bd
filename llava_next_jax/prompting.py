"""Image + question -> chat prompt, and generated tokens -> text: shared by `LlavaNext.caption`/`chat`
and the caption script (`caption.Captioner`). Needs no jax."""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_CAPTION_PROMPT = "Describe this image in one sentence."


def chat_messages(question: str, history: Sequence[tuple[str, str]] | None = None, images: int = 1) -> list[dict]:
    """HF-format messages: the `images` image blocks in the first user turn, then each (question, answer)
    of `history`, then `question`. Content is always a list of blocks (what the released chat templates
    expect)."""
    messages: list[dict] = []
    turns = [*(history or ()), (question, None)]
    for i, turn in enumerate(turns):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not isinstance(turn[0], str) or (
                i < len(turns) - 1 and not isinstance(turn[1], str)):
            raise TypeError(f"history must be a list of (question, answer) string pairs; item {i} is {turn!r}")
        q, a = turn
        content = ([{"type": "image"}] * images if i == 0 else []) + [{"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        if a is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return messages


def chat_prompt(processor, question: str, history: Sequence[tuple[str, str]] | None = None,
                images: int = 1) -> tuple[str, bool]:
    """(prompt, add_special_tokens) for `images` images and `question` through the processor's chat template.

    The prompt must hold exactly `images` image placeholders (ValueError otherwise, e.g. when the
    question itself contains `<image>`). add_special_tokens is False when the template already writes the BOS
    (as HF's `apply_chat_template(tokenize=True)` decides), so the tokenizer does not add a second.
    """
    if not isinstance(question, str):
        raise TypeError(f"the prompt/question must be a string; got {type(question).__name__}")
    prompt = processor.apply_chat_template(chat_messages(question, history, images), add_generation_prompt=True)
    count = prompt.count(processor.image_token)
    if count != images:
        raise ValueError(f"the chat template rendered {prompt!r}, with {count} {processor.image_token} "
                         f"placeholders; need exactly {images} (do not write {processor.image_token} in the prompt)")
    bos = processor.special_tokens.get("bos_token")
    return prompt, not (bos and prompt.startswith(bos))


def decode_new_tokens(processor, tokens: np.ndarray) -> list[str]:
    """Generated tokens `[B, N]` (pad after a stop id) -> B stripped strings, special tokens dropped."""
    return [text.strip() for text in processor.batch_decode(tokens, skip_special_tokens=True)]
