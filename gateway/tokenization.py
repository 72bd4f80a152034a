"""The served model's tokenizer: chat templates, prompt encoding, per-token text.

Engines receive token ids only, so everything text-shaped about the model lives here. Long
inputs are encoded on one worker thread so that the event loop never waits on them. The
worker has a tokenizer of its own, loaded on that thread when first needed: a Hugging Face
tokenizer must not be used by two threads at once, and the event loop keeps using its own
for short inputs and for detokenization.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from gateway.bpe_pieces import PieceEncoder
from gateway.detokenizer import Decoder

# Inputs shorter than this many characters are encoded inline; it costs less than a hop.
_INLINE_ENCODE_CHARS = 2048
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TemplateError(ValueError):
    """The chat template rejected the messages (e.g. roles that do not alternate)."""


def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-printable-character map used by byte-level BPE."""
    byte_values = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    code_points = list(byte_values)
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + len(code_points) - 188)
    return {chr(code_point): byte for byte, code_point in zip(byte_values, code_points)}


class ModelTokenizer:
    """Wraps the model's Hugging Face tokenizer with what the gateway needs of it."""

    def __init__(self, model_path: str) -> None:
        self._model_path = model_path
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(model_path)
        self._worker_tokenizer: PreTrainedTokenizerBase | None = None  # worker thread only
        # The Rust tokenizer under the Hugging Face wrapper encodes prompts and rendered
        # chats for less than the wrapper; it is used only where it gives the wrapper's ids.
        self._direct = _direct_encoding_matches(self.tokenizer)
        # Plain ASCII text, piece by piece from a cache (gateway/bpe_pieces.py), where that
        # gives the Rust tokenizer's ids; the event loop's tokenizer only (not thread-safe).
        self._pieces = (
            PieceEncoder.for_tokenizer(self.tokenizer.backend_tokenizer) if self._direct else None
        )
        # Detokenization decodes twice per generated token: through the Rust tokenizer
        # directly where that gives the wrapper's text (a fifth of the wrapper's cost).
        self.decoder: Decoder = (
            self.tokenizer.backend_tokenizer
            if _direct_decoding_matches(self.tokenizer)
            else self.tokenizer
        )
        self.max_model_len = _max_model_len(Path(model_path), self.tokenizer)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._byte_decoder = _byte_level_decoder() if _is_byte_level(self.tokenizer) else None
        self._token_texts: dict[int, str] = {}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def encode_chat(
        self, messages: list[dict[str, Any]], chat_template_kwargs: dict[str, Any]
    ) -> list[int]:
        """Renders the chat template with the generation prompt appended, then tokenizes."""
        # Tool schemas and other template arguments are rendered too: count them.
        size = sum(len(str(message.get("content") or "")) for message in messages)
        if chat_template_kwargs:
            size += len(str(chat_template_kwargs))
        return await self._run(size, self._encode_chat_sync, messages, chat_template_kwargs)

    async def encode_prompt(self, prompt: str) -> list[int]:
        """Tokenizes a raw completion prompt, with the tokenizer's usual special tokens."""
        return await self._run(len(prompt), self._encode_prompt_sync, prompt)

    def chat_template_text(self) -> str:
        """The chat template's source (all named templates, when there are several)."""
        template = self.tokenizer.chat_template
        if isinstance(template, dict):
            return "\n".join(str(text) for text in template.values())
        return str(template or "")

    def added_vocabulary(self) -> set[str]:
        """The tokens added on top of the learned vocabulary (special and control tokens)."""
        return set(self.tokenizer.get_added_vocab())

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (byte-level BPE pieces may be half a character)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_decoder is not None and all(char in self._byte_decoder for char in piece):
            return bytes(self._byte_decoder[char] for char in piece)
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        return self.tokenizer.decode([token_id]).encode()

    def token_text(self, token_id: int) -> str:
        """A token as logprobs show it; partial UTF-8 is written as ``bytes:\\xNN...``."""
        text = self._token_texts.get(token_id)
        if text is None:
            raw = self.token_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw)
            self._token_texts[token_id] = text
        return text

    async def _run(self, size: int, fn: Any, *args: Any) -> list[int]:
        if size < _INLINE_ENCODE_CHARS:
            return fn(self.tokenizer, *args)  # type: ignore[no-any-return]
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._on_worker, fn, *args
        )

    def _on_worker(self, fn: Any, *args: Any) -> list[int]:
        if self._worker_tokenizer is None:
            self._worker_tokenizer = AutoTokenizer.from_pretrained(self._model_path)
        return fn(self._worker_tokenizer, *args)  # type: ignore[no-any-return]

    def _encode_chat_sync(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: list[dict[str, Any]],
        chat_template_kwargs: dict[str, Any],
    ) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **chat_template_kwargs
            )
        except Exception as exc:  # jinja raises its own types, and templates raise_exception()
            raise TemplateError(f"the chat template rejected the messages: {exc}") from exc
        # The rendered template already holds BOS and the like; do not add them twice.
        return self._encode_text(tokenizer, str(text), add_special_tokens=False)

    def _encode_prompt_sync(self, tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
        return self._encode_text(tokenizer, prompt, add_special_tokens=True)

    def _encode_text(
        self, tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool
    ) -> list[int]:
        if self._pieces is not None and tokenizer is self.tokenizer:
            ids = self._pieces.encode(text, add_special_tokens)
            if ids is not None:
                return ids
        if self._direct:
            return _encode_direct(tokenizer.backend_tokenizer, text, add_special_tokens)
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def _direct_encoding_matches(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the fast tokenizer's Rust core encodes text exactly as the wrapper does, with
    special tokens added (a prompt) and without (a rendered chat), special-token and added
    tokens' text kept whole; checked on a few samples and on a chat the template renders."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    added = " ".join(str(token) for token in tokenizer.get_added_vocab())
    specials = " ".join(str(token) for token in tokenizer.all_special_tokens)
    samples = ["Hello, world!", " leading space", "numbers 12345 and ünïcödé", specials, added]
    try:
        if tokenizer.chat_template is not None:
            chat = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}]
            samples.append(str(tokenizer.apply_chat_template(chat, tokenize=False)))
    except Exception:
        pass  # a template that needs more than this: the plain samples still decide
    try:
        return all(
            _encode_direct(backend, text, add_special_tokens)
            == list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
            for text in samples
            for add_special_tokens in (True, False)
        )
    except Exception:
        return False


