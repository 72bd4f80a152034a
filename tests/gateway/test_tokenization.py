"""Prompt encoding stays off the event loop when the input is large."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from gateway import tokenization
from gateway.tokenization import ModelTokenizer


def test_a_chat_with_large_tools_is_rendered_off_the_event_loop(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = ModelTokenizer(str(checkpoint))
    threads: list[str] = []
    render = tokenizer._encode_chat_sync

    def recording(*args: Any) -> list[int]:
        threads.append(threading.current_thread().name)
        return render(*args)

    monkeypatch.setattr(tokenizer, "_encode_chat_sync", recording)
    schema = {
        "type": "object",
        "properties": {f"field_{i}": {"type": "string"} for i in range(500)},
    }
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    try:
        asyncio.run(tokenizer.encode_chat([{"role": "user", "content": "hi"}], {"tools": tools}))
    finally:
        tokenizer.close()
    assert threads and threads[0] != threading.main_thread().name


def test_the_worker_thread_encodes_with_a_tokenizer_of_its_own(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = ModelTokenizer(str(checkpoint))
    used: list[Any] = []
    encode = tokenizer._encode_prompt_sync

    def recording(hf_tokenizer: Any, prompt: str) -> list[int]:
        used.append(hf_tokenizer)
        return encode(hf_tokenizer, prompt)

    monkeypatch.setattr(tokenizer, "_encode_prompt_sync", recording)
    try:
        asyncio.run(tokenizer.encode_prompt("yard " * 1000))
    finally:
        tokenizer.close()
    assert len(used) == 1 and used[0] is not tokenizer.tokenizer


def test_short_prompts_encode_as_the_wrapper_does(checkpoint: Path) -> None:
    tokenizer = ModelTokenizer(str(checkpoint))
    assert tokenizer._direct, "the test checkpoint's tokenizer takes the fast path"
    texts = ["Hello", "  two  spaces", "ünïcödé and 42", f"{tokenizer.tokenizer.eos_token} after"]
    try:
        for text in texts:
            wrapper = list(tokenizer.tokenizer.encode(text, add_special_tokens=True))
            assert asyncio.run(tokenizer.encode_prompt(text)) == wrapper
    finally:
        tokenizer.close()


def test_chats_encode_as_the_wrapper_encodes_the_rendered_template(checkpoint: Path) -> None:
    tokenizer = ModelTokenizer(str(checkpoint))
    hf = tokenizer.tokenizer
    chats = [
        [{"role": "user", "content": "Hello"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "ünïcödé, 42 and  two  spaces"},
            {"role": "assistant", "content": f"a {hf.eos_token} inside"},
            {"role": "user", "content": "again"},
        ],
    ]
    try:
        for chat in chats:
            rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            wrapper = list(hf.encode(rendered, add_special_tokens=False))
            assert asyncio.run(tokenizer.encode_chat(chat, {})) == wrapper
    finally:
        tokenizer.close()


def test_plain_ascii_prompts_are_encoded_piece_by_piece(
    checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = ModelTokenizer(str(checkpoint))
    rust_calls: list[str] = []
    encode_direct = tokenization._encode_direct

    def recording(backend: Any, text: str, add_special_tokens: bool) -> list[int]:
        rust_calls.append(text)
        return encode_direct(backend, text, add_special_tokens)

    monkeypatch.setattr(tokenization, "_encode_direct", recording)
    try:
        for text in ["signal track yard", "ünïcödé yard"]:
            wrapper = list(tokenizer.tokenizer.encode(text, add_special_tokens=True))
            assert asyncio.run(tokenizer.encode_prompt(text)) == wrapper
    finally:
        tokenizer.close()
    assert rust_calls == ["ünïcödé yard"]  # the ASCII prompt never reached the Rust tokenizer
