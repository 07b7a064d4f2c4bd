"""HF's `stop_strings` (`StopStringCriteria`): per-token tables built once per (tokenizer, stop strings)
in numpy, which `generate.stop_string_hits` checks in the compiled decode loop. Needs no jax.

A row stops after the token with which its text (prompt included, as HF checks it) ends in a stop
string: HF's test, which looks back from the last token. That token must begin with the end of a stop
string (an "end overlap" of e characters, e >= 1), and each token before it, going back, must end
where the part not yet matched ends (its "valid position": the characters matched so far), until e plus
their lengths reaches the string's length (a token may run past its start). Per token and stop string,
the tables hold those sets as bitmasks (value v at bit v - 1), so the check is a few integer operations
per token over the last MAX_STOP_STRING_LENGTH tokens.

Strings are matched as HF matches them: as text for most tokenizers, as UTF-8 bytes for byte-level
ones (GPT-2/Qwen/Llama 3) and those with byte-fallback tokens (`<0xNN>`, Llama/Mistral), a token's text
being what the tokenizer's decoder makes of it after a fixed prefix (HF's `clean_tokenizer_vocab`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np

MAX_STOP_STRINGS = 8
MAX_STOP_STRING_LENGTH = 32   # characters, or UTF-8 bytes where the tokenizer matches bytes (a uint32's bits)
_PREFIX = "abcdef"            # HF's static_prefix
_CACHE: OrderedDict = OrderedDict()   # (tokenizer, strings, rows) -> tables; the last 8, as HF keeps them


def backend(tokenizer):
    """The `tokenizers.Tokenizer` behind `tokenizer`: ours (`LlavaNextProcessor` or its `.tokenizer`),
    an HF fast tokenizer (its `backend_tokenizer`) or an HF processor holding one."""
    from tokenizers import Tokenizer
    for candidate in (tokenizer, getattr(tokenizer, "backend_tokenizer", None),
                      getattr(tokenizer, "tokenizer", None),
                      getattr(getattr(tokenizer, "tokenizer", None), "backend_tokenizer", None)):
        if isinstance(candidate, Tokenizer):
            return candidate
    raise TypeError(f"tokenizer must be a LlavaNextProcessor, a tokenizers.Tokenizer or an HF fast tokenizer "
                    f"(one with a backend_tokenizer); got {type(tokenizer).__name__}")


def matching_mode(tok) -> str | None:
    """HF's `_get_stop_string_matching_mode`: "byte_level" (a ByteLevel decoder), "byte_fallback" (a
    decoder with a ByteFallback step), else None (text)."""
    decoder = tok.decoder
    if decoder is None:
        return None
    if type(decoder).__name__ == "ByteLevel":
        return "byte_level"
    state = decoder.__getstate__()
    try:
        config = json.loads(state)
    except (TypeError, ValueError):
        return None

    def has(node, kind):
        if isinstance(node, dict):
            return node.get("type") == kind or any(has(v, kind) for v in node.values())
        return isinstance(node, list) and any(has(v, kind) for v in node)
    return "byte_fallback" if has(config, "ByteFallback") else "byte_level" if has(config, "ByteLevel") else None


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character standing for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


def token_texts(tok, mode: str | None) -> dict[int, str | bytes]:
    """HF's `clean_tokenizer_vocab`: each id's text as generation writes it (bytes where `mode` matches
    bytes): a byte-level token's bytes, a `<0xNN>` byte-fallback token's byte, else what the decoder
    makes of the token after the tokens of "abcdef", that prefix cut off."""
    decoder = _byte_decoder() if mode == "byte_level" else None
    base = [tok.id_to_token(i) for i in tok.encode(_PREFIX, add_special_tokens=False).ids]
    decode = tok.decoder.decode if tok.decoder is not None else " ".join
    texts = {}
    for token, index in tok.get_vocab(with_added_tokens=True).items():
        text = None
        if mode == "byte_level" and all(c in decoder for c in token):
            text = bytes(decoder[c] for c in token)
        elif (mode == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
              and all(c in "0123456789abcdefABCDEF" for c in token[3:5])):
            text = bytes([int(token[3:5], 16)])
        if text is None:
            text = decode(base + [token])
            text = text[text.index(_PREFIX) + len(_PREFIX):]
            text = text.encode() if mode is not None else text
        texts[index] = text
    return texts


def overlaps(token, stop) -> tuple[set[int], set[int]]:
    """HF's `_stop_string_get_matching_positions` for one token and stop string: (valid positions: the
    counts i in [1, len(stop)) of characters matched from the end after which the token ends where the
    rest of the string ends, or runs past its start; end overlaps: the e in [1, len(stop)] such that the
    token holds the string's last e characters, ending with its last character (the whole string
    anywhere in the token: e = len(stop)))."""
    L, reversed_stop, reversed_token = len(stop), stop[::-1], token[::-1]
    positions, i = set(), reversed_stop.find(reversed_token[:1], 1)   # where the token's last character is
    while 0 <= i < L:
        if reversed_token.startswith(reversed_stop[i:i + len(token)]):
            positions.add(i)
        i = reversed_stop.find(reversed_token[:1], i + 1)
    ends = set()
    for i in range(len(token)):
        e = min(i + 1, L)
        if token[i:i + 1] == stop[-1:] and token[i + 1 - e:i + 1] == stop[-e:]:
            ends.add(e)
    return positions, ends


def check_stop_strings(stop_strings) -> tuple[str, ...]:
    """`stop_strings` (a string or a list of them, as HF takes them) as a tuple; ValueError naming a
    bad value."""
    strings = (stop_strings,) if isinstance(stop_strings, str) else stop_strings
    if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s for s in strings):
        raise ValueError(f"stop_strings must be a non-empty string or a non-empty list of them; got {stop_strings!r}")
    if len(strings) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop_strings; got {len(strings)}")
    return tuple(strings)


def tables(tokenizer, stop_strings, rows: int) -> dict[str, np.ndarray]:
    """The stop-string options `generate.options` takes, for token ids [0, rows) (the model's
    vocabulary; the tokenizer's other ids never occur): per token and string, `stop_string_positions`
    and `stop_string_ends` (uint32 bitmasks, value v at bit v - 1), `stop_string_token_lengths` (its
    text's length, at most MAX_STOP_STRING_LENGTH: longer runs past any string all the same),
    `stop_string_lengths` (0: no string) and `stop_string_window` (the tokens HF looks back over: the
    longest string's length). Cached for the last 8 (tokenizer, strings, rows)."""
    strings = check_stop_strings(stop_strings)
    tok = backend(tokenizer)
    key = (id(tok), tok.get_vocab_size(with_added_tokens=True), strings, rows)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key][1]
    mode = matching_mode(tok)
    targets = [s.encode() if mode is not None else s for s in strings]
    for given, target in zip(strings, targets):
        if len(target) > MAX_STOP_STRING_LENGTH:
            raise ValueError(f"stop string {given!r} is {len(target)} {'bytes' if mode else 'characters'} long; "
                             f"at most {MAX_STOP_STRING_LENGTH}")
    out = no_stop_strings(rows)
    for index, text in token_texts(tok, mode).items():
        if index >= rows:
            continue
        out["stop_string_token_lengths"][index] = min(len(text), MAX_STOP_STRING_LENGTH)
        for s, target in enumerate(targets):
            positions, ends = overlaps(text, target)
            out["stop_string_positions"][index, s] = sum(1 << (v - 1) for v in positions)
            out["stop_string_ends"][index, s] = sum(1 << (v - 1) for v in ends)
    if not out["stop_string_ends"].any():   # HF raises too
        raise ValueError(f"no token of the tokenizer can end any of the stop_strings {list(strings)} (characters "
                         f"not in its vocabulary?)")
    out["stop_string_lengths"][:len(targets)] = [len(t) for t in targets]
    out["stop_string_window"] = np.int32(max(len(t) for t in targets))
    _CACHE[key] = (tok, out)   # the tokenizer held, so its id is not reused while the entry lives
    if len(_CACHE) > 8:
        _CACHE.popitem(last=False)
    return out


def no_stop_strings(rows: int) -> dict[str, Any]:
    """The stop-string options of no stop string (`tables`' shapes: they compile nothing new)."""
    return dict(stop_string_positions=np.zeros((rows, MAX_STOP_STRINGS), np.uint32),
                stop_string_ends=np.zeros((rows, MAX_STOP_STRINGS), np.uint32),
                stop_string_token_lengths=np.zeros(rows, np.uint8),
                stop_string_lengths=np.zeros(MAX_STOP_STRINGS, np.int32), stop_string_window=np.int32(0))