def _encode_direct(backend: Any, text: str, add_special_tokens: bool) -> list[int]:
    """``text``'s ids from the Rust tokenizer; the batch call of one skips computing
    character offsets, which the gateway never reads."""
    return list(backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids)


def _direct_decoding_matches(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the fast tokenizer's Rust core decodes exactly as the wrapper does: the
    wrapper is the library's own (no model-specific ``decode``) and adds no clean-up of
    spaces, checked on a few samples (special tokens, split characters and the spacing
    that clean-up rewrites included)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(tokenizer, TokenizersBackend):
        return False
    if type(tokenizer).decode is not TokenizersBackend.decode:
        return False
    if type(tokenizer)._decode is not TokenizersBackend._decode:
        return False
    specials = " ".join(str(token) for token in tokenizer.all_special_tokens)
    samples = [
        "Hello, world!",
        " leading space",
        "numbers 12345 and ünïcödé 😀 你好",
        # What the wrapper's optional clean-up of spaces would rewrite.
        "it is . is it ? yes ! a , b don 't I 'm he 's we 've they 're",
        specials,
    ]
    try:
        for text in samples:
            ids = list(tokenizer.encode(text, add_special_tokens=True))
            windows = [ids, ids[1:], ids[:-1], ids[len(ids) // 2 :]]
            for window in windows:
                for skip in (True, False):
                    wrapped = tokenizer.decode(window, skip_special_tokens=skip)
                    if backend.decode(window, skip_special_tokens=skip) != wrapped:
                        return False
    except Exception:
        return False
    return True


def _is_byte_level(tokenizer: PreTrainedTokenizerBase) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [part.get("type") for part in decoder.get("decoders", [])]
    return "ByteLevel" in kinds


def _max_model_len(model_path: Path, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The context length from config.json, else the tokenizer's limit when it is real."""
    config_file = model_path / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            if isinstance(config.get(key), int):
                return int(config[key])
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and limit < 10_000_000 else None
