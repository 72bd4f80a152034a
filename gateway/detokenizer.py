"""Incremental detokenization: token ids in, text deltas out, never half a character.

Byte-level BPE splits one UTF-8 character over several tokens, and SentencePiece-style
tokenizers decode a token differently depending on what precedes it. So a delta is never
the decoding of the new token alone; it is the difference between two decodings of a short
window that ends at the newest token:

```
 token ids:  ... p0 p1 p2 | r0 r1 | n0        (p: context, r: decoded but not yet
             prefix_offset^  read_offset^        emitted, n: the new token)
 prefix_text = decode(ids[prefix_offset:read_offset])
 full_text   = decode(ids[prefix_offset:])
 delta       = full_text[len(prefix_text):]   unless full_text ends in U+FFFD
```

While the window's decoding ends in U+FFFD (an incomplete UTF-8 sequence), nothing is
emitted and the offsets stay put; the next token completes the character. Once a delta is
emitted the window slides: ``prefix_offset`` moves to the old ``read_offset`` and
``read_offset`` to the end. At the end of the sample, ``flush`` emits whatever is left,
so the concatenated deltas equal ``tokenizer.decode(all_ids, skip_special_tokens=True)``.
"""

from __future__ import annotations

from typing import Protocol

# How many prompt tokens seed the window so that the first generated token decodes in
# context (a leading space, a character continued from the prompt).
_PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The slice of a Hugging Face tokenizer that detokenization needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one sample's generated token ids into text deltas.

    ``prompt_ids`` only seeds the decoding context; no prompt text is ever emitted.
    """

    __slots__ = ("_decoder", "_ids", "_prefix_offset", "_prefix_text", "_read_offset")

    def __init__(self, decoder: Decoder, prompt_ids: list[int]) -> None:
        self._decoder = decoder
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # the window's decoded prefix, until it slides

    def prime(self) -> None:
        """Decodes the context the first token will be read against, ahead of it (the
        gateway calls this while the engine computes)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._prefix_offset, self._read_offset)

    def add(self, token_ids: list[int]) -> str:
        """Appends generated tokens; returns the text they complete (maybe empty)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Returns the text still held back (an unfinished character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._prefix_text
        if prefix_text is None:
            prefix_text = self._prefix_text = self._decode(self._prefix_offset, self._read_offset)
        full_text = self._decode(self._prefix_offset, len(self._ids))
        if len(full_text) <= len(prefix_text) and not final:
            # Special tokens skipped or a character still incomplete: nothing new yet.
            return ""
        if full_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = None
        return full_text[len(prefix_text) :]

    def _decode(self, start: int, end: int) -> str:
        return self._decoder.decode(self._ids[start:end], skip_special_tokens=True)
