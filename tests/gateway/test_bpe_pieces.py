"""Plain ASCII prompts encoded piece by piece give the Rust tokenizer's ids, or are left to it."""

from __future__ import annotations

import json
import random
import string

import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from gateway import bpe_pieces
from gateway.bpe_pieces import PieceEncoder

# Llama 3's pre-tokenizer: a regex Split, then ByteLevel without its own regex.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
WORDS = ["the", "The", "cat's", "isn't", "WE'LL", "yard", "42", "3.14", "x1", "--", "!?", "()"]


def ascii_texts(count: int, seed: int) -> list[str]:
    """Random plain ASCII: words, digits, punctuation, runs of spaces, tabs and line breaks."""
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \t\n\r"
    texts = []
    for _ in range(count):
        parts = [
            rng.choice(WORDS) if rng.random() < 0.6 else rng.choice(alphabet) for _ in range(40)
        ]
        separators = [" ", "  ", "\n", " \n\n", "\t", "\r\n", ""]
        texts.append("".join(part + rng.choice(separators) for part in parts))
    return texts


def with_pre_tokenizer(backend: Tokenizer, pre_tokenizer: dict[str, object]) -> Tokenizer:
    config = json.loads(backend.to_str())
    config["pre_tokenizer"] = pre_tokenizer
    return Tokenizer.from_str(json.dumps(config))


def assert_encodes_as_rust(backend: Tokenizer, texts: list[str]) -> None:
    encoder = PieceEncoder.for_tokenizer(backend)
    assert encoder is not None
    for text in texts:
        for add_special_tokens in (True, False):
            want = backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
            assert encoder.encode(text, add_special_tokens) == want, repr(text)


def test_plain_ascii_encodes_as_the_rust_tokenizer_does(tokenizer: PreTrainedTokenizerBase) -> None:
    assert_encodes_as_rust(tokenizer.backend_tokenizer, ascii_texts(300, seed=0))


def test_a_split_then_byte_level_pipeline_encodes_as_the_rust_tokenizer_does(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    llama3 = with_pre_tokenizer(
        tokenizer.backend_tokenizer,
        {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": LLAMA3_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": True,
                    "use_regex": False,
                },
            ],
        },
    )
    assert_encodes_as_rust(llama3, ascii_texts(300, seed=1))


@pytest.mark.parametrize(
    "text",
    ["ünïcödé", "emoji 😀", "a\x0bvertical tab", "unit\x1fseparator", "nul\x00", "del\x7f"],
)
def test_text_beyond_plain_ascii_is_left_to_the_rust_tokenizer(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> None:
    encoder = PieceEncoder.for_tokenizer(tokenizer.backend_tokenizer)
    assert encoder is not None
    assert encoder.encode(text, add_special_tokens=True) is None


def test_text_holding_an_added_token_is_left_to_the_rust_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    encoder = PieceEncoder.for_tokenizer(tokenizer.backend_tokenizer)
    assert encoder is not None
    assert encoder.encode(f"before {tokenizer.eos_token} after", add_special_tokens=True) is None


def test_a_pipeline_of_another_shape_gets_no_encoder(tokenizer: PreTrainedTokenizerBase) -> None:
    config = json.loads(tokenizer.backend_tokenizer.to_str())
    config["normalizer"] = {"type": "Lowercase"}
    assert PieceEncoder.for_tokenizer(Tokenizer.from_str(json.dumps(config))) is None
    prefixed = with_pre_tokenizer(
        tokenizer.backend_tokenizer,
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
    )
    assert PieceEncoder.for_tokenizer(prefixed) is None


def test_the_piece_cache_is_bounded(
    tokenizer: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bpe_pieces, "MAX_CACHED_PIECES", 16)
    encoder = PieceEncoder.for_tokenizer(tokenizer.backend_tokenizer)
    assert encoder is not None
    backend = tokenizer.backend_tokenizer
    for number in range(200):
        text = f"word{number} other{number}"
        want = backend.encode_batch_fast([text], add_special_tokens=True)[0].ids
        assert encoder.encode(text, add_special_tokens=True) == want
        assert len(encoder._cache) <= 16
