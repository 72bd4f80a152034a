"""Encoding plain ASCII prompts for byte-level BPE tokenizers, a piece at a time from a cache.

A byte-level BPE tokenizer (GPT-2, Llama 3, Qwen and the like) splits text with one regular
expression into pieces (a word with its leading space, a run of digits, of punctuation, of
whitespace), maps each piece's bytes to printable characters and runs BPE on each piece
alone, so a piece's ids never depend on its neighbours. Prompts repeat the same pieces (the
words of a language) over and over, yet the Rust tokenizer pays its pre-tokenizer on every
call: on a 2-core host, ~0.42 ms of a 64-word prompt's ~0.45 ms cold (``docs/gateway.md``,
"What each request costs"). :class:`PieceEncoder` splits with Python's ``regex`` instead (a
quarter of the cost) and looks each piece's ids up in a bounded cache that the tokenizer's
own BPE model fills on a miss, then adds the post-processor's special tokens:

    "The cat sat.\\n" ─ regex split ─▶ "The" " cat" " sat" "." "\\n"
      ─▶ [bos] + ids("The") + ids(" cat") + ...   (each from the cache, else model.tokenize)

Only where this is exactly the Rust tokenizer's answer: text of printable ASCII, tab, line
feed and carriage return (where the two regex engines agree on letters, digits and
whitespace), none of the tokenizer's added or special tokens in it (those the Rust side
splits out first), no normalizer, no BPE dropout, and a pre-tokenizer of the two usual
shapes (``ByteLevel`` with its regex, or a regex ``Split`` then ``ByteLevel`` without one),
checked at load on samples that exercise every branch of those patterns. Anything else is
``None``: the caller encodes it with the Rust tokenizer as before.

Not thread-safe (the cache and the BPE model's use): one encoder per tokenizer, used by the
thread that owns that tokenizer.
"""

from __future__ import annotations

import json
import re
from typing import Any

import regex

# GPT-2's pattern, which tokenizers' ByteLevel pre-tokenizer applies when use_regex is on.
_BYTE_LEVEL_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# What the fast path takes: printable ASCII, tab, line feed, carriage return.
_OUTSIDE_PLAIN_ASCII = regex.compile(r"[^\t\n\r\x20-\x7e]")
# Pieces remembered at most (a word each, a few hundred bytes with its ids), and the longest
# piece remembered: long runs of spaces or symbols are rare and would only fill the cache.
MAX_CACHED_PIECES = 65_536
_MAX_CACHED_PIECE_CHARS = 32
# Text the load-time check encodes both ways: every alternative of both patterns (letters,
# digits in runs of 1-5, punctuation with and without a space, contractions in both cases,
# spaces, tabs and line breaks before words and at the end).
_SAMPLES = [
    "Hello, world! The cat's toy isn't here; they'll see we've I'm you'd they're.",
    "IT'S SHOUTED: YOU'LL SEE WE'VE THEY'RE I'D I'M DON'T",
    "numbers 1 12 123 1234 12345 3.14159 -42 +7 1e10 0x1F and a1b2c3",
    "  two  spaces,   three   and trailing   ",
    "tabs\tand\t\ttwo\nnew\n\nlines\r\nwindows\r\n  indented\n\tcode();\n",
    "symbols !@#$%^&*()_+-=[]{}|;:'\",.<>/?`~ and ... --- === mixed--in",
    " leading space",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "'s 't 're 've 'm 'll 'd 'x ' quote 'tis",
    "a",
    "",
]


class PieceEncoder:
    """Encodes plain ASCII text as ``backend`` (a ``tokenizers.Tokenizer``) does, or answers
    None where it cannot vouch for that; build one with :meth:`for_tokenizer`."""

    def __init__(
        self,
        backend: Any,
        pattern: str,
        byte_chars: dict[int, str],
        specials: tuple[list[int], list[int]],
        added: list[str],
    ) -> None:
        self._model = backend.model
        self._pattern = regex.compile(pattern)
        self._byte_chars = str.maketrans({chr(b): c for b, c in byte_chars.items() if b < 128})
        self._prefix, self._suffix = specials
        # One search for all of them (Llama 3 has 256): re matches an alternation of
        # literals sharing a prefix in well under a microsecond.
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def for_tokenizer(cls, backend: Any) -> PieceEncoder | None:
        """An encoder for ``backend`` if its pipeline is one this class reproduces exactly
        (and does, on the samples); else None."""
        try:
            config = json.loads(backend.to_str())
            pattern = _split_pattern(config)
            if pattern is None:
                return None
            bare = backend.encode_batch_fast(["a"], add_special_tokens=False)[0].ids
            full = backend.encode_batch_fast(["a"], add_special_tokens=True)[0].ids
            at = _find(full, bare)
            if at is None:
                return None
            specials = (list(full[:at]), list(full[at + len(bare) :]))
            added = [token["content"] for token in config.get("added_tokens") or []]
            encoder = cls(backend, pattern, _bytes_to_unicode(), specials, added)
            for text in _SAMPLES:
                for add_special_tokens in (True, False):
                    want = backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)
                    if encoder.encode(text, add_special_tokens) != want[0].ids:
                        return None
            encoder._cache.clear()  # the samples' pieces are not the traffic's
            return encoder
        except Exception:
            return None

    def encode(self, text: str, add_special_tokens: bool) -> list[int] | None:
        """``text``'s ids, or None when ``text`` is not plain ASCII or holds an added token."""
        if _OUTSIDE_PLAIN_ASCII.search(text) is not None:
            return None
        if self._added is not None and self._added.search(text) is not None:
            return None
        pieces = self._pattern.findall(text)
        if sum(map(len, pieces)) != len(text):
            return None  # a pattern that leaves gaps: the Rust side would keep them as pieces
        ids = list(self._prefix) if add_special_tokens else []
        cache = self._cache
        for piece in pieces:
            piece_ids = cache.get(piece)
            if piece_ids is None:
                chars = piece.translate(self._byte_chars)
                piece_ids = [token.id for token in self._model.tokenize(chars)]
                if len(piece) <= _MAX_CACHED_PIECE_CHARS:
                    if len(cache) >= MAX_CACHED_PIECES:
                        cache.clear()
                    cache[piece] = piece_ids
            ids += piece_ids
        if add_special_tokens:
            ids += self._suffix
        return ids


def _split_pattern(config: dict[str, Any]) -> str | None:
    """The pre-tokenizer's splitting regex if the pipeline is one of the two shapes this
    module reproduces (no normalizer, a BPE model without dropout); else None."""
    if config.get("normalizer") is not None:
        return None
    model = config.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") not in (None, 0, 0.0):
        return None
    pre = config.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel":
        if pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
            return _BYTE_LEVEL_PATTERN
        return None
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers") or []) != 2:
        return None
    split, byte_level = pre["pretokenizers"]
    if (
        split.get("type") == "Split"
        and "Regex" in (split.get("pattern") or {})
        and split.get("behavior") == "Isolated"
        and not split.get("invert", False)
        and byte_level.get("type") == "ByteLevel"
        and not byte_level.get("use_regex", True)
        and not byte_level.get("add_prefix_space", False)
    ):
        return str(split["pattern"]["Regex"])
    return None


def _find(haystack: list[int], needle: list[int]) -> int | None:
    for start in range(len(haystack) - len(needle) + 1):
        if haystack[start : start + len(needle)] == needle:
            return start
    return None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE writes for it."""
    byte_values = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(byte_values)
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(byte_values, chars)}
